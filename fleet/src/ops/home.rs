//! The fleet home directory: where each part of the operator side keeps its
//! state. The CLI, the fleet service and a web console all locate things
//! through this one type.
//!
//! ```text
//! <home>/pki/            CA keys and issued certificates (edgebind-certs)
//! <home>/broker/         generated mosquitto.conf, ACL, CRL, server identity (edgebind-broker)
//! <home>/registry.db     device registry (edgebind-fleet), unless a registry URL names another
//! <home>/bundles/<id>/   device identity bundles ready for the factory line
//! <home>/operator/       this operator's own client identity
//! <home>/identities/     other client identities (`<role>-<name>/`)
//! ```

use std::path::{Path, PathBuf};

use edgebind_certs::Pki;
use edgebind_protocol::Principal;

use super::OpsError;
use crate::registry::{RegistryUrl, Retention, Store};

#[derive(Debug, Clone)]
pub struct FleetHome {
    root: PathBuf,
    registry: Option<RegistryUrl>,
}

impl FleetHome {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FleetHome {
            root: root.into(),
            registry: None,
        }
    }

    /// Keep the registry somewhere else than `<home>/registry.db`
    /// (`--registry`, `EDGEBIND_REGISTRY`: `sqlite:PATH` or `postgres://...`).
    pub fn with_registry(mut self, registry: Option<RegistryUrl>) -> Self {
        self.registry = registry;
        self
    }

    /// Where the registry is: the URL given, or `<home>/registry.db`.
    pub fn registry(&self) -> RegistryUrl {
        self.registry
            .clone()
            .unwrap_or_else(|| RegistryUrl::Sqlite(self.registry_db()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }

    pub fn broker_dir(&self) -> PathBuf {
        self.root.join("broker")
    }

    pub fn registry_db(&self) -> PathBuf {
        self.root.join("registry.db")
    }

    pub fn bundles_dir(&self) -> PathBuf {
        self.root.join("bundles")
    }

    /// The default bundle directory of a device (`<dir>.tar` beside it).
    pub fn bundle_dir(&self, id: &edgebind_protocol::DeviceId) -> PathBuf {
        self.bundles_dir().join(id.as_str())
    }

    pub fn operator_dir(&self) -> PathBuf {
        self.root.join("operator")
    }

    /// Where a non-device principal's client identity lives by default.
    pub fn identity_dir(&self, principal: &Principal) -> PathBuf {
        edgebind_certs::layout::identity_dir(&self.root, principal)
    }

    /// The registry of this fleet home.
    pub fn open_registry(&self) -> Result<Box<dyn Store>, OpsError> {
        Ok(crate::registry::open_store(
            &self.registry(),
            Retention::default(),
        )?)
    }

    /// The registry of a new fleet home: an absent SQLite file is created
    /// (only `edgebind pki init` and `edgebind fleet init` call this; every
    /// other path refuses a missing registry instead of starting an empty one).
    pub fn create_registry(&self) -> Result<Box<dyn Store>, OpsError> {
        Ok(crate::registry::create_store(
            &self.registry(),
            Retention::default(),
        )?)
    }

    /// The fleet PKI of this home (its error says to run `edgebind pki init`
    /// when there is none).
    pub fn open_pki(&self) -> Result<Pki, OpsError> {
        Ok(Pki::open(&self.pki_dir())?)
    }
}
