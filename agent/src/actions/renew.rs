//! `renew`: renew the device certificate now instead of at its usual point
//! of the certificate's life (`edgebind device renew`). Succeeds once the
//! renewal has been started; its progress is in the agent's log and in the
//! fleet's certificate history.

use edgebind_protocol::actions::{ActionSpec, Origin, RENEW};
use serde_json::{Map, Value};

use super::{Builtin, Facts, Job, Plan};

#[derive(Debug)]
pub struct Renew;

impl Builtin for Renew {
    fn spec(&self) -> ActionSpec {
        ActionSpec {
            name: RENEW,
            origin: Origin::Builtin,
            description: Some("renew the device certificate now".into()),
            args: Default::default(),
            idempotent: true,
            timeout_s: 5,
            result: None,
        }
    }

    fn plan(&self, _: &Facts, _: &Map<String, Value>) -> Result<Plan, String> {
        Ok(Plan::Run(Job::Renew))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_plans_the_renew_job() {
        let plan = Renew
            .plan(&super::super::tests::facts(), &Map::new())
            .unwrap();
        assert_eq!(plan, Plan::Run(Job::Renew));
    }
}
