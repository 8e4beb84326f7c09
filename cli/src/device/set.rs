//! `edgebind set`: desired settings of a device.

use std::process::ExitCode;

use edgebind_fleet::ops::{self, FleetHome};
use edgebind_fleet::registry::parse_setting;
use edgebind_protocol::DeviceId;
use serde_json::{Map, Value, json};

use super::args::SetArgs;

pub fn set(args: SetArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let id = DeviceId::new(&args.id)?;
    let changes = parse_settings(&args.settings)?;
    let mut store = home.open_registry()?;
    let done = ops::set(store.as_mut(), &id, &changes)?;
    crate::audit(
        home,
        store.as_mut(),
        "set",
        id.as_str(),
        &format!(
            "desired settings revision {} = {}",
            done.desired.revision,
            Value::Object(changes.clone())
        ),
    );
    let desired = &done.desired;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"device": id, "desired": desired}))?
        );
    } else {
        println!(
            "{id}: desired settings revision {} = {}",
            desired.revision,
            Value::Object(desired.settings.clone())
        );
        for k in &done.unknown_keys {
            eprintln!(
                "note: {k:?} is not a setting agents are known to understand; the device will report it as ignored"
            );
        }
        println!("the fleet service publishes it to the device (retained)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `key=value` words into the changes to merge.
fn parse_settings(settings: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut changes = Map::new();
    for s in settings {
        let (k, v) = parse_setting(s)?;
        changes.insert(k, v);
    }
    Ok(changes)
}
