//! `inventory`: the device's facts (OS, kernel, board, serial, boot id) and
//! every action it offers with its argument schema. The result is marked as
//! facts, so the registry keeps it as the device's inventory.

use edgebind_protocol::actions::{ActionSpec, INVENTORY, Origin};
use serde_json::{Map, Value};

use super::{Builtin, Facts, Plan};

#[derive(Debug)]
pub struct InventoryAction;

impl Builtin for InventoryAction {
    fn spec(&self) -> ActionSpec {
        ActionSpec {
            name: INVENTORY,
            origin: Origin::Builtin,
            description: Some("device facts and the actions it offers".into()),
            args: Default::default(),
            idempotent: true,
            timeout_s: 1,
            result: Some(
                "{agent_version, os_release, kernel, board_model, serial, boot_id, actions}".into(),
            ),
        }
    }

    fn plan(&self, facts: &Facts, _: &Map<String, Value>) -> Result<Plan, String> {
        Ok(Plan::Answer {
            output: serde_json::to_value(&facts.inventory).map_err(|e| e.to_string())?,
            facts: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgebind_protocol::messages::Inventory;

    #[test]
    fn inventory_is_the_facts_with_the_action_list() {
        let mut f = super::super::tests::facts();
        f.inventory.actions.push(InventoryAction.spec());
        let Plan::Answer { output, facts } = InventoryAction.plan(&f, &Map::new()).unwrap() else {
            panic!("inventory answers");
        };
        assert!(facts);
        let inv: Inventory = serde_json::from_value(output).unwrap();
        assert_eq!(inv.actions[0].name, INVENTORY);
    }
}
