//! What a device puts in its messages' text cannot stop the fleet service:
//! a NUL character (`\u0000` in JSON) is valid JSON and a valid Rust string
//! but PostgreSQL refuses it in TEXT, so a registry write holding one fails
//! every retry and the service gave up, was restarted, got the same
//! unacknowledged message again: one device could halt ingest for the whole
//! fleet. The NUL is stored as U+FFFD (as a lossy UTF-8 read would), on both
//! backends alike, and ingest goes on.

mod fleet_support;

use edgebind_protocol::DeviceId;
use edgebind_protocol::topics::Topic;
use edgebind_tests::{QoS, TestClient, wait_for};
use fleet_support::{Fleet, LONG};

fn device_client(fleet: &Fleet, id: &str) -> TestClient {
    let bundle = fleet.add_device(id, &[]);
    let identity = edgebind_tests::Identity {
        principal: None,
        name: id.into(),
        dir: bundle.clone(),
        cert: bundle.join("device.crt"),
        key: bundle.join("device.key"),
        ca: bundle.join("ca.crt"),
        serial: String::new(),
    };
    TestClient::connect(&identity, &fleet.env.broker).expect("device connects")
}

fn a_nul_in_device_text_is_replaced_and_ingest_goes_on(mut fleet: Fleet) {
    fleet.start_service();
    let dev = device_client(&fleet, "dev-nul");
    let id = DeviceId::new("dev-nul").unwrap();
    let events = Topic::Events(id.clone()).render();
    for payload in [
        r#"{"ts":1,"kind":"k","message":"before\u0000after"}"#,
        r#"{"ts":2,"kind":"k\u0000","message":"m"}"#,
    ] {
        dev.publish(&events, payload.as_bytes(), QoS::AtLeastOnce, false)
            .unwrap();
    }
    let status = Topic::Status(id.clone()).render();
    dev.publish(
        &status,
        br#"{"state":"online","agent_version":"0.1\u0000","ts":3}"#,
        QoS::AtLeastOnce,
        false,
    )
    .unwrap();
    dev.publish(
        &events,
        br#"{"ts":4,"kind":"k","message":"good"}"#,
        QoS::AtLeastOnce,
        false,
    )
    .unwrap();

    let store = fleet.store();
    let stored = wait_for(LONG, || {
        let rows = store.events(&id, 10).ok()?;
        rows.iter().any(|e| e.message == "good").then_some(rows)
    });
    let log = fleet.service_log();
    let rows =
        stored.unwrap_or_else(|| panic!("the good event was not stored; service log:\n{log}"));
    let mut texts: Vec<(String, String)> = rows.into_iter().map(|e| (e.kind, e.message)).collect();
    texts.sort();
    assert_eq!(
        texts,
        [
            ("k".to_owned(), "before\u{FFFD}after".to_owned()),
            ("k".to_owned(), "good".to_owned()),
            ("k\u{FFFD}".to_owned(), "m".to_owned()),
        ]
    );
    let d = store.device(&id).unwrap();
    assert_eq!(d.agent_version.as_deref(), Some("0.1\u{FFFD}"), "{d:?}");
    let mut service = fleet.take_service().expect("service started");
    let exited = service.try_wait().unwrap();
    let _ = service.kill();
    let _ = service.wait();
    assert_eq!(exited, None, "the fleet service gave up:\n{log}");
}

#[test]
fn a_nul_in_device_text_is_replaced_and_ingest_goes_on_on_postgres() {
    a_nul_in_device_text_is_replaced_and_ingest_goes_on(Fleet::start_on_postgres());
}

#[test]
fn a_nul_in_device_text_is_replaced_and_ingest_goes_on_on_sqlite() {
    a_nul_in_device_text_is_replaced_and_ingest_goes_on(Fleet::start());
}
