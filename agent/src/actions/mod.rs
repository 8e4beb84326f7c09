//! Remote actions: one module per action behind one interface, [`Builtin`].
//!
//! An action says what it is ([`ActionSpec`]: name, argument schema,
//! idempotent or not, time limit, what its result holds) and decides, without
//! I/O, what a command asking for it does ([`Builtin::plan`] → [`Plan`]). The
//! core checks the arguments against the spec (the same check the CLI runs
//! against the device's reported schema), records the command in the journal
//! as the plan requires, and hands any [`Job`] to the runtime, which runs it
//! ([`Job::run`]) and reports a [`JobOutcome`] back.
//!
//! Adding a built-in: one file here implementing [`Builtin`] (with its
//! test) and one line in [`ActionSet::from_config`]. Actions declared by the
//! image (`actions.d/NAME.toml`, see [`declared`]) are the same interface.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use edgebind_protocol::CommandId;
use edgebind_protocol::actions::{Action, ActionSpec, validate_args};
use edgebind_protocol::messages::{CommandStatus, Inventory};
use serde_json::{Map, Value};

use crate::config::{AgentConfig, RebootConfig};
use crate::runner::{self, ProgramSpec};

pub mod collect_logs;
pub mod declared;
pub mod inventory;
pub mod ping;
pub mod reboot;
pub mod renew;
pub mod restart_agent;
pub mod restart_service;

/// What the agent knows about itself when planning.
#[derive(Debug, Clone)]
pub struct Facts {
    pub agent_version: String,
    pub boot_id: String,
    /// Collected at start, with the action list filled in.
    pub inventory: Inventory,
}

/// What a command for an action does.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// No side effect: answer now (accepted, then succeeded with `output`).
    /// `facts`: the output is the device's facts (the registry keeps it).
    Answer { output: Value, facts: bool },
    /// Record success durably, then leave the process so systemd starts the
    /// agent again.
    Restart,
    /// Record `accepted` durably, then run the job; its outcome is the final
    /// result.
    Run(Job),
    /// Record `accepted` with the boot id durably, then run the job; success
    /// is reported once the device is back with another boot id.
    RunUntilReboot(Job),
}

/// A side effect the runtime carries out.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Reboot(RebootConfig),
    Program(ProgramSpec),
    /// Renew the certificate now: the runtime starts the renewal
    /// ([`crate::renewal`]) when it hands this job out.
    Renew,
}

/// How a job ended: a final status (succeeded, failed, timed_out), why, and
/// what it printed.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub status: CommandStatus,
    pub reason: Option<String>,
    pub output: Option<Value>,
}

impl JobOutcome {
    pub fn succeeded(output: Option<Value>) -> Self {
        JobOutcome {
            status: CommandStatus::Succeeded,
            reason: None,
            output,
        }
    }

    pub fn failed(reason: impl Into<String>) -> Self {
        JobOutcome {
            status: CommandStatus::Failed,
            reason: Some(reason.into()),
            output: None,
        }
    }
}

impl Job {
    /// Carry the job out (the runtime calls this on a task of its own).
    pub async fn run(self, id: &CommandId) -> JobOutcome {
        match self {
            Job::Reboot(cfg) => match reboot::request(&cfg, id).await {
                Ok(()) => JobOutcome::succeeded(None),
                Err(why) => JobOutcome::failed(why),
            },
            Job::Program(p) => runner::run(&p, id).await,
            Job::Renew => JobOutcome::succeeded(Some(Value::String("renewal started".into()))),
        }
    }
}

/// One action: built into the agent or declared by the image.
pub trait Builtin: fmt::Debug + Send + Sync {
    /// Name, argument schema, idempotence, time limit, result shape.
    fn spec(&self) -> ActionSpec;
    /// What a command with these arguments (already checked against the
    /// spec) does. `Err` rejects the command with that reason.
    fn plan(&self, facts: &Facts, args: &Map<String, Value>) -> Result<Plan, String>;
}

/// Every action this agent offers, by name.
#[derive(Debug, Clone, Default)]
pub struct ActionSet {
    actions: BTreeMap<Action, (ActionSpec, Arc<dyn Builtin>)>,
}

/// Why a command is refused before anything runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl ActionSet {
    /// The built-ins, plus the actions declared in `actions.dir` (bad
    /// definition files are logged and skipped; a declared action never
    /// replaces a built-in).
    pub fn from_config(config: &AgentConfig) -> ActionSet {
        let a = &config.actions;
        let mut set = ActionSet::default();
        set.add(Arc::new(reboot::Reboot(a.reboot.clone())));
        set.add(Arc::new(ping::Ping));
        set.add(Arc::new(inventory::InventoryAction));
        set.add(Arc::new(restart_agent::RestartAgent));
        if config.renewal.enabled {
            set.add(Arc::new(renew::Renew));
        }
        if !a.allowed_units.is_empty() {
            set.add(Arc::new(restart_service::RestartService::new(a)));
            set.add(Arc::new(collect_logs::CollectLogs::new(a)));
        }
        for d in declared::load_dir(&a.dir, a) {
            let name = d.spec().name;
            if set.get(&name).is_some() {
                tracing::warn!(action = %name, dir = %a.dir.display(), "declared action has the name of a built-in; skipped");
                continue;
            }
            set.add(Arc::new(d));
        }
        set
    }

    pub fn add(&mut self, action: Arc<dyn Builtin>) {
        let spec = action.spec();
        self.actions.insert(spec.name.clone(), (spec, action));
    }

    pub fn get(&self, name: &Action) -> Option<&ActionSpec> {
        self.actions.get(name).map(|(s, _)| s)
    }

    /// Every spec, by name (what the inventory lists).
    pub fn specs(&self) -> Vec<ActionSpec> {
        self.actions.values().map(|(s, _)| s.clone()).collect()
    }

    /// Look the action up, check the arguments against its schema, plan.
    pub fn plan(
        &self,
        name: &Action,
        args: &Map<String, Value>,
        facts: &Facts,
    ) -> Result<(&ActionSpec, Plan), Refusal> {
        let Some((spec, action)) = self.actions.get(name) else {
            let known: Vec<&str> = self.actions.keys().map(Action::as_str).collect();
            return Err(Refusal(format!(
                "unknown action {:?} (this device offers: {})",
                name.as_str(),
                known.join(", ")
            )));
        };
        validate_args(&spec.args, args).map_err(|e| Refusal(format!("{name}: {e}")))?;
        let plan = action
            .plan(facts, args)
            .map_err(|e| Refusal(format!("{name}: {e}")))?;
        Ok((spec, plan))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn facts() -> Facts {
        Facts {
            agent_version: "0.1.0".into(),
            boot_id: "boot-1".into(),
            inventory: Inventory {
                agent_version: "0.1.0".into(),
                os_release: None,
                kernel: None,
                board_model: None,
                serial: None,
                boot_id: Some("boot-1".into()),
                actions: vec![],
            },
        }
    }

    #[test]
    fn unknown_actions_and_arguments_outside_the_schema_are_refused_with_reasons() {
        let cfg = AgentConfig::new(crate::config::BrokerConfig::new("h", 1));
        let set = ActionSet::from_config(&cfg);
        let none = Map::new();
        let err = set
            .plan(&Action::new("format-disk").unwrap(), &none, &facts())
            .unwrap_err();
        assert!(
            err.0.contains("unknown action \"format-disk\""),
            "{}",
            err.0
        );
        assert!(err.0.contains("ping"), "{}", err.0);
        let mut args = Map::new();
        args.insert("x".into(), 1.into());
        let err = set
            .plan(&edgebind_protocol::actions::PING, &args, &facts())
            .unwrap_err();
        assert!(err.0.contains("\"x\" is not declared"), "{}", err.0);
        // Without allowed units the unit actions are not offered at all.
        assert!(set.get(&Action::new("restart-service").unwrap()).is_none());
        let names: Vec<String> = set.specs().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(
            names,
            ["inventory", "ping", "reboot", "renew", "restart-agent"]
        );
    }
}
