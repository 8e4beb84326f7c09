//! Commands through the CLI: round trip with exit codes, queued delivery,
//! on-connect rules, and the command log in the registry.

mod fleet_support;

use edgebind_fleet::registry::{CommandState, Delivery, Store};
use edgebind_protocol::DeviceId;
use fleet_support::{AgentTweaks, Fleet, LONG, stderr, stdout};
use serde_json::Value;

fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

#[test]
fn send_waits_for_the_result_and_the_exit_code_says_how_it_ended() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let bundle = fleet.add_device("dev-a", &[]);
    fleet.add_device("dev-off", &[]); // registered, never started
    // `reboot` runs a command that fails: the agent reports `failed`.
    let tweaks = AgentTweaks {
        reboot_command: vec!["/bin/false".into()],
        ..AgentTweaks::default()
    };
    let _agent = fleet.spawn_agent(&fleet.agent_config(&bundle, &tweaks));
    fleet.wait_device("dev-a", LONG, "online", |d| d.online);

    // Success: exit 0, the output is shown.
    let out = fleet.cli(&["send", "dev-a", "ping", "--timeout", "20"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("succeeded"), "{}", stdout(&out));
    assert!(stdout(&out).contains("pong"), "{}", stdout(&out));

    // --json for scripts.
    let out = fleet.cli(&["send", "dev-a", "inventory", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["device"], "dev-a");
    assert_eq!(v[0]["outcome"], "succeeded");
    assert!(v[0]["output"]["agent_version"].is_string(), "{v}");

    // Failure: exit 1.
    let out = fleet.cli(&["send", "dev-a", "reboot", "--timeout", "20"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("failed"), "{}", stdout(&out));

    // Rejection (the command has already expired when it arrives): exit 1.
    let out = fleet.cli(&["send", "dev-a", "ping", "--expires-in", "0", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["outcome"], "rejected", "{v}");
    assert!(
        v[0]["reason"].as_str().unwrap_or("").contains("expired"),
        "{v}"
    );

    // Nobody answers: timed out, exit 1.
    let out = fleet.cli(&["send", "dev-off", "ping", "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("timed out"), "{}", stdout(&out));

    // Queued through the fleet service, waiting for the recorded result.
    let out = fleet.cli(&[
        "send",
        "dev-a",
        "ping",
        "--queue",
        "--wait",
        "--timeout",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("succeeded"), "{}", stdout(&out));
    let out = fleet.cli(&[
        "send",
        "dev-off",
        "ping",
        "--queue",
        "--wait",
        "--timeout",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("timed out"), "{}", stdout(&out));

    // Every command and its final state is in the registry's command log.
    let store = fleet.registry();
    let log = store.commands_for(&dev("dev-a"), 50).unwrap();
    let state_of = |action: &str| -> Vec<CommandState> {
        log.iter()
            .filter(|c| c.action.as_deref() == Some(action) && c.delivery == Delivery::Now)
            .map(|c| c.state)
            .collect()
    };
    assert!(
        state_of("ping").contains(&CommandState::Succeeded),
        "{log:#?}"
    );
    assert!(
        state_of("ping").contains(&CommandState::Rejected),
        "{log:#?}"
    );
    assert_eq!(state_of("reboot"), vec![CommandState::Failed], "{log:#?}");
    // Who asked is recorded: the operator's CN, or the service for its own.
    for c in &log {
        let by = c.requested_by.as_deref().unwrap_or("");
        match c.delivery {
            Delivery::Now | Delivery::Queued => assert_eq!(by, "operator:tester", "{c:?}"),
            Delivery::Auto | Delivery::OnConnect => assert_eq!(by, "service:fleet", "{c:?}"),
        }
    }

    // An action the device does not offer (by its reported list) never
    // leaves the CLI.
    let out = fleet.cli(&["send", "dev-a", "format-disk"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("does not offer format-disk"),
        "{}",
        stderr(&out)
    );
    fleet.stop_service();
}

#[test]
fn an_action_queued_while_offline_runs_once_when_the_device_connects() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let bundle = fleet.add_device("dev-q", &[]);
    let marker = fleet.home().join("reboot-ran");
    let tweaks = AgentTweaks {
        reboot_command: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("echo ran >> {}", marker.display()),
        ],
        ..AgentTweaks::default()
    };
    let config = fleet.agent_config(&bundle, &tweaks);

    // Offline: queue a reboot and a ping, and ask for inventory on every connect.
    let out = fleet.cli_ok(&["send", "dev-q", "reboot", "--queue", "--json"]);
    let queued: Value = serde_json::from_str(&out).unwrap();
    let reboot_id = queued[0]["command"].as_str().unwrap().to_owned();
    let out = fleet.cli_ok(&["send", "dev-q", "ping", "--queue", "--json"]);
    let ping_id = serde_json::from_str::<Value>(&out).unwrap()[0]["command"]
        .as_str()
        .unwrap()
        .to_owned();
    fleet.cli_ok(&["send", "dev-q", "inventory", "--on-connect"]);
    let store = fleet.registry();
    let cid = |s: &str| edgebind_protocol::CommandId::new(s).unwrap();
    assert_eq!(
        store.command(&cid(&reboot_id)).unwrap().state,
        CommandState::Queued
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(!marker.exists(), "nothing runs while the device is offline");

    let mut agent = fleet.spawn_agent(&config);
    fleet.wait_device("dev-q", LONG, "online", |d| d.online);
    let ping = edgebind_tests::wait_for(LONG, || {
        let c = store.command(&cid(&ping_id)).ok()?;
        (c.state == CommandState::Succeeded).then_some(c)
    })
    .unwrap_or_else(|| panic!("queued ping not run; log:\n{}", fleet.service_log()));
    assert!(ping.sent_at.is_some());
    assert!(
        edgebind_tests::wait_until(LONG, || marker.exists()),
        "queued reboot not run"
    );
    let on_connect_runs = |store: &edgebind_fleet::registry::SqliteStore| {
        store
            .commands_for(&dev("dev-q"), 100)
            .unwrap()
            .into_iter()
            .filter(|c| c.delivery == Delivery::OnConnect && c.state == CommandState::Succeeded)
            .count()
    };
    assert!(edgebind_tests::wait_until(LONG, || on_connect_runs(&store) == 1));
    let d = fleet.wait_device("dev-q", LONG, "inventory", |d| d.inventory.is_some());
    assert!(d.inventory.unwrap()["agent_version"].is_string());

    // Reconnecting (agent restart) runs the on-connect rule again but never
    // the queued commands.
    agent.terminate();
    fleet.wait_device("dev-q", LONG, "offline", |d| !d.online);
    let _agent = fleet.spawn_agent(&config);
    fleet.wait_device("dev-q", LONG, "online again", |d| d.online);
    assert!(
        edgebind_tests::wait_until(LONG, || on_connect_runs(&store) == 2),
        "on-connect rule must run on the second connect too"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    let runs = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(
        runs.lines().count(),
        1,
        "the queued reboot ran once: {runs:?}"
    );
    let queued_ping_runs = store
        .commands_for(&dev("dev-q"), 100)
        .unwrap()
        .into_iter()
        .filter(|c| c.id.as_str() == ping_id)
        .count();
    assert_eq!(queued_ping_runs, 1);

    // `device show` tells the story.
    let show = fleet.cli_ok(&["device", "show", "dev-q"]);
    assert!(show.contains("on connect:"), "{show}");
    assert!(show.contains(&ping_id), "{show}");
    fleet.stop_service();
}
