//! The fleet simulator at test size (300 devices, each the real agent with
//! its own registered identity, in this process): every device connects and
//! answers a fan-out, a paced reboot of all of them is simulated (the host
//! is not rebooted) and reported once each is back, a broker restart loses
//! no device, the fleet's reconnect window spreads the reconnections of a
//! restart over it, and the cleanup revokes what the simulator registered.

mod fleet_support;

use std::time::{Duration, Instant};

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

/// The fleet's retained reconnect hint reaches every agent, is remembered in
/// its state directory, and after a broker restart the agents spread their
/// reconnections over the window instead of all coming back at once (the
/// agents' own backoff alone retries within half a second).
#[test]
fn agents_given_a_reconnect_window_spread_their_reconnections_over_it() {
    use edgebind_protocol::reconnect::{ReconnectHint, TOPIC};
    use edgebind_tests::{PubAckReason, QoS, TestClient};
    const WINDOW_S: u32 = 30;
    let mut fleet = Fleet::start();
    let home = FleetHome::new(fleet.home());
    let mut store = fleet.registry();
    let out = fleet.home().join("sim-bundles");
    let ids = identities::create(
        &home,
        &mut store,
        "simw",
        DEVICES as usize,
        None,
        &out,
        |_| {},
    )
    .unwrap();
    // Published before the devices start, as by a running fleet service:
    // each gets it, retained, when it subscribes.
    let svc = TestClient::connect(&fleet.env.pki.service, &fleet.env.broker).unwrap();
    let hint = ReconnectHint::new(WINDOW_S, "service:fleet").encode();
    let ack = svc.publish(TOPIC, &hint, QoS::AtLeastOnce, true).unwrap();
    assert!(
        matches!(
            ack,
            Some(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
        ),
        "{ack:?}"
    );
    svc.disconnect();
    let sim = Simulation::start(ids.clone(), &options()).unwrap();
    assert!(
        sim.wait_for(DEADLINE, |s| s.online == DEVICES),
        "{:?}",
        sim.snapshot()
    );
    let remembered = |id: &edgebind_protocol::DeviceId| {
        let path = sim
            .state_dir()
            .join(id.as_str())
            .join("agent/reconnect.json");
        std::fs::read(path)
            .ok()
            .and_then(|b| ReconnectHint::decode(&b).ok().flatten())
            .map(|h| h.window_s)
    };
    assert!(
        wait_until(DEADLINE, || ids
            .ids
            .iter()
            .all(|id| remembered(id) == Some(WINDOW_S))),
        "not every agent remembered the window: {:?}",
        ids.ids.iter().find(|id| remembered(id) != Some(WINDOW_S))
    );

    let before = sim.snapshot();
    let stopped = Instant::now();
    fleet.env.broker.restart().unwrap();
    let up = stopped.elapsed();
    // Connections the broker completed by the end of the window's first
    // tenth after its return (the first sample at or past it).
    let tenth = Duration::from_secs(u64::from(WINDOW_S)) / 10;
    let mut early = None;
    let back = wait_until(DEADLINE, || {
        let s = sim.snapshot();
        if early.is_none() && stopped.elapsed() >= up + tenth {
            early = Some(s.connects - before.connects);
        }
        s.lost >= before.lost + DEVICES && s.online == DEVICES
    });
    let all_back = stopped.elapsed();
    assert!(
        back,
        "{:?}; offline: {:?}",
        sim.snapshot(),
        sim.counters().offline_devices()
    );
    let early = early.unwrap_or(DEVICES);
    // Uniform over the window: about (down time + a tenth) / window of the
    // fleet, ~13 % here; the agents' own backoff brings nearly all back then.
    assert!(
        early * 100 <= DEVICES * 30,
        "{early} of {DEVICES} reconnected in the first {tenth:?} after the broker's return ({up:?} down)"
    );
    // And spread, not merely late: the last one is back within the window
    // (plus its time down and a margin for the loaded machine).
    assert!(
        all_back <= up + Duration::from_secs(u64::from(WINDOW_S) + 30),
        "all back after {all_back:?} (down {up:?}, window {WINDOW_S} s)"
    );
    assert!(
        all_back >= Duration::from_secs(u64::from(WINDOW_S) / 2),
        "all back after {all_back:?}: the window was not used"
    );
    let after = sim.snapshot();
    assert_eq!(after.agent_errors, 0, "{after:?}");
    sim.stop(Duration::from_secs(60));
    identities::remove(&home, &mut store, &ids).unwrap();
}

/// `fleet serve --reconnect-accept-rate R` publishes the retained window for
/// the registered fleet at R connections a second, and widens it while it
/// runs when more devices are registered.
#[test]
fn the_fleet_service_publishes_the_reconnect_window_for_the_registered_fleet() {
    use edgebind_protocol::reconnect::{ReconnectHint, TOPIC, window_for};
    use edgebind_tests::TestClient;
    let mut fleet = Fleet::start();
    let home = FleetHome::new(fleet.home());
    let mut store = fleet.registry();
    let out = fleet.home().join("sim-bundles");
    let ids = identities::create(&home, &mut store, "simr", 40, None, &out, |_| {}).unwrap();
    let devices = store.stats().unwrap().devices;
    assert!(devices >= 40);
    fleet.start_service_with(&["--reconnect-accept-rate", "4"]);
    let op = TestClient::connect(&fleet.env.pki.operator, &fleet.env.broker).unwrap();
    op.subscribe(TOPIC).unwrap();
    let got = op
        .wait_for_topic(TOPIC, DEADLINE)
        .expect("no retained reconnect window");
    let hint = ReconnectHint::decode(&got.payload).unwrap().unwrap();
    assert_eq!(hint.window_s, window_for(devices, 4.0));
    assert_eq!(hint.by, "service:fleet");

    // The fleet grows under the running service: the window follows.
    let more = identities::create(&home, &mut store, "simg", 40, None, &out, |_| {}).unwrap();
    let grown = store.stats().unwrap().devices;
    let wider = window_for(grown, 4.0);
    assert!(wider > hint.window_s, "{grown} devices: {wider} s");
    let got = op.wait_for_message(DEADLINE, |m| {
        m.topic == TOPIC
            && ReconnectHint::decode(&m.payload)
                .ok()
                .flatten()
                .is_some_and(|h| h.window_s == wider)
    });
    assert!(
        got.is_some(),
        "the window was not widened to {wider} s for {grown} devices; seen: {:?}",
        op.received()
            .iter()
            .filter(|m| m.topic == TOPIC)
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect::<Vec<_>>()
    );
    op.disconnect();
    fleet.stop_service();
    identities::remove(&home, &mut store, &ids).unwrap();
    identities::remove(&home, &mut store, &more).unwrap();
}
