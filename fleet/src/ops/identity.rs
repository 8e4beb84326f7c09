//! Client identities on disk (operator, service): find one, or issue it from
//! the fleet PKI when there is none yet.

use std::path::Path;

use edgebind_certs::Validity;
use edgebind_certs::profile::default_days;
use edgebind_protocol::{DeviceId, Principal};
use serde::Serialize;

use super::{FleetHome, OpsError, refresh_broker_policy};
use crate::mqtt::ClientIdentity;

/// An identity ready to connect with, and whether it was issued just now.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The certificate's CN: the broker's user name and client id for it.
    pub cn: String,
    pub files: ClientIdentity,
    pub issued: Option<IssuedIdentity>,
}

/// A client identity this call issued (the caller tells the operator).
#[derive(Debug, Clone, Serialize)]
pub struct IssuedIdentity {
    pub cn: String,
    pub serial: String,
    pub dir: std::path::PathBuf,
}

/// An identity in `dir`: the first `<stem>.crt` + `<stem>.key` pair found, with `ca.crt`.
pub fn find_identity(dir: &Path, stems: &[&str]) -> Result<ClientIdentity, OpsError> {
    for stem in stems {
        let id = ClientIdentity::in_dir(dir, stem);
        if id.cert.is_file() && id.key.is_file() {
            if !id.ca.is_file() {
                return Err(OpsError::Identity(format!(
                    "{} has {stem}.crt but no ca.crt",
                    dir.display()
                )));
            }
            return Ok(id);
        }
    }
    Err(OpsError::Identity(format!(
        "no identity in {} (looked for {} with a .key and ca.crt)",
        dir.display(),
        stems
            .iter()
            .map(|s| format!("{s}.crt"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The identity for `principal` in `dir`; issued from the fleet PKI (and the
/// broker's ACL refreshed so it gets its grants) when there is none yet. If
/// the files or the broker policy cannot be written, the new certificate is
/// revoked and its files removed: no identity the broker does not know stays.
pub fn ensure_identity(
    home: &FleetHome,
    dir: &Path,
    principal: &Principal,
    days: u32,
) -> Result<Identity, OpsError> {
    let stem = edgebind_certs::layout::CLIENT_STEM;
    if let Ok(files) = find_identity(dir, &[stem, principal.role()]) {
        let cn = edgebind_certs::inspect::first_cert_cn(&files.cert)?;
        return Ok(Identity {
            cn,
            files,
            issued: None,
        });
    }
    let pki = home.open_pki().map_err(|e| {
        OpsError::Identity(format!(
            "no identity in {} and no fleet PKI to issue one (run `edgebind pki init`): {e}",
            dir.display()
        ))
    })?;
    let issued = pki.issue(principal, Validity::days(days))?;
    let undo = |e: OpsError| {
        let files = ClientIdentity::in_dir(dir, stem);
        for f in [&files.cert, &files.key] {
            let _ = std::fs::remove_file(f);
        }
        let _ = pki.revoke_serial(&issued.serial);
        e
    };
    issued
        .write_identity(dir, stem, pki.root_pem())
        .map_err(|e| undo(e.into()))?;
    refresh_broker_policy(home, &pki).map_err(undo)?;
    Ok(Identity {
        cn: principal.cn(),
        files: find_identity(dir, &[stem])?,
        issued: Some(IssuedIdentity {
            cn: principal.cn(),
            serial: issued.serial.clone(),
            dir: dir.to_owned(),
        }),
    })
}

/// The operator identity: the one in `dir` when `explicit` (`--identity`),
/// else `dir` (normally `<home>/operator/`), issued as `operator:<user>` from
/// the fleet PKI if there is none yet.
pub fn operator_identity(
    home: &FleetHome,
    dir: &Path,
    explicit: bool,
) -> Result<Identity, OpsError> {
    if explicit {
        let files = find_identity(dir, &["operator", "client"])?;
        let cn = edgebind_certs::inspect::first_cert_cn(&files.cert)?;
        return Ok(Identity {
            cn,
            files,
            issued: None,
        });
    }
    let user = std::env::var("USER")
        .ok()
        .and_then(|u| DeviceId::new(u).ok())
        .map(|u| u.to_string())
        .unwrap_or_else(|| "admin".into());
    let principal = Principal::from_cn(&format!("operator:{user}"))?;
    ensure_identity(home, dir, &principal, default_days::OPERATOR)
}

/// The CN of the identity in `dir`, if there is one (who queued a command).
pub fn identity_cn(dir: &Path) -> Option<String> {
    let files = find_identity(dir, &["client", "operator"]).ok()?;
    edgebind_certs::inspect::first_cert_cn(&files.cert).ok()
}

/// A TLS server identity (the console's): `server.crt` (leaf and issuing
/// CA) and `server.key` in `dir`, issued from the fleet PKI with `hosts` and
/// `ips` as its names when there is none yet or `renew` asks for a new one.
/// Returns the chain and key PEM, and the serial when it was issued now.
pub fn ensure_server_identity(
    home: &FleetHome,
    dir: &Path,
    hosts: &[String],
    ips: &[std::net::IpAddr],
    renew: bool,
) -> Result<(String, String, Option<String>), OpsError> {
    let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| OpsError::Io { path, source }
    };
    if !renew && crt.exists() && key.exists() {
        return Ok((
            std::fs::read_to_string(&crt).map_err(io(&crt))?,
            std::fs::read_to_string(&key).map_err(io(&key))?,
            None,
        ));
    }
    let pki = home.open_pki()?;
    let issued = pki.issue_server(hosts, ips, Validity::days(default_days::BROKER))?;
    let written = (|| {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        edgebind_certs::files::write_private(&key, issued.key_pem.as_bytes())?;
        edgebind_certs::files::write_public(&crt, issued.chain_pem.as_bytes())?;
        Ok::<_, OpsError>(())
    })();
    if let Err(e) = written {
        let _ = pki.revoke_serial(&issued.serial);
        return Err(e);
    }
    Ok((issued.chain_pem, issued.key_pem, Some(issued.serial)))
}
