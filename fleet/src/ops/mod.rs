//! The operator's use cases, as library functions the CLI, the fleet service
//! and a web console share: each takes a [`FleetHome`] (and the registry
//! [`Store`](crate::registry::Store) it works on), returns a plain
//! serializable result for the caller to render, and either completes or
//! leaves nothing half-done (each module documents its undo).
//!
//! - [`register_device`], [`register_devices`] (a factory batch) and
//!   [`renew_device`]: certificate, identity files, broker policy, registry;
//!   [`provision_device`]: the same for a unit's claim request (its CSR).
//! - [`renew`]: renewal by the device over its own connection (sign a CSR
//!   for the current certificate's device, confirm, retire the previous).
//! - [`rollover`]: a new issuing CA under the same root, the old one retired
//!   once nothing depends on it.
//! - [`revoke`], [`revoke_devices`] (a batch), [`revoke_principal`], [`revoke_serial`]: PKI, registry
//!   lifecycle and queued commands, broker policy; every revocation path.
//! - [`refresh_broker_policy`]: ACL + CRL from the PKI, SIGHUP to a running broker.
//! - [`broker_endpoint`], [`agent_broker`]: where clients and agents dial.
//! - [`send()`]: one device, a tag or the fleet; now, queued or on connect.
//! - [`set`]: desired settings.
//! - [`audit`]: the audit log of operators' changes (CLI and console).
//! - [`login`]: single-use console login codes for the fleet's operators.
//! - [`identity`]: find or issue the operator's and services' client identities.
//! - [`claim`]: a batch's claim identity (its claim bundle) and allow-list
//!   for claim-based first boot.
//! - [`factory`]: the flashing station (a manifest's units made through
//!   [`register_device`] / [`renew_unit`] with their manufacturing records,
//!   export/import of records, the offline station kit).

pub mod audit;
pub mod broker_policy;
pub mod claim;
pub mod endpoint;
pub mod factory;
pub mod home;
pub mod identity;
pub mod login;
pub mod reconnect;
pub mod register;
pub mod renew;
pub mod revoke;
pub mod rollover;
pub mod send;
pub mod settings;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use edgebind_protocol::{DeviceId, IdError};

pub use broker_policy::{AppliedPolicy, PolicyRefresh, refresh_broker_policy};
pub use endpoint::{AgentBroker, agent_broker, broker_endpoint};
pub use home::FleetHome;
pub use login::{LoginCodeIssued, issue_login_code, redeem_login_code};
pub use reconnect::reconnect_hint;
pub use register::{
    BatchRegistered, BatchRegistration, ClaimRequest, IdentityOutput, Provisioned, Registered,
    Registration, Renewed, Unit, provision_device, register_device, register_devices, renew_device,
    renew_unit, staging_path, write_image,
};
pub use revoke::{
    Policy, Revoked, RevokedBatch, revoke, revoke_devices, revoke_principal, revoke_serial,
};
pub use send::{Mode, SendEvent, SendRequest, Sent, Targets, send};
pub use settings::{SettingsChanged, set};

use crate::registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Pki(#[from] edgebind_certs::Error),
    #[error(transparent)]
    Broker(#[from] edgebind_broker::Error),
    #[error("broker policy (ACL, CRL) not written: {0}")]
    Policy(#[source] edgebind_broker::Error),
    #[error(
        "no broker address: pass the broker's host:port or run `edgebind broker config --host NAME` first ({0})"
    )]
    NoBrokerAddress(#[source] Box<OpsError>),
    #[error("broker address {addr:?}: {why}")]
    BadBrokerAddress { addr: String, why: String },
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("image {}: {source}", path.display())]
    Image {
        path: PathBuf,
        source: edgebind_image::Error,
    },
    #[error("{0}")]
    Factory(String),
    #[error("{0}")]
    Identity(String),
    #[error("claim refused: {0}")]
    ClaimRefused(String),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttSetupError),
    #[error(transparent)]
    Send(#[from] crate::operator::SendError),
    #[error("start the async runtime: {0}")]
    Runtime(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} already exists (left from an earlier registration?); move it away first",
        .0.display()
    )]
    OutputExists(PathBuf),
    #[error("device {0} is revoked")]
    DeviceRevoked(DeviceId),
    #[error("device {0} is already revoked")]
    AlreadyRevoked(DeviceId),
    #[error("no (non-revoked) device matches")]
    NoTargets,
    #[error("not sent: {0}")]
    ActionRefused(String),
    #[error(
        "{cause}; undone: the new certificate {serial} of {id} is revoked and the registry keeps the previous one"
    )]
    RenewalUndone {
        id: DeviceId,
        serial: String,
        cause: Box<OpsError>,
    },
    #[error(
        "{id}: {done}, but the revocation is not complete: {cause} (run the revocation again to finish it)"
    )]
    RevocationIncomplete {
        id: DeviceId,
        done: &'static str,
        cause: Box<OpsError>,
    },
    #[error("{cause}; undoing it failed too ({what}: {rollback})")]
    RollbackFailed {
        what: String,
        cause: Box<OpsError>,
        rollback: String,
    },
}
