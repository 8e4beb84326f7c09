//! `restart-service unit=NAME`: `systemctl restart NAME`, only for the units
//! listed in `actions.allowed_units` (the argument's schema is exactly that
//! list, so the CLI refuses any other unit before sending, and so does the
//! agent). Runs through the same runner as declared actions, with the agent's
//! own rights: the agent must be allowed to restart the unit (root, or a
//! polkit rule for its user).

use std::collections::BTreeMap;
use std::time::Duration;

use edgebind_protocol::actions::{Action, ActionSpec, ArgSpec, ArgType, Origin};
use serde_json::{Map, Value};

use super::{Builtin, Facts, Job, Plan};
use crate::config::ActionsConfig;
use crate::runner::{ProgramSpec, RunAs, Sandbox};

const TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug)]
pub struct RestartService {
    units: Vec<String>,
    systemctl: String,
    sandbox: Sandbox,
}

impl RestartService {
    pub fn new(cfg: &ActionsConfig) -> Self {
        RestartService {
            units: cfg.allowed_units.clone(),
            systemctl: cfg.systemctl.clone(),
            sandbox: Sandbox::resolve(cfg.sandbox),
        }
    }
}

/// The `unit` argument: one of the allowed units.
pub fn unit_arg(units: &[String]) -> ArgSpec {
    ArgSpec {
        ty: ArgType::String {
            allowed: units.to_vec(),
            max_len: 256,
        },
        required: true,
        description: Some("a unit listed in the agent's actions.allowed_units".into()),
    }
}

impl Builtin for RestartService {
    fn spec(&self) -> ActionSpec {
        ActionSpec {
            name: Action::new("restart-service").expect("valid name"),
            origin: Origin::Builtin,
            description: Some("systemctl restart UNIT (allowed units only)".into()),
            args: BTreeMap::from([("unit".to_owned(), unit_arg(&self.units))]),
            idempotent: true,
            timeout_s: TIMEOUT.as_secs(),
            result: Some("{exit_code, stdout, stderr, duration_ms, sandbox}".into()),
        }
    }

    fn plan(&self, _: &Facts, args: &Map<String, Value>) -> Result<Plan, String> {
        let unit = args
            .get("unit")
            .and_then(Value::as_str)
            .filter(|u| self.units.iter().any(|a| a == u))
            .ok_or("unit is not in actions.allowed_units")?;
        Ok(Plan::Run(Job::Program(ProgramSpec {
            action: "restart-service".into(),
            argv: vec![
                self.systemctl.clone(),
                "restart".into(),
                "--no-ask-password".into(),
                "--".into(),
                unit.to_owned(),
            ],
            run_as: RunAs::Agent,
            timeout: TIMEOUT,
            output_limit: 4096,
            writable: vec![],
            sandbox: self.sandbox,
            require_landlock: false,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgebind_protocol::actions::validate_args;
    use serde_json::json;

    fn action() -> RestartService {
        RestartService::new(&ActionsConfig {
            allowed_units: vec!["app.service".into()],
            ..ActionsConfig::default()
        })
    }

    #[test]
    fn only_allowed_units_are_restarted_without_a_shell() {
        let a = action();
        let spec = a.spec();
        let args = |u: &str| json!({ "unit": u }).as_object().unwrap().clone();
        assert!(validate_args(&spec.args, &args("sshd.service")).is_err());
        validate_args(&spec.args, &args("app.service")).unwrap();
        let Plan::Run(Job::Program(p)) = a
            .plan(&super::super::tests::facts(), &args("app.service"))
            .unwrap()
        else {
            panic!("runs a program");
        };
        assert_eq!(
            p.argv,
            [
                "systemctl",
                "restart",
                "--no-ask-password",
                "--",
                "app.service"
            ]
        );
        assert!(
            a.plan(&super::super::tests::facts(), &args("sshd.service"))
                .is_err()
        );
    }
}
