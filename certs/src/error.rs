use std::path::PathBuf;

use edgebind_protocol::IdError;

/// Everything the PKI can fail with; each variant names the file or identity at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    BadId(#[from] IdError),
    #[error("{what}: {source}")]
    Crypto { what: String, source: rcgen::Error },
    #[error(
        "{} already exists; refusing to overwrite fleet CA material without --force \
         (replacing the CA invalidates every certificate issued so far)",
        path.display()
    )]
    Exists { path: PathBuf },
    #[error(
        "{} is missing: no fleet PKI here (run `edgebind pki init` first)",
        path.display()
    )]
    NotInitialized { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("no certificate was ever issued to {cn:?} (see `edgebind pki list`)")]
    UnknownPrincipal { cn: String },
    #[error("no certificate with serial {serial} in the inventory")]
    UnknownSerial { serial: String },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn crypto(what: impl Into<String>, source: rcgen::Error) -> Self {
        Error::Crypto {
            what: what.into(),
            source,
        }
    }
}
