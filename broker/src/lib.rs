//! The least-privilege Mosquitto broker of an Edgebind fleet.
//!
//! [`generate`] writes everything Mosquitto 2.0 needs into one directory
//! (normally `<home>/broker`):
//!
//! ```text
//! settings.toml    what `edgebind broker config` was given (hosts, port, ...); see BrokerSettings
//! mosquitto.conf   TLS-only listener, identity = certificate CN, no anonymous access
//! acl              rendered from edgebind_protocol::acl (patterns + one block per back-end user)
//! crl.pem          copy of the PKI's current CRL
//! ca.crt           fleet root + issuing CA (verifies client chains)
//! server.crt/.key  the broker's own identity (serverAuth, SANs = hosts and IPs)
//! data/            persistence (retained status/desired messages survive a restart)
//! mosquitto.pid    written by `edgebind broker run`, read by `edgebind broker reload`
//! ```
//!
//! [`regenerate_policy`] re-renders only the ACL and the CRL, and
//! [`process::reload`] sends SIGHUP so a running broker applies them without
//! dropping any connection.

pub mod acl;
pub mod config;
mod error;
pub mod process;
pub mod settings;

pub use config::{GenerateOptions, Generated, generate, regenerate_policy};
pub use error::Error;
pub use settings::BrokerSettings;

/// File names inside the broker directory.
pub mod layout {
    pub const SETTINGS: &str = "settings.toml";
    pub const CONF: &str = "mosquitto.conf";
    pub const ACL: &str = "acl";
    pub const CRL: &str = "crl.pem";
    pub const CA: &str = "ca.crt";
    pub const SERVER_CERT: &str = "server.crt";
    pub const SERVER_KEY: &str = "server.key";
    pub const DATA_DIR: &str = "data";
    pub const PID: &str = "mosquitto.pid";
}
