//! The fleet simulator at test size (300 devices, each the real agent with
//! its own registered identity, in this process): every device connects and
//! answers a fan-out, a paced reboot of all of them is simulated (the host
//! is not rebooted) and reported once each is back, a broker restart loses
//! no device, and the cleanup revokes what the simulator registered.

mod fleet_support;

use std::time::Duration;

use edgebind_fleet::ops::FleetHome;
use edgebind_fleet::registry::{Lifecycle, Selector, Store};
use edgebind_sim::{SimOptions, Simulation, identities};
use edgebind_tests::wait_until;
use fleet_support::{Fleet, stdout};
use serde_json::Value;

const DEVICES: u64 = 300;
const DEADLINE: Duration = Duration::from_secs(180);

fn options() -> SimOptions {
    SimOptions {
        telemetry_interval_s: 60,
        keep_alive_s: Some(30),
        ramp_per_s: 200,
        ..SimOptions::default()
    }
}

fn outcomes(out: &std::process::Output) -> Vec<Value> {
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)));
    v.as_array().cloned().unwrap_or_default()
}

#[test]
fn simulated_fleet_answers_a_fan_out_and_a_paced_reboot_then_is_revoked() {
    let mut fleet = Fleet::start();
    fleet.start_service();
    let home = FleetHome::new(fleet.home());
    let mut store = fleet.registry();
    let out = fleet.home().join("sim-bundles");
    let ids = identities::create(
        &home,
        &mut store,
        "simf",
        DEVICES as usize,
        None,
        &out,
        |_| {},
    )
    .unwrap();
    assert_eq!(ids.ids.len() as u64, DEVICES);

    let sim = Simulation::start(ids.clone(), &options()).unwrap();
    assert!(
        sim.wait_for(DEADLINE, |s| s.online == DEVICES),
        "online: {:?}",
        sim.snapshot()
    );
    // The registry sees them too (through the fleet service).
    let online_in_registry = || {
        store
            .devices(&Selector::Tag("simf".parse().unwrap()))
            .unwrap()
            .iter()
            .filter(|d| d.online)
            .count() as u64
    };
    assert!(wait_until(DEADLINE, || online_in_registry() == DEVICES));

    // Fan-out: one ping to every device, every result back and recorded.
    let out = fleet.cli(&[
        "send",
        "--tag",
        "simf",
        "ping",
        "--timeout",
        "120",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let list = outcomes(&out);
    assert_eq!(list.len() as u64, DEVICES);
    assert!(list.iter().all(|o| o["outcome"] == "succeeded"));
    assert!(sim.wait_for(DEADLINE, |s| s.answered_ok >= DEVICES));

    // A reboot of all of them, paced at 100/s: each agent is stopped and
    // started under a new boot id, and reports success once back.
    let out = fleet.cli(&[
        "send",
        "--tag",
        "simf",
        "reboot",
        "--rate",
        "100",
        "--timeout",
        "120",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let list = outcomes(&out);
    assert_eq!(list.len() as u64, DEVICES);
    assert!(list.iter().all(|o| o["outcome"] == "succeeded"), "{list:?}");
    let times: Vec<u64> = list
        .iter()
        .map(|o| o["elapsed_ms"].as_u64().unwrap())
        .collect();
    let spread = times.iter().max().unwrap() - times.iter().min().unwrap();
    // 300 at 100/s take about 3 s to publish: the reboots are spread out.
    assert!(spread >= 2000, "results within {spread} ms: not paced");
    assert!(sim.wait_for(DEADLINE, |s| s.reboots == DEVICES && s.online == DEVICES));

    // The human form: results as they come, a summary by outcome.
    let out = fleet.cli(&["send", "--tag", "simf", "inventory", "--timeout", "120"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert_eq!(text.lines().count() as u64, DEVICES + 1, "{text}");
    assert!(text.contains("300 devices: 300 succeeded"), "{text}");

    let last = sim.stop(Duration::from_secs(60));
    assert_eq!(last.agent_errors, 0, "{last:?}");
    let removed = identities::remove(&home, &mut store, &ids)
        .unwrap()
        .unwrap();
    assert_eq!(removed.devices as u64, DEVICES);
    assert!(
        ids.ids
            .iter()
            .all(|id| store.device(id).unwrap().lifecycle == Lifecycle::Revoked)
    );
    fleet.stop_service();
}

#[test]
fn a_broker_restart_under_the_simulated_fleet_loses_no_device() {
    let mut fleet = Fleet::start();
    let home = FleetHome::new(fleet.home());
    let mut store = fleet.registry();
    let out = fleet.home().join("sim-bundles");
    let ids = identities::create(
        &home,
        &mut store,
        "sims",
        DEVICES as usize,
        None,
        &out,
        |_| {},
    )
    .unwrap();
    let sim = Simulation::start(ids.clone(), &options()).unwrap();
    assert!(
        sim.wait_for(DEADLINE, |s| s.online == DEVICES),
        "{:?}",
        sim.snapshot()
    );
    let before = sim.snapshot();
    fleet.env.broker.restart().unwrap();
    // Every device notices and comes back.
    assert!(
        sim.wait_for(DEADLINE, |s| s.lost >= before.lost + DEVICES
            && s.online == DEVICES),
        "{:?}; offline: {:?}",
        sim.snapshot(),
        sim.counters().offline_devices()
    );
    let after = sim.snapshot();
    assert_eq!(after.agent_errors, 0, "{after:?}");
    assert!(sim.counters().offline_devices().is_empty());
    sim.stop(Duration::from_secs(60));
    identities::remove(&home, &mut store, &ids).unwrap();
}
