//! A key made on the device and the certificate the fleet issues for it: the
//! one module that claim-based first boot and certificate renewal share.
//!
//! The steps, whatever carries the request:
//! 1. [`Enrollment::open`] on a directory of its own under the state
//!    directory, then [`Enrollment::key`]: the ECDSA P-256 key pair is
//!    generated on the device (rcgen, ring) once and kept (0600), so a
//!    restart asks again with the same key and the fleet recognises the
//!    repeat. The private key never leaves the device.
//! 2. [`DeviceKey::csr_pem`]: a PKCS#10 request whose subject CN is a
//!    [`DeviceId`], validated by the one id rule before it is asked for.
//! 3. [`verify_issued`]: the chain that came back is checked against what
//!    was asked ([`Expected`]): it certifies our key, chains to the fleet CA
//!    for client authentication, names the id we asked for, is valid now,
//!    and, when it replaces a certificate, expires later than that one.
//!    Anything else is an [`EnrollError`] and must never be used.
//! 4. [`Enrollment::accept`] keeps the verified chain beside the key, then
//!    [`Enrollment::install`] writes key and certificate over the identity
//!    files ([`IdentityFiles`]), each atomically (temporary file, fsync,
//!    rename, fsync of the directory; the key 0600 from its creation), and
//!    removes the enrollment directory.
//!
//! Restart safety: until the enrollment directory is gone, everything needed
//! to finish is in it. A caller starting up calls [`Enrollment::resume`]
//! first: when an accepted chain is there (a crash between or during the two
//! renames of `install`), it installs it again, which is idempotent. Key and
//! certificate are two files, so between the two renames they disagree; the
//! key goes first, and the identity is only complete (and loadable by
//! [`crate::identity::Identity::load`]) once `resume`/`install` returned.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use edgebind_protocol::DeviceId;
use edgebind_protocol::bundle::{DIR_MODE, PRIVATE_MODE, PUBLIC_MODE};
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::identity::{leaf_facts, rfc3339, verify_chain};

/// The key file inside an enrollment directory.
pub const PENDING_KEY: &str = "key.pem";
/// The verified chain inside an enrollment directory, once accepted.
pub const ACCEPTED_CHAIN: &str = "chain.pem";
/// Largest key or chain file read back (a chain is a few kilobytes).
const MAX_READ: u64 = 64 * 1024;

/// Why an enrollment step failed. A verification error means the chain must
/// not be used; the caller retries (with backoff) and keeps its key.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the kept key {} is unusable ({detail}); remove the enrollment directory {} to start over with a new key", path.display(), dir.display())]
    BadKey {
        path: PathBuf,
        dir: PathBuf,
        detail: String,
    },
    #[error("cannot generate a key pair or request: {0}")]
    Crypto(String),
    #[error("the returned chain is not PEM certificates: {0}")]
    NotPem(String),
    #[error("the returned chain holds no certificate")]
    EmptyChain,
    #[error("the returned certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("the returned certificate is for another key than ours")]
    NotOurKey,
    #[error("the returned certificate names {got:?}, we asked for {asked:?}")]
    WrongId { asked: String, got: String },
    #[error("the returned certificate does not chain to the fleet CA: {0}")]
    NotFromFleetCa(String),
    #[error(
        "the returned certificate is not valid now (valid {not_before} to {not_after}, device clock says {now})"
    )]
    NotValidNow {
        not_before: String,
        not_after: String,
        now: String,
    },
    #[error(
        "the returned certificate expires at {got}, not later than the one it replaces ({current})"
    )]
    NotLater { got: String, current: String },
}

fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> EnrollError + 'p {
    move |source| EnrollError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A key pair generated on this device. `Debug` shows no key material.
pub struct DeviceKey {
    pair: rcgen::KeyPair,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey").finish_non_exhaustive()
    }
}

impl DeviceKey {
    /// A new ECDSA P-256 key pair (the fleet's only key type).
    pub fn generate() -> Result<DeviceKey, EnrollError> {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map(|pair| DeviceKey { pair })
            .map_err(|e| EnrollError::Crypto(e.to_string()))
    }

    /// A key read back from its PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<DeviceKey, String> {
        let pair = rcgen::KeyPair::from_pem(pem).map_err(|e| e.to_string())?;
        if pair.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err("not an ECDSA P-256 key".into());
        }
        Ok(DeviceKey { pair })
    }

    /// The private key as PKCS#8 PEM (what goes into the key file).
    pub fn private_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    /// The public key's bits (the uncompressed EC point), as a certificate's
    /// SubjectPublicKeyInfo carries them.
    pub fn public_key_raw(&self) -> &[u8] {
        self.pair.public_key_raw()
    }

    #[cfg(test)]
    pub(crate) fn pair_for_tests(&self) -> &rcgen::KeyPair {
        &self.pair
    }

    /// A PKCS#10 request, signed with this key, whose subject is only
    /// `CN = id`. The fleet takes nothing else from it.
    pub fn csr_pem(&self, id: &DeviceId) -> Result<String, EnrollError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, id.as_str());
        params
            .serialize_request(&self.pair)
            .and_then(|csr| csr.pem())
            .map_err(|e| EnrollError::Crypto(e.to_string()))
    }
}

/// What a returned chain must be.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// The fleet root CA: the only trust anchor.
    pub ca: &'a CertificateDer<'static>,
    /// The id the request asked for.
    pub device_id: &'a DeviceId,
    /// When the chain replaces a certificate (renewal): that one's expiry
    /// (Unix seconds); the new one must expire later.
    pub replaces_not_after: Option<i64>,
    pub now: UnixTime,
}

/// A chain that passed [`verify_issued`].
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    /// Leaf first, then the issuing CA(s), as it came (PEM).
    pub pem: String,
    pub certs: Vec<CertificateDer<'static>>,
    pub device_id: DeviceId,
    /// Leaf expiry (Unix seconds).
    pub not_after: i64,
}

/// Check a returned chain (see the module documentation). Nothing is
/// written; only a [`VerifiedChain`] can be accepted and installed.
pub fn verify_issued(
    chain_pem: &str,
    key: &DeviceKey,
    expected: &Expected<'_>,
) -> Result<VerifiedChain, EnrollError> {
    let certs = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EnrollError::NotPem(e.to_string()))?;
    let leaf = certs.first().ok_or(EnrollError::EmptyChain)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| EnrollError::BadCertificate(e.to_string()))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(EnrollError::NotOurKey);
    }
    let facts = leaf_facts(leaf, Path::new("response"))
        .map_err(|e| EnrollError::BadCertificate(e.to_string()))?;
    let got = facts.cn.unwrap_or_default();
    if got != expected.device_id.as_str() {
        return Err(EnrollError::WrongId {
            asked: expected.device_id.to_string(),
            got,
        });
    }
    let now = expected.now.as_secs() as i64;
    if now < facts.not_before || now > facts.not_after {
        return Err(EnrollError::NotValidNow {
            not_before: rfc3339(facts.not_before),
            not_after: rfc3339(facts.not_after),
            now: rfc3339(now),
        });
    }
    verify_chain(
        &certs,
        expected.ca,
        &edgebind_link::provider(),
        expected.now,
    )
    .map_err(EnrollError::NotFromFleetCa)?;
    if let Some(current) = expected.replaces_not_after
        && facts.not_after <= current
    {
        return Err(EnrollError::NotLater {
            got: rfc3339(facts.not_after),
            current: rfc3339(current),
        });
    }
    Ok(VerifiedChain {
        pem: chain_pem.to_owned(),
        certs,
        device_id: expected.device_id.clone(),
        not_after: facts.not_after,
    })
}

/// Where an identity's key and certificate chain live (the agent
/// configuration's `identity.key` and `identity.cert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
}

/// One enrollment in progress, kept in its own directory (0700) so that a
/// restart at any point resumes it.
#[derive(Debug, Clone)]
pub struct Enrollment {
    dir: PathBuf,
}

impl Enrollment {
    /// Open (or create) the enrollment directory `dir`.
    pub fn open(dir: &Path) -> Result<Enrollment, EnrollError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io_err("cannot create the enrollment directory", dir))?;
        Ok(Enrollment {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether an enrollment is in progress in `dir`.
    pub fn exists(dir: &Path) -> bool {
        dir.join(PENDING_KEY).exists()
    }

    /// The enrollment's key: the kept one, or a new one generated and kept
    /// (0600, durable) before it is returned. `true` when it was made now.
    pub fn key(&self) -> Result<(DeviceKey, bool), EnrollError> {
        let path = self.dir.join(PENDING_KEY);
        match read_small(&path) {
            Ok(text) => DeviceKey::from_pem(&text)
                .map(|k| (k, false))
                .map_err(|detail| EnrollError::BadKey {
                    path: path.clone(),
                    dir: self.dir.clone(),
                    detail,
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = DeviceKey::generate()?;
                write_file(&path, key.private_pem().as_bytes(), PRIVATE_MODE)
                    .map_err(io_err("cannot keep the new key in", &path))?;
                Ok((key, true))
            }
            Err(e) => Err(io_err("cannot read the kept key", &path)(e)),
        }
    }

    /// Keep a verified chain for [`Enrollment::install`] (durably).
    pub fn accept(&self, chain: &VerifiedChain) -> Result<(), EnrollError> {
        let path = self.dir.join(ACCEPTED_CHAIN);
        write_file(&path, chain.pem.as_bytes(), PUBLIC_MODE)
            .map_err(io_err("cannot keep the accepted chain in", &path))
    }

    /// The accepted chain, verified again against the kept key (a file
    /// damaged since is reported, not installed).
    pub fn accepted(
        &self,
        expected: &Expected<'_>,
    ) -> Result<Option<(DeviceKey, VerifiedChain)>, EnrollError> {
        let path = self.dir.join(ACCEPTED_CHAIN);
        let text = match read_small(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot read the accepted chain", &path)(e)),
        };
        let (key, _) = self.key()?;
        let chain = verify_issued(&text, &key, expected)?;
        Ok(Some((key, chain)))
    }

    /// Write key and chain over `target` (key first, each atomically), then
    /// remove the enrollment directory: done.
    pub fn install(
        self,
        key: &DeviceKey,
        chain: &VerifiedChain,
        target: &IdentityFiles,
    ) -> Result<(), EnrollError> {
        self.accept(chain)?;
        crate::test_hooks::pause_point(crate::test_hooks::step::BEFORE_REPLACE);
        write_file(&target.key, key.private_pem().as_bytes(), PRIVATE_MODE)
            .map_err(io_err("cannot write the key", &target.key))?;
        crate::test_hooks::pause_point(crate::test_hooks::step::BETWEEN_RENAMES);
        write_file(&target.cert, chain.pem.as_bytes(), PUBLIC_MODE)
            .map_err(io_err("cannot write the certificate", &target.cert))?;
        std::fs::remove_dir_all(&self.dir)
            .map_err(io_err("cannot remove the finished enrollment", &self.dir))
    }

    /// At start-up: finish an enrollment whose chain was accepted but maybe
    /// not installed. `Ok(true)` when it installed one now; `Ok(false)` when
    /// there was none (nothing accepted yet, or no enrollment at all).
    pub fn resume(
        dir: &Path,
        expected: &Expected<'_>,
        target: &IdentityFiles,
    ) -> Result<bool, EnrollError> {
        if !Enrollment::exists(dir) {
            return Ok(false);
        }
        let this = Enrollment::open(dir)?;
        match this.accepted(expected)? {
            Some((key, chain)) => this.install(&key, &chain, target).map(|()| true),
            None => Ok(false),
        }
    }

    /// Give up on this enrollment (its key with it).
    pub fn discard(self) -> Result<(), EnrollError> {
        std::fs::remove_dir_all(&self.dir)
            .map_err(io_err("cannot remove the enrollment", &self.dir))
    }
}

fn read_small(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    File::open(path)?.take(MAX_READ).read_to_string(&mut text)?;
    Ok(text)
}

/// Temporary file created with `mode` (a key is never readable by others,
/// not even for a moment), fsync, rename, fsync of the directory.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.new"));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have taken bits away; never added any.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    /// What the fleet would sign: a client-auth leaf for `public` named `cn`.
    fn leaf(ca: &Ca, cn: &str, public: &DeviceKey, days: (i64, i64)) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        p.signed_by(&public.pair, &ca.issuer).unwrap().pem()
    }

    fn expected<'a>(ca: &'a Ca, id: &'a DeviceId) -> Expected<'a> {
        Expected {
            ca: &ca.der,
            device_id: id,
            replaces_not_after: None,
            now: UnixTime::now(),
        }
    }

    #[test]
    fn the_request_names_the_id_and_carries_our_key() {
        let key = DeviceKey::generate().unwrap();
        let id = DeviceId::new("line-1-sn0001").unwrap();
        let pem = key.csr_pem(&id).unwrap();
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
                .unwrap();
        assert_eq!(
            csr.certification_request_info
                .subject_pki
                .subject_public_key
                .data
                .as_ref(),
            key.public_key_raw()
        );
        let subject = &csr.certification_request_info.subject;
        let cns: Vec<_> = subject
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cns, ["line-1-sn0001"]);
        assert_eq!(subject.iter().count(), 1, "only the CN: {subject}");
    }

    #[test]
    fn a_right_chain_verifies_and_every_wrong_one_is_refused() {
        let fleet = ca("fleet");
        let key = DeviceKey::generate().unwrap();
        let id = DeviceId::new("dev-a").unwrap();
        let good = leaf(&fleet, "dev-a", &key, (-1, 30));
        let ok = verify_issued(&good, &key, &expected(&fleet, &id)).unwrap();
        assert_eq!(ok.device_id, id);
        assert!(ok.not_after > UnixTime::now().as_secs() as i64);

        let other_key = DeviceKey::generate().unwrap();
        type Case = (&'static str, String, fn(&EnrollError) -> bool);
        let cases: Vec<Case> = vec![
            (
                "another key",
                leaf(&fleet, "dev-a", &other_key, (-1, 30)),
                |e| matches!(e, EnrollError::NotOurKey),
            ),
            ("another id", leaf(&fleet, "dev-b", &key, (-1, 30)), |e| {
                matches!(e, EnrollError::WrongId { .. })
            }),
            (
                "another CA",
                leaf(&ca("fleet"), "dev-a", &key, (-1, 30)),
                |e| matches!(e, EnrollError::NotFromFleetCa(_)),
            ),
            ("expired", leaf(&fleet, "dev-a", &key, (-30, -1)), |e| {
                matches!(e, EnrollError::NotValidNow { .. })
            }),
            ("not yet valid", leaf(&fleet, "dev-a", &key, (2, 30)), |e| {
                matches!(e, EnrollError::NotValidNow { .. })
            }),
            ("empty", String::new(), |e| {
                matches!(e, EnrollError::EmptyChain)
            }),
            (
                "garbage",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
                |e| matches!(e, EnrollError::BadCertificate(_) | EnrollError::NotPem(_)),
            ),
        ];
        for (what, pem, is) in cases {
            let err = verify_issued(&pem, &key, &expected(&fleet, &id)).unwrap_err();
            assert!(is(&err), "{what}: {err}");
        }
    }

    #[test]
    fn a_renewal_must_expire_later_than_the_certificate_it_replaces() {
        let fleet = ca("fleet");
        let key = DeviceKey::generate().unwrap();
        let id = DeviceId::new("dev-a").unwrap();
        let pem = leaf(&fleet, "dev-a", &key, (-1, 30));
        let later = UnixTime::now().as_secs() as i64 + 60 * 86_400;
        let mut exp = expected(&fleet, &id);
        exp.replaces_not_after = Some(later);
        assert!(matches!(
            verify_issued(&pem, &key, &exp),
            Err(EnrollError::NotLater { .. })
        ));
        exp.replaces_not_after = Some(later - 40 * 86_400);
        verify_issued(&pem, &key, &exp).unwrap();
    }

    #[test]
    fn the_key_is_made_once_kept_private_and_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("enroll");
        let first = Enrollment::open(&dir).unwrap();
        let (key, made) = first.key().unwrap();
        assert!(made);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(PENDING_KEY)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let (again, made) = Enrollment::open(&dir).unwrap().key().unwrap();
        assert!(!made);
        assert_eq!(again.public_key_raw(), key.public_key_raw());
        assert!(Enrollment::exists(&dir));
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_damaged_kept_key_is_reported_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let e = Enrollment::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join(PENDING_KEY), "not a key").unwrap();
        let err = e.key().unwrap_err().to_string();
        assert!(err.contains("remove the enrollment directory"), "{err}");
    }

    #[test]
    fn install_writes_the_identity_and_an_interrupted_one_resumes() {
        let fleet = ca("fleet");
        let id = DeviceId::new("dev-a").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("enroll");
        let target = IdentityFiles {
            key: tmp.path().join("device.key"),
            cert: tmp.path().join("device.crt"),
        };
        let e = Enrollment::open(&dir).unwrap();
        let (key, _) = e.key().unwrap();
        let chain = verify_issued(
            &leaf(&fleet, "dev-a", &key, (-1, 30)),
            &key,
            &expected(&fleet, &id),
        )
        .unwrap();
        // Accepted, then "crashed" before installing.
        e.accept(&chain).unwrap();
        assert!(!target.cert.exists());
        assert!(Enrollment::resume(&dir, &expected(&fleet, &id), &target).unwrap());
        assert!(!dir.exists(), "the finished enrollment is removed");
        let mode = std::fs::metadata(&target.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&target.cert).unwrap(), chain.pem);
        let back = DeviceKey::from_pem(&std::fs::read_to_string(&target.key).unwrap()).unwrap();
        assert_eq!(back.public_key_raw(), key.public_key_raw());
        // Nothing left to resume.
        assert!(!Enrollment::resume(&dir, &expected(&fleet, &id), &target).unwrap());
    }

    #[test]
    fn a_chain_damaged_after_acceptance_is_not_installed() {
        let fleet = ca("fleet");
        let id = DeviceId::new("dev-a").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("enroll");
        let target = IdentityFiles {
            key: tmp.path().join("device.key"),
            cert: tmp.path().join("device.crt"),
        };
        let e = Enrollment::open(&dir).unwrap();
        e.key().unwrap();
        let other = DeviceKey::generate().unwrap();
        std::fs::write(
            dir.join(ACCEPTED_CHAIN),
            leaf(&fleet, "dev-a", &other, (-1, 30)),
        )
        .unwrap();
        assert!(matches!(
            Enrollment::resume(&dir, &expected(&fleet, &id), &target),
            Err(EnrollError::NotOurKey)
        ));
        assert!(!target.key.exists() && !target.cert.exists());
    }
}
