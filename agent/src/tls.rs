//! The agent's TLS client configuration: rustls with the ring provider, the
//! fleet CA as the only root, client authentication with the device chain.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::identity::Identity;

/// The ring provider, chosen explicitly (never a process-wide default, never
/// aws-lc-rs: Yocto builds it without cmake/nasm).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the fleet CA certificate cannot be used as the trust anchor: {0}")]
    BadCa(String),
    #[error("broker server name {0:?} is neither a DNS name nor an IP address")]
    BadServerName(String),
    #[error("TLS client setup failed: {0}")]
    Setup(#[from] rustls::Error),
}

/// Client configuration trusting only `identity.ca`, presenting the device
/// chain, and checking the broker certificate against `server_name`.
pub fn client_config(
    identity: &Identity,
    server_name: &str,
    provider: Arc<CryptoProvider>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(identity.ca.clone())
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| TlsError::BadServerName(server_name.to_owned()))?;
    let verifier = Arc::new(PinnedNameVerifier { inner, name });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous() // only to install the name-pinning wrapper below; chain checks stay WebPKI's
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(config)
}

/// rumqttc derives the TLS server name from the host it dials, so the
/// configured `server_name` (for a broker reached through an address not in
/// its certificate) is enforced here: full WebPKI verification, but against
/// the configured name instead of the dialled one. With the default
/// (server_name = host) both are the same.
#[derive(Debug)]
struct PinnedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for PinnedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
