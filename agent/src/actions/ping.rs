//! `ping`: answer at once with the boot id and agent version (liveness).

use edgebind_protocol::actions::{ActionSpec, Origin, PING};
use serde_json::{Map, Value, json};

use super::{Builtin, Facts, Plan};

#[derive(Debug)]
pub struct Ping;

impl Builtin for Ping {
    fn spec(&self) -> ActionSpec {
        ActionSpec {
            name: PING,
            origin: Origin::Builtin,
            description: Some("answer at once (liveness)".into()),
            args: Default::default(),
            idempotent: true,
            timeout_s: 1,
            result: Some("{pong, boot_id, agent_version}".into()),
        }
    }

    fn plan(&self, facts: &Facts, _: &Map<String, Value>) -> Result<Plan, String> {
        Ok(Plan::Answer {
            output: json!({
                "pong": true,
                "boot_id": facts.boot_id,
                "agent_version": facts.agent_version,
            }),
            facts: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_answers_with_the_boot_id() {
        let Plan::Answer { output, facts } = Ping
            .plan(&super::super::tests::facts(), &Map::new())
            .unwrap()
        else {
            panic!("ping answers");
        };
        assert_eq!(output["boot_id"], "boot-1");
        assert!(!facts);
    }
}
