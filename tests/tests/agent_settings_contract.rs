//! `edgebind set` refuses a desired value the agent would refuse, with the
//! agent's own rule (`edgebind_protocol::settings`), and changes nothing.

mod fleet_support;

use edgebind_fleet::registry::Store;
use edgebind_protocol::DeviceId;
use edgebind_protocol::settings::validate;
use fleet_support::Fleet;
use serde_json::Value;

#[test]
fn each_invalid_set_value_is_refused_by_the_cli_with_the_agents_rule() {
    let fleet = Fleet::start();
    fleet.add_device("dev-set", &[]);
    let id = DeviceId::new("dev-set").unwrap();

    for arg in [
        "telemetry_interval_s=-5",
        "telemetry_interval_s=abc",
        "telemetry_interval_s=0",
        "telemetry_interval_s=1.5",
        "telemetry_interval_s=86401",
        "log_level=verbose",
        "log_level=3",
    ] {
        let out = fleet.cli(&["set", "dev-set", arg]);
        assert!(!out.status.success(), "{arg} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (key, raw) = arg.split_once('=').unwrap();
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into()));
        let rule = validate(key, &value).unwrap_err().to_string();
        assert!(
            stderr.contains(&rule),
            "{arg}: stderr lacks the agent's message {rule:?}:\n{stderr}"
        );
    }
    let d = fleet.registry().device(&id).unwrap();
    assert_eq!(d.desired_revision, 0, "nothing was published");

    // Valid values, a removal and a key a newer agent may know still pass.
    fleet.cli_ok(&[
        "set",
        "dev-set",
        "telemetry_interval_s=30",
        "log_level=warn",
    ]);
    fleet.cli_ok(&["set", "dev-set", "log_level=null"]);
    fleet.cli_ok(&["set", "dev-set", "frobnicate=1"]);
    assert_eq!(fleet.registry().device(&id).unwrap().desired_revision, 3);
}
