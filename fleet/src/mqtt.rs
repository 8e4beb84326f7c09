//! Connecting the fleet service and the operator CLI to the broker: the
//! workspace's one client setup (`edgebind-link`, MQTT 5 over mTLS), with
//! the identity read from files. The fleet service's own ingest connection
//! goes through [`relay`] (its acknowledgements leave in few TLS records).

pub mod relay;

use std::sync::Arc;
use std::time::Duration;

pub use edgebind_link::{BrokerEndpoint, ClientIdentity, SetupError as MqttSetupError, connect};
use rumqttc::v5::MqttOptions;

/// MQTT 5 options for an mTLS connection presenting `identity`.
pub fn options(
    client_id: &str,
    endpoint: &BrokerEndpoint,
    identity: &ClientIdentity,
    keep_alive: Duration,
) -> Result<MqttOptions, MqttSetupError> {
    let tls = edgebind_link::tls_from_files(identity)?;
    Ok(edgebind_link::options(
        client_id,
        endpoint,
        Arc::new(tls),
        keep_alive,
    ))
}
