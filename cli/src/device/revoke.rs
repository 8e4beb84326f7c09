//! `edgebind revoke` / `device revoke`: the library's one revocation.

use std::process::ExitCode;

use edgebind_fleet::ops::{self, FleetHome, Policy};
use edgebind_protocol::DeviceId;
use serde_json::json;

use super::args::RevokeArgs;

pub fn revoke(args: RevokeArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let id = DeviceId::new(&args.id)?;
    let mut store = home.open_registry()?;
    let done = ops::revoke(home, store.as_mut(), &id, Policy::Refresh)?;
    crate::audit(
        home,
        store.as_mut(),
        "revoke",
        id.as_str(),
        &format!("{} certificate(s) on the CRL", done.certificates.len()),
    );
    let reloaded = done.policy.as_ref().is_some_and(|p| p.reloaded());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "device": done.device,
                "revoked_serials": done.certificates.iter().map(|e| &e.serial).collect::<Vec<_>>(),
                "broker_reloaded": reloaded,
            }))?
        );
    } else {
        println!(
            "revoked {id}: {} certificate(s) on the CRL, queued commands dropped",
            done.certificates.len()
        );
        if reloaded {
            println!(
                "broker reloaded: its certificate is refused at every new handshake, and a connection \
                 that is already open is denied every topic (ACL) until it drops"
            );
        } else {
            println!(
                "broker not running here: the new ACL/CRL apply at its next start or `edgebind broker reload`"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
