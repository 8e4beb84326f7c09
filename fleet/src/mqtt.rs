//! Connecting the fleet service and the operator CLI to the broker (mTLS, rustls with ring).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, NetworkOptions, TlsConfiguration, Transport};

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS setup with {cert} and {ca}: {source}")]
    Tls {
        cert: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// A client's mTLS identity: certificate chain (leaf first), its key and the
/// fleet root CA that the broker's certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ClientIdentity {
    /// `<dir>/<stem>.crt`, `<dir>/<stem>.key`, `<dir>/ca.crt` (the layout
    /// `edgebind_certs::IssuedCert::write_identity` writes).
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        ClientIdentity {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            ca: dir.join("ca.crt"),
        }
    }
}

/// Where the broker listens. The host is also the name verified against the
/// broker certificate (a DNS SAN or an IP SAN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerEndpoint {
    pub host: String,
    pub port: u16,
}

fn read(path: &Path) -> Result<Vec<u8>, MqttSetupError> {
    std::fs::read(path).map_err(|source| MqttSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A rustls client configuration presenting `identity` and trusting only its CA.
pub fn tls_config(identity: &ClientIdentity) -> Result<rustls::ClientConfig, MqttSetupError> {
    let pem_err = |path: &Path, what: String| MqttSetupError::Pem {
        path: path.to_owned(),
        what,
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = read(&identity.ca)?;
    for cert in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        let cert = cert.map_err(|e| pem_err(&identity.ca, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| pem_err(&identity.ca, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(pem_err(&identity.ca, "no CA certificate found".into()));
    }
    let chain_pem = read(&identity.cert)?;
    let chain = rustls_pemfile::certs(&mut chain_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(&identity.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(&identity.cert, "no certificate found".into()));
    }
    let key_pem = read(&identity.key)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| pem_err(&identity.key, e.to_string()))?
        .ok_or_else(|| pem_err(&identity.key, "no private key found".into()))?;
    let tls_err = |source| MqttSetupError::Tls {
        cert: identity.cert.clone(),
        ca: identity.ca.clone(),
        source,
    };
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)
}

/// MQTT options for an mTLS connection. The broker replaces `client_id` by
/// the certificate CN (`use_username_as_clientid`), so it only matters for logs.
pub fn options(
    client_id: &str,
    endpoint: &BrokerEndpoint,
    identity: &ClientIdentity,
    keep_alive: Duration,
) -> Result<MqttOptions, MqttSetupError> {
    let tls = tls_config(identity)?;
    let mut opts = MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    opts.set_keep_alive(keep_alive);
    let max = edgebind_protocol::messages::MAX_PACKET_BYTES;
    opts.set_max_packet_size(max, max);
    Ok(opts)
}

/// A client and its event loop for `opts`, with TCP_NODELAY: without it every
/// QoS 1 exchange waits ~40 ms on Nagle + delayed ACK.
pub fn connect(opts: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts, capacity);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}
