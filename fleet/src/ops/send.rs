//! Sending an action: to one device, a tag or the whole fleet; now (publish
//! and wait for the results), queued for the fleet service, or as an
//! on-connect rule.
//!
//! Every command is recorded in the registry before anything is published,
//! in one transaction for the whole fan-out, so a command the devices see is
//! always one the registry knows.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgebind_protocol::actions::{ArgSpec, ArgType, validate_args};
use edgebind_protocol::messages::{Action, Command, Inventory, now_unix};
use edgebind_protocol::{CommandId, DeviceId};
use serde::Serialize;
use serde_json::{Map, Value};

use super::identity::{IssuedIdentity, identity_cn, operator_identity};
use super::{FleetHome, OpsError, broker_endpoint};
use crate::operator::{self, DeviceOutcome, Outcome};
use crate::registry::{
    CommandState, Delivery, Device, Lifecycle, NewCommand, OnConnectRule, Selector, Store, Tag,
    Update,
};
use crate::service::new_command_id;

/// Which devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    Device(DeviceId),
    Tag(Tag),
    /// Every device that is not revoked.
    All,
}

/// How the action reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Publish now and wait up to the timeout for every result.
    Now,
    /// Queue for the fleet service to deliver when each device is online.
    Queue,
    /// Queue, then wait up to the timeout for the results the service records.
    QueueAndWait,
    /// Run on every connect (an on-connect rule per device).
    OnConnect,
}

#[derive(Debug, Clone)]
pub struct SendRequest {
    pub targets: Targets,
    pub action: Action,
    pub args: Map<String, Value>,
    pub mode: Mode,
    pub timeout: Duration,
    /// Seconds until the command expires on the device; default: the timeout
    /// for [`Mode::Now`], never for queued commands.
    pub expires_in: Option<u64>,
    /// The operator identity directory, and whether the caller named it
    /// (then it must hold an identity; otherwise one is issued if missing).
    pub identity_dir: PathBuf,
    pub identity_explicit: bool,
    /// `host:port`; default: the broker settings of the home.
    pub broker: Option<String>,
    /// Commands published per second ([`Mode::Now`]): a reboot of every
    /// device must not be one instant. The wait and each command's expiry
    /// are extended by the time the pacing takes. `None`: unpaced.
    pub rate: Option<u32>,
}

/// What a send reports while it runs.
#[derive(Debug, Clone)]
pub enum SendEvent<'a> {
    /// The operator had no identity yet: this one was issued for the send.
    IdentityIssued(&'a IssuedIdentity),
    /// `done` of `total` devices have a final outcome, `failures` of them not a success.
    Progress {
        done: usize,
        total: usize,
        failures: usize,
    },
    /// One device's final outcome, as it comes (before its `Progress`).
    Outcome(&'a DeviceOutcome),
    /// The registry holds no action list for this device (never
    /// inventoried, or an agent older than the list): its arguments were not
    /// checked here; the device still checks them.
    NotChecked(&'a DeviceId),
}

#[derive(Debug, Clone, Serialize)]
pub struct QueuedCommand {
    pub device: DeviceId,
    pub command: CommandId,
    pub state: &'static str,
}

/// How a send ended.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Sent {
    Rules(Vec<OnConnectRule>),
    Queued(Vec<QueuedCommand>),
    Finished {
        outcomes: Vec<DeviceOutcome>,
        /// Why the results seen could not be recorded in the registry (the
        /// fleet service records them too when it runs).
        #[serde(skip)]
        not_recorded: Option<String>,
    },
}

impl Sent {
    /// Every device reached a success (rules and queued commands count as sent).
    pub fn all_succeeded(&self) -> bool {
        match self {
            Sent::Finished { outcomes, .. } => outcomes.iter().all(|o| o.outcome.is_success()),
            _ => true,
        }
    }
}

/// The non-revoked devices `targets` names; a named device must exist and
/// not be revoked, and an empty selection is an error.
pub fn resolve_targets(store: &dyn Store, targets: &Targets) -> Result<Vec<DeviceId>, OpsError> {
    let ids = match targets {
        Targets::Device(id) => {
            let d = store.device(id)?;
            if d.lifecycle == Lifecycle::Revoked {
                return Err(OpsError::DeviceRevoked(id.clone()));
            }
            vec![id.clone()]
        }
        Targets::Tag(tag) => active(store.devices(&Selector::Tag(tag.clone()))?),
        Targets::All => active(store.devices(&Selector::All)?),
    };
    if ids.is_empty() {
        return Err(OpsError::NoTargets);
    }
    Ok(ids)
}

fn active(devices: Vec<Device>) -> Vec<DeviceId> {
    devices
        .into_iter()
        .filter(|d| d.lifecycle != Lifecycle::Revoked)
        .map(|d| d.id)
        .collect()
}

/// The action and its arguments checked against what each target reported
/// in its last inventory (the device's own schema, so an image's declared
/// actions are checked as exactly as the built-ins). Arguments typed as text
/// (`count=5` parses as a number) are turned back into strings where the
/// schema wants a string. Refuses the whole send, naming every device that
/// would refuse it; devices without a reported action list are returned,
/// unchecked.
pub fn check_against_inventory(
    store: &dyn Store,
    targets: &[DeviceId],
    action: &Action,
    args: &Map<String, Value>,
) -> Result<(Map<String, Value>, Vec<DeviceId>), OpsError> {
    let mut unchecked = Vec::new();
    let mut refusals = Vec::new();
    let mut args = args.clone();
    let mut coerced = false;
    for id in targets {
        let device = store.device(id)?;
        let inventory = device
            .inventory
            .and_then(|v| serde_json::from_value::<Inventory>(v).ok())
            .filter(|inv| !inv.actions.is_empty());
        let Some(inventory) = inventory else {
            unchecked.push(id.clone());
            continue;
        };
        let Some(spec) = inventory.action(action) else {
            let offered: Vec<&str> = inventory.actions.iter().map(|a| a.name.as_str()).collect();
            refusals.push(format!(
                "{id} does not offer {action} (it offers: {}; `edgebind send {id} inventory` refreshes the list)",
                offered.join(", ")
            ));
            continue;
        };
        if !coerced {
            coerce_text(&spec.args, &mut args);
            coerced = true;
        }
        if let Err(why) = validate_args(&spec.args, &args) {
            refusals.push(format!("{id}: {action}: {why}"));
        }
    }
    if !refusals.is_empty() {
        return Err(OpsError::ActionRefused(refusals.join("; ")));
    }
    Ok((args, unchecked))
}

/// `name=5` typed for a string argument is the string "5".
fn coerce_text(spec: &std::collections::BTreeMap<String, ArgSpec>, args: &mut Map<String, Value>) {
    for (name, value) in args.iter_mut() {
        if let Some(ArgSpec {
            ty: ArgType::String { .. },
            ..
        }) = spec.get(name)
            && !value.is_string()
            && !value.is_object()
            && !value.is_array()
            && !value.is_null()
        {
            *value = Value::String(value.to_string());
        }
    }
}

/// Send `req.action` to its targets (see [`Mode`]).
pub fn send(
    home: &FleetHome,
    store: &mut dyn Store,
    req: &SendRequest,
    mut on_event: impl FnMut(SendEvent<'_>),
) -> Result<Sent, OpsError> {
    let targets = resolve_targets(store, &req.targets)?;
    let (args, unchecked) = check_against_inventory(store, &targets, &req.action, &req.args)?;
    for d in &unchecked {
        on_event(SendEvent::NotChecked(d));
    }
    let req = &SendRequest {
        args,
        ..req.clone()
    };
    if req.mode == Mode::OnConnect {
        let mut rules = Vec::new();
        for d in &targets {
            rules.push(store.add_on_connect(d, req.action.clone(), &req.args)?);
        }
        return Ok(Sent::Rules(rules));
    }
    let queued = matches!(req.mode, Mode::Queue | Mode::QueueAndWait);
    // Queued commands need no connection; still record who asked when the
    // operator identity is at hand.
    let operator = if queued {
        None
    } else {
        let id = operator_identity(home, &req.identity_dir, req.identity_explicit)?;
        if let Some(issued) = &id.issued {
            on_event(SendEvent::IdentityIssued(issued));
        }
        Some(id)
    };
    let requested_by = match &operator {
        Some(o) => Some(o.cn.clone()),
        None => identity_cn(&req.identity_dir),
    };
    // A paced command published last must not expire before it is sent
    // (rounded up to the next second); an unpaced send keeps exactly the
    // expiry asked for (`--expires-in 0` is already expired on arrival).
    let spread = match (queued, req.rate) {
        (false, Some(_)) => operator::pacing_time(targets.len(), req.rate)
            .as_secs()
            .saturating_add(1),
        _ => 0,
    };
    let expires_at = match (req.expires_in, queued) {
        (Some(s), _) => Some(now_unix() + s + spread),
        (None, false) => Some(now_unix() + req.timeout.as_secs() + spread),
        (None, true) => None,
    };
    let new: Vec<NewCommand> = targets
        .iter()
        .map(|d| NewCommand {
            id: new_command_id(if queued { "q" } else { "op" }),
            device: d.clone(),
            action: req.action.clone(),
            args: req.args.clone(),
            delivery: if queued {
                Delivery::Queued
            } else {
                Delivery::Now
            },
            requested_by: requested_by.clone(),
            expires_at,
            rule_id: None,
        })
        .collect();
    store.insert_commands(&new)?;

    match (req.mode, operator) {
        (Mode::QueueAndWait, _) => {
            let outcomes = wait_in_registry(store, &new, req.timeout, &mut on_event)?;
            Ok(Sent::Finished {
                outcomes,
                not_recorded: None,
            })
        }
        (Mode::Queue, _) => Ok(Sent::Queued(
            new.into_iter()
                .map(|c| QueuedCommand {
                    device: c.device,
                    command: c.id,
                    state: "queued",
                })
                .collect(),
        )),
        (_, Some(operator)) => deliver_now(home, store, req, &new, expires_at, operator, on_event),
        (_, None) => unreachable!("an immediate send has an operator identity"),
    }
}

fn deliver_now(
    home: &FleetHome,
    store: &mut dyn Store,
    req: &SendRequest,
    new: &[NewCommand],
    expires_at: Option<u64>,
    operator: super::identity::Identity,
    mut on_event: impl FnMut(SendEvent<'_>),
) -> Result<Sent, OpsError> {
    let endpoint = broker_endpoint(home, req.broker.as_deref())
        .map_err(|e| OpsError::NoBrokerAddress(Box::new(e)))?;
    let opts = crate::mqtt::options(
        &operator.cn,
        &endpoint,
        &operator.files,
        Duration::from_secs(30),
    )?;
    let commands: Vec<(DeviceId, Command)> = new
        .iter()
        .map(|c| {
            (
                c.device.clone(),
                Command {
                    id: c.id.clone(),
                    action: req.action.clone(),
                    args: req.args.clone(),
                    expires_at,
                },
            )
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| OpsError::Runtime(e.to_string()))?;
    let mut failures = 0usize;
    let report = runtime.block_on(operator::send_and_wait(
        opts,
        commands,
        req.timeout,
        req.rate,
        |done, total, o: &DeviceOutcome| {
            if !o.outcome.is_success() {
                failures += 1;
            }
            on_event(SendEvent::Outcome(o));
            on_event(SendEvent::Progress {
                done,
                total,
                failures,
            });
        },
    ))?;
    // Record what we saw, in case the fleet service is not running; applying
    // a result twice is harmless (final states never change).
    let received_at = now_unix();
    let updates: Vec<Update> = report
        .results
        .iter()
        .map(|(device, result)| Update::CommandResult {
            device: device.clone(),
            result: result.clone(),
            received_at,
        })
        .collect();
    let not_recorded = store.apply(&updates).err().map(|e| e.to_string());
    Ok(Sent::Finished {
        outcomes: report.outcomes,
        not_recorded,
    })
}

/// Wait for queued commands to reach a final state in the registry (the
/// fleet service delivers them and records the results).
fn wait_in_registry(
    store: &dyn Store,
    commands: &[NewCommand],
    timeout: Duration,
    on_event: &mut impl FnMut(SendEvent<'_>),
) -> Result<Vec<DeviceOutcome>, OpsError> {
    let started = Instant::now();
    let mut outcomes: Vec<Option<DeviceOutcome>> = vec![None; commands.len()];
    let mut failures = 0usize;
    loop {
        let mut done = 0usize;
        for (slot, c) in outcomes.iter_mut().zip(commands) {
            if slot.is_some() {
                done += 1;
                continue;
            }
            let record = store.command(&c.id)?;
            let outcome = match record.state {
                CommandState::Succeeded => Outcome::Succeeded {
                    output: record.output,
                },
                CommandState::Failed => Outcome::Failed {
                    reason: record.reason,
                    output: record.output,
                },
                CommandState::Rejected => Outcome::Rejected {
                    reason: record.reason,
                },
                _ if started.elapsed() >= timeout => Outcome::TimedOut {
                    accepted: record.state == CommandState::Accepted,
                },
                _ => continue,
            };
            if !outcome.is_success() {
                failures += 1;
            }
            let o = slot.insert(DeviceOutcome {
                device: c.device.clone(),
                command: c.id.clone(),
                outcome,
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
            on_event(SendEvent::Outcome(o));
            done += 1;
        }
        on_event(SendEvent::Progress {
            done,
            total: commands.len(),
            failures,
        });
        if done == commands.len() {
            return Ok(outcomes.into_iter().flatten().collect());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
