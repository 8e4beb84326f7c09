//! The least-privilege Mosquitto broker of an Edgebind fleet.
//!
//! [`generate`] writes everything Mosquitto 2.0 needs into one directory
//! (normally `<home>/broker`):
//!
//! ```text
//! settings.toml    what `edgebind broker config` was given (hosts, port, ...); see BrokerSettings
//! mosquitto.conf   TLS-only listeners, identity = certificate CN, no anonymous access
//! acl              device listener's ACL, from edgebind_protocol::acl (patterns + a block per non-device principal)
//! acl-provisioning provisioning listener's ACL (the claim exchange only), used when a provisioning port is set
//! crl.pem          copy of the PKI's current CRL
//! ca.crt           fleet root + issuing CA (verifies client chains)
//! server.crt/.key  the broker's own identity (serverAuth, SANs = hosts and IPs)
//! data/            persistence (retained status/desired messages survive a restart)
//! mosquitto.pid    pid of `edgebind broker run` (the supervisor, which forwards
//!                  signals to its mosquitto child) or of a mosquitto started
//!                  another way; read by `edgebind broker reload`
//! ```
//!
//! [`regenerate_policy`] re-renders only the ACL and the CRL, and
//! [`process::reload`] sends SIGHUP so a running broker applies them without
//! dropping any connection. [`supervise::run`] is `edgebind broker run`:
//! Mosquitto as a child, signals forwarded, and the CRL re-issued before it
//! lapses (a lapsed CRL makes Mosquitto refuse every client).

pub mod acl;
pub mod budget;
pub mod config;
mod error;
pub mod process;
pub mod settings;
pub mod supervise;

pub use budget::Budget;
pub use config::{
    GenerateOptions, Generated, generate, install_fresh_crl, regenerate_policy,
    regenerate_policy_with_crl_lifetime,
};
pub use error::Error;
pub use settings::BrokerSettings;

/// File names inside the broker directory.
pub mod layout {
    pub const SETTINGS: &str = "settings.toml";
    pub const CONF: &str = "mosquitto.conf";
    pub const ACL: &str = "acl";
    pub const ACL_PROVISIONING: &str = "acl-provisioning";
    pub const CRL: &str = "crl.pem";
    pub const CA: &str = "ca.crt";
    pub const SERVER_CERT: &str = "server.crt";
    pub const SERVER_KEY: &str = "server.key";
    pub const DATA_DIR: &str = "data";
    pub const PID: &str = "mosquitto.pid";
}
