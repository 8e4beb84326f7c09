//! The Edgebind fleet PKI.
//!
//! One directory (normally `<home>/pki`) holds a fleet root CA, an issuing CA
//! signed by it, an inventory of every certificate issued (JSON) and the
//! current revocation list. Every leaf is signed by the issuing CA, so the root
//! key can be moved offline after [`Pki::init`]: [`Pki::open`] needs only the
//! issuing CA's key.
//!
//! ```no_run
//! use edgebind_certs::{InitOptions, Pki, Validity};
//! use edgebind_protocol::DeviceId;
//! # fn main() -> Result<(), edgebind_certs::Error> {
//! let pki = Pki::init("fleet/pki".as_ref(), &InitOptions::new("acme"))?;
//! let issued = pki.issue_device(&DeviceId::new("rpi-0001")?, Validity::days(1825))?;
//! println!("{} expires {}", issued.serial, issued.not_after);
//! # Ok(()) }
//! ```
//!
//! All keys are ECDSA P-256 (what the broker, rustls with ring and small
//! devices all handle fast). Private keys are always written with mode 0600.

pub mod bundle;
pub mod csr;
mod error;
pub mod files;
pub mod inspect;
pub mod inventory;
pub mod pki;
pub mod profile;

pub use csr::DeviceCsr;
pub use error::Error;
pub use inventory::{AuditFinding, CrlStatus, Inventory, InventoryEntry};
pub use pki::{InitOptions, IssuedCert, Pki, Rollover};
pub use profile::Validity;

/// File names inside the PKI directory.
pub mod layout {
    /// The fleet trust anchor; every client and the broker verify against it.
    pub const ROOT_CERT: &str = "root-ca.crt";
    /// Needed only to create the issuing CA; may be moved offline after `init`.
    pub const ROOT_KEY: &str = "root-ca.key";
    pub const ISSUING_CERT: &str = "issuing-ca.crt";
    pub const ISSUING_KEY: &str = "issuing-ca.key";
    /// JSON list of every certificate issued: serial, CN, fingerprint, expiry, revocation.
    pub const INVENTORY: &str = "inventory.json";
    /// Taken (flock) while the inventory is read-modified-written.
    pub const INVENTORY_LOCK: &str = "inventory.lock";
    /// The current CRL (issued by the issuing CA), PEM.
    pub const CRL: &str = "crl.pem";
    /// Append-only log of every issued leaf certificate (PEM, each preceded
    /// by a `# serial <hex> cn <cn>` line): one file, so a batch of thousands
    /// costs no file creation per certificate.
    pub const ISSUED_LOG: &str = "issued.pem";

    /// File stem of non-device client identities: `client.crt`, `client.key` (+ `ca.crt`).
    pub const CLIENT_STEM: &str = "client";

    /// Where `edgebind pki issue` puts a non-device client identity by
    /// default, relative to the fleet home: `<home>/identities/<role>-<name>/`
    /// (e.g. `identities/service-fleet/`). The files are `client.crt` (leaf +
    /// issuing CA), `client.key` (0600) and `ca.crt` (fleet root), as
    /// [`crate::IssuedCert::write_identity`] writes them. (`edgebind pki init`
    /// also puts the first operator's identity in `<home>/operator/`: the one
    /// the CLI itself uses.)
    pub fn identity_dir(
        home: &std::path::Path,
        principal: &edgebind_protocol::Principal,
    ) -> std::path::PathBuf {
        home.join("identities")
            .join(format!("{}-{}", principal.role(), principal.name()))
    }
}

#[cfg(test)]
mod tests;
