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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlStatus {
    pub path: PathBuf,
    pub this_update: OffsetDateTime,
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
