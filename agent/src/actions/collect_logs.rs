//! `collect-logs unit=NAME [since=…] [until=…] [lines=N]`: a bounded
//! excerpt of the journal of an allowed unit (`journalctl -u NAME --since …
//! --until … -o short-iso -n N --no-pager`), through the same runner, the
//! output capped at [`OUTPUT_LIMIT`] bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use edgebind_protocol::actions::{Action, ActionSpec, ArgSpec, ArgType, Origin};
use serde_json::{Map, Value};

use super::restart_service::unit_arg;
use super::{Builtin, Facts, Job, Plan};
use crate::config::ActionsConfig;
use crate::runner::{ProgramSpec, RunAs, Sandbox};

/// Bytes of the excerpt kept (the result travels in one MQTT message and is
/// journaled).
pub const OUTPUT_LIMIT: usize = 32 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_LINES: i64 = 2000;

#[derive(Debug)]
pub struct CollectLogs {
    units: Vec<String>,
    journalctl: String,
    sandbox: Sandbox,
}

impl CollectLogs {
    pub fn new(cfg: &ActionsConfig) -> Self {
        CollectLogs {
            units: cfg.allowed_units.clone(),
            journalctl: cfg.journalctl.clone(),
            sandbox: Sandbox::resolve(cfg.sandbox),
        }
    }
}

fn time_arg(what: &str) -> ArgSpec {
    ArgSpec {
        ty: ArgType::String {
            allowed: vec![],
            max_len: 40,
        },
        required: false,
        description: Some(format!(
            "{what} (journalctl time: \"2025-01-31 12:00\", \"-1h\", \"today\")"
        )),
    }
}

impl Builtin for CollectLogs {
    fn spec(&self) -> ActionSpec {
        ActionSpec {
            name: Action::new("collect-logs").expect("valid name"),
            origin: Origin::Builtin,
            description: Some("journal excerpt of an allowed unit".into()),
            args: BTreeMap::from([
                ("unit".to_owned(), unit_arg(&self.units)),
                ("since".to_owned(), time_arg("start")),
                ("until".to_owned(), time_arg("end")),
                (
                    "lines".to_owned(),
                    ArgSpec {
                        ty: ArgType::Integer {
                            min: 1,
                            max: MAX_LINES,
                        },
                        required: false,
                        description: Some("newest lines at most (default 200)".into()),
                    },
                ),
            ]),
            idempotent: true,
            timeout_s: TIMEOUT.as_secs(),
            result: Some(format!(
                "{{stdout: the excerpt (at most {OUTPUT_LIMIT} bytes), stdout_truncated, exit_code}}"
            )),
        }
    }

    fn plan(&self, _: &Facts, args: &Map<String, Value>) -> Result<Plan, String> {
        let unit = args
            .get("unit")
            .and_then(Value::as_str)
            .filter(|u| self.units.iter().any(|a| a == u))
            .ok_or("unit is not in actions.allowed_units")?;
        let mut argv = vec![
            self.journalctl.clone(),
            format!("--unit={unit}"),
            "--output=short-iso".into(),
            "--no-pager".into(),
            "--quiet".into(),
            format!(
                "--lines={}",
                args.get("lines").and_then(Value::as_i64).unwrap_or(200)
            ),
        ];
        for key in ["since", "until"] {
            if let Some(t) = args.get(key).and_then(Value::as_str) {
                // One argv word: a value cannot become another option.
                argv.push(format!("--{key}={t}"));
            }
        }
        Ok(Plan::Run(Job::Program(ProgramSpec {
            action: "collect-logs".into(),
            argv,
            run_as: RunAs::Agent,
            timeout: TIMEOUT,
            output_limit: OUTPUT_LIMIT,
            writable: vec![],
            sandbox: self.sandbox,
            require_landlock: false,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_excerpt_is_bounded_and_limited_to_allowed_units() {
        let a = CollectLogs::new(&ActionsConfig {
            allowed_units: vec!["app.service".into()],
            ..ActionsConfig::default()
        });
        let args = json!({"unit": "app.service", "since": "-1h --output=json", "lines": 5});
        let Plan::Run(Job::Program(p)) = a
            .plan(&super::super::tests::facts(), args.as_object().unwrap())
            .unwrap()
        else {
            panic!("runs a program");
        };
        assert_eq!(p.output_limit, OUTPUT_LIMIT);
        assert!(p.argv.contains(&"--unit=app.service".to_owned()));
        assert!(p.argv.contains(&"--lines=5".to_owned()));
        assert!(
            p.argv.contains(&"--since=-1h --output=json".to_owned()),
            "one word"
        );
        let other = json!({"unit": "sshd.service"});
        assert!(
            a.plan(&super::super::tests::facts(), other.as_object().unwrap())
                .is_err()
        );
    }
}
