//! `edgebind device renew` (ask a device to renew its certificate now, over
//! its own connection) and `edgebind device reissue` (a fresh identity
//! bundle made here, for the factory or a service centre).

use std::process::ExitCode;

use edgebind_fleet::ops::{self, FleetHome, IdentityOutput};
use edgebind_protocol::DeviceId;
use serde_json::json;

use super::args::{ReissueArgs, RenewArgs, SendArgs};

/// The `renew` action, sent like `edgebind send DEV renew`: the agent makes
/// a new key and renews at once instead of at its usual point of the
/// certificate's life.
pub fn renew(args: RenewArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    DeviceId::new(&args.id)?;
    super::send(
        SendArgs {
            words: vec![
                args.id,
                edgebind_protocol::actions::RENEW.as_str().to_owned(),
            ],
            arg: Vec::new(),
            tag: None,
            all: false,
            timeout: args.timeout,
            expires_in: None,
            queue: args.queue,
            wait: false,
            on_connect: false,
            connect: args.connect,
            json: args.json,
            rate: None,
        },
        home,
    )
}

/// A new certificate and bundle for a registered device, made here: the
/// registry records it as the device's current certificate; the previous
/// one stays valid until it expires or is revoked (`pki revoke --serial`).
pub fn reissue(args: ReissueArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let id = DeviceId::new(&args.id)?;
    let dir = args.out.unwrap_or_else(|| home.bundle_dir(&id));
    let mut store = home.open_registry()?;
    let done = ops::renew_device(
        home,
        store.as_mut(),
        &id,
        args.days,
        None,
        &IdentityOutput::Bundle { dir: dir.clone() },
    )?;
    if let Err(e) = &done.policy {
        eprintln!(
            "edgebind: warning: broker policy not refreshed ({e}); run `edgebind broker reload`"
        );
    }
    let not_after = done.device.cert.as_ref().map(|c| c.not_after);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "device": id,
                "serial": done.serial,
                "fingerprint_sha256": done.fingerprint_sha256,
                "not_after": not_after,
                "bundle": dir,
                "tar": edgebind_certs::bundle::tar_path_for(&dir),
            }))?
        );
    } else {
        println!(
            "reissued {id}: serial {} sha256 {} expires {}; bundle {} (and {})",
            done.serial,
            done.fingerprint_sha256,
            crate::render::unix_time(not_after),
            dir.display(),
            edgebind_certs::bundle::tar_path_for(&dir).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
