//! The one MQTT client setup of Edgebind: MQTT 5 over mutual TLS with rustls
//! and the ring provider, used by the device agent, the fleet service, the
//! operator CLI and the test harness alike, so a TLS or socket setting is
//! decided once.
//!
//! - [`pem`]: reading a client identity (chain, key, fleet CA) from PEM files,
//!   with errors that name the file.
//! - [`tls`]: the rustls client configuration (fleet CA as the only root,
//!   optional pinned server name, client certificate).
//! - [`options`]: the rumqttc v5 options every client starts from.
//!
//! The crate is built into the device image too (see `agent-workspace/`):
//! it depends only on what the agent already needs.

pub mod pem;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use edgebind_protocol::messages::MAX_PACKET_BYTES;
use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};

pub use pem::{ClientIdentity, PemError, PemMaterial};
pub use tls::{ClientAuth, TlsError, client_config, provider};

/// Where a broker listens. The host is also the name verified against the
/// broker certificate (a DNS SAN or an IP SAN) unless a client pins another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerEndpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for BrokerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// How long a TCP + TLS connect may take before the attempt counts as failed.
pub const CONNECT_TIMEOUT_S: u64 = 10;

/// MQTT 5 options for an mTLS connection to `endpoint`: TCP_NODELAY (without
/// it every QoS 1 round trip and TLS connect waits ~40 ms for Nagle and
/// delayed ACK), a connect timeout, and the packet size limit both ways.
/// Session, will and acknowledgement settings are each client's own.
///
/// The broker replaces `client_id` by the certificate CN on the device
/// listener (`use_username_as_clientid`), so there it only matters for logs.
pub fn options(
    client_id: &str,
    endpoint: &BrokerEndpoint,
    tls: Arc<rustls::ClientConfig>,
    keep_alive: Duration,
) -> MqttOptions {
    let mut o = base_options(client_id, &endpoint.host, endpoint.port, keep_alive);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(CONNECT_TIMEOUT_S);
    o.set_network_options(net);
    o
}

/// What every workspace client sets whatever its transport: the keep-alive
/// and the packet size limit both ways. (The fleet service's relayed
/// connection builds on this with its own transport.)
pub fn base_options(client_id: &str, host: &str, port: u16, keep_alive: Duration) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(keep_alive)
        .set_max_packet_size(Some(MAX_PACKET_BYTES as u32));
    o
}

/// The client configuration for an identity on disk, verifying the broker
/// against the host dialled.
pub fn tls_from_files(identity: &ClientIdentity) -> Result<rustls::ClientConfig, SetupError> {
    let material = identity.load()?;
    Ok(client_config(ClientAuth::from_pem(&material))?)
}

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A client and its event loop, `capacity` requests deep.
pub fn connect(opts: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    AsyncClient::new(opts, capacity)
}
