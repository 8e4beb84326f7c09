//! The PKI directory: CAs, issuing, inventory, revocation.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use edgebind_protocol::{DeviceId, Principal};
use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use ring::digest;
use time::{Duration, OffsetDateTime};

use crate::Error;
use crate::files::{self, create_dir, read_string, write_private, write_public};
use crate::inventory::{CrlStatus, Inventory, InventoryEntry, normalize_serial};
use crate::layout::*;
use crate::profile::{self, Validity, default_days};

/// Options of [`Pki::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Fleet name, written into the CA subjects (organization and CN).
    pub fleet: String,
    pub root_days: u32,
    pub issuing_days: u32,
    /// Replace existing CA material (every certificate issued so far stops working).
    pub force: bool,
}

impl InitOptions {
    pub fn new(fleet: impl Into<String>) -> Self {
        InitOptions {
            fleet: fleet.into(),
            root_days: default_days::ROOT_CA,
            issuing_days: default_days::ISSUING_CA,
            force: false,
        }
    }
}

/// One freshly issued certificate with its private key (held only in memory;
/// the caller writes it where it belongs, e.g. into an identity bundle).
#[derive(Clone)]
pub struct IssuedCert {
    /// `None` for the broker's server certificate.
    pub principal: Option<Principal>,
    pub cn: String,
    /// Lower-case hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint_sha256: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The leaf certificate alone, PEM.
    pub cert_pem: String,
    /// Leaf followed by the issuing CA: what a client or the broker presents.
    pub chain_pem: String,
    /// PKCS#8 PEM private key.
    pub key_pem: String,
    /// SHA-256 (hex) of the issuing CA certificate that signed it.
    pub issuer_id: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("IssuedCert")
            .field("cn", &self.cn)
            .field("serial", &self.serial)
            .field("fingerprint_sha256", &self.fingerprint_sha256)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    fn role(&self) -> &'static str {
        self.principal.as_ref().map_or("broker", Principal::role)
    }

    fn inventory_entry(&self, issued_at: OffsetDateTime) -> InventoryEntry {
        InventoryEntry {
            serial: self.serial.clone(),
            cn: self.cn.clone(),
            role: self.role().to_owned(),
            fingerprint_sha256: self.fingerprint_sha256.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            issued_at,
            revoked_at: None,
            issuer: Some(self.issuer_id.clone()).filter(|i| !i.is_empty()),
        }
    }

    /// Write `<dir>/<stem>.crt` (chain), `<dir>/<stem>.key` (0600) and
    /// `<dir>/ca.crt` (the fleet root), creating `dir` (0700).
    pub fn write_identity(&self, dir: &Path, stem: &str, root_pem: &str) -> Result<(), Error> {
        create_dir(dir, 0o700)?;
        write_private(&dir.join(format!("{stem}.key")), self.key_pem.as_bytes())?;
        write_public(&dir.join(format!("{stem}.crt")), self.chain_pem.as_bytes())?;
        write_public(&dir.join("ca.crt"), root_pem.as_bytes())
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn parse_hex(serial: &str) -> Result<Vec<u8>, Error> {
    let s = normalize_serial(serial);
    let s = if s.len() % 2 == 1 { format!("0{s}") } else { s };
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16)
                .map_err(|_| Error::Invalid(format!("serial {serial:?} is not hexadecimal")))
        })
        .collect()
}

/// A fleet PKI directory opened for issuing (only the issuing CA's key is loaded).
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    issuing_pem: String,
    /// SHA-256 (hex) of the issuing CA certificate.
    issuer_id: String,
    /// Issuing CAs replaced by a rollover whose certificates may still be
    /// in use: they sign CRLs (nothing else) until they are retired.
    previous: Vec<PreviousIssuer>,
    root_pem: String,
    crl_validity: Duration,
}

/// An issuing CA replaced by [`Pki::rollover`], kept for its CRL.
struct PreviousIssuer {
    id: String,
    issuer: Issuer<'static, KeyPair>,
}

/// What [`Pki::rollover`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rollover {
    /// SHA-256 of the new issuing CA certificate.
    pub new_issuer: String,
    pub new_subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// The issuing CA it replaces, now in `previous-issuing/`.
    pub previous_issuer: String,
}

/// Where replaced issuing CAs live: `previous-issuing/<sha256>.{crt,key}`
/// while certificates they signed are usable, `retired-issuing/` after.
pub const PREVIOUS_ISSUING_DIR: &str = "previous-issuing";
pub const RETIRED_ISSUING_DIR: &str = "retired-issuing";

/// SHA-256 (hex) of the first certificate of a PEM text.
fn pem_cert_sha256(pem: &str) -> Option<String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    Some(hex(
        digest::digest(&digest::SHA256, &block.contents).as_ref()
    ))
}

fn load_issuer(cert: &Path, key: &Path) -> Result<(Issuer<'static, KeyPair>, String), Error> {
    let pem = read_string(cert)?;
    let key_pem = read_string(key)?;
    let pair = KeyPair::from_pem(&key_pem).map_err(|e| Error::Parse {
        path: key.to_owned(),
        message: format!("not a usable private key: {e}"),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&pem, pair).map_err(|e| Error::Parse {
        path: cert.to_owned(),
        message: format!("not a usable CA certificate: {e}"),
    })?;
    Ok((issuer, pem))
}

/// Default lifetime of a CRL: the broker refuses everyone once it lapses, so
/// it is re-issued by `pki crl` / `broker reload` well before that.
pub const DEFAULT_CRL_DAYS: u32 = 7;

impl Pki {
    /// Create a root CA and an issuing CA in `dir` (mode 0700, keys 0600).
    /// Refuses to touch existing CA files unless `opts.force`.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Pki, Error> {
        if !opts.force {
            for name in [ROOT_KEY, ROOT_CERT, ISSUING_KEY, ISSUING_CERT] {
                let path = dir.join(name);
                if path.exists() {
                    return Err(Error::Exists { path });
                }
            }
        }
        if opts.fleet.trim().is_empty() {
            return Err(Error::Invalid("the fleet name must not be empty".into()));
        }
        create_dir(dir, 0o700)?;

        let root_key = KeyPair::generate().map_err(|e| Error::crypto("root CA key", e))?;
        let root_params = profile::root_ca(&opts.fleet, Validity::days(opts.root_days))?;
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(|e| Error::crypto("root CA certificate", e))?;
        let root_issuer = Issuer::new(root_params, &root_key);

        let issuing_key = KeyPair::generate().map_err(|e| Error::crypto("issuing CA key", e))?;
        let issuing_params = profile::issuing_ca(&opts.fleet, Validity::days(opts.issuing_days))?;
        let issuing_cert = issuing_params
            .signed_by(&issuing_key, &root_issuer)
            .map_err(|e| Error::crypto("issuing CA certificate", e))?;

        write_private(&dir.join(ROOT_KEY), root_key.serialize_pem().as_bytes())?;
        write_public(&dir.join(ROOT_CERT), root_cert.pem().as_bytes())?;
        write_private(
            &dir.join(ISSUING_KEY),
            issuing_key.serialize_pem().as_bytes(),
        )?;
        write_public(&dir.join(ISSUING_CERT), issuing_cert.pem().as_bytes())?;
        write_public(
            &dir.join(INVENTORY),
            serde_json::to_string_pretty(&Inventory::new())
                .expect("inventory serializes")
                .as_bytes(),
        )?;
        let pki = Pki::open(dir)?;
        pki.refresh_crl()?;
        Ok(pki)
    }

    /// Open an existing PKI. Needs `issuing-ca.{crt,key}` and `root-ca.crt`;
    /// the root key may be absent (kept offline).
    pub fn open(dir: &Path) -> Result<Pki, Error> {
        let issuing_pem = read_string(&dir.join(ISSUING_CERT))?;
        let key_path = dir.join(ISSUING_KEY);
        let key_pem = read_string(&key_path)?;
        let root_pem = read_string(&dir.join(ROOT_CERT))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| Error::Parse {
            path: key_path.clone(),
            message: format!("not a usable private key: {e}"),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&issuing_pem, key).map_err(|e| Error::Parse {
            path: dir.join(ISSUING_CERT),
            message: format!("not a usable CA certificate: {e}"),
        })?;
        let issuer_id = pem_cert_sha256(&issuing_pem).unwrap_or_default();
        let mut previous = Vec::new();
        let prev_dir = dir.join(PREVIOUS_ISSUING_DIR);
        if let Ok(list) = fs::read_dir(&prev_dir) {
            let mut names: Vec<PathBuf> = list
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "crt"))
                .collect();
            names.sort();
            for crt in names {
                let (issuer, pem) = load_issuer(&crt, &crt.with_extension("key"))?;
                previous.push(PreviousIssuer {
                    id: pem_cert_sha256(&pem).unwrap_or_default(),
                    issuer,
                });
            }
        }
        Ok(Pki {
            dir: dir.to_owned(),
            issuer,
            issuing_pem,
            issuer_id,
            previous,
            root_pem,
            crl_validity: Duration::days(i64::from(DEFAULT_CRL_DAYS)),
        })
    }

    /// SHA-256 (hex) of the issuing CA certificate that signs now.
    pub fn issuer_id(&self) -> &str {
        &self.issuer_id
    }

    /// Issuing CAs replaced by a rollover and not retired yet.
    pub fn previous_issuers(&self) -> Vec<String> {
        self.previous.iter().map(|p| p.id.clone()).collect()
    }

    /// Replace the issuing CA by a new one under the same root (which needs
    /// `root-ca.key` in the directory). The old one moves to
    /// `previous-issuing/` and keeps signing its CRL, so the certificates it
    /// signed stay usable until they expire, are revoked or are renewed;
    /// [`Pki::retire_unused`] retires it once none is left. Inventory
    /// entries from before issuers were recorded are marked as the old one's.
    /// Returns the rollover; open the PKI again to use the new issuer.
    pub fn rollover(&self, days: u32) -> Result<Rollover, Error> {
        let root_key_path = self.dir.join(ROOT_KEY);
        let root_key_pem = read_string(&root_key_path).map_err(|_| {
            Error::Invalid(format!(
                "{} is not there: a rollover signs the new issuing CA with the root key; put it back for the rollover (and move it offline again after)",
                root_key_path.display()
            ))
        })?;
        let root_key = KeyPair::from_pem(&root_key_pem).map_err(|e| Error::Parse {
            path: root_key_path.clone(),
            message: format!("not a usable private key: {e}"),
        })?;
        let root =
            Issuer::from_ca_cert_pem(&self.root_pem, root_key).map_err(|e| Error::Parse {
                path: self.dir.join(ROOT_CERT),
                message: format!("not a usable CA certificate: {e}"),
            })?;
        let fleet = fleet_of(&self.root_pem).unwrap_or_else(|| "edgebind".into());
        let now = OffsetDateTime::now_utc();
        // A subject of its own: CRLs are found by issuer name, and two
        // issuing CAs with one name would make brokers pick the wrong one.
        let stamp = format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let mut params = profile::issuing_ca(&fleet, Validity::days(days))?;
        let subject = format!("{fleet} Edgebind Issuing CA {stamp}");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, fleet.as_str());
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, subject.as_str());
        let key = KeyPair::generate().map_err(|e| Error::crypto("issuing CA key", e))?;
        let cert = params
            .signed_by(&key, &root)
            .map_err(|e| Error::crypto("issuing CA certificate", e))?;
        let new_id = hex(digest::digest(&digest::SHA256, cert.der()).as_ref());
        let old_id = self.issuer_id.clone();
        let prev = self.dir.join(PREVIOUS_ISSUING_DIR);
        create_dir(&prev, 0o700)?;
        self.update(|inv| {
            for e in inv.entries.iter_mut().filter(|e| e.issuer.is_none()) {
                e.issuer = Some(old_id.clone());
            }
            // The old pair is copied before the new one replaces it: a crash
            // in between leaves both usable.
            write_private(
                &prev.join(format!("{old_id}.key")),
                read_string(&self.dir.join(ISSUING_KEY))?.as_bytes(),
            )?;
            write_public(
                &prev.join(format!("{old_id}.crt")),
                self.issuing_pem.as_bytes(),
            )?;
            write_private(&self.dir.join(ISSUING_KEY), key.serialize_pem().as_bytes())?;
            write_public(&self.dir.join(ISSUING_CERT), cert.pem().as_bytes())?;
            Ok(())
        })?;
        Ok(Rollover {
            new_issuer: new_id,
            new_subject: subject,
            not_after: params.not_after,
            previous_issuer: old_id,
        })
    }

    /// Retire every previous issuing CA on which no usable certificate
    /// depends any more (its files move to `retired-issuing/`; it signs no
    /// more CRLs). Returns the retired ones.
    pub fn retire_unused(&self, now: OffsetDateTime) -> Result<Vec<String>, Error> {
        if self.previous.is_empty() {
            return Ok(Vec::new());
        }
        let inv = self.inventory()?;
        let retired_dir = self.dir.join(RETIRED_ISSUING_DIR);
        let mut retired = Vec::new();
        for p in &self.previous {
            if inv.depends_on(&p.id, now) {
                continue;
            }
            create_dir(&retired_dir, 0o700)?;
            for ext in ["crt", "key"] {
                let from = self
                    .dir
                    .join(PREVIOUS_ISSUING_DIR)
                    .join(format!("{}.{ext}", p.id));
                let to = retired_dir.join(format!("{}.{ext}", p.id));
                fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
            }
            retired.push(p.id.clone());
        }
        Ok(retired)
    }

    /// Change how long CRLs issued by this handle stay valid.
    pub fn with_crl_validity(mut self, validity: Duration) -> Self {
        self.crl_validity = validity;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The fleet root certificate (PEM): the trust anchor (`ca.crt` everywhere).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn issuing_pem(&self) -> &str {
        &self.issuing_pem
    }

    pub fn root_cert_path(&self) -> PathBuf {
        self.dir.join(ROOT_CERT)
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL)
    }

    /// The issuing CA as an rcgen issuer, for callers (tests) that need a
    /// certificate profile this crate does not offer.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    fn finish(
        &self,
        params: rcgen::CertificateParams,
        key: KeyPair,
        principal: Option<Principal>,
        cn: String,
    ) -> Result<IssuedCert, Error> {
        let key_pem = key.serialize_pem();
        self.finish_for(params, &key, key_pem, principal, cn)
    }

    /// Sign `params` for `public_key`; `key_pem` is the private key when
    /// this side made it (empty when only the device holds it).
    fn finish_for(
        &self,
        params: rcgen::CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        key_pem: String,
        principal: Option<Principal>,
        cn: String,
    ) -> Result<IssuedCert, Error> {
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| Error::crypto(format!("certificate for {cn:?}"), e))?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex(s.as_ref()))
            .unwrap_or_default();
        let cert_pem = cert.pem();
        let mut chain_pem = String::with_capacity(cert_pem.len() + self.issuing_pem.len());
        chain_pem.push_str(&cert_pem);
        chain_pem.push_str(&self.issuing_pem);
        Ok(IssuedCert {
            issuer_id: self.issuer_id.clone(),
            principal,
            cn,
            serial: normalize_serial(&serial),
            fingerprint_sha256: hex(digest::digest(&digest::SHA256, cert.der()).as_ref()),
            not_before: params.not_before,
            not_after: params.not_after,
            cert_pem,
            chain_pem,
            key_pem,
        })
    }

    /// Sign and record a device certificate for the key of a verified CSR
    /// (the claim flow: the key never left the device). The certificate
    /// names [`DeviceCsr::requested`], the id validated when the CSR was
    /// parsed, with the fleet's device profile; `key_pem` is empty.
    pub fn sign_device_csr(
        &self,
        csr: &crate::DeviceCsr,
        validity: Validity,
    ) -> Result<IssuedCert, Error> {
        let principal = Principal::Device(csr.requested().clone());
        let params = profile::client(&principal, validity)?;
        let issued = self.finish_for(
            params,
            csr.public_key(),
            String::new(),
            Some(principal.clone()),
            principal.cn(),
        )?;
        self.record(std::slice::from_ref(&issued))?;
        Ok(issued)
    }

    /// Make a client certificate for `principal` without recording it
    /// (batch issuance records many at once with [`Pki::record`]).
    pub fn generate(&self, principal: &Principal, validity: Validity) -> Result<IssuedCert, Error> {
        let key = KeyPair::generate().map_err(|e| Error::crypto("leaf key", e))?;
        let params = profile::client(principal, validity)?;
        self.finish(params, key, Some(principal.clone()), principal.cn())
    }

    /// Make the broker's server certificate without recording it.
    pub fn generate_server(
        &self,
        hosts: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<IssuedCert, Error> {
        let key = KeyPair::generate().map_err(|e| Error::crypto("broker key", e))?;
        let params = profile::broker(hosts, ips, validity)?;
        let cn = hosts.first().cloned().unwrap_or_else(|| ips[0].to_string());
        self.finish(params, key, None, cn)
    }

    /// Issue and record a client certificate for any principal. Issuing again
    /// for the same principal is a renewal: same CN, new key and serial; the
    /// earlier certificate stays valid until it expires or is revoked.
    pub fn issue(&self, principal: &Principal, validity: Validity) -> Result<IssuedCert, Error> {
        let issued = self.generate(principal, validity)?;
        self.record(std::slice::from_ref(&issued))?;
        Ok(issued)
    }

    /// Issue and record a device certificate (CN = id, clientAuth only).
    pub fn issue_device(&self, id: &DeviceId, validity: Validity) -> Result<IssuedCert, Error> {
        self.issue(&Principal::Device(id.clone()), validity)
    }

    /// Issue and record the broker's server certificate.
    pub fn issue_server(
        &self,
        hosts: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<IssuedCert, Error> {
        let issued = self.generate_server(hosts, ips, validity)?;
        self.record(std::slice::from_ref(&issued))?;
        Ok(issued)
    }

    /// Issue device certificates for many ids at once on `threads` threads
    /// (factory lines). `each` runs on the issuing thread for every
    /// certificate (write its bundle there); `progress` gets the running count.
    /// All certificates are recorded in the inventory in one update at the
    /// end, and only if every `each` succeeded. Duplicate ids are refused.
    pub fn issue_devices(
        &self,
        ids: &[DeviceId],
        validity: Validity,
        threads: usize,
        each: impl Fn(&IssuedCert) -> Result<(), Error> + Sync,
        progress: impl Fn(usize) + Sync,
    ) -> Result<Vec<IssuedCert>, Error> {
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = ids.iter().find(|id| !seen.insert(*id)) {
            return Err(Error::Invalid(format!(
                "device id {dup} appears more than once in the batch"
            )));
        }
        let threads = threads.clamp(1, ids.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Result<Vec<(usize, IssuedCert)>, Error>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(id) = ids.get(i) else { break };
                            let issued = self.generate(&Principal::Device(id.clone()), validity)?;
                            each(&issued)?;
                            mine.push((i, issued));
                            progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
                        }
                        Ok(mine)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("issuing thread panicked"))
                .collect()
        });
        let mut all = Vec::with_capacity(ids.len());
        for r in results {
            all.extend(r?);
        }
        all.sort_by_key(|(i, _)| *i);
        let issued: Vec<IssuedCert> = all.into_iter().map(|(_, c)| c).collect();
        self.record(&issued)?;
        Ok(issued)
    }

    fn lock(&self) -> Result<File, Error> {
        let path = self.dir.join(INVENTORY_LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.lock().map_err(|e| Error::io(&path, e))?;
        Ok(file)
    }

    /// Read the inventory (no lock: it is only ever replaced atomically).
    pub fn inventory(&self) -> Result<Inventory, Error> {
        let path = self.dir.join(INVENTORY);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Parse {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Inventory::new()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn save_inventory(&self, inv: &Inventory) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(inv).expect("inventory serializes");
        write_public(&self.dir.join(INVENTORY), text.as_bytes())
    }

    /// Change the inventory under the lock (safe against concurrent `edgebind` processes).
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Inventory) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let _lock = self.lock()?;
        let mut inv = self.inventory()?;
        let out = change(&mut inv)?;
        self.save_inventory(&inv)?;
        Ok(out)
    }

    /// Record issued certificates in the inventory and append each leaf to
    /// `issued.pem`.
    pub fn record(&self, issued: &[IssuedCert]) -> Result<(), Error> {
        let now = OffsetDateTime::now_utc();
        self.update(|inv| {
            let mut log = String::with_capacity(issued.len() * 800);
            for cert in issued {
                log.push_str(&format!("# serial {} cn {}\n", cert.serial, cert.cn));
                log.push_str(&cert.cert_pem);
            }
            let path = self.dir.join(ISSUED_LOG);
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            file.write_all(log.as_bytes())
                .map_err(|e| Error::io(&path, e))?;
            inv.entries
                .extend(issued.iter().map(|c| c.inventory_entry(now)));
            Ok(())
        })
    }

    /// Add inventory entries of certificates this issuing CA signed
    /// elsewhere (a flashing station's copy of the PKI), so that they can be
    /// listed and revoked here. An entry already present with the same
    /// fingerprint is skipped; one with the same serial and another
    /// fingerprint is refused, and then nothing is added. Returns how many
    /// were added.
    pub fn merge_entries(&self, entries: &[InventoryEntry]) -> Result<usize, Error> {
        self.update(|inv| {
            let mut added = Vec::new();
            for e in entries {
                let serial = normalize_serial(&e.serial);
                match inv.entries.iter().find(|have| have.serial == serial) {
                    Some(have) if have.fingerprint_sha256 == e.fingerprint_sha256 => {}
                    Some(have) => {
                        return Err(Error::Invalid(format!(
                            "serial {serial} ({}) is already in the inventory for {} with another fingerprint",
                            e.cn, have.cn
                        )));
                    }
                    None => added.push(InventoryEntry {
                        serial,
                        ..e.clone()
                    }),
                }
            }
            let n = added.len();
            inv.entries.extend(added);
            Ok(n)
        })
    }

    /// Revoke every certificate of `principal` that is not revoked yet and
    /// re-issue the CRL. Returns the entries revoked now (empty if all were
    /// already revoked). The broker applies it on its next reload.
    pub fn revoke(&self, principal: &Principal) -> Result<Vec<InventoryEntry>, Error> {
        let cn = principal.cn();
        let now = OffsetDateTime::now_utc();
        let revoked = self.update(|inv| {
            if !inv.by_cn(&cn).any(|e| e.role != "broker") {
                return Err(Error::UnknownPrincipal { cn: cn.clone() });
            }
            let mut revoked = Vec::new();
            for e in inv
                .entries
                .iter_mut()
                .filter(|e| e.cn == cn && e.role != "broker")
            {
                if e.revoked_at.is_none() {
                    e.revoked_at = Some(now);
                    revoked.push(e.clone());
                }
            }
            Ok(revoked)
        })?;
        self.refresh_crl()?;
        Ok(revoked)
    }

    /// Revoke one certificate by serial (e.g. a single lost key while the
    /// device's newer certificate stays valid) and re-issue the CRL.
    pub fn revoke_serial(&self, serial: &str) -> Result<InventoryEntry, Error> {
        let wanted = normalize_serial(serial);
        let now = OffsetDateTime::now_utc();
        let entry = self.update(|inv| {
            let e = inv
                .entries
                .iter_mut()
                .find(|e| e.serial == wanted)
                .ok_or_else(|| Error::UnknownSerial {
                    serial: serial.to_owned(),
                })?;
            e.revoked_at.get_or_insert(now);
            Ok(e.clone())
        })?;
        self.refresh_crl()?;
        Ok(entry)
    }

    /// Revoke many certificates by serial in one inventory update and one
    /// CRL (undoing a batch costs one write, not one per certificate).
    /// Unknown serials are an error and then nothing is revoked.
    pub fn revoke_serials(&self, serials: &[String]) -> Result<Vec<InventoryEntry>, Error> {
        let now = OffsetDateTime::now_utc();
        let entries = self.update(|inv| {
            let mut out = Vec::with_capacity(serials.len());
            for serial in serials {
                let wanted = normalize_serial(serial);
                let e = inv
                    .entries
                    .iter_mut()
                    .find(|e| e.serial == wanted)
                    .ok_or_else(|| Error::UnknownSerial {
                        serial: serial.clone(),
                    })?;
                e.revoked_at.get_or_insert(now);
                out.push(e.clone());
            }
            Ok(out)
        })?;
        self.refresh_crl()?;
        Ok(entries)
    }

    /// Build a new CRL (signed by the issuing CA, valid for the CRL validity
    /// from now), write it to `<pki>/crl.pem` and return its PEM.
    pub fn refresh_crl(&self) -> Result<String, Error> {
        self.refresh_crl_valid_for(self.crl_validity)
    }

    /// [`Pki::refresh_crl`] with an explicit lifetime (the broker settings' `crl_days`).
    pub fn refresh_crl_valid_for(&self, validity: Duration) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let crl = self.update(|inv| {
            inv.crl_number += 1;
            // One CRL per issuing CA in use, the current one first: a broker
            // checks a client against the CRL of the CA that signed it.
            let mut pem = String::new();
            let signers = std::iter::once((self.issuer_id.as_str(), &self.issuer))
                .chain(self.previous.iter().map(|p| (p.id.as_str(), &p.issuer)));
            for (id, issuer) in signers {
                let current = id == self.issuer_id;
                let revoked_certs = inv
                    .crl_entries(now)
                    .filter(|e| match e.issuer.as_deref() {
                        Some(i) => i == id,
                        // Recorded before issuers were: the original issuer's,
                        // the current one until the first rollover stamps them.
                        None => current,
                    })
                    .map(|e| {
                        Ok(RevokedCertParams {
                            serial_number: SerialNumber::from_slice(&parse_hex(&e.serial)?),
                            revocation_time: e.revoked_at.unwrap_or(now),
                            reason_code: Some(RevocationReason::Unspecified),
                            invalidity_date: None,
                        })
                    })
                    .collect::<Result<Vec<_>, Error>>()?;
                let params = CertificateRevocationListParams {
                    // Back-dated like certificates, for brokers with a slightly slow clock.
                    this_update: now - Duration::minutes(5),
                    next_update: now + validity,
                    crl_number: SerialNumber::from(inv.crl_number),
                    issuing_distribution_point: None,
                    revoked_certs,
                    key_identifier_method: KeyIdMethod::Sha256,
                };
                let crl = params
                    .signed_by(issuer)
                    .map_err(|e| Error::crypto("CRL", e))?;
                pem.push_str(&crl.pem().map_err(|e| Error::crypto("CRL PEM", e))?);
            }
            Ok(pem)
        })?;
        write_public(&self.crl_path(), crl.as_bytes())?;
        Ok(crl)
    }

    /// Alias of [`Pki::refresh_crl`]: a fresh CRL PEM.
    pub fn crl_pem(&self) -> Result<String, Error> {
        self.refresh_crl()
    }

    /// Freshness of the CRL currently in `<pki>/crl.pem`.
    pub fn crl_status(&self) -> Result<CrlStatus, Error> {
        crl_status(&self.crl_path())
    }
}

/// The fleet name of a root certificate (its organization).
fn fleet_of(root_pem: &str) -> Option<String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(root_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&block.contents).ok()?;
    cert.subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_owned)
}

/// Read a CRL file's update times (any CRL PEM, e.g. the broker's copy).
pub fn crl_status(path: &Path) -> Result<CrlStatus, Error> {
    let text = files::read_string(path)?;
    let bad = |message: String| Error::Parse {
        path: path.to_owned(),
        message,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| bad(format!("not a PEM CRL: {e}")))?;
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&pem.contents)
        .map_err(|e| bad(format!("not a CRL: {e}")))?;
    let to_time = |t: x509_parser::time::ASN1Time| t.to_datetime();
    let next = crl
        .next_update()
        .ok_or_else(|| bad("the CRL has no nextUpdate".into()))?;
    Ok(CrlStatus {
        path: path.to_owned(),
        this_update: to_time(crl.last_update()),
        next_update: to_time(next),
        crl_number: crl.crl_number().and_then(|n| u64::try_from(n.clone()).ok()),
        revoked: crl.iter_revoked_certificates().count(),
    })
}
