use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] edgebind_certs::Error),
    #[error("{}: {message}", path.display())]
    Settings { path: PathBuf, message: String },
    #[error(
        "{} is missing: the broker is not configured yet (run `edgebind broker config --host NAME` first)",
        path.display()
    )]
    NotConfigured { path: PathBuf },
    #[error(
        "mosquitto was not found (looked for {looked}); install it, e.g. `apt-get install mosquitto`, \
         or set EDGEBIND_MOSQUITTO=/path/to/mosquitto"
    )]
    MosquittoMissing { looked: String },
    #[error("{0}")]
    NotRunning(String),
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
}
