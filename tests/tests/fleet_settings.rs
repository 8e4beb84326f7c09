//! Desired settings: set through the CLI, published by the fleet service,
//! applied and reported by a real agent, surviving an agent restart.

mod fleet_support;

use std::time::Duration;

use fleet_support::{AgentTweaks, Fleet, LONG, stdout};
use serde_json::{Value, json};

#[test]
fn desired_settings_are_applied_reported_and_survive_an_agent_restart() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let bundle = fleet.add_device("dev-s", &[]);
    let config = fleet.agent_config(&bundle, &AgentTweaks::default());
    let mut agent = fleet.spawn_agent(&config);
    fleet.wait_device("dev-s", LONG, "online", |d| d.online);

    let out = fleet.cli_ok(&[
        "set",
        "dev-s",
        "telemetry_interval_s=2",
        "log_level=warn",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["desired"]["revision"], 1);

    let d = fleet.wait_device("dev-s", LONG, "reported revision 1", |d| {
        d.reported.as_ref().is_some_and(|r| r.revision >= 1)
    });
    let reported = d.reported.clone().unwrap();
    assert_eq!(
        reported.applied["telemetry_interval_s"],
        json!(2),
        "{reported:?}"
    );
    assert_eq!(reported.applied["log_level"], json!("warn"), "{reported:?}");
    assert!(d.converged(), "{d:#?}");
    assert_eq!(d.desired_published_revision, 1);

    // The agent really uses the new interval: samples now come ~2 s apart.
    let store = fleet.registry();
    let id = edgebind_protocol::DeviceId::new("dev-s").unwrap();
    let count_at = |store: &edgebind_fleet::registry::SqliteStore| {
        use edgebind_fleet::registry::Store;
        store.device(&id).unwrap().telemetry_count
    };
    let start = count_at(&store);
    std::thread::sleep(Duration::from_secs(8));
    let per_8s = count_at(&store) - start;
    assert!(
        (2..=6).contains(&per_8s),
        "{per_8s} samples in 8 s at interval 2 s"
    );

    // A key agents do not know is reported as ignored: not converged.
    fleet.cli_ok(&["set", "dev-s", "frobnicate=1"]);
    let d = fleet.wait_device("dev-s", LONG, "reported revision 2", |d| {
        d.reported.as_ref().is_some_and(|r| r.revision >= 2)
    });
    assert!(
        d.reported
            .as_ref()
            .unwrap()
            .ignored
            .contains_key("frobnicate")
    );
    assert!(!d.converged());
    let show = fleet.cli_ok(&["device", "show", "dev-s"]);
    assert!(show.contains("converged     no"), "{show}");
    fleet.cli_ok(&["set", "dev-s", "frobnicate=null"]);
    let d = fleet.wait_device("dev-s", LONG, "reported revision 3", |d| {
        d.reported.as_ref().is_some_and(|r| r.revision >= 3)
    });
    assert!(d.converged(), "{d:#?}");

    // Restart the agent: it comes back with the same settings in force.
    agent.terminate();
    fleet.wait_device("dev-s", LONG, "offline", |d| !d.online);
    let _agent = fleet.spawn_agent(&config);
    let d = fleet.wait_device("dev-s", LONG, "online after restart", |d| d.online);
    let r = d.reported.clone().unwrap();
    assert_eq!(r.revision, 3);
    assert_eq!(r.applied["telemetry_interval_s"], json!(2));
    assert_eq!(r.applied["log_level"], json!("warn"));
    assert!(d.converged());
    // ...and really in force: still ~one sample per 2 s.
    std::thread::sleep(Duration::from_secs(2));
    let start = count_at(&store);
    std::thread::sleep(Duration::from_secs(8));
    let per_8s = count_at(&store) - start;
    assert!(
        (2..=6).contains(&per_8s),
        "{per_8s} samples in 8 s after restart"
    );
    let list: Value = serde_json::from_str(&fleet.cli_ok(&["devices", "--json"])).unwrap();
    assert_eq!(list[0]["converged"], true, "{list}");
    let human = fleet.cli(&["device", "show", "dev-s"]);
    assert!(stdout(&human).contains("converged     yes"));
    fleet.stop_service();
}
