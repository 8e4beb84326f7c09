//! The console's HTML, as maud templates (checked when the crate compiles).

use edgebind_fleet::registry::rules::PresenceView;
use edgebind_fleet::registry::{
    AuditEntry, CommandRecord, Device, DevicePage, KNOWN_BOARDS, Overview, PresenceChange,
    PresenceState, TelemetryRow,
};
use edgebind_protocol::actions::{ArgSpec, ArgType};
use edgebind_protocol::messages::Inventory;
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use crate::auth::{CSRF_FIELD, Operator};

pub fn unix_time(t: Option<u64>) -> String {
    let Some(t) = t else { return "-".into() };
    match time::OffsetDateTime::from_unix_timestamp(t as i64) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            d.year(),
            d.month() as u8,
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        ),
        Err(_) => t.to_string(),
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Edgebind" }
            link rel="stylesheet" href="/assets/console.css";
            script src="/assets/console.js" defer {}
        }
    }
}

pub fn csrf(op: &Operator) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(op.csrf); }
}

pub fn layout(op: &Operator, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    span.brand { "Edgebind" }
                    nav {
                        a href="/" { "Overview" }
                        a href="/devices" { "Devices" }
                        a href="/add" { "Add devices" }
                        a href="/factory" { "Factory" }
                        a href="/audit" { "Audit log" }
                    }
                    div.who {
                        span { "operator:" (op.name) }
                        form method="post" action="/logout" {
                            (csrf(op))
                            button.plain type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    @if let Some(f) = &op.flash { div.notice role="status" { (f) } }
                    (body)
                }
            }
        }
    }
}

pub fn login(code: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body {
                main.login {
                    section.card {
                        h1 { "Edgebind console" }
                        @if let Some(e) = error { div.error role="alert" { (e) } }
                        p.muted { "Get a single-use code on the fleet host with "
                            code { "edgebind console login --operator NAME" } "." }
                        form method="post" action="/login" {
                            label for="code" { "Login code" }
                            input #code type="text" name="code" value=(code) autocomplete="off" autofocus required size="44";
                            p { button type="submit" { "Log in" } }
                        }
                    }
                }
            }
        }
    }
}

pub fn error_page(op: Option<&Operator>, message: &str) -> Markup {
    let body = html! {
        h1 { "Not done" }
        div.error role="alert" { (message) }
        p { a href="/devices" { "Back to the devices" } }
    };
    match op {
        Some(op) => layout(op, "Error", body),
        None => html! { (DOCTYPE) html lang="en" { (head("Error")) body { main { (body) } } } },
    }
}

pub fn badge(state: PresenceState) -> Markup {
    html! { span class={"badge " (state.key())} { (state.label()) } }
}

fn stale_note(view: PresenceView) -> Markup {
    html! {
        @if !view.fresh {
            p.stale role="note" {
                "Presence may be stale: no fleet service is connected (last kept up to date "
                (unix_time(view.as_of)) "). Start " code { "edgebind fleet serve" } "."
            }
        }
    }
}

fn telemetry_cell(d: &Device, key: &str) -> String {
    let t = d.telemetry.as_ref();
    match key {
        "cpu" => t
            .and_then(|t| t.get("cpu_pct")?.as_f64())
            .map(|c| format!("{c:.0}%")),
        _ => t.and_then(|t| {
            let used = t.get("mem_used_bytes")?.as_u64()?;
            let total = t.get("mem_total_bytes")?.as_u64()?;
            Some(format!("{}/{} MiB", used >> 20, total >> 20))
        }),
    }
    .unwrap_or_else(|| "-".into())
}

/// The rows of the device table (also the live fragment).
pub fn device_rows(page: &DevicePage, view: PresenceView) -> Markup {
    html! {
        (stale_note(view))
        table #devices {
            thead { tr {
                th { "Device" } th { "Board" } th { "State" } th.hide-narrow { "Tags" }
                th { "Last seen" } th.hide-narrow { "Agent" } th.hide-narrow { "CPU" }
                th.hide-narrow { "Memory" } th { "Settings" }
            } }
            tbody {
                @for d in &page.devices {
                    tr data-device=(d.id) {
                        td { a href={"/devices/" (d.id)} { (d.id) } }
                        td { (d.board) }
                        td { (badge(d.presence_state())) }
                        td.hide-narrow { @for t in &d.tags { code { (t) } " " } }
                        td { (unix_time(d.last_seen)) }
                        td.hide-narrow { (d.agent_version.as_deref().unwrap_or("-")) }
                        td.num.hide-narrow { (telemetry_cell(d, "cpu")) }
                        td.num.hide-narrow { (telemetry_cell(d, "mem")) }
                        td { @if d.converged() { "converged" } @else { "rev " (d.desired_revision) " pending" } }
                    }
                }
                @if page.devices.is_empty() {
                    tr { td colspan="9" .muted { "No devices match. " a href="/add" { "Add devices" } } }
                }
            }
        }
    }
}

pub struct ListFilters<'a> {
    pub tag: &'a str,
    pub state: &'a str,
    pub q: &'a str,
    pub limit: u32,
    /// The query string of this listing (for the live fragment and paging).
    pub query: String,
}

pub fn devices(
    op: &Operator,
    f: &ListFilters<'_>,
    page: &DevicePage,
    view: PresenceView,
) -> Markup {
    layout(
        op,
        "Devices",
        html! {
            h1 { "Devices" }
            form.filters method="get" action="/devices" role="search" {
                div { label for="q" { "Search id" } input #q type="search" name="q" value=(f.q); }
                div { label for="tag" { "Tag" } input #tag type="text" name="tag" value=(f.tag) size="12"; }
                div { label for="state" { "State" }
                    select #state name="state" {
                        option value="" selected[f.state.is_empty()] { "any" }
                        @for s in PresenceState::ALL {
                            option value=(s.key()) selected[f.state == s.key()] { (s.label()) }
                        }
                    }
                }
                div { label for="limit" { "Per page" } input #limit type="number" name="limit" min="1" max="1000" value=(f.limit); }
                div { button type="submit" { "Filter" } }
            }
            div #device-list data-live={"/live/devices?" (f.query)} { (device_rows(page, view)) }
            @if let Some(next) = &page.next_after {
                p.pager { a href={"/devices?" (f.query) "&after=" (next)} { "Next page →" } }
            }
        },
    )
}

fn json(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The live part of a device page: presence and settings state.
pub fn device_live(d: &Device, view: PresenceView) -> Markup {
    let reported = d.reported.as_ref();
    let mut keys: Vec<&String> = d.desired.keys().collect();
    if let Some(r) = reported {
        keys.extend(r.applied.keys().chain(r.ignored.keys()));
    }
    keys.sort();
    keys.dedup();
    html! {
        (stale_note(view))
        dl {
            dt { "State" } dd #state { (badge(d.presence_state())) }
            dt { "Last seen" } dd { (unix_time(d.last_seen)) }
            dt { "Connected since" } dd { (unix_time(d.connected_at)) }
            dt { "Agent" } dd { (d.agent_version.as_deref().unwrap_or("-")) }
            dt { "Addresses" } dd { (d.addresses.join(", ")) }
        }
        h2 { "Desired vs reported settings" }
        p.muted { "Desired revision " (d.desired_revision) ", published " (d.desired_published_revision)
            ", reported " (reported.map(|r| r.revision.to_string()).unwrap_or_else(|| "-".into()))
            @if d.converged() { " · converged" } @else { " · not converged" } }
        table #settings {
            thead { tr { th { "Key" } th { "Desired" } th { "Reported (applied)" } th { "Ignored" } } }
            tbody {
                @for k in &keys {
                    tr {
                        td { code { (k) } }
                        td { (d.desired.get(*k).map(json).unwrap_or_default()) }
                        td { (reported.and_then(|r| r.applied.get(*k)).map(json).unwrap_or_default()) }
                        td { (reported.and_then(|r| r.ignored.get(*k)).map(json).unwrap_or_default()) }
                    }
                }
            }
        }
    }
}

pub struct DeviceView<'a> {
    pub device: &'a Device,
    pub view: PresenceView,
    pub telemetry: &'a [TelemetryRow],
    pub commands: &'a [CommandRecord],
    pub presence: &'a [PresenceChange],
    pub actions: Vec<String>,
    /// What the device last reported of itself (None: never, or unreadable).
    pub inventory: Option<Inventory>,
    pub image: Option<String>,
}

/// Actions that ask for a confirmation before they are sent.
const CONFIRM_ACTIONS: &str = "reboot,restart-agent";

/// "3 h 2 min"-style length of a connection.
fn span(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        s => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Connects and disconnects, latest first, with how long each connection
/// lasted (the live part of the presence history).
pub fn presence_history(entries: &[PresenceChange]) -> Markup {
    html! {
        @if entries.is_empty() {
            p.muted { "Never connected." }
        } @else {
            table #presence-table {
                thead { tr { th { "When" } th { "Change" } th { "Connection lasted" } } }
                tbody {
                    @for (i, e) in entries.iter().enumerate() {
                        tr {
                            td { (unix_time(Some(e.at))) }
                            td { @if e.online { span.badge.online { "connected" } } @else { span.badge.offline { "disconnected" } } }
                            td {
                                @if e.online {
                                    @match i.checked_sub(1).map(|j| &entries[j]) {
                                        Some(end) if !end.online => { (span(end.at.saturating_sub(e.at))) }
                                        _ => { @if i == 0 { "still connected" } @else { "-" } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn arg_rule(a: &ArgSpec) -> String {
    let ty = match &a.ty {
        ArgType::String { allowed, max_len } if allowed.is_empty() => {
            format!("text, at most {max_len} bytes")
        }
        ArgType::String { allowed, .. } => format!("one of {}", allowed.join(", ")),
        ArgType::Integer { min, max } => format!("whole number {min}..{max}"),
        ArgType::Bool => "true or false".to_owned(),
    };
    if a.required {
        format!("{ty}, required")
    } else {
        ty
    }
}

fn inventory_card(d: &Device, inv: Option<&Inventory>) -> Markup {
    html! {
        section.card #inventory {
            h2 { "Inventory" }
            @match inv {
                None => { p.muted { "Not reported yet: send " code { "inventory" } "." } }
                Some(inv) => {
                    dl {
                        dt { "Reported" } dd { (unix_time(d.inventory_at)) }
                        dt { "Agent" } dd { (inv.agent_version) }
                        dt { "OS" } dd { (inv.os_release.as_deref().unwrap_or("-")) }
                        dt { "Kernel" } dd { (inv.kernel.as_deref().unwrap_or("-")) }
                        dt { "Board model" } dd { (inv.board_model.as_deref().unwrap_or("-")) }
                        dt { "Serial" } dd.mono { (inv.serial.as_deref().unwrap_or("-")) }
                    }
                    @if !inv.actions.is_empty() {
                        h2 { "Actions it offers" }
                        table #declared-actions {
                            thead { tr { th { "Action" } th { "From" } th { "Arguments" } th { "What it does" } } }
                            tbody {
                                @for a in &inv.actions {
                                    tr {
                                        td { code { (a.name) } }
                                        td { (format!("{:?}", a.origin).to_lowercase()) }
                                        td {
                                            @if a.args.is_empty() { span.muted { "none" } }
                                            @for (name, spec) in &a.args {
                                                div { code { (name) } ": " (arg_rule(spec))
                                                    @if let Some(d) = &spec.description { span.muted { " — " (d) } } }
                                            }
                                        }
                                        td { (a.description.as_deref().unwrap_or("")) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn device(op: &Operator, v: &DeviceView<'_>) -> Markup {
    let d = v.device;
    let revoked = d.presence_state() == PresenceState::Revoked;
    layout(
        op,
        d.id.as_str(),
        html! {
            h1 { (d.id) " " (badge(d.presence_state())) }
            div.grid {
                section.card {
                    h2 { "Identity" }
                    dl {
                        dt { "Board" } dd { (d.board) }
                        dt { "Tags" } dd { @for t in &d.tags { code { (t) } " " } }
                        dt { "Lifecycle" } dd { (d.lifecycle.as_str()) }
                        dt { "Registered" } dd { (unix_time(Some(d.registered_at))) }
                        @if let Some(c) = &d.cert {
                            dt { "Certificate serial" } dd.mono { (c.serial) }
                            dt { "Fingerprint (SHA-256)" } dd.mono { (c.fingerprint_sha256) }
                            dt { "Expires" } dd { (unix_time(Some(c.not_after))) }
                        }
                    }
                    p {
                        a href={"/devices/" (d.id) "/bundle.tar"} download { "Download identity bundle (tar)" }
                        @if let Some(img) = &v.image {
                            " · " a href={"/devices/" (d.id) "/image"} download { "Download personalized image (" (img) ")" }
                        }
                    }
                }
                section.card {
                    h2 { "Presence" }
                    div #live data-live={"/live/devices/" (d.id)} aria-live="polite" { (device_live(d, v.view)) }
                }
            }
            @if !revoked {
                div.grid {
                    section.card {
                        h2 { "Send an action" }
                        form #send-form method="post" action={"/devices/" (d.id) "/send"}
                            data-confirm-actions=(CONFIRM_ACTIONS)
                            data-confirm={"It runs on " (d.id) " as soon as the device takes it."} {
                            (csrf(op))
                            label for="action" { "Action" }
                            select #action name="action" {
                                @for a in &v.actions { option value=(a) { (a) } }
                            }
                            label for="args" { "Arguments (key=value, one per line; see Inventory for what each action takes)" }
                            textarea #args name="args" {}
                            p { button #send type="submit" { "Send" } }
                        }
                    }
                    section.card {
                        h2 { "Change settings" }
                        form method="post" action={"/devices/" (d.id) "/settings"} {
                            (csrf(op))
                            label for="settings" { "key=value, one per line (key=null removes it)" }
                            textarea #settings-input name="settings" {}
                            p { button #set type="submit" { "Set" } }
                        }
                    }
                }
                section.card {
                    h2 { "Revoke" }
                    p { "Revoking puts every certificate of " strong { (d.id) } " on the CRL, marks it revoked in \
                        the registry, drops its queued commands and on-connect rules, and reloads the broker: \
                        the device can no longer connect, and an open connection is denied every topic. \
                        It cannot be undone; the id can only come back with a new registration." }
                    form #revoke-form method="post" action={"/devices/" (d.id) "/revoke"}
                        data-confirm={"Revoke " (d.id) "? This cannot be undone."} {
                        (csrf(op))
                        label for="confirm" { "Type the device id to confirm" }
                        input #confirm type="text" name="confirm" autocomplete="off" required;
                        " "
                        button.danger #revoke type="submit" { "Revoke " (d.id) }
                    }
                }
            }
            section.card {
                h2 { "Commands (latest first)" }
                div #commands aria-live="polite" { (commands(v.commands)) }
            }
            div.grid {
                section.card {
                    h2 { "Presence history" }
                    div #presence-history { (presence_history(v.presence)) }
                }
                (inventory_card(d, v.inventory.as_ref()))
            }
            section.card {
                h2 { "Telemetry" }
                (chart(v.telemetry))
                h2 { "Samples (latest first)" }
                table #telemetry {
                    thead { tr { th { "Time" } th { "CPU" } th { "Memory used" } th { "Temperature" } th { "Disk used" } } }
                    tbody {
                        @for t in v.telemetry {
                            tr {
                                td { (unix_time(Some(t.ts))) }
                                td.num { (metric(&t.payload, "cpu_pct", "%")) }
                                td.num { (mib(&t.payload, "mem_used_bytes")) }
                                td.num { (metric(&t.payload, "soc_temp_c", " °C")) }
                                td.num { (mib(&t.payload, "disk_used_bytes")) }
                            }
                        }
                    }
                }
            }
        },
    )
}

fn metric(p: &Value, key: &str, unit: &str) -> String {
    p.get(key)
        .and_then(Value::as_f64)
        .map(|v| format!("{v:.1}{unit}"))
        .unwrap_or_else(|| "-".into())
}

fn mib(p: &Value, key: &str) -> String {
    p.get(key)
        .and_then(Value::as_u64)
        .map(|v| format!("{} MiB", v >> 20))
        .unwrap_or_else(|| "-".into())
}

pub fn commands(cmds: &[CommandRecord]) -> Markup {
    html! {
        table #command-table {
            thead { tr { th { "Command" } th { "Action" } th { "State" } th { "By" } th { "Created" } th { "Result" } } }
            tbody {
                @for c in cmds {
                    tr {
                        td.mono { (c.id) }
                        td { (c.action.as_deref().unwrap_or("-")) }
                        td { (c.state.as_str()) }
                        td { (c.requested_by.as_deref().unwrap_or("-")) }
                        td { (unix_time(Some(c.created_at))) }
                        td { (c.reason.as_deref().unwrap_or("")) " " (c.output.as_ref().map(|o| o.to_string()).unwrap_or_default()) }
                    }
                }
            }
        }
    }
}

pub fn add_form(op: &Operator, images: &[String], error: Option<&str>) -> Markup {
    layout(
        op,
        "Add devices",
        html! {
            h1 { "Add devices" }
            @if let Some(e) = error { div.error role="alert" { (e) } }
            section.card {
                form #add method="post" action="/add" {
                    (csrf(op))
                    div.grid {
                        div {
                            label for="board" { "Board" }
                            select #board name="board" {
                                @for b in KNOWN_BOARDS { option value=(b) { (b) } }
                            }
                            label for="tags" { "Tags (space or comma separated)" }
                            input #tags type="text" name="tags" size="30";
                            label for="settings" { "Initial desired settings (key=value per line)" }
                            textarea #settings name="settings" placeholder="telemetry_interval_s=30\nlog_level=info" {}
                        }
                        div {
                            label for="ids" { "Device ids (one device, or a list: one per line)" }
                            textarea #ids name="ids" required {}
                            label for="image" { "Personalized image from a golden image" }
                            select #image name="image" {
                                option value="" { "none (bundle only)" }
                                @for i in images { option value=(i) { (i) } }
                            }
                            @if images.is_empty() { p.muted { "No golden images: start the console with --images DIR." } }
                        }
                    }
                    p { button #register type="submit" { "Register" } }
                }
            }
        },
    )
}

pub struct AddedRow {
    pub id: String,
    pub result: Result<String, String>,
    pub image: bool,
}

pub fn added(op: &Operator, rows: &[AddedRow]) -> Markup {
    layout(
        op,
        "Devices added",
        html! {
            h1 { "Add devices: results" }
            table #added {
                thead { tr { th { "Device" } th { "Result" } th { "Downloads" } } }
                tbody {
                    @for r in rows {
                        tr data-added=(r.id) {
                            td { (r.id) }
                            @match &r.result {
                                Ok(msg) => {
                                    td { (msg) }
                                    td {
                                        a.bundle href={"/devices/" (r.id) "/bundle.tar"} download { "bundle (tar)" }
                                        @if r.image { " · " a href={"/devices/" (r.id) "/image"} download { "image" } }
                                    }
                                }
                                Err(e) => { td.error { (e) } td {} }
                            }
                        }
                    }
                }
            }
            p { a href="/devices" { "To the devices" } " · " a href="/add" { "Add more" } }
        },
    )
}

pub fn audit(op: &Operator, entries: &[AuditEntry]) -> Markup {
    layout(
        op,
        "Audit log",
        html! {
            h1 { "Audit log" }
            p.muted { "Every change made through the console or the CLI, latest first (also "
                code { "edgebind audit" } ")." }
            table #audit {
                thead { tr { th { "#" } th { "When" } th { "Who" } th { "What" } th { "Target" } th { "Detail" } } }
                tbody {
                    @for e in entries {
                        tr {
                            td.num { (e.seq) }
                            td { (unix_time(Some(e.at))) }
                            td { (e.actor) }
                            td { code { (e.action) } }
                            td { @if !e.target.is_empty() && !e.target.contains(':') && e.target != "all" {
                                a href={"/devices/" (e.target)} { (e.target) } } @else { (e.target) } }
                            td { (e.detail) }
                        }
                    }
                }
            }
            @if let Some(last) = entries.last().filter(|_| entries.len() >= 100) {
                p.pager { a href={"/audit?before=" (last.seq)} { "Older →" } }
            }
        },
    )
}

pub fn overview(op: &Operator, o: &Overview, view: PresenceView, expiry_days: u64) -> Markup {
    layout(
        op,
        "Overview",
        html! {
            h1 { "Fleet overview" }
            (stale_note(view))
            div.grid #overview {
                section.card {
                    h2 { (o.total) " devices" }
                    dl {
                        @for s in PresenceState::ALL {
                            dt { (badge(s)) }
                            dd { a href={"/devices?state=" (s.key())} { (o.count(s)) } }
                        }
                    }
                }
                section.card {
                    h2 { "Needs attention" }
                    dl {
                        dt { "Certificate expires within " (expiry_days) " days" }
                        dd #cert-expiring { (o.cert_expiring) }
                        dt { "Settings not yet reported applied" }
                        dd #settings-pending { (o.settings_pending) }
                    }
                    p.muted { "Renew a certificate with " code { "edgebind pki issue device ID" } " (a renewal for a registered device)" "." }
                }
            }
        },
    )
}

/// The percentage a sample shows for one series of the chart.
fn series_value(p: &Value, series: &str) -> Option<f64> {
    let ratio = |used: &str, total: &str| {
        let total = p.get(total)?.as_f64().filter(|t| *t > 0.0)?;
        Some(100.0 * p.get(used)?.as_f64()? / total)
    };
    match series {
        "cpu" => p.get("cpu_pct")?.as_f64(),
        "memory" => ratio("mem_used_bytes", "mem_total_bytes"),
        "disk" => ratio("disk_used_bytes", "disk_total_bytes"),
        // Degrees Celsius on the same 0-100 scale.
        _ => p.get("soc_temp_c")?.as_f64(),
    }
}

/// CPU, memory, disk (percent) and temperature (°C) over the recent
/// samples, oldest on the left: an inline SVG, no script.
pub fn chart(rows: &[TelemetryRow]) -> Markup {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    let series = [
        ("cpu", "CPU %", "#0b6bcb"),
        ("memory", "memory %", "#1a7f37"),
        ("disk", "disk %", "#9a6700"),
        ("temperature", "temperature °C", "#cf222e"),
    ];
    let n = rows.len();
    let points = |name: &str| -> String {
        rows.iter()
            .rev()
            .enumerate()
            .filter_map(|(i, r)| {
                let v = series_value(&r.payload, name)?.clamp(0.0, 100.0);
                let x = if n > 1 {
                    W * i as f64 / (n - 1) as f64
                } else {
                    W / 2.0
                };
                Some(format!("{x:.1},{:.1}", H - H * v / 100.0))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    html! {
        @if rows.is_empty() {
            p.muted { "No telemetry yet." }
        } @else {
            svg #telemetry-chart viewBox={"0 0 " (W) " " (H)} width="100%" height="140"
                preserveAspectRatio="none" role="img" aria-label="telemetry over the recent samples" {
                line x1="0" y1=(H / 2.0) x2=(W) y2=(H / 2.0) stroke="#dde2e7" {}
                @for (name, _, colour) in series {
                    polyline fill="none" stroke=(colour) stroke-width="2" points=(points(name)) {}
                }
            }
            p.muted {
                @for (name, label, _) in series {
                    span class={"key-" (name)} { "■ " } (label) "  "
                }
                " · last " (n) " samples, 0–100"
            }
        }
    }
}
