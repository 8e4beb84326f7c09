//! The registry's domain rules as plain functions over plain values: no
//! database, no clock (every instant is an argument), so each rule is tested
//! here and every backend obeys the same ones.

use std::collections::BTreeSet;

use edgebind_protocol::messages::{
    Command, CommandResult, CommandStatus, Desired, Presence, Status, UnixSeconds,
};
use edgebind_protocol::{CommandId, DeviceId, UnitSerial};
use serde_json::{Map, Value};

use serde::Serialize;

use super::{
    ClaimSerial, CommandRecord, CommandState, ConnectPolicy, Delivery, Device, DeviceState,
    Lifecycle, LoginCode, ManufacturingRecord, NewCommand, NewDevice, OnConnectRule,
    PresenceChange, RegistryError, Result, SERVICE_HEARTBEAT_S, ServicePresence,
    validate_setting_key,
};

/// Whether a console login code may be exchanged at `now`: it must exist,
/// be unused and not expired. Gives the operator it was issued to.
pub fn check_login_code(code: Option<&LoginCode>, now: UnixSeconds) -> Result<String> {
    let refused = |why| Err(RegistryError::LoginRefused { why });
    match code {
        None => refused("unknown code"),
        Some(c) if c.used_at.is_some() => refused("the code was already used"),
        Some(c) if now >= c.expires_at => refused("the code has expired"),
        Some(c) => Ok(c.operator.clone()),
    }
}

/// What a device may be asked to do: anything, unless it is revoked.
pub fn ensure_active(device: &Device) -> Result<()> {
    if device.lifecycle == Lifecycle::Revoked {
        return Err(RegistryError::Revoked(device.id.clone()));
    }
    Ok(())
}

/// A batch of new devices is added whole or not at all: no id twice, none
/// already registered.
pub fn check_new_devices(batch: &[NewDevice], registered: &[DeviceId]) -> Result<()> {
    if let Some(id) = registered.first() {
        return Err(RegistryError::DuplicateDevice(id.clone()));
    }
    let mut seen = BTreeSet::new();
    for d in batch {
        if !seen.insert(&d.id) {
            return Err(RegistryError::DuplicateDevice(d.id.clone()));
        }
    }
    Ok(())
}

/// A unit is manufactured once: its serial has no record yet and its device
/// id is free. A revoked id is refused as revoked (it is never issued again).
pub fn check_new_unit(
    record: &ManufacturingRecord,
    existing_record: Option<&ManufacturingRecord>,
    existing_device: Option<&Device>,
) -> Result<()> {
    if let Some(r) = existing_record {
        return Err(RegistryError::DuplicateUnit {
            serial: record.serial.clone(),
            device: r.device.clone(),
        });
    }
    match existing_device {
        Some(d) if d.lifecycle == Lifecycle::Revoked => Err(RegistryError::Revoked(d.id.clone())),
        Some(d) => Err(RegistryError::DuplicateDevice(d.id.clone())),
        None => Ok(()),
    }
}

/// A unit of a batch is provisioned once: its serial is on that batch's
/// allow-list, not provisioned yet, and the id it asked for is free (a
/// revoked id is never issued again).
pub fn check_provision(
    batch: &DeviceId,
    serial: &UnitSerial,
    entry: Option<&ClaimSerial>,
    existing_device: Option<&Device>,
) -> Result<()> {
    let Some(entry) = entry else {
        return Err(RegistryError::NotAllowed {
            batch: batch.clone(),
            serial: serial.clone(),
        });
    };
    if &entry.batch != batch {
        return Err(RegistryError::OtherBatch {
            batch: batch.clone(),
            serial: serial.clone(),
            other: entry.batch.clone(),
        });
    }
    if let Some(p) = &entry.provisioned {
        return Err(RegistryError::AlreadyProvisioned {
            serial: serial.clone(),
            device: p.device.clone(),
        });
    }
    match existing_device {
        Some(d) if d.lifecycle == Lifecycle::Revoked => Err(RegistryError::Revoked(d.id.clone())),
        Some(d) => Err(RegistryError::DuplicateDevice(d.id.clone())),
        None => Ok(()),
    }
}

/// How close to its expiry a device certificate may be when its unit
/// re-provisions: five minutes covers a device clock somewhat ahead of the
/// fleet's, and is too short for a leaked batch key to be worth much (a
/// device that was online renewed at two thirds of its life, long before).
pub const REPROVISION_SKEW_S: u64 = 300;

/// Re-provisioning through the claim identity: may the provisioned `serial`
/// of `batch`, asking with a new key for `requested`, be issued a new
/// certificate at `now`? Only when
/// - the serial is on `batch`'s allow-list and was provisioned as
///   `requested` (a serial's id never changes, and never moves to another
///   serial: the allow-list entry binds them);
/// - the device is registered and not revoked;
/// - its current certificate (the registry's) has expired, or expires
///   within [`REPROVISION_SKEW_S`]. A device whose certificate is still
///   valid renews over its own connection; letting the batch key replace
///   it would let anyone holding that key take a live device's id.
///
/// (The batch's claim certificate being usable is the PKI's question, asked
/// by the caller first.)
pub fn check_reprovision(
    batch: &DeviceId,
    serial: &UnitSerial,
    entry: Option<&ClaimSerial>,
    device: Option<&Device>,
    requested: &DeviceId,
    now: UnixSeconds,
) -> Result<()> {
    let Some(entry) = entry else {
        return Err(RegistryError::NotAllowed {
            batch: batch.clone(),
            serial: serial.clone(),
        });
    };
    if &entry.batch != batch {
        return Err(RegistryError::OtherBatch {
            batch: batch.clone(),
            serial: serial.clone(),
            other: entry.batch.clone(),
        });
    }
    let refuse = |device: &DeviceId, why: String| {
        Err(RegistryError::NoReprovision {
            serial: serial.clone(),
            device: device.clone(),
            why,
        })
    };
    let Some(done) = &entry.provisioned else {
        return refuse(
            requested,
            "it was never provisioned (first boot asks, not re-provisioning)".into(),
        );
    };
    if &done.device != requested {
        return refuse(
            &done.device,
            format!(
                "the request asks for {requested}; this serial is device {} for good",
                done.device
            ),
        );
    }
    let Some(device) = device else {
        return Err(RegistryError::UnknownDevice(done.device.clone()));
    };
    if device.lifecycle == Lifecycle::Revoked {
        return Err(RegistryError::Revoked(device.id.clone()));
    }
    if let Some(cert) = &device.cert
        && cert.not_after > now.saturating_add(REPROVISION_SKEW_S)
    {
        return refuse(
            &device.id,
            format!(
                "its certificate {} is valid for {} s more; a device with a valid certificate renews over its own connection",
                cert.serial,
                cert.not_after - now
            ),
        );
    }
    Ok(())
}

/// A unit made again keeps its device: the serial is recorded for that
/// device, and the device is not revoked.
pub fn check_reissue(
    record: &ManufacturingRecord,
    existing_record: Option<&ManufacturingRecord>,
    device: &Device,
) -> Result<()> {
    let Some(existing) = existing_record else {
        return Err(RegistryError::UnknownUnit(record.serial.clone()));
    };
    if existing.device != record.device {
        return Err(RegistryError::ManufacturingConflict {
            serial: record.serial.clone(),
            why: format!(
                "recorded as device {}, not {}",
                existing.device, record.device
            ),
        });
    }
    ensure_active(device)
}

/// What an import does with one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportStep {
    /// Register the device and add the record.
    DeviceAndRecord,
    /// The device is registered with this certificate: add the record.
    RecordOnly,
    /// Already recorded, identically.
    Nothing,
}

/// Whether a unit exported from a station merges into this registry, and how.
/// Identical is a no-op (imports are idempotent); anything that disagrees
/// with what is here is a conflict naming the unit.
pub fn import_step(
    new: &NewDevice,
    record: &ManufacturingRecord,
    existing_record: Option<&ManufacturingRecord>,
    existing_device: Option<&Device>,
    record_of_device: Option<&ManufacturingRecord>,
) -> Result<ImportStep> {
    let conflict = |why: String| RegistryError::ManufacturingConflict {
        serial: record.serial.clone(),
        why,
    };
    let cert_serial = new.cert.as_ref().map(|c| c.serial.as_str());
    if new.id != record.device || cert_serial != Some(record.cert_serial.as_str()) {
        return Err(conflict(format!(
            "the export is inconsistent: its record names device {} certificate {}, its device is {} with certificate {}",
            record.device,
            record.cert_serial,
            new.id,
            cert_serial.unwrap_or("(none)")
        )));
    }
    if let Some(r) = existing_record {
        if r.device != record.device {
            return Err(conflict(format!(
                "recorded here as device {}, the import says {}",
                r.device, record.device
            )));
        }
        if r.cert_serial != record.cert_serial
            || r.cert_fingerprint_sha256 != record.cert_fingerprint_sha256
        {
            return Err(conflict(format!(
                "recorded here with certificate {}, the import has {} (reissued at one of the two?)",
                r.cert_serial, record.cert_serial
            )));
        }
        return Ok(ImportStep::Nothing);
    }
    if let Some(other) = record_of_device {
        return Err(conflict(format!(
            "device {} is already recorded here for unit serial {:?}",
            record.device, other.serial
        )));
    }
    match existing_device {
        None => Ok(ImportStep::DeviceAndRecord),
        Some(d) => {
            let here = d.cert.as_ref().map(|c| c.serial.as_str());
            if here == Some(record.cert_serial.as_str()) {
                Ok(ImportStep::RecordOnly)
            } else {
                Err(conflict(format!(
                    "device {} is already registered here with certificate {}, the import has {}",
                    d.id,
                    here.unwrap_or("(none)"),
                    record.cert_serial
                )))
            }
        }
    }
}

/// The state of a device that has just been revoked at `now`.
pub fn revoke(device: &Device, now: UnixSeconds) -> Result<DeviceState> {
    ensure_active(device)?;
    Ok(DeviceState {
        lifecycle: Lifecycle::Revoked,
        revoked_at: Some(now),
        online: false,
        ..device.state()
    })
}

/// A queued command of a revoked device: it can never be delivered.
pub fn reject_for_revocation(command: &CommandRecord, now: UnixSeconds) -> Option<CommandRecord> {
    (command.state == CommandState::Queued).then(|| CommandRecord {
        state: CommandState::Rejected,
        finished_at: Some(now),
        reason: Some("device revoked".into()),
        ..command.clone()
    })
}

/// Merge `changes` into the device's desired settings (`null` removes a
/// key); every change is a new revision.
pub fn merge_desired(device: &Device, changes: &Map<String, Value>) -> Result<Desired> {
    for key in changes.keys() {
        validate_setting_key(key)?;
    }
    ensure_active(device)?;
    let mut settings = device.desired.clone();
    for (k, v) in changes {
        if v.is_null() {
            settings.remove(k);
        } else {
            settings.insert(k.clone(), v.clone());
        }
    }
    Ok(Desired {
        revision: device.desired_revision + 1,
        settings,
    })
}

/// Publishing an older revision late never lowers what is known to be published.
pub fn published_revision(device: &Device, revision: u64) -> u64 {
    device.desired_published_revision.max(revision)
}

/// The log entry of a command recorded at `now`: queued ones wait for the
/// fleet service, every other kind is on its way already.
pub fn new_command(command: &NewCommand, now: UnixSeconds) -> CommandRecord {
    // Everything but an operator's `now` is published by the fleet service's
    // outbox, which claims it first: queued until then.
    let queued = command.delivery != Delivery::Now;
    CommandRecord {
        id: command.id.clone(),
        device: command.device.clone(),
        action: Some(command.action.as_str().to_owned()),
        args: command.args.clone(),
        delivery: command.delivery,
        state: if queued {
            CommandState::Queued
        } else {
            CommandState::Sent
        },
        requested_by: command.requested_by.clone(),
        rule_id: command.rule_id,
        created_at: now,
        sent_at: (!queued).then_some(now),
        accepted_at: None,
        finished_at: None,
        expires_at: command.expires_at,
        reason: None,
        output: None,
    }
}

/// What names one connection of a device: its `online` status's time, boot
/// and session, all set by the device, so the same message always gives the
/// same name and two connections never do.
pub fn connection_name(status: &Status, connected_at: UnixSeconds) -> String {
    format!(
        "{connected_at}/{}/{}",
        status.boot_id.as_deref().unwrap_or(""),
        status.session.as_deref().unwrap_or("")
    )
}

/// The commands a new connection of `device` (named by [`connection_name`],
/// at `connected_at`) queues: one per on-connect rule, and the inventory
/// request. Their ids are derived from the connection, so the same `online`
/// message applied twice (redelivered after a crash, or seen by two service
/// instances) names the same commands, which exist once.
pub fn on_connect_commands(
    device: &DeviceId,
    connected_at: UnixSeconds,
    connection: &str,
    rules: &[OnConnectRule],
    policy: &ConnectPolicy,
) -> Vec<NewCommand> {
    let mut out: Vec<NewCommand> = rules
        .iter()
        .map(|rule| NewCommand {
            id: connection_command_id("oc", device, connected_at, connection, &rule.id.to_string()),
            device: device.clone(),
            action: rule.action.clone(),
            args: rule.args.clone(),
            delivery: Delivery::OnConnect,
            requested_by: policy.requested_by.clone(),
            expires_at: None,
            rule_id: Some(rule.id),
        })
        .collect();
    if policy.inventory {
        out.push(NewCommand {
            id: connection_command_id("inv", device, connected_at, connection, "inventory"),
            device: device.clone(),
            action: edgebind_protocol::actions::INVENTORY,
            args: Map::new(),
            delivery: Delivery::Auto,
            requested_by: policy.requested_by.clone(),
            expires_at: None,
            rule_id: None,
        });
    }
    out
}

/// `PREFIX-CONNECTEDAT-HASH`: time-ordered like operator command ids, and
/// unique per (device, connection, purpose) with 64 bits of SHA-256.
fn connection_command_id(
    prefix: &str,
    device: &DeviceId,
    connected_at: UnixSeconds,
    connection: &str,
    purpose: &str,
) -> CommandId {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [device.as_str(), connection, purpose] {
        h.update(part.as_bytes());
        h.update(&[0]);
    }
    let digest = h.finish();
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    CommandId::new(format!("{prefix}-{connected_at}-{hex}"))
        .expect("prefix, digits and hex are a valid command id")
}

/// What makes a telemetry sample or event the same message again: 16 bytes
/// of SHA-256 over its content, stored with its device and timestamp under a
/// unique index, so a redelivered message is not stored twice.
/// Whether a batch that brought a device's count of samples received to
/// `total` (`added` of them in this batch) should trim its history back to
/// `keep`. Trimming walks `keep` index entries, so it is done once the
/// history has grown a tenth of `keep` past it, not on every batch: at most
/// `keep + keep / 10` samples are stored, and never fewer than `keep` (or
/// all received) are kept. A device that has sent no more than `keep` has
/// nothing to trim.
pub fn telemetry_trim_due(total: u64, added: u64, keep: u32) -> bool {
    let keep = u64::from(keep);
    if total <= keep {
        return false;
    }
    let slack = (keep / 10).max(1);
    // Past `keep`, the batch crossed a multiple of `slack`.
    let before = total.saturating_sub(added).saturating_sub(keep);
    let after = total - keep;
    before / slack != after / slack || before == 0
}

pub fn content_digest(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finish().as_ref()[..16]);
    out
}

/// Handing a command to the broker: only a queued one moves, so a command
/// is never sent twice by the service.
pub fn mark_sent(command: &CommandRecord, at: UnixSeconds) -> Option<CommandRecord> {
    (command.state == CommandState::Queued).then(|| CommandRecord {
        state: CommandState::Sent,
        sent_at: Some(at),
        ..command.clone()
    })
}

/// Presence after a status message received at `received_at`, and whether
/// it began a new connection.
/// The connection change a status made, if any: a new connection, or the
/// end of one (a replayed retained `online` or a second last will is none).
pub fn presence_change(
    before: &DeviceState,
    after: &DeviceState,
    new_connection: bool,
    received_at: UnixSeconds,
) -> Option<PresenceChange> {
    if new_connection && after.online {
        Some(PresenceChange {
            at: after.connected_at.unwrap_or(received_at),
            online: true,
        })
    } else if before.online && !after.online {
        Some(PresenceChange {
            at: received_at,
            online: false,
        })
    } else {
        None
    }
}

pub fn on_status(
    state: &DeviceState,
    status: &Status,
    received_at: UnixSeconds,
) -> (DeviceState, bool) {
    match status.state {
        Presence::Online => {
            let connected_at = status.ts.unwrap_or(received_at);
            // A retained `online` replayed after a service restart carries
            // the same ts: not a new connection.
            let new_connection =
                !state.online || status.ts.is_none() || state.connected_at != Some(connected_at);
            let lifecycle = match state.lifecycle {
                Lifecycle::Registered => Lifecycle::Provisioned,
                other => other,
            };
            let next = DeviceState {
                lifecycle,
                provisioned_at: state.provisioned_at.or(Some(received_at)),
                online: true,
                connected_at: Some(connected_at),
                agent_version: status
                    .agent_version
                    .clone()
                    .or_else(|| state.agent_version.clone()),
                boot_id: status.boot_id.clone().or_else(|| state.boot_id.clone()),
                addresses: status.addresses.clone(),
                ..heard_from(state, received_at)
            };
            (next, new_connection)
        }
        // An offline will says nothing about when the device was last heard
        // from, so last_seen stays.
        Presence::Offline => (
            DeviceState {
                online: false,
                ..state.clone()
            },
            false,
        ),
    }
}

/// Any message from the device itself (not its will) means it was there.
pub fn heard_from(state: &DeviceState, at: UnixSeconds) -> DeviceState {
    DeviceState {
        last_seen: Some(state.last_seen.map_or(at, |l| l.max(at))),
        ..state.clone()
    }
}

/// A command seen on its way to `device`, published by anyone: enters the
/// log if it is not there; a log entry made from a result alone learns its
/// action. `None`: nothing to store.
pub fn command_seen(
    existing: Option<&CommandRecord>,
    device: &DeviceId,
    command: &Command,
    received_at: UnixSeconds,
) -> Option<CommandRecord> {
    match existing {
        Some(c) if c.action.is_none() => Some(CommandRecord {
            action: Some(command.action.as_str().to_owned()),
            args: command.args.clone(),
            ..c.clone()
        }),
        Some(_) => None,
        None => Some(CommandRecord {
            id: command.id.clone(),
            device: device.clone(),
            action: Some(command.action.as_str().to_owned()),
            args: command.args.clone(),
            delivery: Delivery::Now,
            state: CommandState::Sent,
            requested_by: None,
            rule_id: None,
            created_at: received_at,
            sent_at: Some(received_at),
            accepted_at: None,
            finished_at: None,
            expires_at: command.expires_at,
            reason: None,
            output: None,
        }),
    }
}

/// What a result from the device changes.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultEffect {
    /// The command entry to store (`None`: unchanged).
    pub command: Option<CommandRecord>,
    /// The entry did not exist: insert rather than update.
    pub new_entry: bool,
    /// A succeeded result that carries the device's facts (`facts: true`,
    /// e.g. the answer to `inventory`) becomes the device's inventory,
    /// whichever action sent it.
    pub inventory: Option<Value>,
}

/// A result received at `at`. A final state is never overwritten (a
/// duplicate delivery, a late `accepted`), a result never moves another
/// device's command, and a result for a command never seen (the service was
/// down when it was sent) still gets a log entry.
pub fn command_result(
    existing: Option<&CommandRecord>,
    device: &DeviceId,
    result: &CommandResult,
    at: UnixSeconds,
) -> ResultEffect {
    let new_entry = existing.is_none();
    let base = match existing {
        Some(c) if &c.device != device => {
            return ResultEffect {
                command: None,
                new_entry: false,
                inventory: None,
            };
        }
        Some(c) => c.clone(),
        None => orphan_entry(&result.id, device, at),
    };
    let moved = match result.status {
        CommandStatus::Accepted => matches!(base.state, CommandState::Queued | CommandState::Sent)
            .then(|| CommandRecord {
                state: CommandState::Accepted,
                accepted_at: Some(at),
                ..base.clone()
            }),
        final_status => (!base.state.is_final()).then(|| CommandRecord {
            state: final_state(final_status),
            finished_at: Some(at),
            reason: result.reason.clone(),
            output: result.output.clone(),
            ..base.clone()
        }),
    };
    let inventory = match &moved {
        Some(c) if c.state == CommandState::Succeeded && result.facts => c.output.clone(),
        _ => None,
    };
    ResultEffect {
        command: moved.or(new_entry.then_some(base)),
        new_entry,
        inventory,
    }
}

fn orphan_entry(id: &CommandId, device: &DeviceId, at: UnixSeconds) -> CommandRecord {
    CommandRecord {
        id: id.clone(),
        device: device.clone(),
        action: None,
        args: Map::new(),
        delivery: Delivery::Now,
        state: CommandState::Sent,
        requested_by: None,
        rule_id: None,
        created_at: at,
        sent_at: None,
        accepted_at: None,
        finished_at: None,
        expires_at: None,
        reason: None,
        output: None,
    }
}

fn final_state(status: CommandStatus) -> CommandState {
    match status {
        CommandStatus::Accepted => CommandState::Accepted,
        CommandStatus::Succeeded => CommandState::Succeeded,
        // The registry keeps one failed state; the reason says it timed out.
        CommandStatus::Failed | CommandStatus::TimedOut => CommandState::Failed,
        CommandStatus::Rejected => CommandState::Rejected,
    }
}

#[cfg(test)]
mod tests;

/// Whether the presence the registry shows can be trusted, from what the
/// fleet services recorded (see [`ServicePresence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PresenceView {
    /// A service is connected and its heartbeat is recent.
    pub fresh: bool,
    /// When presence was last kept up to date (None: never, no service ran).
    pub as_of: Option<UnixSeconds>,
}

/// A heartbeat older than three beats means the service is gone (killed,
/// hung, cut off) even though its last record says connected.
pub fn presence_view(services: &[ServicePresence], now: UnixSeconds) -> PresenceView {
    let stale_after = 3 * SERVICE_HEARTBEAT_S;
    let fresh = services
        .iter()
        .any(|s| s.connected && now.saturating_sub(s.seen_at) <= stale_after);
    let as_of = services
        .iter()
        .map(|s| if s.connected { s.seen_at } else { s.since })
        .max();
    PresenceView { fresh, as_of }
}
