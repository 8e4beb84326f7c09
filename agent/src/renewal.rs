//! Certificate renewal before expiry, over the device's own connection
//! ([`edgebind_protocol::renewal`]), built on [`crate::enroll`].
//!
//! At [`RenewalConfig::at_fraction`] of the certificate's life (two thirds
//! by default, moved by up to [`RenewalConfig::jitter_fraction`] of the life
//! by the certificate's own serial, so a fleet issued together does not
//! renew together), the agent:
//!
//! 1. takes the key of its renewal enrollment (`<state>/renewal/`, made on
//!    the device once and kept, 0600) and sends a CSR for its own id with the
//!    serial of the certificate it is connected with;
//! 2. verifies the answer ([`crate::enroll::verify_issued`]: our key, the
//!    fleet CA, our id, valid now, expiring later than the current one);
//! 3. writes the new pair as a *trial* identity (`<state>/renewal-trial/`)
//!    and reconnects with it, the identity files untouched;
//! 4. only once the broker accepted the trial connection, installs it over
//!    the identity files ([`crate::enroll::Enrollment::install`]: key then
//!    certificate, each atomically) and tells the fleet it is connected with
//!    the new serial, which starts the previous certificate's grace period;
//! 5. if the trial connection is not accepted within
//!    [`RenewalConfig::trial_timeout_s`], it reconnects with the identity it
//!    had, gives the key up, and tries again after
//!    [`RenewalConfig::retry_s`].
//!
//! Power loss at any point leaves a working identity:
//!
//! | interrupted                         | at the next start                                              |
//! |-------------------------------------|----------------------------------------------------------------|
//! | before or while asking, verifying   | the old identity; the kept key asks again and gets the same certificate |
//! | during the trial connection         | the old identity (the trial directory is removed)              |
//! | between or during the two renames   | [`resume`] finishes the install from the enrollment's accepted chain, which exists only once the trial connected |
//! | after the install                   | the new identity; `Connected` is sent again on connecting (the confirmation marker) |
//!
//! The decisions are plain functions ([`renew_at`], [`Renewal::on_response`]);
//! the runtime only carries the messages and reconnects.

use std::path::{Path, PathBuf};

use edgebind_protocol::DeviceId;
use edgebind_protocol::renewal::{Leg, Request, Response};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::Deserialize;
use tracing::{info, warn};

use crate::config::IdentityConfig;
use crate::core::{Outgoing, Qos};
use crate::enroll::{self, DeviceKey, Enrollment, Expected, IdentityFiles, VerifiedChain};

/// The renewal enrollment, under the state directory.
pub const RENEWAL_DIR: &str = "renewal";
/// The trial identity (a renewed pair before its first connection).
pub const TRIAL_DIR: &str = "renewal-trial";
/// The serial the fleet has not been told about yet (one line of hex).
pub const CONFIRM_FILE: &str = "renewal-confirm";

/// `[renewal]` of `agent.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewalConfig {
    /// `enabled` (default true): renew the certificate before it expires.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `at_fraction` (default 0.66, 0.1..=0.95): the point of the
    /// certificate's life at which the agent renews.
    #[serde(default = "default_fraction")]
    pub at_fraction: f64,
    /// `jitter_fraction` (default 0.05, 0..=0.2): renewal moves by up to
    /// this fraction of the life, earlier or later, by certificate.
    #[serde(default = "default_jitter")]
    pub jitter_fraction: f64,
    /// `trial_timeout_s` (default 30): how long the renewed identity may
    /// take to connect before the agent falls back to the one it had.
    #[serde(default = "default_trial_timeout")]
    pub trial_timeout_s: u64,
    /// `retry_s` (default 300): wait after a failed renewal, unless the
    /// fleet names a time.
    #[serde(default = "default_retry")]
    pub retry_s: u64,
    /// `response_timeout_s` (default 60): a request the fleet has not
    /// answered by then is sent again.
    #[serde(default = "default_response_timeout")]
    pub response_timeout_s: u64,
}

fn yes() -> bool {
    true
}
fn default_fraction() -> f64 {
    0.66
}
fn default_jitter() -> f64 {
    0.05
}
fn default_trial_timeout() -> u64 {
    30
}
fn default_retry() -> u64 {
    300
}
fn default_response_timeout() -> u64 {
    60
}

impl Default for RenewalConfig {
    fn default() -> Self {
        RenewalConfig {
            enabled: true,
            at_fraction: default_fraction(),
            jitter_fraction: default_jitter(),
            trial_timeout_s: default_trial_timeout(),
            retry_s: default_retry(),
            response_timeout_s: default_response_timeout(),
        }
    }
}

impl RenewalConfig {
    /// The ranges documented on each key.
    pub fn check(&self) -> Result<(), String> {
        if !(0.1..=0.95).contains(&self.at_fraction) {
            return Err(format!(
                "renewal.at_fraction = {} must be between 0.1 and 0.95",
                self.at_fraction
            ));
        }
        if !(0.0..=0.2).contains(&self.jitter_fraction) {
            return Err(format!(
                "renewal.jitter_fraction = {} must be between 0 and 0.2",
                self.jitter_fraction
            ));
        }
        for (key, v) in [
            ("trial_timeout_s", self.trial_timeout_s),
            ("retry_s", self.retry_s),
            ("response_timeout_s", self.response_timeout_s),
        ] {
            if v == 0 || v > 86_400 {
                return Err(format!("renewal.{key} = {v} must be 1..=86400"));
            }
        }
        Ok(())
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// at `fraction` of its life, moved by up to `jitter` of the life by
/// `spread` (any bytes that differ between certificates: the serial), and
/// never later than a tenth of the life before expiry.
pub fn renew_at(not_before: i64, not_after: i64, fraction: f64, jitter: f64, spread: &[u8]) -> i64 {
    let life = (not_after - not_before).max(1) as f64;
    // FNV-1a of the spread bytes, then splitmix64's finalizer (FNV alone
    // hardly moves the top bits for the last byte), as a number in [-1, 1).
    let mut h = spread.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let unit = (h >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    let at = not_before as f64 + life * (fraction + jitter * unit);
    (at as i64).min(not_after - (life / 10.0) as i64)
}

/// The identity in use, as renewal needs it.
#[derive(Debug, Clone)]
pub struct Current {
    pub device: DeviceId,
    /// Lower-case hex, without leading zero octets.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub ca: CertificateDer<'static>,
}

/// What the runtime does next for renewal.
#[derive(Debug)]
pub enum Step {
    /// Nothing now.
    Wait,
    /// Reconnect with the trial identity in these files.
    Switch(Trial),
}

/// A renewed identity waiting for its first connection.
#[derive(Debug, Clone)]
pub struct Trial {
    pub files: IdentityConfig,
    pub serial: String,
    pub not_after: i64,
}

#[derive(Debug)]
enum Phase {
    Idle,
    /// A request is out; its key.
    Asked {
        key: Box<DeviceKey>,
        at: i64,
    },
    /// A trial identity is being tried.
    Trying,
}

/// One device's renewal, between the runtime's messages.
#[derive(Debug)]
pub struct Renewal {
    cfg: RenewalConfig,
    state_dir: PathBuf,
    /// The identity files of the configuration: what an install replaces.
    target: IdentityFiles,
    current: Current,
    next_at: i64,
    phase: Phase,
}

impl Renewal {
    pub fn new(
        cfg: RenewalConfig,
        state_dir: &Path,
        identity: &IdentityConfig,
        current: Current,
    ) -> Renewal {
        let next_at = renew_at(
            current.not_before,
            current.not_after,
            cfg.at_fraction,
            cfg.jitter_fraction,
            current.serial.as_bytes(),
        );
        Renewal {
            cfg,
            state_dir: state_dir.to_owned(),
            target: IdentityFiles {
                key: identity.key.clone(),
                cert: identity.cert.clone(),
            },
            current,
            next_at,
            phase: Phase::Idle,
        }
    }

    /// When the next request goes out (Unix seconds).
    pub fn next_at(&self) -> i64 {
        self.next_at
    }

    /// Renew now (the `renew` action).
    pub fn force(&mut self, now: i64) {
        if matches!(self.phase, Phase::Idle) {
            self.next_at = now;
        }
    }

    fn enrollment_dir(&self) -> PathBuf {
        self.state_dir.join(RENEWAL_DIR)
    }

    /// The request to publish, when one is due at `now` (connected only).
    pub fn poll(&mut self, now: i64) -> Option<Outgoing> {
        if !self.cfg.enabled {
            return None;
        }
        match &self.phase {
            Phase::Asked { at, .. } if now >= at + self.cfg.response_timeout_s as i64 => {
                // No answer: ask again (same key, the same certificate back).
                self.phase = Phase::Idle;
            }
            Phase::Idle if now >= self.next_at => {}
            _ => return None,
        }
        match self.request(now) {
            Ok(o) => Some(o),
            Err(e) => {
                warn!(error = %e, "cannot make a renewal request; trying again later");
                self.next_at = now + self.cfg.retry_s as i64;
                None
            }
        }
    }

    fn request(&mut self, now: i64) -> Result<Outgoing, enroll::EnrollError> {
        let enrollment = Enrollment::open(&self.enrollment_dir())?;
        let (key, made) = enrollment.key()?;
        if made {
            crate::test_hooks::pause_point(crate::test_hooks::step::KEY_WRITTEN);
        }
        let csr_pem = key.csr_pem(&self.current.device)?;
        info!(
            serial = %self.current.serial,
            new_key = made,
            "renewing the device certificate"
        );
        let request = Request::Renew {
            csr_pem,
            current_serial: self.current.serial.clone(),
        };
        self.phase = Phase::Asked {
            key: Box::new(key),
            at: now,
        };
        Ok(outgoing(&self.current.device, &request))
    }

    /// The fleet's answer on our response topic.
    pub fn on_response(&mut self, payload: &[u8], now: i64) -> Step {
        let Phase::Asked { .. } = &self.phase else {
            // An answer we no longer wait for (sent again by the fleet).
            return Step::Wait;
        };
        let response: Response = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "unreadable renewal response; ignored");
                return Step::Wait;
            }
        };
        let Phase::Asked { key, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("checked above")
        };
        match response {
            Response::Refused {
                reason,
                retry_after_s: Some(s),
            } => {
                warn!(%reason, retry_after_s = s, "renewal refused for now");
                self.next_at = now + s.max(1) as i64;
                Step::Wait
            }
            Response::Refused {
                reason,
                retry_after_s: None,
            } => {
                warn!(%reason, retry_s = self.cfg.retry_s, "renewal refused; a new key next time");
                self.give_up(now);
                Step::Wait
            }
            Response::Issued { chain_pem, .. } => {
                let expected = Expected {
                    ca: &self.current.ca,
                    device_id: &self.current.device,
                    replaces_not_after: Some(self.current.not_after),
                    now: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                        now.max(0) as u64
                    )),
                };
                match enroll::verify_issued(&chain_pem, &key, &expected) {
                    Ok(chain) => match self.write_trial(&key, &chain) {
                        Ok(trial) => {
                            info!(serial = %trial.serial, "renewed certificate verified; trying it");
                            crate::test_hooks::pause_point(crate::test_hooks::step::CERT_RECEIVED);
                            self.phase = Phase::Trying;
                            Step::Switch(trial)
                        }
                        Err(e) => {
                            warn!(error = %e, "cannot write the trial identity; trying again later");
                            self.next_at = now + self.cfg.retry_s as i64;
                            Step::Wait
                        }
                    },
                    Err(e) => {
                        warn!(error = %e, "the renewal response is not a certificate we can use; refused");
                        self.give_up(now);
                        Step::Wait
                    }
                }
            }
        }
    }

    /// The key is given up (the fleet refused it, or what came back for it
    /// is unusable): the next attempt makes a new one.
    fn give_up(&mut self, now: i64) {
        if let Ok(e) = Enrollment::open(&self.enrollment_dir())
            && let Err(err) = e.discard()
        {
            warn!(error = %err, "cannot remove the renewal enrollment");
        }
        self.phase = Phase::Idle;
        self.next_at = now + self.cfg.retry_s as i64;
    }

    fn write_trial(&self, key: &DeviceKey, chain: &VerifiedChain) -> std::io::Result<Trial> {
        let dir = self.state_dir.join(TRIAL_DIR);
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir)?;
        let key_path = dir.join("device.key");
        let cert_path = dir.join("device.crt");
        write_private(&key_path, key.private_pem().as_bytes())?;
        write_private(&cert_path, chain.pem.as_bytes())?;
        Ok(Trial {
            files: IdentityConfig {
                cert: cert_path,
                key: key_path,
                ca: PathBuf::new(),
            },
            serial: leaf_serial(&chain.certs[0]).unwrap_or_default(),
            not_after: chain.not_after,
        })
    }

    /// The trial connection was accepted: install the new pair over the
    /// identity files and remember to tell the fleet. Afterwards the new
    /// identity is the current one.
    pub fn trial_connected(&mut self, trial: &Trial, now: i64) -> Result<(), String> {
        crate::test_hooks::pause_point(crate::test_hooks::step::TRIAL_CONNECTED);
        let enrollment = Enrollment::open(&self.enrollment_dir()).map_err(|e| e.to_string())?;
        let (key, _) = enrollment.key().map_err(|e| e.to_string())?;
        let pem = std::fs::read_to_string(&trial.files.cert).map_err(|e| e.to_string())?;
        let expected = Expected {
            ca: &self.current.ca,
            device_id: &self.current.device,
            replaces_not_after: Some(self.current.not_after),
            now: UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64)),
        };
        let chain = enroll::verify_issued(&pem, &key, &expected).map_err(|e| e.to_string())?;
        // The marker first: once the install has begun, a restart finishes
        // it, and the fleet must hear of the new serial either way.
        write_private(&self.state_dir.join(CONFIRM_FILE), trial.serial.as_bytes())
            .map_err(|e| e.to_string())?;
        enrollment
            .install(&key, &chain, &self.target)
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(self.state_dir.join(TRIAL_DIR));
        let not_before = leaf_not_before(&chain.certs[0]).unwrap_or(now);
        self.current = Current {
            serial: trial.serial.clone(),
            not_before,
            not_after: chain.not_after,
            ..self.current.clone()
        };
        self.next_at = renew_at(
            not_before,
            chain.not_after,
            self.cfg.at_fraction,
            self.cfg.jitter_fraction,
            trial.serial.as_bytes(),
        );
        self.phase = Phase::Idle;
        info!(serial = %trial.serial, next_renewal = self.next_at, "renewed identity installed");
        Ok(())
    }

    /// The trial identity did not connect in time: back to the old one,
    /// the key given up, another attempt later.
    pub fn trial_failed(&mut self, now: i64) {
        let _ = std::fs::remove_dir_all(self.state_dir.join(TRIAL_DIR));
        warn!(
            retry_s = self.cfg.retry_s,
            "the renewed certificate was not accepted by the broker; back to the current one"
        );
        self.give_up(now);
    }

    pub fn trial_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.cfg.trial_timeout_s)
    }

    /// What to send once connected: `Connected` with our serial while the
    /// fleet has not been told, and only if it is the serial in use (a
    /// marker left from an install that never completed says nothing).
    pub fn on_connected(&self) -> Option<Outgoing> {
        let marker = self.state_dir.join(CONFIRM_FILE);
        let serial = std::fs::read_to_string(&marker).ok()?;
        if serial.trim() != self.current.serial {
            let _ = std::fs::remove_file(&marker);
            return None;
        }
        Some(outgoing(
            &self.current.device,
            &Request::Connected {
                serial: self.current.serial.clone(),
            },
        ))
    }

    /// The fleet has the confirmation (the broker acknowledged it).
    pub fn confirmed(&self) {
        let _ = std::fs::remove_file(self.state_dir.join(CONFIRM_FILE));
    }

    /// The topic the fleet answers on.
    pub fn response_topic(&self) -> String {
        Leg::Response.topic(&self.current.device)
    }

    pub fn current(&self) -> &Current {
        &self.current
    }
}

fn outgoing(device: &DeviceId, request: &Request) -> Outgoing {
    Outgoing {
        topic: Leg::Request.topic(device),
        payload: serde_json::to_vec(request).expect("a request serializes"),
        qos: Qos::AtLeastOnce,
        retain: false,
        class: None,
    }
}

/// At start-up, before the identity is loaded: finish an install that a
/// restart interrupted (see the module table), and drop a trial identity.
pub fn resume(
    state_dir: &Path,
    identity: &IdentityConfig,
    configured: Option<&DeviceId>,
) -> Result<bool, String> {
    let _ = std::fs::remove_dir_all(state_dir.join(TRIAL_DIR));
    let dir = state_dir.join(RENEWAL_DIR);
    if !Enrollment::exists(&dir) {
        return Ok(false);
    }
    let ca = read_first_cert(&identity.ca)?;
    // The id is the same in the old and the new certificate; between the
    // two renames the key and certificate disagree, the certificate's CN
    // does not change.
    let device = match configured {
        Some(d) => d.clone(),
        None => {
            let leaf = read_first_cert(&identity.cert)?;
            leaf_cn(&leaf).ok_or_else(|| {
                format!(
                    "{}: no device id in the certificate",
                    identity.cert.display()
                )
            })?
        }
    };
    let expected = Expected {
        ca: &ca,
        device_id: &device,
        replaces_not_after: None,
        now: UnixTime::now(),
    };
    let target = IdentityFiles {
        key: identity.key.clone(),
        cert: identity.cert.clone(),
    };
    let done = Enrollment::resume(&dir, &expected, &target).map_err(|e| e.to_string())?;
    if done {
        info!("finished installing a renewed identity that a restart interrupted");
    }
    Ok(done)
}

/// The renewal view of the identity the agent loaded.
pub fn current_of(identity: &crate::identity::Identity) -> Current {
    let leaf = &identity.chain[0];
    Current {
        device: identity.device_id.clone(),
        serial: leaf_serial(leaf).unwrap_or_default(),
        not_before: leaf_not_before(leaf).unwrap_or(0),
        not_after: identity.not_after,
        ca: identity.ca.clone(),
    }
}

fn read_first_cert(path: &Path) -> Result<CertificateDer<'static>, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::certs(&mut text.as_slice())
        .next()
        .ok_or_else(|| format!("{}: no certificate", path.display()))?
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn parsed<T>(
    der: &CertificateDer<'_>,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> T,
) -> Option<T> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .ok()
        .map(|(_, c)| f(&c))
}

/// The serial as the fleet writes it: lower-case hex, no leading zero octets.
pub fn leaf_serial(der: &CertificateDer<'_>) -> Option<String> {
    parsed(der, |c| {
        let bytes = c.raw_serial();
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
    })
}

fn leaf_not_before(der: &CertificateDer<'_>) -> Option<i64> {
    parsed(der, |c| c.validity().not_before.timestamp())
}

fn leaf_cn(der: &CertificateDer<'_>) -> Option<DeviceId> {
    parsed(der, |c| {
        c.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .and_then(|cn| DeviceId::new(cn).ok())
    })
    .flatten()
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// A scratch file of the trial or the marker: 0600 from creation, synced.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "test fleet");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A client-auth leaf for `key` named `cn`, valid `secs` from now.
    fn leaf(ca: &Ca, cn: &str, key: &KeyPair, secs: i64) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::seconds(60);
        p.not_after = now + time::Duration::seconds(secs);
        let mut serial = [0u8; 16];
        serial[0] = 0x11;
        serial[15] = (secs % 251) as u8 + 1;
        serial[8] = cn.len() as u8;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        p.signed_by(key, &ca.issuer).unwrap().pem()
    }

    struct Device {
        _tmp: tempfile::TempDir,
        state: PathBuf,
        identity: IdentityConfig,
        ca: Ca,
    }

    impl Device {
        /// An installed identity of dev-a valid for 90 s.
        fn new() -> Device {
            let tmp = tempfile::tempdir().unwrap();
            let ca = ca();
            let key = KeyPair::generate().unwrap();
            let identity = IdentityConfig {
                cert: tmp.path().join("device.crt"),
                key: tmp.path().join("device.key"),
                ca: tmp.path().join("ca.crt"),
            };
            std::fs::write(&identity.cert, leaf(&ca, "dev-a", &key, 90)).unwrap();
            std::fs::write(&identity.key, key.serialize_pem()).unwrap();
            std::fs::write(&identity.ca, &ca.pem).unwrap();
            Device {
                state: tmp.path().join("state"),
                _tmp: tmp,
                identity,
                ca,
            }
        }

        fn load(&self) -> crate::identity::Identity {
            crate::identity::Identity::load(
                &self.identity,
                None,
                &edgebind_link::provider(),
                UnixTime::now(),
            )
            .expect("a working identity")
        }

        fn renewal(&self) -> Renewal {
            let cfg = RenewalConfig::default();
            Renewal::new(cfg, &self.state, &self.identity, current_of(&self.load()))
        }

        /// What the fleet would answer the pending request: a certificate
        /// for the enrollment's key.
        fn issue(&self, cn: &str, secs: i64) -> Vec<u8> {
            let (key, _) = Enrollment::open(&self.state.join(RENEWAL_DIR))
                .unwrap()
                .key()
                .unwrap();
            let chain = leaf(&self.ca, cn, key.pair_for_tests(), secs);
            serde_json::to_vec(&Response::Issued {
                device_id: DeviceId::new(cn).unwrap(),
                serial: String::new(),
                chain_pem: chain,
            })
            .unwrap()
        }

        fn files(&self) -> (Vec<u8>, Vec<u8>) {
            (
                std::fs::read(&self.identity.cert).unwrap(),
                std::fs::read(&self.identity.key).unwrap(),
            )
        }
    }

    fn now() -> i64 {
        UnixTime::now().as_secs() as i64
    }

    fn trial_of(step: Step) -> Trial {
        match step {
            Step::Switch(t) => t,
            Step::Wait => panic!("no trial"),
        }
    }

    #[test]
    fn a_renewal_is_tried_then_installed_and_a_restart_at_each_step_leaves_a_working_identity() {
        let d = Device::new();
        let old = d.files();
        let old_serial = current_of(&d.load()).serial;
        let mut r = d.renewal();
        // Not due yet at start (2/3 of 90 s), due when forced.
        assert!(r.poll(now()).is_none());
        r.force(now());
        let request = r.poll(now()).expect("a request");
        assert_eq!(request.topic, "edgebind/v2/renew/request/dev-a");
        let Request::Renew { current_serial, .. } =
            serde_json::from_slice(&request.payload).unwrap()
        else {
            panic!("not a renewal request")
        };
        assert_eq!(current_serial, old_serial);

        // Restart while asking: the old identity; the kept key asks again.
        assert!(!resume(&d.state, &d.identity, None).unwrap());
        assert_eq!(d.files(), old);

        let trial = trial_of(r.on_response(&d.issue("dev-a", 300), now()));
        assert_eq!(
            d.files(),
            old,
            "nothing installed before the trial connected"
        );
        assert!(trial.files.cert.exists() && trial.files.key.exists());
        // Restart during the trial: the old identity, the trial removed.
        assert!(!resume(&d.state, &d.identity, None).unwrap());
        assert_eq!(d.files(), old);
        assert!(!trial.files.cert.exists());
        assert_eq!(current_of(&d.load()).serial, old_serial);

        // Again, and this time the trial connects.
        let mut r = d.renewal();
        r.force(now());
        r.poll(now()).unwrap();
        let trial = trial_of(r.on_response(&d.issue("dev-a", 300), now()));
        r.trial_connected(&trial, now()).unwrap();
        let new = d.load();
        assert_eq!(current_of(&new).serial, trial.serial);
        assert_ne!(trial.serial, old_serial);
        assert!(new.not_after > now() + 200);
        assert_eq!(r.current().serial, trial.serial);
        assert!(
            r.next_at() > now() + 100,
            "the next renewal is at 2/3 of the new life"
        );
        // The fleet is told once connected, on every connection until the next renewal.
        let told = r.on_connected().expect("a confirmation");
        assert_eq!(
            serde_json::from_slice::<Request>(&told.payload).unwrap(),
            Request::Connected {
                serial: trial.serial.clone()
            }
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&d.identity.key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!d.state.join(RENEWAL_DIR).exists());
    }

    #[test]
    fn an_install_interrupted_between_the_two_renames_is_finished_at_the_next_start() {
        let d = Device::new();
        let mut r = d.renewal();
        r.force(now());
        r.poll(now()).unwrap();
        let trial = trial_of(r.on_response(&d.issue("dev-a", 300), now()));
        // What `install` does up to the power cut: the chain accepted, the
        // key written over the old one, the certificate not yet.
        let dir = d.state.join(RENEWAL_DIR);
        let enrollment = Enrollment::open(&dir).unwrap();
        let (key, _) = enrollment.key().unwrap();
        let pem = std::fs::read_to_string(&trial.files.cert).unwrap();
        let ca_der = read_first_cert(&d.identity.ca).unwrap();
        let id = DeviceId::new("dev-a").unwrap();
        let chain = enroll::verify_issued(
            &pem,
            &key,
            &Expected {
                ca: &ca_der,
                device_id: &id,
                replaces_not_after: None,
                now: UnixTime::now(),
            },
        )
        .unwrap();
        enrollment.accept(&chain).unwrap();
        std::fs::write(&d.identity.key, key.private_pem()).unwrap();
        assert!(
            crate::identity::Identity::load(
                &d.identity,
                None,
                &edgebind_link::provider(),
                UnixTime::now()
            )
            .is_err(),
            "key and certificate disagree between the renames"
        );
        assert!(resume(&d.state, &d.identity, None).unwrap());
        assert_eq!(current_of(&d.load()).serial, trial.serial);
    }

    #[test]
    fn a_tampered_or_mismatched_response_is_refused_and_nothing_changes() {
        let d = Device::new();
        let old = d.files();
        let other = KeyPair::generate().unwrap();
        let other_ca = ca();
        let chain = |pem: String| {
            serde_json::to_vec(&Response::Issued {
                device_id: DeviceId::new("dev-a").unwrap(),
                serial: String::new(),
                chain_pem: pem,
            })
            .unwrap()
        };
        for what in [
            "another id",
            "not later than the current one",
            "another key",
            "another CA",
        ] {
            let mut r = d.renewal();
            r.force(now());
            r.poll(now()).unwrap();
            // Made after the request: for the key it asked with, or not.
            let payload = match what {
                "another id" => d.issue("dev-b", 300),
                "another key" => chain(leaf(&d.ca, "dev-a", &other, 300)),
                "another CA" => chain(leaf(&other_ca, "dev-a", &other, 300)),
                _ => d.issue("dev-a", 30),
            };
            assert!(
                matches!(r.on_response(&payload, now()), Step::Wait),
                "{what} was accepted"
            );
            assert_eq!(d.files(), old, "{what}");
            assert!(
                !d.state.join(RENEWAL_DIR).exists(),
                "{what}: the key is given up"
            );
            assert!(r.next_at() >= now() + 299, "{what}: retried later");
        }
        // Not JSON at all: ignored, still waiting for the answer.
        let mut r = d.renewal();
        r.force(now());
        r.poll(now()).unwrap();
        assert!(matches!(r.on_response(b"\xff{", now()), Step::Wait));
        assert!(matches!(
            r.on_response(&d.issue("dev-a", 300), now()),
            Step::Switch(_)
        ));
    }

    #[test]
    fn refusals_wait_as_told_and_a_failed_trial_gives_the_key_up() {
        let d = Device::new();
        let mut r = d.renewal();
        r.force(now());
        r.poll(now()).unwrap();
        let later = serde_json::to_vec(&Response::Refused {
            reason: "slow down".into(),
            retry_after_s: Some(40),
        })
        .unwrap();
        let t = now();
        assert!(matches!(r.on_response(&later, t), Step::Wait));
        assert_eq!(r.next_at(), t + 40);
        assert!(d.state.join(RENEWAL_DIR).exists(), "the key is kept");
        assert!(r.poll(t + 39).is_none());
        assert!(r.poll(t + 40).is_some());
        let never = serde_json::to_vec(&Response::Refused {
            reason: "revoked".into(),
            retry_after_s: None,
        })
        .unwrap();
        assert!(matches!(r.on_response(&never, t + 41), Step::Wait));
        assert!(!d.state.join(RENEWAL_DIR).exists(), "the key is given up");

        let old = d.files();
        r.force(t + 400);
        r.poll(t + 400).unwrap();
        let trial = trial_of(r.on_response(&d.issue("dev-a", 300), now()));
        r.trial_failed(now());
        assert_eq!(d.files(), old);
        assert!(!trial.files.cert.exists());
        assert!(!d.state.join(RENEWAL_DIR).exists());
        // A marker of a serial that is not in use says nothing.
        std::fs::create_dir_all(&d.state).unwrap();
        std::fs::write(d.state.join(CONFIRM_FILE), "ffff").unwrap();
        assert!(r.on_connected().is_none());
    }

    #[test]
    fn renewal_falls_at_the_fraction_with_bounded_jitter() {
        let (nb, na) = (1_000, 1_000 + 90 * 86_400);
        let plain = renew_at(nb, na, 0.66, 0.0, b"x");
        assert_eq!(plain, nb + (90.0 * 86_400.0 * 0.66) as i64);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0u32..200 {
            let at = renew_at(nb, na, 0.66, 0.05, &i.to_be_bytes());
            let life = (na - nb) as f64;
            assert!(at as f64 >= nb as f64 + life * 0.61 - 1.0, "{at}");
            assert!(at as f64 <= nb as f64 + life * 0.71 + 1.0, "{at}");
            seen.insert(at / 3600);
        }
        // Spread over many hours, not one instant for the whole fleet.
        assert!(seen.len() > 50, "{}", seen.len());
        // Never in the last tenth of the life.
        assert!(renew_at(nb, na, 0.95, 0.2, b"late") <= na - (na - nb) / 10);
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(RenewalConfig::default().check().is_ok());
        let bad = RenewalConfig {
            at_fraction: 0.99,
            ..RenewalConfig::default()
        };
        assert!(bad.check().unwrap_err().contains("at_fraction"));
        let bad = RenewalConfig {
            retry_s: 0,
            ..RenewalConfig::default()
        };
        assert!(bad.check().is_err());
        let parsed: RenewalConfig = toml::from_str("at_fraction = 0.5\n").unwrap();
        assert_eq!(parsed.at_fraction, 0.5);
        assert!(toml::from_str::<RenewalConfig>("at_fractoin = 0.5\n").is_err());
    }
}
