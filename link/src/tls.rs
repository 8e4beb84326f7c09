//! The rustls client configuration: the ring provider (never a process-wide
//! default, never aws-lc-rs: Yocto builds it without cmake and nasm), the
//! fleet CA as the only trust anchor, the client's own chain.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::pem::PemMaterial;

/// The ring provider.
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

/// What a client presents and whom it trusts.
pub struct ClientAuth<'a> {
    /// Leaf first. `None` (with `key`) connects without a client
    /// certificate: only the tests that prove the broker refuses it do that.
    pub chain: Option<Vec<CertificateDer<'static>>>,
    pub key: Option<PrivateKeyDer<'static>>,
    pub ca: &'a [CertificateDer<'static>],
    /// Verify the broker certificate against this name instead of the host
    /// dialled (a broker reached through an address not in its certificate).
    pub server_name: Option<&'a str>,
}

impl<'a> ClientAuth<'a> {
    /// Present `material`'s chain and key, trust its CA.
    pub fn from_pem(material: &'a PemMaterial) -> Self {
        ClientAuth {
            chain: Some(material.chain.clone()),
            key: Some(material.key.clone_key()),
            ca: &material.ca,
            server_name: None,
        }
    }
}

/// The client configuration for `auth`.
pub fn client_config(auth: ClientAuth<'_>) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in auth.ca {
        roots
            .add(ca.clone())
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::BadCa("no CA certificate".into()));
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous(); // only to install the verifier below; chain checks stay WebPKI's
    let builder = match auth.server_name {
        Some(name) => {
            let name = ServerName::try_from(name.to_owned())
                .map_err(|_| TlsError::BadServerName(name.to_owned()))?;
            builder.with_custom_certificate_verifier(Arc::new(PinnedNameVerifier { inner, name }))
        }
        None => builder.with_custom_certificate_verifier(inner),
    };
    Ok(match (auth.chain, auth.key) {
        (Some(chain), Some(key)) => builder.with_client_auth_cert(chain, key)?,
        _ => builder.with_no_client_auth(),
    })
}

/// rumqttc derives the TLS server name from the host it dials, so a
/// configured server name is enforced here: full WebPKI verification, but
/// against the configured name instead of the dialled one.
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
