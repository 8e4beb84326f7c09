//! `edgebind device add`: register a device (certificate, bundle, broker
//! policy, registry row) through the library's one registration.

use std::collections::BTreeSet;
use std::process::ExitCode;

use edgebind_fleet::ops::{self, AgentBroker, FleetHome, IdentityOutput, Registration};
use edgebind_fleet::registry::{Board, Tag};
use edgebind_protocol::DeviceId;
use serde_json::json;

use super::args::AddArgs;
use crate::render;

pub fn add(args: AddArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let id = DeviceId::new(&args.id)?;
    let board: Board = args.board.parse()?;
    let tags = args
        .tags
        .iter()
        .map(|t| t.parse::<Tag>())
        .collect::<Result<BTreeSet<_>, _>>()?;
    let broker = args
        .broker
        .as_deref()
        .map(AgentBroker::from_addr)
        .transpose()?;
    let mut store = home.open_registry()?;
    let req = Registration {
        output: IdentityOutput::Bundle {
            dir: home.bundle_dir(&id),
        },
        id,
        board,
        tags,
        validity_days: args.days,
        broker,
        unit: None,
    };
    let done = ops::register_device(home, store.as_mut(), &req)?;
    crate::audit(
        home,
        store.as_mut(),
        "device.add",
        done.device.id.as_str(),
        &format!(
            "registered ({}), certificate serial {}",
            done.device.board, done.serial
        ),
    );
    let IdentityOutput::Bundle { dir } = &done.output else {
        unreachable!("device add writes a bundle")
    };
    let tar = edgebind_certs::bundle::tar_path_for(dir);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "device": done.device,
                "bundle_dir": dir,
                "bundle_tar": tar,
                "broker_reloaded": done.policy.reloaded(),
            }))?
        );
    } else {
        println!(
            "registered {} ({}), certificate serial {} valid until {}",
            done.device.id,
            done.device.board,
            done.serial,
            render::unix_time(done.device.cert.as_ref().map(|c| c.not_after))
        );
        println!("identity bundle: {}", dir.display());
        println!("factory tar:     {}", tar.display());
    }
    Ok(ExitCode::SUCCESS)
}
