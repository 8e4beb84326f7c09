//! `edgebind devices` / `device list`: the device table (or JSON rows).

use std::process::ExitCode;

use anyhow::Context;
use edgebind_fleet::ops::FleetHome;
use edgebind_fleet::registry::{DeviceQuery, PresenceState, RenewalStatus};
use edgebind_protocol::DeviceId;
use serde_json::{Value, json};

use super::args::{ListArgs, StateFilter};
use crate::render;

impl StateFilter {
    fn narrow(self, query: &mut DeviceQuery) {
        match self {
            StateFilter::Online => PresenceState::Online,
            StateFilter::Offline => PresenceState::Offline,
            StateFilter::NeverSeen => PresenceState::NeverSeen,
            StateFilter::Revoked => PresenceState::Revoked,
        }
        .narrow(query);
    }
}

pub fn list(args: ListArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let mut query = DeviceQuery {
        tag: args.tag.as_deref().map(str::parse).transpose()?,
        search: args.search.clone(),
        after: args
            .after
            .as_deref()
            .map(DeviceId::new)
            .transpose()
            .context("--after")?,
        limit: args.limit,
        ..DeviceQuery::default()
    };
    if let Some(state) = args.state {
        state.narrow(&mut query);
    }
    let store = home.open_registry()?;
    let page = store.list_devices(&query)?;
    let view = edgebind_fleet::registry::rules::presence_view(
        &store.services()?,
        edgebind_protocol::messages::now_unix(),
    );
    if let Some(note) = render::stale_presence(view) {
        eprintln!("({note})");
    }
    if let Some(after) = &page.next_after {
        eprintln!("(more devices: --after {after})");
    }
    let devices = page.devices;
    // One history read per device of the page (a page is at most a few hundred).
    let renewals: Vec<RenewalStatus> = devices
        .iter()
        .map(|d| store.cert_history(&d.id).map(|h| RenewalStatus::of(&h)))
        .collect::<Result<_, _>>()?;
    if args.json {
        let rows: Vec<Value> = devices
            .iter()
            .zip(&renewals)
            .map(|(d, renewal)| {
                json!({
                    "id": d.id,
                    "board": d.board,
                    "tags": d.tags,
                    "lifecycle": d.lifecycle,
                    "online": d.online,
                    "presence_stale": !view.fresh,
                    "last_seen": d.last_seen,
                    "agent_version": d.agent_version,
                    "cpu_pct": d.telemetry.as_ref().and_then(|t| t.get("cpu_pct")),
                    "mem_used_bytes": d.telemetry.as_ref().and_then(|t| t.get("mem_used_bytes")),
                    "mem_total_bytes": d.telemetry.as_ref().and_then(|t| t.get("mem_total_bytes")),
                    "cert_not_after": d.cert.as_ref().map(|c| c.not_after),
                    "renewal": renewal,
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
        "RENEWAL",
    ];
    let rows: Vec<[String; 9]> = devices
        .iter()
        .zip(&renewals)
        .map(|(d, renewal)| {
            let state = d.presence_state().label();
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
                render::renewal_state(renewal),
            ]
        })
        .collect();
    render::table(&header, &rows);
    let filtered = query
        != DeviceQuery {
            limit: query.limit,
            ..DeviceQuery::default()
        };
    if devices.is_empty() && !filtered {
        eprintln!("(no devices; add one with `edgebind device add <id> --board <board>`)");
    }
    Ok(ExitCode::SUCCESS)
}
