use std::path::{Path, PathBuf};

use edgebind_certs::{InitOptions, IssuedCert, Pki, Validity};
use edgebind_protocol::{DeviceId, Principal};
use rcgen::{CertificateParams, KeyPair};

use crate::broker::Broker;

/// One client identity on disk: `<dir>/client.crt` (leaf + issuing CA),
/// `<dir>/client.key`, `<dir>/ca.crt` (fleet root).
#[derive(Debug, Clone)]
pub struct Identity {
    /// `None` for certificates made with [`TestPki::custom`].
    pub principal: Option<Principal>,
    /// Label: the CN for normal identities, the directory name for custom ones.
    pub name: String,
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub serial: String,
}

impl Identity {
    /// An identity already on disk: `<dir>/<stem>.crt`, `<dir>/<stem>.key`,
    /// `<dir>/ca.crt` (e.g. `<home>/operator` with stem `client`, or a
    /// bundle directory with stem `device`). `name` labels it in messages.
    pub fn from_dir(dir: &Path, stem: &str, name: &str) -> Identity {
        Identity {
            principal: Principal::from_cn(name).ok(),
            name: name.to_owned(),
            dir: dir.to_owned(),
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            ca: dir.join("ca.crt"),
            serial: String::new(),
        }
    }
}

/// A throwaway fleet home with an initialised PKI (see the crate docs).
pub struct TestPki {
    home: tempfile::TempDir,
    pki: Pki,
    /// `operator:tester`: reads everything, commands devices.
    pub operator: Identity,
    /// `service:fleet`: the fleet back-end's identity.
    pub service: Identity,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// A fresh fleet PKI (fleet name "test") in a new tempdir. Panics on failure.
    pub fn new() -> TestPki {
        let home = crate::cli::broker_home("edgebind-test-");
        let pki = Pki::init(&home.path().join("pki"), &InitOptions::new("test")).expect("pki init");
        // As `edgebind pki init` does: the home's registry exists from the start
        // (nothing else creates one).
        edgebind_fleet::registry::open_or_create(&home.path().join("registry.db"))
            .expect("create the registry");
        let mut me = TestPki {
            pki,
            operator: placeholder(),
            service: placeholder(),
            home,
        };
        me.operator = me.identity(&Principal::from_cn("operator:tester").unwrap());
        me.service = me.identity(&Principal::from_cn("service:fleet").unwrap());
        me
    }

    /// The fleet home (the tempdir).
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.home().join("pki")
    }

    pub fn broker_dir(&self) -> PathBuf {
        self.home().join("broker")
    }

    pub fn bundles_dir(&self) -> PathBuf {
        self.home().join("bundles")
    }

    /// The fleet root certificate path.
    pub fn root_ca(&self) -> PathBuf {
        self.pki.root_cert_path()
    }

    /// Issue (and record) a device identity. A second call for the same id is
    /// a renewal: new key and serial, written over the previous files.
    pub fn device(&self, id: &str) -> Identity {
        self.identity(&Principal::from_cn(id).expect("valid device id"))
    }

    /// Issue (and record) a certificate for any principal (`operator:x`, `claim:y`, ...).
    pub fn identity(&self, principal: &Principal) -> Identity {
        let issued = self
            .pki
            .issue(principal, Validity::days(30))
            .expect("issue certificate");
        self.write(
            principal.cn().replace(':', "_"),
            Some(principal.clone()),
            &issued,
        )
    }

    /// Sign arbitrary rcgen parameters with the fleet's issuing CA (NOT recorded
    /// in the inventory): expired, no-CN, serverAuth-only certificates...
    /// `label` names the directory under `<home>/identities/`.
    pub fn custom(&self, label: &str, params: CertificateParams) -> Identity {
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, self.pki.issuer())
            .expect("sign custom certificate");
        let issued = IssuedCert {
            issuer_id: self.pki.issuer_id().to_owned(),
            principal: None,
            cn: label.to_owned(),
            serial: String::new(),
            fingerprint_sha256: String::new(),
            not_before: params.not_before,
            not_after: params.not_after,
            cert_pem: cert.pem(),
            chain_pem: format!("{}{}", cert.pem(), self.pki.issuing_pem()),
            key_pem: key.serialize_pem(),
        };
        self.write(label.to_owned(), None, &issued)
    }

    /// A client certificate for an arbitrary CN, signed by the fleet's
    /// issuing CA with rcgen directly: none of edgebind's name checks run, as
    /// if a buggy claim flow or renewal had signed whatever it was asked to.
    /// Not recorded in the inventory. `name` is a file-safe label.
    pub fn hostile(&self, cn: &str) -> Identity {
        use std::hash::{Hash, Hasher};
        let mut params = edgebind_certs::profile::client(
            &Principal::from_cn("placeholder").expect("valid"),
            Validity::days(30),
        )
        .expect("client profile");
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        params.distinguished_name = dn;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        cn.hash(&mut h);
        self.custom(&format!("hostile-{:016x}", h.finish()), params)
    }

    fn write(
        &self,
        dir_name: String,
        principal: Option<Principal>,
        issued: &IssuedCert,
    ) -> Identity {
        let dir = self.home().join("identities").join(&dir_name);
        issued
            .write_identity(&dir, "client", self.pki.root_pem())
            .expect("write identity");
        Identity {
            name: principal.as_ref().map(Principal::cn).unwrap_or(dir_name),
            principal,
            cert: dir.join("client.crt"),
            key: dir.join("client.key"),
            ca: dir.join("ca.crt"),
            dir,
            serial: issued.serial.clone(),
        }
    }

    /// Revoke every certificate of `cn` in the PKI (inventory + CRL). The
    /// broker applies it on [`Broker::reload`].
    pub fn revoke(&self, cn: &str) {
        self.pki
            .revoke(&Principal::from_cn(cn).expect("valid cn"))
            .expect("revoke");
    }

    /// Issue a device certificate and write an identity bundle for it to
    /// `<home>/bundles/<id>/` (+ `<home>/bundles/<id>.tar`), with an
    /// agent.toml pointing at `broker` (host 127.0.0.1, its port, server
    /// name `localhost`). Returns the bundle directory.
    pub fn bundle(&self, id: &str, broker: &Broker) -> PathBuf {
        let principal = Principal::from_cn(id).expect("valid device id");
        let issued = self
            .pki
            .issue(&principal, Validity::days(30))
            .expect("issue device certificate");
        let dir = self.bundles_dir().join(id);
        let toml = edgebind_protocol::bundle::agent_toml(
            &DeviceId::new(id).expect("valid device id"),
            broker.host(),
            broker.port(),
            Some(broker.server_name()),
        );
        edgebind_certs::bundle::write_bundle(&dir, &issued, self.pki.root_pem(), &toml)
            .expect("write bundle");
        dir
    }
}

/// Certificate names a fleet should never sign, for the isolation tests:
/// other devices' ids with topic levels appended or prepended, empty and
/// dot levels, names spelling kind segments or whole topics, wildcards,
/// Mosquitto substitutions, upper case, unicode and a very long name. Each
/// is aimed at `dev-b`.
pub fn hostile_cns() -> Vec<String> {
    let mut cns: Vec<String> = [
        "dev-b/cmd",
        "dev-b/cmd-result",
        "dev-b/desired",
        "dev-b/c1",
        "dev-b/",
        "/dev-b",
        "dev-b//",
        "..",
        "../dev-b",
        "cmd/dev-b",
        "status/dev-b",
        "edgebind/v2/cmd/dev-b",
        "cmd",
        "DEV-B",
        "dév-b",
        "dev-b/+",
        "+",
        "#",
        "%u",
    ]
    .map(String::from)
    .to_vec();
    cns.push("dev-b/".repeat(40));
    cns
}

fn placeholder() -> Identity {
    Identity {
        principal: None,
        name: String::new(),
        dir: PathBuf::new(),
        cert: PathBuf::new(),
        key: PathBuf::new(),
        ca: PathBuf::new(),
        serial: String::new(),
    }
}
