//! `edgebind device show`: everything the registry knows about one device.

use std::process::ExitCode;

use edgebind_fleet::ops::FleetHome;
use edgebind_fleet::registry::{RenewalStatus, Tag};
use edgebind_protocol::DeviceId;
use edgebind_protocol::actions::{ActionSpec, ArgType, Origin};
use edgebind_protocol::messages::Inventory;
use serde_json::{Value, json};

use super::args::ShowArgs;
use crate::render;

pub fn show(args: ShowArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let id = DeviceId::new(&args.id)?;
    let store = home.open_registry()?;
    let d = store.device(&id)?;
    let commands = store.commands_for(&id, args.recent)?;
    let rules = store.on_connect_rules(&id)?;
    let telemetry = store.telemetry_history(&id, args.recent)?;
    let events = store.events(&id, args.recent)?;
    let certificates = store.cert_history(&id)?;
    let renewal = RenewalStatus::of(&certificates);
    let view = edgebind_fleet::registry::rules::presence_view(
        &store.services()?,
        edgebind_protocol::messages::now_unix(),
    );
    let stale = render::stale_presence(view);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "device": d,
                "converged": d.converged(),
                "presence_stale": !view.fresh,
                "presence_as_of": view.as_of,
                "commands": commands,
                "on_connect": rules,
                "telemetry": telemetry,
                "events": events,
                "certificates": certificates,
                "renewal": renewal,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let tags: Vec<&str> = d.tags.iter().map(Tag::as_str).collect();
    println!("device        {}", d.id);
    println!("board         {}", d.board);
    println!("tags          {}", tags.join(", "));
    println!("lifecycle     {}", d.lifecycle.as_str());
    println!(
        "presence      {} (last seen {}){}",
        if d.online { "online" } else { "offline" },
        render::unix_time(d.last_seen),
        stale.map(|s| format!(" - {s}")).unwrap_or_default()
    );
    println!(
        "agent         {}",
        d.agent_version.as_deref().unwrap_or("-")
    );
    if !d.addresses.is_empty() {
        println!("addresses     {}", d.addresses.join(", "));
    }
    if let Some(c) = &d.cert {
        println!(
            "certificate   serial {} sha256 {} expires {}",
            c.serial,
            c.fingerprint_sha256,
            render::unix_time(Some(c.not_after))
        );
    }
    println!("renewal       {}", render::renewal_state(&renewal));
    if certificates.len() > 1 {
        println!("certificates:");
        for r in &certificates {
            println!(
                "  {} {:<9} {:<10} issued {} expires {}",
                r.serial,
                r.state.as_str(),
                r.origin.as_str(),
                render::unix_time(Some(r.issued_at)),
                render::unix_time(Some(r.not_after))
            );
        }
    }
    println!(
        "desired       rev {} {}{}",
        d.desired_revision,
        Value::Object(d.desired.clone()),
        if d.desired_published_revision < d.desired_revision {
            " (not published yet)"
        } else {
            ""
        }
    );
    match &d.reported {
        Some(r) => println!(
            "reported      rev {} {}{}",
            r.revision,
            Value::Object(r.applied.clone()),
            if r.ignored.is_empty() {
                String::new()
            } else {
                format!(" ignored {}", Value::Object(r.ignored.clone()))
            }
        ),
        None => println!("reported      -"),
    }
    println!("converged     {}", if d.converged() { "yes" } else { "no" });
    if let Some(t) = &d.telemetry {
        println!(
            "telemetry     {} ({} samples received)",
            t, d.telemetry_count
        );
    }
    if let Some(inv) = &d.inventory {
        // The action list is shown on its own below.
        let mut facts = inv.clone();
        if let Some(map) = facts.as_object_mut() {
            map.remove("actions");
        }
        println!(
            "inventory     {facts} (at {})",
            render::unix_time(d.inventory_at)
        );
        let actions = serde_json::from_value::<Inventory>(inv.clone())
            .map(|i| i.actions)
            .unwrap_or_default();
        if !actions.is_empty() {
            println!("actions:");
            for a in &actions {
                println!("  {}", render_action(a));
            }
        }
    }
    if !rules.is_empty() {
        println!("on connect:");
        for r in &rules {
            println!(
                "  rule {:<4} {} {}",
                r.id,
                r.action,
                Value::Object(r.args.clone())
            );
        }
    }
    if !commands.is_empty() {
        println!("recent commands:");
        for c in &commands {
            println!(
                "  {:<32} {:<14} {:<10} {:<10} {}{}",
                c.id,
                c.action.as_deref().unwrap_or("?"),
                c.delivery.as_str(),
                c.state.as_str(),
                render::unix_time(Some(c.created_at)),
                c.reason
                    .as_deref()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    if !events.is_empty() {
        println!("recent events:");
        for e in &events {
            println!(
                "  {} {:<12} {}",
                render::unix_time(Some(e.ts)),
                e.kind,
                e.message
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `selftest (declared, not idempotent, 30 s) level=quick|full count=1..5 [verbose=bool]`
fn render_action(a: &ActionSpec) -> String {
    let mut words = vec![format!(
        "{:<16} ({}, {}, {} s)",
        a.name.as_str(),
        match a.origin {
            Origin::Builtin => "built-in",
            Origin::Declared => "declared",
        },
        if a.idempotent {
            "idempotent"
        } else {
            "not idempotent"
        },
        a.timeout_s
    )];
    for (name, arg) in &a.args {
        let ty = match &arg.ty {
            ArgType::String { allowed, .. } if !allowed.is_empty() => allowed.join("|"),
            ArgType::String { .. } => "text".to_owned(),
            ArgType::Integer { min, max } => format!("{min}..{max}"),
            ArgType::Bool => "true|false".to_owned(),
        };
        words.push(if arg.required {
            format!("{name}={ty}")
        } else {
            format!("[{name}={ty}]")
        });
    }
    if let Some(d) = &a.description {
        words.push(format!("- {d}"));
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_renders_with_its_argument_schema() {
        let a: ActionSpec = serde_json::from_value(json!({
            "name": "selftest", "origin": "declared", "idempotent": false, "timeout_s": 30,
            "args": {
                "level": {"type": "string", "allowed": ["quick", "full"], "required": true},
                "count": {"type": "integer", "min": 1, "max": 5},
            },
        }))
        .unwrap();
        let line = render_action(&a);
        assert!(line.starts_with("selftest "), "{line}");
        assert!(line.contains("(declared, not idempotent, 30 s)"), "{line}");
        assert!(line.contains("[count=1..5] level=quick|full"), "{line}");
    }
}
