//! Claim-based first boot: a unit whose bundle holds its production batch's
//! claim identity (`[claim]` in `agent.toml`) obtains its own device
//! identity before the agent proper starts, and obtains it again if its
//! certificate expires while it is offline.
//!
//! 1. The unit's serial is read (`claim.serial_file` or `claim.serial`) and
//!    the device id it asks for derived from it by the one rule of
//!    `edgebind_protocol` ([`UnitSerial::device_id`]).
//! 2. Its key pair is made on the device once and kept ([`crate::enroll`]).
//! 3. It connects to the provisioning listener as the claim identity with
//!    the serial as client id, subscribes to its response topic, publishes
//!    its CSR on its request topic ([`edgebind_protocol::provision`]) and
//!    waits for the answer (`claim.response_timeout_s`).
//! 4. The answer is judged ([`judge`]): an issued chain is verified against
//!    the key, the fleet CA and the id asked for; anything else (a refusal,
//!    a chain that does not verify, garbage) means asking again after a
//!    backoff. An unverified certificate is never written.
//! 5. The verified identity is installed over `identity.cert`/`identity.key`:
//!    from then on the agent runs as the device.
//!
//! A restart at any point is safe: the key is kept in the enrollment
//! directory (`<state.dir>/enroll`) until the identity is installed, a chain
//! accepted but not installed is installed on the next start, and the fleet
//! answers the same key asking again with the chain it issued.
//!
//! **An expired device is not bricked.** The claim identity stays where the
//! bundle put it (`claim.key` 0600 beside `agent.toml`): it is the batch's
//! secret, already in every unit's image, so keeping it gives nothing away
//! that the image did not. When the installed certificate has expired by
//! the device clock, at start ([`ensure_identity`]) or when a connection
//! attempt fails ([`after_failed_connect`], called by the runtime, which
//! then ends with [`crate::runtime::Exit::IdentityExpired`]), the same
//! exchange runs again with a new key made on the device, asking for the
//! same id as the installed certificate's (a unit whose serial names
//! another id does not try). The answer must also expire later than the
//! expired certificate. The fleet answers only for the unit's registered
//! serial, a device not revoked and a certificate that has expired
//! (`fleet::registry::rules::check_reprovision`). A certificate that is still
//! valid by the device clock never takes this path. A unit without a claim
//! identity keeps retrying its own and logs that `edgebind device reissue
//! DEV` is the way back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgebind_protocol::provision::{Leg, Request, Response};
use edgebind_protocol::{DeviceId, Principal, UnitSerial};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event};
use rustls::pki_types::{CertificateDer, UnixTime};
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, ClaimConfig};
use crate::enroll::{DeviceKey, EnrollError, Enrollment, Expected, IdentityFiles, verify_issued};
use crate::runtime::ShutdownSignal;
use crate::systemd::Notifier;

/// The enrollment directory under `state.dir`.
pub const ENROLL_DIR: &str = "enroll";
/// Longest serial file read (a serial is at most 64 bytes).
const MAX_SERIAL_READ: u64 = 4096;
/// First and largest backoff cap between attempts.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How long a connection attempt to the provisioning listener may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why first boot cannot even start (retrying cannot help): exit 78.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("cannot read the unit's serial number from {} (config key claim.serial_file): {source}", path.display())]
    SerialUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the unit's serial number {serial:?} (from {origin}) is not usable: {reason}")]
    BadSerial {
        serial: String,
        origin: String,
        reason: String,
    },
    #[error("the claim identity ({}, {}; config keys claim.cert, claim.key) is not usable: {detail}", cert.display(), key.display())]
    ClaimIdentity {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("cannot read the fleet CA {} (config key identity.ca): {detail}", path.display())]
    FleetCa { path: PathBuf, detail: String },
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

/// What happened to a claim, for logs, tests and the benchmark.
#[derive(Debug, Default)]
pub struct ClaimStats {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Answers whose chain did not verify (never used).
    pub rejected: AtomicU64,
    /// Refusals and deferrals by the fleet.
    pub refused: AtomicU64,
    /// Attempts that got no answer in time or lost the connection.
    pub unanswered: AtomicU64,
}

impl ClaimStats {
    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// How first boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstBoot {
    /// No `[claim]` section, or the device identity is there already.
    NotNeeded,
    /// The device identity was obtained (or an interrupted install finished) now.
    Provisioned(DeviceId),
    /// The expired identity was replaced by a new one for the same id.
    Reprovisioned(DeviceId),
    /// Shut down while claiming; the next start resumes.
    Stopped,
}

/// What to do with an answer.
#[derive(Debug)]
pub enum Verdict {
    Install(crate::enroll::VerifiedChain),
    /// Ask again; after about `after` when the fleet said so.
    Retry {
        reason: String,
        after: Option<Duration>,
        rejected: bool,
    },
}

/// Judge the fleet's answer `payload` to our request (no I/O).
pub fn judge(payload: &[u8], key: &DeviceKey, expected: &Expected<'_>) -> Verdict {
    let response: Response = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            return Verdict::Retry {
                reason: format!("unreadable answer ({e})"),
                after: None,
                rejected: true,
            };
        }
    };
    match response {
        Response::Issued {
            device_id,
            chain_pem,
        } => {
            if &device_id != expected.device_id {
                return Verdict::Retry {
                    reason: format!(
                        "the answer is for {device_id}, we asked for {}",
                        expected.device_id
                    ),
                    after: None,
                    rejected: true,
                };
            }
            match verify_issued(&chain_pem, key, expected) {
                Ok(chain) => Verdict::Install(chain),
                Err(e) => Verdict::Retry {
                    reason: format!("refused the issued certificate: {e}"),
                    after: None,
                    rejected: true,
                },
            }
        }
        Response::Refused { reason } => Verdict::Retry {
            reason: format!("the fleet refused: {reason}"),
            after: None,
            rejected: false,
        },
        Response::Deferred {
            reason,
            retry_after_s,
        } => Verdict::Retry {
            reason: format!("the fleet deferred: {reason}"),
            after: Some(Duration::from_secs(retry_after_s.clamp(1, 3600))),
            rejected: false,
        },
    }
}

/// The unit's serial: `claim.serial`, or the first line of
/// `claim.serial_file` with NULs (device tree strings) and white space trimmed.
pub fn read_serial(claim: &ClaimConfig) -> Result<UnitSerial, ClaimError> {
    use std::io::Read;
    if let Some(s) = &claim.serial {
        return Ok(s.clone());
    }
    let path = claim
        .serial_file
        .clone()
        .unwrap_or_else(|| edgebind_protocol::bundle::defaults::CLAIM_SERIAL_FILE.into());
    let mut raw = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_SERIAL_READ).read_to_end(&mut raw))
        .map_err(|source| ClaimError::SerialUnreadable {
            path: path.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&raw);
    let line = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_matches(|c: char| c == '\0' || c.is_whitespace());
    UnitSerial::new(line).map_err(|e| ClaimError::BadSerial {
        serial: line.to_owned(),
        origin: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn read_ca(path: &Path) -> Result<CertificateDer<'static>, ClaimError> {
    let bad = |detail: String| ClaimError::FleetCa {
        path: path.to_owned(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    rustls_pemfile::certs(&mut bytes.as_slice())
        .next()
        .ok_or_else(|| bad("no PEM certificate".into()))?
        .map_err(|e| bad(e.to_string()))
}

/// Obtain the device identity when the bundle is a claim bundle and the
/// identity is not there yet; returns once it is installed, or when
/// `shutdown` fires. See the module documentation.
pub async fn ensure_identity(
    config: &AgentConfig,
    stats: &ClaimStats,
    notifier: &Notifier,
    watchdog: Option<Duration>,
    shutdown: &mut ShutdownSignal,
) -> Result<FirstBoot, ClaimError> {
    let Some(claim) = &config.claim else {
        return Ok(FirstBoot::NotNeeded);
    };
    let target = IdentityFiles {
        key: config.identity.key.clone(),
        cert: config.identity.cert.clone(),
    };
    let enroll_dir = config.state.dir.join(ENROLL_DIR);
    let ca = read_ca(&config.identity.ca)?;
    let serial = read_serial(claim)?;
    let device_id = serial.device_id();
    if Enrollment::resume(
        &enroll_dir,
        &Expected {
            ca: &ca,
            device_id: &device_id,
            replaces_not_after: None,
            now: UnixTime::now(),
        },
        &target,
    )? {
        info!(device = %device_id, "finished installing the identity obtained before the restart");
        return Ok(FirstBoot::Provisioned(device_id));
    }
    // Some(expiry): the installed certificate expired, re-provision.
    let replaces = if target.cert.exists() {
        // A renewed identity whose install a restart interrupted is the
        // one to judge (and it would be installed over ours afterwards).
        if let Err(e) = crate::renewal::resume(
            &config.state.dir,
            &config.identity,
            config.device_id.as_ref(),
        ) {
            warn!(error = %e, "could not finish installing a renewed identity; keeping the one in place");
        }
        let Some(expired) = expired_identity(&target.cert, unix_now()) else {
            return Ok(FirstBoot::NotNeeded);
        };
        if expired.cn.as_deref() != Some(device_id.as_str()) {
            warn!(
                installed = expired.cn.as_deref().unwrap_or_default(),
                serial_names = %device_id,
                "the device certificate expired, but it is not the identity this unit's serial names: not re-provisioning; `edgebind device reissue DEV` is the way back"
            );
            return Ok(FirstBoot::NotNeeded);
        }
        if !claim.key.exists() || !claim.cert.exists() {
            warn!(device = %device_id, key = %claim.key.display(), "the device certificate expired and the claim identity is gone: `edgebind device reissue {device_id}` is the way back");
            return Ok(FirstBoot::NotNeeded);
        }
        warn!(
            device = %device_id,
            expired_at = %crate::identity::rfc3339(expired.not_after),
            "the device certificate expired while the device was offline: re-provisioning the same id through the claim identity"
        );
        Some(expired.not_after)
    } else {
        None
    };
    let expected = |now| Expected {
        ca: &ca,
        device_id: &device_id,
        replaces_not_after: replaces,
        now,
    };
    let tls = claim_tls(config, claim)?;
    let enrollment = Enrollment::open(&enroll_dir)?;
    let (key, made) = enrollment.key()?;
    let csr_pem = key.csr_pem(&device_id)?;
    let batch = claim_batch(claim)?;
    info!(
        serial = %serial,
        device = %device_id,
        batch = %batch,
        key = if made { "generated now" } else { "kept from before" },
        provisioning = %format!("{}:{}", config.broker.host, claim.port),
        "{}",
        if replaces.is_some() {
            "claiming the device identity again (its certificate expired)"
        } else {
            "claiming a device identity (claim bundle, first boot)"
        }
    );
    notifier.notify(&format!(
        "READY=1\nSTATUS=claiming the identity of {device_id} (serial {serial})"
    ));

    let request = serde_json::to_vec(&Request { csr_pem }).expect("a request serializes");
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let mut ping = watchdog.map(|w| tokio::time::interval(w / 2));
    loop {
        let attempt = exchange(
            config, claim, &tls, &batch, &serial, &request, stats, &key, &expected,
        );
        tokio::pin!(attempt);
        let verdict = loop {
            tokio::select! {
                v = &mut attempt => break v,
                () = shutdown.requested() => return Ok(FirstBoot::Stopped),
                () = tick(&mut ping) => notifier.notify("WATCHDOG=1"),
            }
        };
        let (reason, after) = match verdict {
            Verdict::Install(chain) => {
                enrollment.clone().install(&key, &chain, &target)?;
                info!(device = %device_id, not_after = %crate::identity::rfc3339(chain.not_after), "device identity obtained and installed; the private key never left the device");
                notifier.notify(&format!("STATUS=identity of {device_id} installed"));
                if replaces.is_some() {
                    // A renewal begun with the expired certificate is void:
                    // the fleet abandoned it when it re-provisioned.
                    let _ =
                        std::fs::remove_dir_all(config.state.dir.join(crate::renewal::RENEWAL_DIR));
                }
                return Ok(if replaces.is_some() {
                    FirstBoot::Reprovisioned(device_id.clone())
                } else {
                    FirstBoot::Provisioned(device_id.clone())
                });
            }
            Verdict::Retry {
                reason,
                after,
                rejected,
            } => {
                if rejected {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
                (reason, after)
            }
        };
        let delay = after
            .unwrap_or_else(|| backoff.next_delay())
            .max(Duration::from_millis(200));
        warn!(device = %device_id, retry_in_ms = delay.as_millis() as u64, "claim not done: {reason}");
        if let Some(not_after) = replaces
            && unix_now() <= not_after
        {
            // The clock was set back (NTP after a wrong RTC): the installed
            // certificate is valid after all and is used as it is.
            info!(device = %device_id, "the installed certificate is valid by the clock now; not re-provisioning");
            enrollment.discard()?;
            return Ok(FirstBoot::NotNeeded);
        }
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                () = shutdown.requested() => return Ok(FirstBoot::Stopped),
                () = tick(&mut ping) => notifier.notify("WATCHDOG=1"),
            }
        }
    }
}

async fn tick(ping: &mut Option<tokio::time::Interval>) {
    match ping {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn claim_batch(claim: &ClaimConfig) -> Result<DeviceId, ClaimError> {
    let bad = |detail: String| ClaimError::ClaimIdentity {
        cert: claim.cert.clone(),
        key: claim.key.clone(),
        detail,
    };
    let bytes = std::fs::read(&claim.cert).map_err(|e| bad(e.to_string()))?;
    let leaf = rustls_pemfile::certs(&mut bytes.as_slice())
        .next()
        .ok_or_else(|| bad("no PEM certificate".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let facts = crate::identity::leaf_facts(&leaf, &claim.cert).map_err(|e| bad(e.to_string()))?;
    match facts.cn.as_deref().map(Principal::from_cn) {
        Some(Ok(Principal::Claim(batch))) => Ok(batch),
        _ => Err(bad(format!(
            "its CN {:?} is not a claim identity (claim:BATCH)",
            facts.cn.unwrap_or_default()
        ))),
    }
}

fn claim_tls(
    config: &AgentConfig,
    claim: &ClaimConfig,
) -> Result<Arc<rustls::ClientConfig>, ClaimError> {
    let material = edgebind_link::ClientIdentity {
        cert: claim.cert.clone(),
        key: claim.key.clone(),
        ca: config.identity.ca.clone(),
    }
    .load()
    .map_err(|e| ClaimError::ClaimIdentity {
        cert: claim.cert.clone(),
        key: claim.key.clone(),
        detail: e.to_string(),
    })?;
    let mut auth = edgebind_link::ClientAuth::from_pem(&material);
    auth.server_name = Some(config.broker.server_name());
    edgebind_link::client_config(auth)
        .map(Arc::new)
        .map_err(|e| ClaimError::ClaimIdentity {
            cert: claim.cert.clone(),
            key: claim.key.clone(),
            detail: e.to_string(),
        })
}

fn unix_now() -> i64 {
    UnixTime::now().as_secs() as i64
}

/// An installed certificate that has expired at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredIdentity {
    pub cn: Option<String>,
    pub not_after: i64,
}

/// The installed device certificate at `path`, when it has expired at `now`
/// (Unix seconds). `None` when it is valid, or unreadable: the agent's own
/// identity check reports that one.
pub fn expired_identity(path: &Path, now: i64) -> Option<ExpiredIdentity> {
    let bytes = std::fs::read(path).ok()?;
    let leaf = rustls_pemfile::certs(&mut bytes.as_slice()).next()?.ok()?;
    let facts = crate::identity::leaf_facts(&leaf, path).ok()?;
    (now > facts.not_after).then_some(ExpiredIdentity {
        cn: facts.cn,
        not_after: facts.not_after,
    })
}

/// What a failed connection attempt means for the device identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailedConnect {
    /// The certificate is valid by the device clock: retry as before.
    Retry,
    /// It has expired and a claim identity is there: re-provision.
    Reprovision,
    /// It has expired and there is no claim identity to recover with.
    NoWayBack,
}

/// Decide, after a connection attempt failed, whether the expired
/// certificate (`not_after`, by the device clock `now`) is why and the
/// claim identity can replace it. No network; only whether the claim files
/// exist.
pub fn after_failed_connect(config: &AgentConfig, not_after: i64, now: i64) -> AfterFailedConnect {
    if now <= not_after {
        return AfterFailedConnect::Retry;
    }
    match &config.claim {
        Some(c) if c.key.exists() && c.cert.exists() => AfterFailedConnect::Reprovision,
        _ => AfterFailedConnect::NoWayBack,
    }
}

/// One connection to the provisioning listener: subscribe, ask, wait.
#[allow(clippy::too_many_arguments)]
async fn exchange<'a>(
    config: &AgentConfig,
    claim: &ClaimConfig,
    tls: &Arc<rustls::ClientConfig>,
    batch: &DeviceId,
    serial: &UnitSerial,
    request: &[u8],
    stats: &ClaimStats,
    key: &DeviceKey,
    expected: &(dyn Fn(UnixTime) -> Expected<'a> + Sync),
) -> Verdict {
    let endpoint = edgebind_link::BrokerEndpoint {
        host: config.broker.host.clone(),
        port: claim.port,
    };
    let mut opts = edgebind_link::options(
        serial.as_str(),
        &endpoint,
        tls.clone(),
        config.broker.keep_alive(),
    );
    opts.set_clean_start(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let response_topic = Leg::Response.topic(batch, serial);
    let request_topic = Leg::Request.topic(batch, serial);
    let unanswered = |reason: String| {
        stats.unanswered.fetch_add(1, Ordering::Relaxed);
        Verdict::Retry {
            reason,
            after: None,
            rejected: false,
        }
    };
    let mut deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let verdict = loop {
        let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break unanswered("no answer in time".into()),
            Ok(Err(e)) => break unanswered(format!("provisioning connection failed: {e}")),
            Ok(Ok(ev)) => ev,
        };
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                if let Err(e) = client.subscribe(&response_topic, QoS::AtLeastOnce).await {
                    break unanswered(format!("subscribe: {e}"));
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                {
                    break unanswered(format!(
                        "the broker refused the response topic ({:?})",
                        ack.return_codes
                    ));
                }
                stats.requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = client
                    .publish(&request_topic, QoS::AtLeastOnce, false, request.to_vec())
                    .await
                {
                    break unanswered(format!("publish: {e}"));
                }
                deadline = tokio::time::Instant::now() + claim.response_timeout();
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == response_topic.as_bytes() => {
                let v = judge(&p.payload, key, &expected(UnixTime::now()));
                if let Verdict::Retry {
                    rejected: false, ..
                } = &v
                {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                }
                break v;
            }
            _ => {}
        }
    };
    let _ = client.disconnect().await;
    // Let the DISCONNECT out, briefly; the broker drops the session anyway.
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serial_comes_from_a_device_tree_file_or_the_config() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("serial-number");
        std::fs::write(&file, b"00000000ABC-1\0\n").unwrap();
        let mut claim = ClaimConfig::new(8884, UnitSerial::new("SN-1").unwrap());
        assert_eq!(read_serial(&claim).unwrap().as_str(), "SN-1");
        claim.serial = None;
        claim.serial_file = Some(file.clone());
        let serial = read_serial(&claim).unwrap();
        assert_eq!(serial.as_str(), "00000000ABC-1");
        assert_eq!(serial.device_id().as_str(), "00000000abc-1");
        std::fs::write(&file, b"SN 1\n").unwrap();
        let err = read_serial(&claim).unwrap_err().to_string();
        assert!(
            err.contains("not usable") && err.contains("serial-number"),
            "{err}"
        );
        claim.serial_file = Some(tmp.path().join("missing"));
        let err = read_serial(&claim).unwrap_err().to_string();
        assert!(err.contains("claim.serial_file"), "{err}");
    }

    #[test]
    fn only_a_verified_chain_for_the_id_asked_is_installed() {
        let key = DeviceKey::generate().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = p.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(p, ca_key);
        let sign = |cn: &str| {
            let mut l = rcgen::CertificateParams::default();
            l.distinguished_name = rcgen::DistinguishedName::new();
            l.distinguished_name.push(rcgen::DnType::CommonName, cn);
            l.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            l.signed_by(key.pair_for_tests(), &issuer).unwrap().pem()
        };
        let id = DeviceId::new("sn-1").unwrap();
        let ca = ca_cert.der().clone();
        let exp = Expected {
            ca: &ca,
            device_id: &id,
            replaces_not_after: None,
            now: UnixTime::now(),
        };
        let issued = |device: &str, chain: String| {
            serde_json::to_vec(&Response::Issued {
                device_id: DeviceId::new(device).unwrap(),
                chain_pem: chain,
            })
            .unwrap()
        };
        assert!(matches!(
            judge(&issued("sn-1", sign("sn-1")), &key, &exp),
            Verdict::Install(_)
        ));
        for (what, payload) in [
            ("another id", issued("sn-2", sign("sn-2"))),
            ("a CN that is not ours", issued("sn-1", sign("sn-2"))),
            ("garbage", b"{".to_vec()),
        ] {
            assert!(
                matches!(
                    judge(&payload, &key, &exp),
                    Verdict::Retry { rejected: true, .. }
                ),
                "{what}"
            );
        }
        let refused = serde_json::to_vec(&Response::Refused {
            reason: "not on the allow-list".into(),
        })
        .unwrap();
        assert!(matches!(
            judge(&refused, &key, &exp),
            Verdict::Retry {
                rejected: false,
                after: None,
                ..
            }
        ));
        let deferred = serde_json::to_vec(&Response::Deferred {
            reason: "rate".into(),
            retry_after_s: 5,
        })
        .unwrap();
        assert!(matches!(
            judge(&deferred, &key, &exp),
            Verdict::Retry { after: Some(d), .. } if d == Duration::from_secs(5)
        ));
    }

    #[test]
    fn only_an_expired_certificate_with_a_claim_identity_re_provisions() {
        use crate::config::{AgentConfig, BrokerConfig};
        let tmp = tempfile::tempdir().unwrap();
        let mut config = AgentConfig::new(BrokerConfig::new("127.0.0.1", 8883));
        // Valid by the clock: retry as before, whatever else is there.
        assert_eq!(
            after_failed_connect(&config, 1000, 1000),
            AfterFailedConnect::Retry
        );
        // Expired without a claim section, or with its files gone: no way back.
        assert_eq!(
            after_failed_connect(&config, 1000, 1001),
            AfterFailedConnect::NoWayBack
        );
        let mut claim = ClaimConfig::new(8884, UnitSerial::new("SN-1").unwrap());
        claim.cert = tmp.path().join("claim.crt");
        claim.key = tmp.path().join("claim.key");
        config.claim = Some(claim);
        assert_eq!(
            after_failed_connect(&config, 1000, 1001),
            AfterFailedConnect::NoWayBack
        );
        std::fs::write(tmp.path().join("claim.crt"), "c").unwrap();
        std::fs::write(tmp.path().join("claim.key"), "k").unwrap();
        assert_eq!(
            after_failed_connect(&config, 1000, 1001),
            AfterFailedConnect::Reprovision
        );
        assert_eq!(
            after_failed_connect(&config, 1000, 999),
            AfterFailedConnect::Retry
        );
    }

    #[test]
    fn an_installed_certificate_is_expired_only_after_its_not_after() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("device.crt");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, "sn-1");
        p.not_after = rcgen::date_time_ymd(2030, 1, 1);
        std::fs::write(&path, p.self_signed(&key).unwrap().pem()).unwrap();
        let not_after = 1_893_456_000; // 2030-01-01T00:00:00Z
        assert_eq!(expired_identity(&path, not_after), None);
        assert_eq!(
            expired_identity(&path, not_after + 1),
            Some(ExpiredIdentity {
                cn: Some("sn-1".into()),
                not_after
            })
        );
        // Unreadable or garbage: not this module's to judge.
        assert_eq!(expired_identity(&tmp.path().join("none"), i64::MAX), None);
        std::fs::write(&path, "junk").unwrap();
        assert_eq!(expired_identity(&path, i64::MAX), None);
    }
}
