//! The registry's domain rules as plain functions over plain values: no
//! database, no clock (every instant is an argument), so each rule is tested
//! here and every backend obeys the same ones.

use std::collections::BTreeSet;

use edgebind_protocol::messages::{
    Command, CommandResult, CommandStatus, Desired, Presence, Status, UnixSeconds,
};
use edgebind_protocol::{CommandId, DeviceId};
use serde_json::{Map, Value};

use serde::Serialize;

use super::{
    CommandRecord, CommandState, Delivery, Device, DeviceState, Lifecycle, NewCommand, NewDevice,
    RegistryError, Result, SERVICE_HEARTBEAT_S, ServicePresence, validate_setting_key,
};

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
    let queued = command.delivery == Delivery::Queued;
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
