//! The fleet home directory: where each part of the operator side keeps its state.
//!
//! ```text
//! <home>/pki/            CA keys and issued certificates (edgebind-certs)
//! <home>/broker/         generated mosquitto.conf, ACL, CRL, server identity (edgebind-broker)
//! <home>/registry.db     device registry (edgebind-fleet), unless --registry names another
//! <home>/bundles/<id>/   device identity bundles ready for the factory line
//! <home>/operator/       this operator's own client identity
//! ```

use std::path::{Path, PathBuf};

use edgebind_fleet::registry::RegistryUrl;

#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
    registry: Option<RegistryUrl>,
}

#[allow(dead_code)] // each accessor is used once its subcommand lands
impl Home {
    pub fn new(root: PathBuf) -> Self {
        Home {
            root,
            registry: None,
        }
    }

    /// Keep the registry somewhere else than `<home>/registry.db` (`--registry`).
    pub fn with_registry(mut self, registry: Option<RegistryUrl>) -> Self {
        self.registry = registry;
        self
    }

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

    pub fn operator_dir(&self) -> PathBuf {
        self.root.join("operator")
    }
}
