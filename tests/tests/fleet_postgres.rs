//! The fleet service and the CLI with the registry on a real PostgreSQL
//! (`EDGEBIND_REGISTRY=postgres://…`): registration, presence, telemetry,
//! a command round trip, listing, and an orderly stop.

mod fleet_support;

use edgebind_fleet::registry::{CommandState, Lifecycle, Selector, Store};
use edgebind_protocol::DeviceId;
use fleet_support::{AgentTweaks, Fleet, LONG};

#[test]
fn fleet_serve_and_the_cli_keep_the_registry_on_postgres() {
    let mut fleet = Fleet::start_on_postgres();
    fleet.start_service();
    let bundle = fleet.add_device("dev-pg", &["lab"]);
    fleet.add_device("dev-idle", &[]);
    assert!(
        fleet.registry().devices(&Selector::All).unwrap().is_empty(),
        "nothing went to the default SQLite file"
    );

    let config = fleet.agent_config(&bundle, &AgentTweaks::default());
    let _agent = fleet.spawn_agent(&config);
    let d = fleet.wait_device("dev-pg", LONG, "online with telemetry", |d| {
        d.online && d.telemetry_count >= 2
    });
    assert_eq!(d.lifecycle, Lifecycle::Provisioned);

    let out = fleet.cli_ok(&["send", "dev-pg", "ping"]);
    assert!(out.contains("succeeded"), "{out}");
    let store = fleet.store();
    let id = DeviceId::new("dev-pg").unwrap();
    let ping = store
        .commands_for(&id, 10)
        .unwrap()
        .into_iter()
        .find(|c| c.action.as_deref() == Some("ping"))
        .expect("the ping is in the log");
    assert_eq!(ping.state, CommandState::Succeeded);

    let online = fleet.cli_ok(&["devices", "--state", "online"]);
    assert!(online.lines().any(|l| l.starts_with("dev-pg")), "{online}");
    assert!(!online.contains("dev-idle"), "{online}");
    let never = fleet.cli_ok(&["devices", "--state", "never-seen", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&never).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["id"], "dev-idle");

    // SIGTERM: the service commits what it holds and exits cleanly.
    fleet.stop_service();
    assert_eq!(store.devices(&Selector::All).unwrap().len(), 2);
    let stats = fleet.cli_ok(&["fleet", "stats"]);
    assert!(stats.contains("postgres://edgebind@127.0.0.1"), "{stats}");
}
