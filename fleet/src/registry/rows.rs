//! Rows as every backend stores them (the same columns, JSON kept as text)
//! and their conversion to the model, so that a corrupt value is the same
//! [`RegistryError::Corrupt`] on every backend.

use std::collections::BTreeSet;

use edgebind_protocol::messages::Action;
use serde_json::Map;

use super::*;

pub(super) fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| RegistryError::Corrupt {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

pub(super) fn parse_id<T: std::str::FromStr>(what: &str, text: String) -> Result<T> {
    text.parse().map_err(|_| RegistryError::Corrupt {
        what: what.to_owned(),
        detail: format!("{text:?}"),
    })
}

pub(super) const DEVICE_COLUMNS: &str = "id, board, lifecycle, registered_at, provisioned_at, revoked_at, \
    cert_serial, cert_fingerprint, cert_not_after, online, last_seen, connected_at, agent_version, \
    boot_id, addresses, desired, desired_rev, desired_published_rev, reported, reported_ignored, \
    reported_rev, reported_at, inventory, inventory_at, telemetry, telemetry_at, telemetry_count";

/// A device row as stored (the same columns on every backend), converted to
/// [`Device`] outside the driver's row callback so that corrupt JSON becomes
/// a [`RegistryError::Corrupt`].
pub(super) struct RawDevice {
    pub id: String,
    pub board: String,
    pub lifecycle: String,
    pub registered_at: i64,
    pub provisioned_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub cert_serial: Option<String>,
    pub cert_fingerprint: Option<String>,
    pub cert_not_after: Option<i64>,
    pub online: bool,
    pub last_seen: Option<i64>,
    pub connected_at: Option<i64>,
    pub agent_version: Option<String>,
    pub boot_id: Option<String>,
    pub addresses: String,
    pub desired: String,
    pub desired_rev: i64,
    pub desired_published_rev: i64,
    pub reported: Option<String>,
    pub reported_ignored: Option<String>,
    pub reported_rev: Option<i64>,
    pub reported_at: Option<i64>,
    pub inventory: Option<String>,
    pub inventory_at: Option<i64>,
    pub telemetry: Option<String>,
    pub telemetry_at: Option<i64>,
    pub telemetry_count: i64,
}

impl RawDevice {
    pub(super) fn into_device(self, tags: BTreeSet<Tag>) -> Result<Device> {
        let what = |field: &str| format!("{field} of device {}", self.id);
        let cert = match (self.cert_serial, self.cert_fingerprint, self.cert_not_after) {
            (Some(serial), Some(fingerprint_sha256), Some(not_after)) => Some(CertInfo {
                serial,
                fingerprint_sha256,
                not_after: not_after.max(0) as u64,
            }),
            _ => None,
        };
        let reported = match (self.reported, self.reported_rev) {
            (Some(applied), Some(rev)) => Some(ReportedState {
                revision: rev.max(0) as u64,
                applied: parse_json(&what("reported"), &applied)?,
                ignored: match &self.reported_ignored {
                    Some(t) => parse_json(&what("reported_ignored"), t)?,
                    None => Map::new(),
                },
                at: opt_u64(self.reported_at).unwrap_or(0),
            }),
            _ => None,
        };
        Ok(Device {
            board: parse_id(&what("board"), self.board)?,
            lifecycle: Lifecycle::parse(&self.lifecycle).ok_or_else(|| RegistryError::Corrupt {
                what: what("lifecycle"),
                detail: self.lifecycle.clone(),
            })?,
            tags,
            registered_at: self.registered_at.max(0) as u64,
            provisioned_at: opt_u64(self.provisioned_at),
            revoked_at: opt_u64(self.revoked_at),
            cert,
            online: self.online,
            last_seen: opt_u64(self.last_seen),
            connected_at: opt_u64(self.connected_at),
            agent_version: self.agent_version,
            boot_id: self.boot_id,
            addresses: parse_json(&what("addresses"), &self.addresses)?,
            desired: parse_json(&what("desired"), &self.desired)?,
            desired_revision: self.desired_rev.max(0) as u64,
            desired_published_revision: self.desired_published_rev.max(0) as u64,
            reported,
            inventory: self
                .inventory
                .as_deref()
                .map(|t| parse_json(&what("inventory"), t))
                .transpose()?,
            inventory_at: opt_u64(self.inventory_at),
            telemetry: self
                .telemetry
                .as_deref()
                .map(|t| parse_json(&what("telemetry"), t))
                .transpose()?,
            telemetry_at: opt_u64(self.telemetry_at),
            telemetry_count: self.telemetry_count.max(0) as u64,
            id: parse_id(&what("id"), self.id)?,
        })
    }
}

/// The state columns of a device row, stored as [`DeviceState`].
pub(super) struct RawState {
    pub lifecycle: String,
    pub provisioned_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub online: bool,
    pub last_seen: Option<i64>,
    pub connected_at: Option<i64>,
    pub agent_version: Option<String>,
    pub boot_id: Option<String>,
    pub addresses: String,
}

pub(super) const STATE_COLUMNS: &str = "id, lifecycle, provisioned_at, revoked_at, online, \
    last_seen, connected_at, agent_version, boot_id, addresses";

impl RawState {
    pub(super) fn into_state(self, id: &str) -> Result<DeviceState> {
        Ok(DeviceState {
            lifecycle: Lifecycle::parse(&self.lifecycle).ok_or_else(|| RegistryError::Corrupt {
                what: format!("lifecycle of device {id}"),
                detail: self.lifecycle.clone(),
            })?,
            provisioned_at: opt_u64(self.provisioned_at),
            revoked_at: opt_u64(self.revoked_at),
            online: self.online,
            last_seen: opt_u64(self.last_seen),
            connected_at: opt_u64(self.connected_at),
            agent_version: self.agent_version,
            boot_id: self.boot_id,
            addresses: parse_json(&format!("addresses of device {id}"), &self.addresses)?,
        })
    }
}

pub(super) const COMMAND_COLUMNS: &str = "id, device_id, action, args, delivery, state, requested_by, rule_id, \
    created_at, sent_at, accepted_at, finished_at, expires_at, reason, output";

/// A command row as stored, in the order of [`COMMAND_COLUMNS`].
pub(super) struct RawCommand {
    pub id: String,
    pub device: String,
    pub action: Option<String>,
    pub args: String,
    pub delivery: String,
    pub state: String,
    pub requested_by: Option<String>,
    pub rule_id: Option<i64>,
    pub created_at: i64,
    /// sent, accepted, finished, expires.
    pub times: [Option<i64>; 4],
    pub reason: Option<String>,
    pub output: Option<String>,
}

impl RawCommand {
    pub(super) fn into_command(self) -> Result<CommandRecord> {
        let id = self.id;
        let what = |f: &str| format!("{f} of command {id}");
        Ok(CommandRecord {
            device: parse_id(&what("device"), self.device)?,
            action: self.action,
            args: parse_json(&what("args"), &self.args)?,
            delivery: Delivery::parse(&self.delivery).ok_or_else(|| RegistryError::Corrupt {
                what: what("delivery"),
                detail: self.delivery.clone(),
            })?,
            state: CommandState::parse(&self.state).ok_or_else(|| RegistryError::Corrupt {
                what: what("state"),
                detail: self.state.clone(),
            })?,
            requested_by: self.requested_by,
            rule_id: self.rule_id,
            created_at: self.created_at.max(0) as u64,
            sent_at: opt_u64(self.times[0]),
            accepted_at: opt_u64(self.times[1]),
            finished_at: opt_u64(self.times[2]),
            expires_at: opt_u64(self.times[3]),
            reason: self.reason,
            output: self
                .output
                .as_deref()
                .map(|t| parse_json(&what("output"), t))
                .transpose()?,
            id: parse_id(&what("id"), id.clone())?,
        })
    }
}

pub(super) fn history_table(history: History) -> &'static str {
    match history {
        History::Telemetry => "telemetry",
        History::Events => "events",
        History::Commands => "commands",
        History::Presence => "presence_history",
    }
}

pub(super) fn action_of(text: &str) -> Result<Action> {
    text.parse().map_err(|e: String| RegistryError::Corrupt {
        what: "action".into(),
        detail: e,
    })
}

/// A value bound into a device-listing query.
pub(super) enum FilterValue {
    Text(String),
    Bool(bool),
}

/// The WHERE clause of a device listing, written once for both backends:
/// `placeholder(n)` spells the n-th bound parameter (`?n`, `$n`) and
/// `contains(p)` a substring test of the id against `p` (as typed: `_` and
/// `%` are no wildcards).
pub(super) fn list_filter(
    query: &DeviceQuery,
    placeholder: fn(usize) -> String,
    contains: fn(&str) -> String,
) -> (String, Vec<FilterValue>) {
    let mut clauses = Vec::new();
    let mut params = Vec::new();
    let mut bind = |v: FilterValue| {
        params.push(v);
        placeholder(params.len())
    };
    if let Some(tag) = &query.tag {
        let p = bind(FilterValue::Text(tag.as_str().to_owned()));
        clauses.push(format!(
            "id IN (SELECT device_id FROM device_tags WHERE tag = {p})"
        ));
    }
    if let Some(lifecycle) = query.lifecycle {
        let p = bind(FilterValue::Text(lifecycle.as_str().to_owned()));
        clauses.push(format!("lifecycle = {p}"));
    }
    if let Some(online) = query.online {
        let p = bind(FilterValue::Bool(online));
        clauses.push(format!("online = {p}"));
    }
    if let Some(text) = &query.search {
        let p = bind(FilterValue::Text(text.clone()));
        clauses.push(contains(&p));
    }
    if let Some(after) = &query.after {
        let p = bind(FilterValue::Text(after.as_str().to_owned()));
        clauses.push(format!("id > {p}"));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    (filter, params)
}

pub(super) const MANUFACTURING_COLUMNS: &str = "serial, device_id, cert_serial, cert_fingerprint, \
    station, operator, made_at, image_sha256";

/// A manufacturing row in the order of [`MANUFACTURING_COLUMNS`].
pub(super) struct RawManufacturing {
    pub serial: String,
    pub device: String,
    pub cert_serial: String,
    pub cert_fingerprint: String,
    pub station: String,
    pub operator: String,
    pub made_at: i64,
    pub image_sha256: Option<String>,
}

impl RawManufacturing {
    pub fn into_record(self) -> Result<ManufacturingRecord> {
        Ok(ManufacturingRecord {
            device: parse_id(
                &format!("device id of unit serial {:?}", self.serial),
                self.device,
            )?,
            serial: self.serial,
            cert_serial: self.cert_serial,
            cert_fingerprint_sha256: self.cert_fingerprint,
            station: self.station,
            operator: self.operator,
            made_at: self.made_at.max(0) as u64,
            image_sha256: self.image_sha256,
        })
    }
}

pub(super) const CLAIM_SERIAL_COLUMNS: &str =
    "serial, batch, allowed_at, device_id, key_sha256, chain_pem, provisioned_at";

/// An allow-list row in the order of [`CLAIM_SERIAL_COLUMNS`].
pub(super) struct RawClaimSerial {
    pub serial: String,
    pub batch: String,
    pub allowed_at: i64,
    pub device: Option<String>,
    pub key_sha256: Option<String>,
    pub chain_pem: Option<String>,
    pub provisioned_at: Option<i64>,
}

impl RawClaimSerial {
    pub fn into_entry(self) -> Result<ClaimSerial> {
        let serial = UnitSerial::new(&self.serial).map_err(|e| RegistryError::Corrupt {
            what: format!("allow-list serial {:?}", self.serial),
            detail: e.to_string(),
        })?;
        let provisioned = match (self.device, self.provisioned_at) {
            (Some(device), Some(at)) => Some(ProvisionedUnit {
                device: parse_id(&format!("device id of unit serial {serial}"), device)?,
                key_sha256: self.key_sha256.unwrap_or_default(),
                chain_pem: self.chain_pem.unwrap_or_default(),
                at: at.max(0) as u64,
            }),
            _ => None,
        };
        Ok(ClaimSerial {
            batch: parse_id(&format!("batch of unit serial {serial}"), self.batch)?,
            serial,
            allowed_at: self.allowed_at.max(0) as u64,
            provisioned,
        })
    }
}

pub(super) const CERT_COLUMNS: &str = "serial, device_id, fingerprint, not_after, issued_at, \
    origin, state, key_sha256, chain_pem, confirmed_at, superseded_at, retired_at";

/// A certificate history row in the order of [`CERT_COLUMNS`].
pub(super) struct RawCert {
    pub serial: String,
    pub device: String,
    pub fingerprint: String,
    pub not_after: i64,
    pub issued_at: i64,
    pub origin: String,
    pub state: String,
    pub key_sha256: Option<String>,
    pub chain_pem: Option<String>,
    pub confirmed_at: Option<i64>,
    pub superseded_at: Option<i64>,
    pub retired_at: Option<i64>,
}

impl RawCert {
    pub fn into_record(self) -> Result<CertRecord> {
        let corrupt = |what: &str, value: &str| RegistryError::Corrupt {
            what: format!("{what} of certificate {}", self.serial),
            detail: format!("{value:?} is not a known value"),
        };
        let at = |t: Option<i64>| t.map(|t| t.max(0) as u64);
        Ok(CertRecord {
            device: parse_id(
                &format!("device id of certificate {}", self.serial),
                self.device.clone(),
            )?,
            origin: CertOrigin::parse(&self.origin)
                .ok_or_else(|| corrupt("origin", &self.origin))?,
            state: CertState::parse(&self.state).ok_or_else(|| corrupt("state", &self.state))?,
            fingerprint_sha256: self.fingerprint,
            not_after: self.not_after.max(0) as u64,
            issued_at: self.issued_at.max(0) as u64,
            key_sha256: self.key_sha256,
            chain_pem: self.chain_pem,
            confirmed_at: at(self.confirmed_at),
            superseded_at: at(self.superseded_at),
            retired_at: at(self.retired_at),
            serial: self.serial,
        })
    }
}
