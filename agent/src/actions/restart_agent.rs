//! `restart-agent`: report success, then leave with exit status 75 so that
//! systemd starts the agent again.

use edgebind_protocol::actions::{ActionSpec, Origin, RESTART_AGENT};
use serde_json::{Map, Value};

use super::{Builtin, Facts, Plan};

#[derive(Debug)]
pub struct RestartAgent;

impl Builtin for RestartAgent {
    fn spec(&self) -> ActionSpec {
        ActionSpec {
            name: RESTART_AGENT,
            origin: Origin::Builtin,
            description: Some("restart the agent (systemd starts it again)".into()),
            args: Default::default(),
            idempotent: false,
            timeout_s: 5,
            result: None,
        }
    }

    fn plan(&self, _: &Facts, _: &Map<String, Value>) -> Result<Plan, String> {
        Ok(Plan::Restart)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_agent_plans_a_restart() {
        let plan = RestartAgent
            .plan(&super::super::tests::facts(), &Map::new())
            .unwrap();
        assert_eq!(plan, Plan::Restart);
    }
}
