//! A client identity on disk: the certificate chain (leaf first), its
//! private key and the fleet root CA the broker's certificate must chain to.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Parse { path: PathBuf, what: String },
}

/// Where a client's identity files are.
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

    /// Read and parse the three files.
    pub fn load(&self) -> Result<PemMaterial, PemError> {
        Ok(PemMaterial {
            chain: certificates(&self.cert)?,
            key: private_key(&self.key)?,
            ca: certificates(&self.ca)?,
        })
    }
}

/// The parsed identity: what [`crate::client_config`] takes.
#[derive(Debug)]
pub struct PemMaterial {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: Vec<CertificateDer<'static>>,
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_err(path: &Path, what: impl ToString) -> PemError {
    PemError::Parse {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

/// Every certificate of a PEM file; at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err(path, e))?;
    if certs.is_empty() {
        return Err(parse_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| parse_err(path, e))?
        .ok_or_else(|| parse_err(path, "no PEM private key found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let id = ClientIdentity::in_dir(dir.path(), "client");
        let e = id.load().unwrap_err().to_string();
        assert!(e.contains("client.crt"), "{e}");

        std::fs::write(&id.cert, "not a certificate").unwrap();
        let e = id.load().unwrap_err().to_string();
        assert!(
            e.contains("client.crt") && e.contains("no PEM certificate"),
            "{e}"
        );
    }
}
