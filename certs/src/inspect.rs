//! Reading certificates this PKI (or anyone) wrote: what a client identity
//! on disk claims to be.

use std::path::Path;

use crate::Error;

/// The subject CN of the first certificate in the PEM file at `path` (a
/// client presents the leaf first, so this is the name the broker sees).
pub fn first_cert_cn(path: &Path) -> Result<String, Error> {
    let pem = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |message: String| Error::Parse {
        path: path.to_owned(),
        message,
    };
    let first = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .next()
        .ok_or_else(|| bad("no certificate".into()))?
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    let cert = first
        .parse_x509()
        .map_err(|e| bad(format!("bad certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| bad("certificate has no CN".into()))?;
    Ok(cn.to_owned())
}

#[cfg(test)]
mod tests {
    use edgebind_protocol::Principal;

    use super::*;
    use crate::{InitOptions, Pki, Validity};

    #[test]
    fn reads_the_cn_of_the_leaf_of_a_written_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::init(&tmp.path().join("pki"), &InitOptions::new("t")).unwrap();
        let op = Principal::from_cn("operator:alice").unwrap();
        let issued = pki.issue(&op, Validity::days(1)).unwrap();
        let dir = tmp.path().join("id");
        issued
            .write_identity(&dir, "client", pki.root_pem())
            .unwrap();
        assert_eq!(
            first_cert_cn(&dir.join("client.crt")).unwrap(),
            "operator:alice"
        );
        std::fs::write(dir.join("empty.crt"), "").unwrap();
        let err = first_cert_cn(&dir.join("empty.crt"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("empty.crt") && err.contains("no certificate"),
            "{err}"
        );
    }
}
