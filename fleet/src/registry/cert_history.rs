//! A device's certificates over time, and the rules of renewal over them.
//!
//! Every device certificate the fleet signs by renewal (and every one it
//! replaced) has a [`CertRecord`]. Its [`CertState`] moves one way:
//!
//! ```text
//! pending ──device connected with it──> current ──a newer one confirmed──> previous ──grace──> retired
//!    └──a newer one signed before it was confirmed──> abandoned
//! current ──reissued by hand──> replaced
//! current (expired) ──re-provisioned through the claim identity──> retired
//! ```
//!
//! `devices.cert_*` always names the `current` record: a `pending`
//! certificate becomes the device's only when the device says it connected
//! with it, so a certificate that never worked never hides the one that did.
//! The decisions are plain functions here ([`check_renewal`],
//! [`confirm_step`]); the store only loads and saves.

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::UnixSeconds;
use serde::{Deserialize, Serialize};

use super::{CertInfo, Device, Lifecycle, RegistryError};

/// How a certificate came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertOrigin {
    /// Issued when the device was registered or provisioned.
    Registered,
    /// Signed for a CSR the device sent over its own connection.
    Renewed,
    /// Issued by an operator (`device reissue`, `pki bundle`, `factory run --reissue`).
    Reissued,
    /// Signed for a CSR the device sent through its batch's claim identity
    /// after its own certificate expired (see [`super::rules::check_reprovision`]).
    Reprovisioned,
}

/// Where a certificate is in its life (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    Pending,
    Current,
    Previous,
    Retired,
    Abandoned,
    Replaced,
}

impl CertOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            CertOrigin::Registered => "registered",
            CertOrigin::Renewed => "renewed",
            CertOrigin::Reissued => "reissued",
            CertOrigin::Reprovisioned => "reprovisioned",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            CertOrigin::Registered,
            CertOrigin::Renewed,
            CertOrigin::Reissued,
            CertOrigin::Reprovisioned,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

impl CertState {
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Pending => "pending",
            CertState::Current => "current",
            CertState::Previous => "previous",
            CertState::Retired => "retired",
            CertState::Abandoned => "abandoned",
            CertState::Replaced => "replaced",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            CertState::Pending,
            CertState::Current,
            CertState::Previous,
            CertState::Retired,
            CertState::Abandoned,
            CertState::Replaced,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// One device certificate in the registry's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub device: DeviceId,
    /// Lower-case hex, as the PKI writes it.
    pub serial: String,
    pub fingerprint_sha256: String,
    pub not_after: UnixSeconds,
    pub issued_at: UnixSeconds,
    pub origin: CertOrigin,
    pub state: CertState,
    /// SHA-256 of the public key (renewals): the same key asking again gets
    /// this certificate back instead of a second one.
    pub key_sha256: Option<String>,
    /// The chain sent to the device (renewals), to send again.
    pub chain_pem: Option<String>,
    /// When the device said it connected with it.
    pub confirmed_at: Option<UnixSeconds>,
    /// When a newer certificate took its place.
    pub superseded_at: Option<UnixSeconds>,
    /// When it was revoked at the end of its grace period.
    pub retired_at: Option<UnixSeconds>,
}

impl CertRecord {
    pub fn info(&self) -> CertInfo {
        CertInfo {
            serial: self.serial.clone(),
            fingerprint_sha256: self.fingerprint_sha256.clone(),
            not_after: self.not_after,
        }
    }

    /// The record of a device's certificate from before the history was
    /// kept (or from a registration): what the device row says.
    pub fn from_device(device: &DeviceId, cert: &CertInfo, at: UnixSeconds) -> CertRecord {
        CertRecord {
            device: device.clone(),
            serial: cert.serial.clone(),
            fingerprint_sha256: cert.fingerprint_sha256.clone(),
            not_after: cert.not_after,
            issued_at: at,
            origin: CertOrigin::Registered,
            state: CertState::Current,
            key_sha256: None,
            chain_pem: None,
            confirmed_at: None,
            superseded_at: None,
            retired_at: None,
        }
    }
}

/// The renewal state of a device, for listings: derived from its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RenewalStatus {
    /// A renewed certificate signed and not yet confirmed by the device.
    pub pending: Option<String>,
    /// Certificates waiting for the end of their grace period.
    pub previous: Vec<String>,
    /// Renewals signed so far.
    pub renewals: usize,
    /// When the last one was signed.
    pub last_renewed_at: Option<UnixSeconds>,
}

impl RenewalStatus {
    pub fn of(history: &[CertRecord]) -> RenewalStatus {
        let renewed: Vec<&CertRecord> = history
            .iter()
            .filter(|r| r.origin == CertOrigin::Renewed)
            .collect();
        RenewalStatus {
            pending: history
                .iter()
                .find(|r| r.state == CertState::Pending)
                .map(|r| r.serial.clone()),
            previous: history
                .iter()
                .filter(|r| r.state == CertState::Previous)
                .map(|r| r.serial.clone())
                .collect(),
            renewals: renewed.len(),
            last_renewed_at: renewed.iter().map(|r| r.issued_at).max(),
        }
    }
}

/// What to do with a renewal request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewalCheck {
    /// Sign a new certificate.
    Sign,
    /// The same key asked before: send this certificate again, sign nothing.
    Resend(CertRecord),
    /// Sign nothing. `retry_after_s`: when asking again may succeed.
    Refuse {
        reason: String,
        retry_after_s: Option<u64>,
    },
}

fn normalize(serial: &str) -> String {
    edgebind_certs::inventory::normalize_serial(serial.trim())
}

/// May `device` (registry row) with `history` renew, presenting
/// `current_serial` and a CSR whose key hashes to `key_sha256`, at `now`?
/// At most one renewal is signed per `min_interval_s`.
pub fn check_renewal(
    device: &Device,
    history: &[CertRecord],
    current_serial: &str,
    key_sha256: &str,
    now: UnixSeconds,
    min_interval_s: u64,
) -> RenewalCheck {
    let refuse = |reason: String| RenewalCheck::Refuse {
        reason,
        retry_after_s: None,
    };
    if device.lifecycle == Lifecycle::Revoked {
        return refuse(format!("device {} is revoked", device.id));
    }
    if let Some(same) = history
        .iter()
        .find(|r| r.key_sha256.as_deref() == Some(key_sha256))
    {
        return match same.state {
            CertState::Pending | CertState::Current if same.chain_pem.is_some() => {
                RenewalCheck::Resend(same.clone())
            }
            _ => refuse(format!(
                "this key was already used for certificate {} ({}); make a new key",
                same.serial,
                same.state.as_str()
            )),
        };
    }
    let Some(current) = &device.cert else {
        return refuse(format!("device {} has no certificate on record", device.id));
    };
    if normalize(current_serial) != normalize(&current.serial) {
        return refuse(format!(
            "the certificate presenting the request (serial {}) is not the current certificate of {} (serial {})",
            normalize(current_serial),
            device.id,
            current.serial
        ));
    }
    if let Some(last) = history
        .iter()
        .filter(|r| r.origin == CertOrigin::Renewed)
        .map(|r| r.issued_at)
        .max()
    {
        let next = last.saturating_add(min_interval_s);
        if now < next {
            return RenewalCheck::Refuse {
                reason: format!(
                    "{} renewed at {last}; at most one renewal per {min_interval_s} s",
                    device.id
                ),
                retry_after_s: Some(next - now),
            };
        }
    }
    RenewalCheck::Sign
}

/// What confirming `serial` changes, in `history`: the records to save.
/// A pending certificate becomes current and the current one previous (its
/// grace period starts now); a current one stays as it is (a confirmation
/// sent again). Anything else is refused.
pub fn confirm_step(
    device: &DeviceId,
    history: &[CertRecord],
    serial: &str,
    now: UnixSeconds,
) -> Result<Vec<CertRecord>, RegistryError> {
    let wanted = normalize(serial);
    let Some(record) = history.iter().find(|r| r.serial == wanted) else {
        return Err(RegistryError::UnknownCertificate {
            device: device.clone(),
            serial: wanted,
        });
    };
    match record.state {
        CertState::Current => Ok(Vec::new()),
        CertState::Pending => {
            let mut changed: Vec<CertRecord> = history
                .iter()
                .filter(|r| r.state == CertState::Current)
                .map(|r| CertRecord {
                    state: CertState::Previous,
                    superseded_at: Some(now),
                    ..r.clone()
                })
                .collect();
            changed.push(CertRecord {
                state: CertState::Current,
                confirmed_at: Some(now),
                ..record.clone()
            });
            Ok(changed)
        }
        other => Err(RegistryError::CertificateState {
            device: device.clone(),
            serial: wanted,
            state: other.as_str(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(serial: &str) -> Device {
        Device {
            id: DeviceId::new("dev-a").unwrap(),
            board: "qemux86-64".parse().unwrap(),
            tags: Default::default(),
            lifecycle: Lifecycle::Registered,
            registered_at: 0,
            provisioned_at: None,
            revoked_at: None,
            cert: Some(CertInfo {
                serial: serial.into(),
                fingerprint_sha256: "f".into(),
                not_after: 1000,
            }),
            online: false,
            last_seen: None,
            connected_at: None,
            agent_version: None,
            boot_id: None,
            addresses: vec![],
            desired: Default::default(),
            desired_revision: 0,
            desired_published_revision: 0,
            reported: None,
            inventory: None,
            inventory_at: None,
            telemetry: None,
            telemetry_at: None,
            telemetry_count: 0,
        }
    }

    fn record(serial: &str, origin: CertOrigin, state: CertState, key: Option<&str>) -> CertRecord {
        CertRecord {
            device: DeviceId::new("dev-a").unwrap(),
            serial: serial.into(),
            fingerprint_sha256: format!("fp-{serial}"),
            not_after: 1000,
            issued_at: 100,
            origin,
            state,
            key_sha256: key.map(str::to_owned),
            chain_pem: key.map(|_| "chain".to_owned()),
            confirmed_at: None,
            superseded_at: None,
            retired_at: None,
        }
    }

    #[test]
    fn only_the_current_certificate_of_a_live_device_renews() {
        let d = device("aa");
        assert_eq!(
            check_renewal(&d, &[], "AA", "k1", 500, 60),
            RenewalCheck::Sign
        );
        assert!(matches!(
            check_renewal(&d, &[], "bb", "k1", 500, 60),
            RenewalCheck::Refuse {
                retry_after_s: None,
                ..
            }
        ));
        let mut revoked = d.clone();
        revoked.lifecycle = Lifecycle::Revoked;
        let RenewalCheck::Refuse { reason, .. } = check_renewal(&revoked, &[], "aa", "k1", 500, 60)
        else {
            panic!("a revoked device renewed")
        };
        assert!(reason.contains("revoked"), "{reason}");
    }

    #[test]
    fn the_same_key_gets_its_certificate_again_and_others_wait() {
        let d = device("aa");
        let pending = record("bb", CertOrigin::Renewed, CertState::Pending, Some("k1"));
        let history = [
            record("aa", CertOrigin::Registered, CertState::Current, None),
            pending.clone(),
        ];
        assert_eq!(
            check_renewal(&d, &history, "aa", "k1", 120, 60),
            RenewalCheck::Resend(pending)
        );
        // Another key within the interval: wait; after it: sign (the pending
        // one is then abandoned by the store).
        assert_eq!(
            check_renewal(&d, &history, "aa", "k2", 120, 60),
            RenewalCheck::Refuse {
                reason: "dev-a renewed at 100; at most one renewal per 60 s".into(),
                retry_after_s: Some(40)
            }
        );
        assert_eq!(
            check_renewal(&d, &history, "aa", "k2", 160, 60),
            RenewalCheck::Sign
        );
        // A key of a retired certificate is never taken again.
        let old = [record(
            "cc",
            CertOrigin::Renewed,
            CertState::Retired,
            Some("k3"),
        )];
        assert!(matches!(
            check_renewal(&d, &old, "aa", "k3", 900, 60),
            RenewalCheck::Refuse { .. }
        ));
    }

    #[test]
    fn confirming_moves_pending_to_current_once() {
        let id = DeviceId::new("dev-a").unwrap();
        let history = [
            record("aa", CertOrigin::Registered, CertState::Current, None),
            record("bb", CertOrigin::Renewed, CertState::Pending, Some("k1")),
        ];
        let changed = confirm_step(&id, &history, "BB", 200).unwrap();
        assert_eq!(changed.len(), 2);
        assert_eq!(
            (
                changed[0].serial.as_str(),
                changed[0].state,
                changed[0].superseded_at
            ),
            ("aa", CertState::Previous, Some(200))
        );
        assert_eq!(
            (
                changed[1].serial.as_str(),
                changed[1].state,
                changed[1].confirmed_at
            ),
            ("bb", CertState::Current, Some(200))
        );
        let after = [changed[0].clone(), changed[1].clone()];
        assert!(confirm_step(&id, &after, "bb", 300).unwrap().is_empty());
        assert!(confirm_step(&id, &after, "aa", 300).is_err());
        assert!(confirm_step(&id, &after, "zz", 300).is_err());
    }

    #[test]
    fn status_counts_renewals() {
        let history = [
            record("aa", CertOrigin::Registered, CertState::Previous, None),
            record("bb", CertOrigin::Renewed, CertState::Current, Some("k1")),
            record("cc", CertOrigin::Renewed, CertState::Pending, Some("k2")),
        ];
        let s = RenewalStatus::of(&history);
        assert_eq!(s.pending.as_deref(), Some("cc"));
        assert_eq!(s.previous, ["aa"]);
        assert_eq!(s.renewals, 2);
    }
}
