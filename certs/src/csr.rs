//! Certificate signing requests of the claim flow: a device made its key
//! pair itself and asks, with a PKCS#10 CSR, for a certificate naming the
//! device id it chose.
//!
//! [`DeviceCsr::parse`] is the only way to a [`DeviceCsr`], and
//! [`crate::Pki::sign_device_csr`] signs nothing else: the CSR's signature
//! is verified (the requester holds the key), its subject CN must be a
//! [`DeviceId`] by the one id rule of `edgebind_protocol`, and its key must
//! be ECDSA P-256 like every key of the fleet. Of the CSR only the public
//! key and that validated id are used: the certificate's profile (validity,
//! key usage, clientAuth, no SAN, not a CA) is the fleet's own device
//! profile, whatever else the request asks for.

use edgebind_protocol::DeviceId;
use rcgen::{CertificateSigningRequestParams, PublicKeyData};
use ring::digest;
use x509_parser::prelude::FromDer;

use crate::Error;

/// A verified CSR for a device certificate.
#[derive(Debug, Clone)]
pub struct DeviceCsr {
    requested: DeviceId,
    public_key: rcgen::PublicKey,
    key_sha256: String,
}

impl DeviceCsr {
    /// Parse and check a PEM CSR (see the module documentation).
    pub fn parse(pem: &str) -> Result<DeviceCsr, Error> {
        let bad = |why: String| Error::Invalid(format!("certificate signing request: {why}"));
        let params = CertificateSigningRequestParams::from_pem(pem)
            .map_err(|e| bad(format!("not a valid, correctly signed CSR ({e})")))?;
        if params.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(bad("the key is not ECDSA P-256".into()));
        }
        // rcgen verified the signature; read the subject CN from the same bytes.
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| bad(format!("not PEM ({e})")))?;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
                .map_err(|e| bad(format!("not a CSR ({e})")))?;
        let subject = &csr.certification_request_info.subject;
        let mut cns = subject.iter_common_name();
        let cn = match (cns.next(), cns.next()) {
            (Some(cn), None) => cn
                .as_str()
                .map_err(|_| bad("the subject CN is not a string".into()))?,
            _ => return Err(bad("the subject must carry exactly one CN".into())),
        };
        let requested = DeviceId::new(cn).map_err(|e| bad(format!("requested id: {e}")))?;
        let key_sha256 =
            hex(digest::digest(&digest::SHA256, params.public_key.der_bytes()).as_ref());
        Ok(DeviceCsr {
            requested,
            public_key: params.public_key,
            key_sha256,
        })
    }

    /// The device id the CSR asks for (validated).
    pub fn requested(&self) -> &DeviceId {
        &self.requested
    }

    /// SHA-256 (hex) of the public key: the same key asking again is the
    /// same device (a restart after a crash), another key is not.
    pub fn key_sha256(&self) -> &str {
        &self.key_sha256
    }

    pub(crate) fn public_key(&self) -> &rcgen::PublicKey {
        &self.public_key
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 (hex) of a PEM certificate's public key bits, as
/// [`DeviceCsr::key_sha256`] computes it for a request.
pub fn cert_key_sha256(cert_pem: &str) -> Result<String, Error> {
    let bad = |why: String| Error::Invalid(format!("certificate: {why}"));
    let (_, block) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&block.contents).map_err(|e| bad(e.to_string()))?;
    Ok(hex(digest::digest(
        &digest::SHA256,
        &cert.public_key().subject_public_key.data,
    )
    .as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn csr_for(cn: &str, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_valid_request_names_its_id_and_key() {
        let key = KeyPair::generate().unwrap();
        let csr = DeviceCsr::parse(&csr_for("sn-0001", &key)).unwrap();
        assert_eq!(csr.requested().as_str(), "sn-0001");
        let again = DeviceCsr::parse(&csr_for("sn-0001", &key)).unwrap();
        assert_eq!(csr.key_sha256(), again.key_sha256());
        let other = DeviceCsr::parse(&csr_for("sn-0001", &KeyPair::generate().unwrap())).unwrap();
        assert_ne!(csr.key_sha256(), other.key_sha256());
    }

    #[test]
    fn names_outside_the_id_rule_are_refused() {
        let key = KeyPair::generate().unwrap();
        for cn in [
            "SN-1",
            "a/b",
            "dev+",
            "#",
            "",
            "service:fleet",
            "claim:line-1",
            "x y",
        ] {
            let err = DeviceCsr::parse(&csr_for(cn, &key)).unwrap_err();
            assert!(err.to_string().contains("requested id"), "{cn:?}: {err}");
        }
    }

    #[test]
    fn a_tampered_request_is_refused() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_for("sn-0001", &key);
        let block = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1;
        let mut der = block.contents.clone();
        // Change one byte of the CN ("sn-0001" -> "sn-0002") without re-signing.
        let at = der.windows(7).position(|w| w == b"sn-0001").unwrap();
        der[at + 6] = b'2';
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64_lines(&der)
        );
        assert!(DeviceCsr::parse(&tampered).is_err());
        assert!(DeviceCsr::parse("garbage").is_err());
    }

    fn base64_lines(der: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
