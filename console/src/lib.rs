//! The Edgebind onboarding console: an HTTPS web interface over the fleet
//! library. Every page calls `edgebind_fleet::ops` (register, send, set)
//! and the registry's [`Store`] reads, the same functions the CLI calls; the
//! console only parses forms and renders results.
//!
//! # Why single-use login codes
//!
//! The console's operators are the fleet's operator principals
//! (`operator:NAME` with a usable certificate in the fleet PKI). To log in,
//! someone who holds the fleet home runs `edgebind console login --operator
//! NAME`, which prints a code (and a URL carrying it) valid for ten minutes
//! and for one exchange. So:
//! - only who can already operate the fleet from its home can open the
//!   console: no password database to leak or to reset, no second account
//!   system beside the PKI's operators;
//! - the registry stores only the SHA-256 of each code, marked used in the
//!   transaction that exchanges it: a copy of the registry logs nobody in, a
//!   code cannot be replayed, and a revoked operator's code is refused;
//! - the browser needs nothing installed (client certificates as PKCS#12
//!   were the alternative: sounder against phishing, but every browser
//!   imports them differently and they cannot be scoped to one session).
//!
//! The code is exchanged for a session cookie (`Secure`, `HttpOnly`,
//! `SameSite=Strict`, expiring with the session); every state-changing
//! request carries the session's CSRF token (a form field or the
//! `x-csrf-token` header), checked before the handler runs; failed logins
//! are rate-limited. Scripts exchange a code for a bearer token instead
//! (the JSON API, module `api`).
//!
//! # Why sessions do not survive a restart
//!
//! Sessions live in the console process only, so restarting it logs
//! everyone out. Keeping them (in the registry) would put a credential
//! that opens the console on disk, readable by whoever copies the registry
//! or a backup of it; what it would save is one `console login` per
//! operator per restart, which costs little when logging in is already
//! tied to the fleet home. Every session still expires after its lifetime
//! (`--session-minutes`), live streams included (module `live`).
//!
//! # Live regions
//!
//! Pages update in place over server-sent events, re-rendered from the
//! registry (module `live`); the console keeps no state of the fleet.

mod api;
mod assets;
mod auth;
mod factory;
mod handlers;
mod live;
mod pages;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use edgebind_fleet::ops::{self, FleetHome};
use edgebind_fleet::registry::Store;

pub use api::{ApiDoc, OPENAPI_PATH};
pub use auth::SESSION_COOKIE;

/// How the console runs.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub home: FleetHome,
    /// Golden images offered for personalized images (`--images DIR`).
    pub images: Option<PathBuf>,
    /// How long a session lasts after login.
    pub session_ttl: Duration,
    /// How long a command sent from the console stays valid: a device that
    /// has not taken it by then refuses it as expired.
    pub send_timeout: Duration,
}

impl ConsoleConfig {
    pub fn new(home: FleetHome) -> Self {
        ConsoleConfig {
            home,
            images: None,
            session_ttl: Duration::from_secs(8 * 3600),
            send_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Ops(#[from] ops::OpsError),
    #[error("console TLS: {0}")]
    Tls(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What every handler shares.
pub(crate) struct Console {
    pub config: ConsoleConfig,
    /// One registry connection for reads and quick writes; `send` opens its
    /// own, since it waits for devices.
    pub store: Mutex<Box<dyn Store>>,
    pub sessions: auth::Sessions,
}

/// The console's routes (for `serve`, and for tests without TLS).
pub fn router(config: ConsoleConfig) -> Result<Router, ConsoleError> {
    let store = config.home.open_registry()?;
    let console = Arc::new(Console {
        config,
        store: Mutex::new(store),
        sessions: auth::Sessions::default(),
    });
    Ok(handlers::routes(console))
}

/// The console's TLS configuration: its server certificate from the fleet
/// PKI (`<home>/console/server.crt`, issued on first start for `hosts` and
/// `ips`), rustls with the ring provider.
pub fn tls_config(
    home: &FleetHome,
    hosts: &[String],
    ips: &[std::net::IpAddr],
    renew: bool,
) -> Result<(rustls::ServerConfig, Option<String>), ConsoleError> {
    let (chain, key, issued) = ops::identity::ensure_server_identity(
        home,
        &home.root().join("console"),
        hosts,
        ips,
        renew,
    )?;
    let tls = |e: &dyn std::fmt::Display| ConsoleError::Tls(e.to_string());
    let certs = rustls_pemfile::certs(&mut chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(&e))?;
    let key = rustls_pemfile::private_key(&mut key.as_bytes())
        .map_err(|e| tls(&e))?
        .ok_or_else(|| ConsoleError::Tls("no private key in server.key".into()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(&e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, issued))
}

/// Serve the console over HTTPS on `listener` until `shutdown` completes.
pub async fn serve(
    config: ConsoleConfig,
    tls: rustls::ServerConfig,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ConsoleError> {
    let app = router(config)?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    let addr = listener
        .local_addr()
        .map_err(|e| ConsoleError::Tls(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ConsoleError::Listen { addr, source })?;
    axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
    )
    .handle(handle)
    .serve(app.into_make_service())
    .await
    .map_err(|source| ConsoleError::Listen { addr, source })
}
