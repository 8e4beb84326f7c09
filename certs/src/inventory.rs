//! The inventory of issued certificates: `<pki>/inventory.json`.
//!
//! A plain JSON file so other tools (the fleet registry, a shell with `jq`)
//! can read serials, fingerprints and expiry dates without this crate:
//!
//! ```json
//! { "version": 1, "crl_number": 3, "entries": [
//!   { "serial": "5f…", "cn": "dev-a", "role": "device",
//!     "fingerprint_sha256": "ab…", "not_before": "2026-…Z", "not_after": "2031-…Z",
//!     "issued_at": "2026-…Z", "revoked_at": null } ] }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use edgebind_protocol::Principal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Version of the file format; bumped on incompatible changes.
pub const INVENTORY_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryEntry {
    /// Lower-case hex, no separators.
    pub serial: String,
    /// Certificate CN = the principal (`dev-a`, `operator:alice`, ...); for
    /// the broker's server certificate its first host name.
    pub cn: String,
    /// `device`, `operator`, `service`, `claim` or `broker`.
    pub role: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint_sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub revoked_at: Option<OffsetDateTime>,
    /// SHA-256 (hex) of the issuing CA certificate that signed it; absent
    /// in entries from before the first CA rollover, which `pki rollover`
    /// fills in with the issuing CA it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

impl InventoryEntry {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.not_after <= now
    }

    /// Usable right now: not revoked and inside its validity window.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        !self.is_revoked() && self.not_before <= now && !self.is_expired(now)
    }

    /// The principal this certificate authenticates (None for broker server certificates).
    pub fn principal(&self) -> Option<Principal> {
        if self.role == "broker" {
            return None;
        }
        Principal::from_cn(&self.cn).ok()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub version: u32,
    /// Number of the last CRL issued (CRL numbers must increase).
    pub crl_number: u64,
    pub entries: Vec<InventoryEntry>,
}

impl Inventory {
    pub fn new() -> Self {
        Inventory {
            version: INVENTORY_VERSION,
            crl_number: 0,
            entries: Vec::new(),
        }
    }

    pub fn by_cn<'a>(&'a self, cn: &'a str) -> impl Iterator<Item = &'a InventoryEntry> + 'a {
        self.entries.iter().filter(move |e| e.cn == cn)
    }

    pub fn by_serial(&self, serial: &str) -> Option<&InventoryEntry> {
        let serial = normalize_serial(serial);
        self.entries.iter().find(|e| e.serial == serial)
    }

    fn principals_where(&self, keep: impl Fn(&[&InventoryEntry]) -> bool) -> Vec<Principal> {
        let mut by_cn: BTreeMap<&str, Vec<&InventoryEntry>> = BTreeMap::new();
        for e in &self.entries {
            if e.role != "broker" {
                by_cn.entry(&e.cn).or_default().push(e);
            }
        }
        by_cn
            .into_iter()
            .filter(|(_, certs)| keep(certs))
            .filter_map(|(cn, _)| Principal::from_cn(cn).ok())
            .collect()
    }

    /// Principals holding at least one usable certificate.
    pub fn active_principals(&self, now: OffsetDateTime) -> Vec<Principal> {
        self.principals_where(|certs| certs.iter().any(|c| c.is_active(now)))
    }

    /// Principals that were revoked and hold no usable certificate: the broker
    /// denies them everything (a new certificate issued later re-enables the id).
    pub fn revoked_principals(&self, now: OffsetDateTime) -> Vec<Principal> {
        self.principals_where(|certs| {
            certs.iter().any(|c| c.is_revoked()) && !certs.iter().any(|c| c.is_active(now))
        })
    }

    /// Entries that belong in the CRL: revoked and not yet expired (an expired
    /// certificate is refused anyway, so the list does not grow forever).
    pub fn crl_entries(&self, now: OffsetDateTime) -> impl Iterator<Item = &InventoryEntry> {
        self.entries
            .iter()
            .filter(move |e| e.is_revoked() && !e.is_expired(now))
    }

    /// Whether some usable certificate was signed by the issuing CA `issuer`.
    pub fn depends_on(&self, issuer: &str, now: OffsetDateTime) -> bool {
        self.entries
            .iter()
            .any(|e| e.issuer.as_deref() == Some(issuer) && e.is_active(now))
    }
}

/// A certificate the fleet should not have signed: its CN is no valid
/// principal name, or names another role than it was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditFinding {
    pub serial: String,
    pub cn: String,
    pub role: String,
    /// Still usable for a TLS handshake (not revoked, inside its validity).
    pub active: bool,
    pub problem: String,
}

/// Why `cn` is not a name the fleet may sign for `role` (None = fine).
/// The same rule the issuing code applies, written once in `protocol`.
pub fn name_problem(cn: &str, role: &str) -> Option<String> {
    match Principal::from_cn(cn) {
        Err(e) => Some(format!("CN is not a valid principal name: {e}")),
        Ok(p) if p.role() != role => Some(format!(
            "CN names a {} but the certificate was issued as {role}",
            p.role()
        )),
        Ok(_) => None,
    }
}

impl Inventory {
    /// Every client certificate whose CN breaks the naming rules (broker
    /// server certificates carry a host name and are not checked).
    pub fn audit(&self, now: OffsetDateTime) -> Vec<AuditFinding> {
        self.entries
            .iter()
            .filter(|e| e.role != "broker")
            .filter_map(|e| {
                name_problem(&e.cn, &e.role).map(|problem| AuditFinding {
                    serial: e.serial.clone(),
                    cn: e.cn.clone(),
                    role: e.role.clone(),
                    active: e.is_active(now),
                    problem,
                })
            })
            .collect()
    }
}

/// Serials are compared as lower-case hex without `:` separators or leading zero octets.
pub fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let trimmed = hex.trim_start_matches("00");
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// Freshness of the CRL the broker loads. A CRL past `next_update` makes
/// Mosquitto refuse every client, so it must be re-issued well before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrlStatus {
    pub path: PathBuf,
    #[serde(with = "time::serde::rfc3339")]
    pub this_update: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub next_update: OffsetDateTime,
    pub crl_number: Option<u64>,
    pub revoked: usize,
}

impl CrlStatus {
    /// Time left before the broker starts refusing every client.
    pub fn remaining(&self, now: OffsetDateTime) -> time::Duration {
        self.next_update - now
    }

    pub fn is_lapsed(&self, now: OffsetDateTime) -> bool {
        self.next_update <= now
    }

    /// True when the CRL lapses within `days` days (time to refresh).
    pub fn expires_within(&self, now: OffsetDateTime, days: u32) -> bool {
        self.remaining(now) <= time::Duration::days(i64::from(days))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cn: &str, role: &str, revoked: bool) -> InventoryEntry {
        let now = OffsetDateTime::now_utc();
        InventoryEntry {
            serial: format!("{:x}", cn.len()),
            cn: cn.into(),
            role: role.into(),
            fingerprint_sha256: String::new(),
            not_before: now - time::Duration::days(1),
            not_after: now + time::Duration::days(1),
            issued_at: now,
            revoked_at: revoked.then_some(now),
            issuer: None,
        }
    }

    #[test]
    fn audit_flags_names_the_fleet_must_not_sign() {
        let mut inv = Inventory::new();
        inv.entries = vec![
            entry("dev-a", "device", false),
            entry("operator:alice", "operator", false),
            entry("broker.example.net", "broker", false),
            entry("dev-b/cmd", "device", false),
            entry("Dev-C", "device", true),
            entry("operator:eve", "device", false),
        ];
        let found = inv.audit(OffsetDateTime::now_utc());
        let cns: Vec<_> = found.iter().map(|f| (f.cn.as_str(), f.active)).collect();
        assert_eq!(
            cns,
            [
                ("dev-b/cmd", true),
                ("Dev-C", false),
                ("operator:eve", true)
            ]
        );
        assert!(found[0].problem.contains("'/'"), "{}", found[0].problem);
        assert!(
            found[1].problem.contains("lowercase"),
            "{}",
            found[1].problem
        );
        assert!(found[2].problem.contains("issued as device"));
    }
}
