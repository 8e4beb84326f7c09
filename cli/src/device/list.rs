//! `edgebind devices` / `device list`: the device table (or JSON rows).

use std::process::ExitCode;

use edgebind_fleet::ops::FleetHome;
use edgebind_fleet::registry::{Lifecycle, Selector};
use serde_json::{Value, json};

use super::args::ListArgs;
use crate::render;

pub fn list(args: ListArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let selector = match &args.tag {
        Some(t) => Selector::Tag(t.parse()?),
        None => Selector::All,
    };
    let devices = home.open_registry()?.devices(&selector)?;
    if args.json {
        let rows: Vec<Value> = devices
            .iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "board": d.board,
                    "tags": d.tags,
                    "lifecycle": d.lifecycle,
                    "online": d.online,
                    "last_seen": d.last_seen,
                    "agent_version": d.agent_version,
                    "cpu_pct": d.telemetry.as_ref().and_then(|t| t.get("cpu_pct")),
                    "mem_used_bytes": d.telemetry.as_ref().and_then(|t| t.get("mem_used_bytes")),
                    "mem_total_bytes": d.telemetry.as_ref().and_then(|t| t.get("mem_total_bytes")),
                    "cert_not_after": d.cert.as_ref().map(|c| c.not_after),
                    "desired_revision": d.desired_revision,
                    "converged": d.converged(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    let header = [
        "ID",
        "BOARD",
        "STATE",
        "LAST SEEN",
        "AGENT",
        "CPU",
        "MEMORY",
        "CERT EXPIRES",
    ];
    let rows: Vec<[String; 8]> = devices
        .iter()
        .map(|d| {
            let state = match (d.lifecycle, d.online) {
                (Lifecycle::Revoked, _) => "revoked",
                (_, true) => "online",
                (Lifecycle::Registered, false) => "never seen",
                (_, false) => "offline",
            };
            let t = d.telemetry.as_ref();
            let cpu = t
                .and_then(|t| t.get("cpu_pct")?.as_f64())
                .map(|c| format!("{c:.0}%"))
                .unwrap_or_else(|| "-".into());
            let mem = t
                .and_then(|t| {
                    let used = t.get("mem_used_bytes")?.as_u64()?;
                    let total = t.get("mem_total_bytes")?.as_u64()?;
                    Some(format!("{}/{} MiB", used >> 20, total >> 20))
                })
                .unwrap_or_else(|| "-".into());
            [
                d.id.to_string(),
                d.board.to_string(),
                state.to_owned(),
                render::unix_time(d.last_seen),
                d.agent_version.clone().unwrap_or_else(|| "-".into()),
                cpu,
                mem,
                render::unix_date(d.cert.as_ref().map(|c| c.not_after)),
            ]
        })
        .collect();
    render::table(&header, &rows);
    if devices.is_empty() {
        eprintln!("(no devices; add one with `edgebind device add <id> --board <board>`)");
    }
    Ok(ExitCode::SUCCESS)
}
