//! Fan-out: one `edgebind send --tag` to 200 real agents (run in-process,
//! each with its own identity, MQTT connection and state directory).

mod fleet_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use edgebind_agent::{Agent, AgentConfig, RunOptions, shutdown_channel};
use edgebind_certs::bundle::BundleForm;
use edgebind_fleet::ops::{BatchRegistration, FleetHome, register_devices};
use edgebind_fleet::registry::{CommandState, Delivery, Selector, Store, Tag};
use edgebind_protocol::DeviceId;
use edgebind_tests::wait_until;
use fleet_support::{AgentTweaks, Fleet, stdout};
use serde_json::Value;

const DEVICES: usize = 200;

#[test]
fn fan_out_to_200_agents_completes_with_every_result_recorded() {
    let mut fleet = Fleet::start();
    fleet.start_service();

    // Register 200 devices with the library call `pki issue device --batch`
    // makes (issue + bundle + broker policy + registry), to keep the test quick.
    let ids: Vec<DeviceId> = (0..DEVICES)
        .map(|i| DeviceId::new(format!("fan-{i:03}")).unwrap())
        .collect();
    let home = FleetHome::new(fleet.home());
    let bundles = home.bundles_dir();
    let mut store = fleet.registry();
    let tag: Tag = "fanout".parse().unwrap();
    let batch = BatchRegistration {
        ids: ids.clone(),
        board: "raspberrypi4-64".parse().unwrap(),
        tags: BTreeSet::from([tag.clone()]),
        validity_days: 30,
        broker: None,
        out: bundles.clone(),
        form: BundleForm::DirectoryAndTar,
        threads: 2,
    };
    let done = register_devices(&home, &mut store, &batch, |_| {}).unwrap();
    assert_eq!(done.registered.len(), DEVICES, "{:?}", done.failed);

    // 200 agents in this process.
    let tweaks = AgentTweaks {
        keep_alive_s: 30,
        telemetry_interval_s: 60,
        ..AgentTweaks::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for id in &ids {
        let config = fleet.agent_config(&bundles.join(id.as_str()), &tweaks);
        let config = AgentConfig::load(&config).unwrap();
        let agent = Agent::prepare(config, RunOptions::default()).unwrap();
        let (handle, signal) = shutdown_channel();
        handles.push(handle);
        tasks.push(runtime.spawn(agent.run(signal)));
    }
    let online = || {
        store
            .devices(&Selector::Tag(tag.clone()))
            .unwrap()
            .iter()
            .filter(|d| d.online)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(120), || online() == DEVICES),
        "{} of {DEVICES} online after {:?}",
        online(),
        started.elapsed()
    );
    eprintln!(
        "{DEVICES} agents started and online in {:?}",
        started.elapsed()
    );

    // One command to all of them, machine-readable.
    let sent = Instant::now();
    let out = fleet.cli(&[
        "send",
        "--tag",
        "fanout",
        "ping",
        "--timeout",
        "120",
        "--json",
    ]);
    eprintln!("fan-out of {DEVICES} pings took {:?}", sent.elapsed());
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let outcomes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let outcomes = outcomes.as_array().unwrap();
    assert_eq!(outcomes.len(), DEVICES);
    let answered: BTreeSet<&str> = outcomes
        .iter()
        .filter(|o| o["outcome"] == "succeeded")
        .map(|o| o["device"].as_str().unwrap())
        .collect();
    assert_eq!(answered.len(), DEVICES, "every device answered once");

    // Every result is in the registry's command log.
    let recorded = || {
        ids.iter()
            .filter(|id| {
                store.commands_for(id, 20).unwrap().iter().any(|c| {
                    c.delivery == Delivery::Now
                        && c.action.as_deref() == Some("ping")
                        && c.state == CommandState::Succeeded
                })
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(30), || recorded() == DEVICES),
        "{} of {DEVICES} results recorded",
        recorded()
    );

    // The human form: progress on stderr, one line per device and a summary.
    let out = fleet.cli(&["send", "--all", "inventory", "--timeout", "120"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{DEVICES} devices: {DEVICES} succeeded")),
        "{}",
        text.lines().last().unwrap_or("")
    );
    // The progress bar's last state: every device answered, none failed.
    let progress = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        progress.contains(&format!("] {DEVICES}/{DEVICES}  {DEVICES} ok  0 not ok")),
        "{}",
        progress.rsplit('\r').next().unwrap_or("")
    );

    for h in &handles {
        h.shutdown();
    }
    runtime.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
    });
    fleet.stop_service();
}
