//! Revocation through `edgebind_broker` + SIGHUP, observed by delivery on a
//! real Mosquitto: a revoked device that is still connected loses all access
//! at once, new connections with its certificate fail, and every other
//! client keeps its very same connection. Hostile certificates (names the
//! fleet should never sign) stay connected throughout and receive nothing.

use edgebind_protocol::topics::Topic;
use edgebind_protocol::{CommandId, DeviceId};
use edgebind_tests::{DEADLINE, HostileCrowd, PubAckReason, QoS, TestClient, TestFleet};
use std::time::Duration;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

/// Quiet period used only to assert that something did NOT arrive, after a
/// later marker message on the same path already arrived.
const SETTLE: Duration = Duration::from_millis(300);

#[test]
fn revoked_device_loses_delivery_while_others_stay_connected() {
    let mut fleet = TestFleet::start();
    let a_ident = fleet.pki.device("dev-a");
    let b_ident = fleet.pki.device("dev-b");
    let (a_id, b_id) = (id("dev-a"), id("dev-b"));
    let crowd = HostileCrowd::connect(&fleet);

    let op = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    op.subscribe("edgebind/v2/#").unwrap();
    let a = TestClient::connect(&a_ident, &fleet.broker).unwrap();
    let b = TestClient::connect(&b_ident, &fleet.broker).unwrap();
    a.subscribe(&edgebind_protocol::topics::Kind::Cmd.filter_for(&a_id))
        .unwrap();
    b.subscribe(&edgebind_protocol::topics::Kind::Cmd.filter_for(&b_id))
        .unwrap();

    // Before: dev-a reports and receives commands.
    let a_tel = Topic::Telemetry(a_id.clone()).render();
    let a_cmd = Topic::Cmd(a_id.clone(), CommandId::new("c1").unwrap()).render();
    assert_eq!(
        a.publish(&a_tel, b"before", QoS::AtLeastOnce, false)
            .unwrap(),
        Some(PubAckReason::Success)
    );
    assert!(op.wait_for_topic(&a_tel, DEADLINE).is_some());
    op.publish(&a_cmd, b"{}", QoS::AtLeastOnce, false).unwrap();
    assert!(a.wait_for_topic(&a_cmd, DEADLINE).is_some());

    // Revoke dev-a and reload the broker (ACL + CRL, SIGHUP).
    fleet.pki.revoke("dev-a");
    fleet.broker.reload().unwrap();
    op.clear();
    a.clear();

    // dev-a's publish on its own topic (allowed by the %u pattern) is now denied...
    assert_eq!(
        a.publish(&a_tel, b"after", QoS::AtLeastOnce, false)
            .unwrap(),
        Some(PubAckReason::NotAuthorized),
        "the revoked device's user-block deny must win over the %u pattern"
    );
    // ...and nothing reaches the operator, while dev-b's message (sent after) does.
    let b_tel = Topic::Telemetry(b_id.clone()).render();
    assert_eq!(
        b.publish(&b_tel, b"b-after", QoS::AtLeastOnce, false)
            .unwrap(),
        Some(PubAckReason::Success)
    );
    assert!(op.wait_for_topic(&b_tel, DEADLINE).is_some());
    std::thread::sleep(SETTLE);
    assert!(
        op.received().iter().all(|m| m.topic != a_tel),
        "revoked dev-a still delivered: {:?}",
        op.received()
    );

    // Commands no longer reach the open dev-a connection; dev-b's still do.
    let b_cmd = Topic::Cmd(b_id.clone(), CommandId::new("c2").unwrap()).render();
    op.publish(&a_cmd, b"{}", QoS::AtLeastOnce, false).unwrap();
    op.publish(&b_cmd, b"{}", QoS::AtLeastOnce, false).unwrap();
    assert!(b.wait_for_topic(&b_cmd, DEADLINE).is_some());
    std::thread::sleep(SETTLE);
    assert!(
        a.received().is_empty(),
        "revoked dev-a got {:?}",
        a.received()
    );

    // dev-b and the operator kept their first connection throughout.
    assert!(b.is_connected() && op.is_connected());
    assert_eq!(b.connack_count(), 1);
    assert_eq!(op.connack_count(), 1);

    // New connections with the revoked certificate are refused (CRL).
    drop(a);
    let err = TestClient::connect(&a_ident, &fleet.broker)
        .err()
        .expect("revoked certificate must not connect");
    assert!(err.to_string().contains("CertificateRevoked"), "{err}");
    // ...while dev-b can still open a new one.
    drop(b);
    TestClient::connect(&b_ident, &fleet.broker).unwrap();
    crowd.assert_received_nothing_foreign();
}

#[test]
fn revoked_operator_can_no_longer_read_or_command() {
    let mut fleet = TestFleet::start();
    let bob = fleet
        .pki
        .identity(&edgebind_protocol::Principal::from_cn("operator:bob").unwrap());
    fleet.broker.reload().unwrap(); // bob's user block enters the ACL
    let dev = fleet.pki.device("dev-a");
    let a_id = id("dev-a");
    let crowd = HostileCrowd::connect(&fleet);
    let bob_c = TestClient::connect(&bob, &fleet.broker).unwrap();
    bob_c.subscribe("edgebind/v2/#").unwrap();
    let a = TestClient::connect(&dev, &fleet.broker).unwrap();
    a.subscribe(&edgebind_protocol::topics::Kind::Cmd.filter_for(&a_id))
        .unwrap();
    let tel = Topic::Telemetry(a_id.clone()).render();
    a.publish(&tel, b"1", QoS::AtLeastOnce, false).unwrap();
    assert!(
        bob_c.wait_for_topic(&tel, DEADLINE).is_some(),
        "operator bob reads before revocation"
    );

    fleet.pki.revoke("operator:bob");
    fleet.broker.reload().unwrap();
    bob_c.clear();
    let cmd = Topic::Cmd(a_id.clone(), CommandId::new("x").unwrap()).render();
    assert_eq!(
        bob_c.publish(&cmd, b"{}", QoS::AtLeastOnce, false).unwrap(),
        Some(PubAckReason::NotAuthorized)
    );
    a.publish(&tel, b"2", QoS::AtLeastOnce, false).unwrap();
    // The service (still valid) sees the marker; bob must not.
    let svc = TestClient::connect(&fleet.pki.service, &fleet.broker).unwrap();
    svc.subscribe(&tel).unwrap();
    a.publish(&tel, b"3", QoS::AtLeastOnce, false).unwrap();
    assert!(svc.wait_for_topic(&tel, DEADLINE).is_some());
    std::thread::sleep(SETTLE);
    assert!(
        bob_c.received().is_empty(),
        "revoked operator still reads: {:?}",
        bob_c.received()
    );
    assert!(
        a.received().is_empty(),
        "revoked operator's command arrived"
    );
    crowd.assert_received_nothing_foreign();
}
