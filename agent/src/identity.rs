//! The device identity: certificate chain, private key and fleet CA, checked
//! before the agent ever opens a socket.
//!
//! A broker's TLS alert ("unknown ca", "certificate expired") arrives after
//! the handshake with TLS 1.3 and says little; checking locally first turns
//! each way a bundle can be wrong into one actionable sentence and a non-zero
//! exit, instead of an agent that retries forever.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgebind_protocol::DeviceId;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;

use crate::config::IdentityConfig;

/// A checked identity, ready for [`edgebind_link::client_config`].
#[derive(Debug)]
pub struct Identity {
    /// The certificate's CN (equal to the configured id when one is set).
    pub device_id: DeviceId,
    /// Leaf first, then the issuing CA certificate(s), as sent to the broker.
    pub chain: Vec<CertificateDer<'static>>,
    /// Never logged; `Debug` of `PrivateKeyDer` redacts the bytes.
    pub key: PrivateKeyDer<'static>,
    /// The fleet root: the only trust anchor.
    pub ca: CertificateDer<'static>,
    /// Leaf expiry (Unix seconds), for "expires soon" warnings.
    pub not_after: i64,
}

/// Why the agent refuses to start with this identity. Each message names the
/// file (and config key) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {what} {} (config key identity.{key}): {source}", path.display())]
    Unreadable {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} (config key identity.{key}) is not valid PEM: {detail}", path.display())]
    BadPem {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what} {} (config key identity.{key}) contains no {expected}", path.display())]
    Empty {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("certificate in {} is not a valid X.509 certificate: {detail}", path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error(
        "the private key {} does not belong to the device certificate {}: {detail}; install the key and certificate of the same identity bundle",
        key.display(), cert.display()
    )]
    KeyMismatch {
        key: PathBuf,
        cert: PathBuf,
        detail: String,
    },
    #[error(
        "the device certificate {} is not valid yet (valid from {not_before}, device clock says {now}); check the clock (NTP/RTC)",
        path.display()
    )]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error(
        "the device certificate {} expired at {not_after} (device clock says {now}); issue a new identity bundle for this device (`edgebind device reissue DEVICE`)",
        path.display()
    )]
    Expired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error(
        "the device certificate {} was not issued by the fleet CA {}: {detail}; this bundle belongs to another fleet or its chain is incomplete",
        cert.display(), ca.display()
    )]
    NotIssuedByFleetCa {
        cert: PathBuf,
        ca: PathBuf,
        detail: String,
    },
    #[error("the device certificate {} has no subject CN; device certificates carry the device id as CN", path.display())]
    NoCommonName { path: PathBuf },
    #[error("the device certificate {} has CN {cn:?}, which is not a valid device id: {reason}", path.display())]
    BadCommonName {
        path: PathBuf,
        cn: String,
        reason: String,
    },
    #[error(
        "device_id {configured:?} in the configuration does not match the certificate CN {cn:?} in {}; the wrong identity bundle is installed",
        path.display()
    )]
    IdMismatch {
        configured: String,
        cn: String,
        path: PathBuf,
    },
}

impl Identity {
    /// Load and check the identity files named by `cfg` at time `now`.
    pub fn load(
        cfg: &IdentityConfig,
        configured_id: Option<&DeviceId>,
        provider: &Arc<CryptoProvider>,
        now: UnixTime,
    ) -> Result<Identity, IdentityError> {
        let chain = read_certs("device certificate chain", "cert", &cfg.cert)?;
        let ca = read_certs("fleet CA certificate", "ca", &cfg.ca)?
            .into_iter()
            .next()
            .expect("read_certs never returns an empty list");
        let key = read_key(&cfg.key)?;

        let leaf = &chain[0];
        let facts = leaf_facts(leaf, &cfg.cert)?;
        let now_s = now.as_secs() as i64;
        if now_s < facts.not_before {
            return Err(IdentityError::NotYetValid {
                path: cfg.cert.clone(),
                not_before: rfc3339(facts.not_before),
                now: rfc3339(now_s),
            });
        }
        if now_s > facts.not_after {
            return Err(IdentityError::Expired {
                path: cfg.cert.clone(),
                not_after: rfc3339(facts.not_after),
                now: rfc3339(now_s),
            });
        }
        verify_chain(&chain, &ca, provider, now).map_err(|detail| {
            IdentityError::NotIssuedByFleetCa {
                cert: cfg.cert.clone(),
                ca: cfg.ca.clone(),
                detail,
            }
        })?;
        check_key_matches(&chain, &key, provider).map_err(|detail| IdentityError::KeyMismatch {
            key: cfg.key.clone(),
            cert: cfg.cert.clone(),
            detail,
        })?;

        let cn = facts.cn.ok_or_else(|| IdentityError::NoCommonName {
            path: cfg.cert.clone(),
        })?;
        let device_id = DeviceId::new(cn.clone()).map_err(|e| IdentityError::BadCommonName {
            path: cfg.cert.clone(),
            cn: cn.clone(),
            reason: e.to_string(),
        })?;
        if let Some(configured) = configured_id
            && configured != &device_id
        {
            return Err(IdentityError::IdMismatch {
                configured: configured.to_string(),
                cn,
                path: cfg.cert.clone(),
            });
        }
        Ok(Identity {
            device_id,
            chain,
            key,
            ca,
            not_after: facts.not_after,
        })
    }
}

fn read_file(what: &'static str, key: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Unreadable {
        what,
        key,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(
    what: &'static str,
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes = read_file(what, key, path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadPem {
            what,
            key,
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Empty {
            what,
            key,
            path: path.to_owned(),
            expected: "PEM certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    const WHAT: &str = "device private key";
    let bytes = read_file(WHAT, "key", path)?;
    // Error texts from the PEM reader never contain key bytes.
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| IdentityError::BadPem {
            what: WHAT,
            key: "key",
            path: path.to_owned(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| IdentityError::Empty {
            what: WHAT,
            key: "key",
            path: path.to_owned(),
            expected: "PEM private key (PKCS#8, SEC1 or PKCS#1)",
        })
}

pub(crate) struct LeafFacts {
    pub(crate) cn: Option<String>,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
}

pub(crate) fn leaf_facts(
    leaf: &CertificateDer<'_>,
    path: &Path,
) -> Result<LeafFacts, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        IdentityError::BadCertificate {
            path: path.to_owned(),
            detail: e.to_string(),
        }
    })?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|attr| attr.as_str().ok())
        .map(str::to_owned);
    Ok(LeafFacts {
        cn,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Verify leaf → (intermediates from the chain file) → fleet CA, for client
/// authentication, with the fleet CA as the only trust anchor.
pub(crate) fn verify_chain(
    chain: &[CertificateDer<'static>],
    ca: &CertificateDer<'static>,
    provider: &CryptoProvider,
    now: UnixTime,
) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca)
        .map_err(|e| format!("the fleet CA certificate is unusable as a trust anchor: {e}"))?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| e.to_string())?;
    leaf.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &[anchor],
        &chain[1..],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("chain verification failed ({e:?})"))
}

fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<(), String> {
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("the key cannot be used ({e})"))?;
    CertifiedKey::new(chain.to_vec(), signing)
        .keys_match()
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "its public key differs from the certificate's".to_owned()
            }
            other => other.to_string(),
        })
}

/// `YYYY-MM-DDTHH:MM:SSZ` for messages (no date crate needed for UTC).
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_577_923_199), "2020-01-01T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn missing_file_names_path_and_key() {
        let cfg = IdentityConfig {
            cert: "/nonexistent/device.crt".into(),
            key: "/nonexistent/device.key".into(),
            ca: "/nonexistent/ca.crt".into(),
        };
        let provider = edgebind_link::provider();
        let err = Identity::load(&cfg, None, &provider, UnixTime::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/device.crt"), "{err}");
        assert!(err.contains("identity.cert"), "{err}");
    }
}
