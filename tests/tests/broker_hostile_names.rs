//! Isolation that does not rest on edgebind's own name checks. Certificates
//! for names edgebind would refuse (`dev-b/cmd`, `/dev-b`, `..`, wildcards,
//! upper case, unicode, very long...) are signed with the fleet's issuing CA
//! by rcgen directly and used against a real Mosquitto running the generated
//! configuration, over MQTT 5 and MQTT 3.1.1. Whatever each one subscribes
//! to or publishes, a real device `dev-b` and the operator must see nothing
//! of it on dev-b's topics, and it must see nothing of dev-b's, live or
//! retained. Non-device principals (claim, operator) must get no device
//! patterns on either listener.

use std::time::Duration;

use edgebind_protocol::acl::{Access, allows, allows_cn, pattern_grants};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId, Principal};
use edgebind_tests::{
    ClientOptions, DEADLINE, Identity, PubAckReason, QoS, Received, TestClient, TestClient311,
    TestFleet, hostile_cns,
};

/// Time for a delivery already routed by the broker to cross loopback:
/// every absence is checked after a marker sent later has arrived.
const SETTLE: Duration = Duration::from_millis(300);

fn dev_b() -> DeviceId {
    DeviceId::new("dev-b").unwrap()
}

/// Every topic of dev-b, one per kind (command id `c1`).
fn dev_b_topics() -> Vec<String> {
    let c = CommandId::new("c1").unwrap();
    let d = dev_b();
    [
        Topic::Status(d.clone()),
        Topic::Telemetry(d.clone()),
        Topic::Events(d.clone()),
        Topic::Reported(d.clone()),
        Topic::Cmd(d.clone(), c.clone()),
        Topic::CmdResult(d.clone(), c),
        Topic::Desired(d),
    ]
    .map(|t| t.render())
    .to_vec()
}

/// What the device patterns expand to for `cn`, as concrete topics.
fn own_expansions(cn: &str) -> Vec<String> {
    pattern_grants(cn)
        .into_iter()
        .map(|g| g.filter.replace('+', "c1"))
        .collect()
}

const FILTERS: [&str; 6] = [
    "#",
    "edgebind/v2/+/dev-b",
    "edgebind/v2/+/dev-b/+",
    "edgebind/v2/+/dev-b/#",
    "edgebind/v2/cmd/dev-b/+",
    "+/+/+/+/#",
];

enum Prober {
    V5(TestClient),
    V311(TestClient311),
}

impl Prober {
    fn connect(v5: bool, ident: &Identity, fleet: &TestFleet) -> anyhow::Result<Prober> {
        let broker = &fleet.broker;
        Ok(if v5 {
            Prober::V5(TestClient::connect(ident, broker)?)
        } else {
            Prober::V311(TestClient311::connect(ident, broker.host(), broker.port())?)
        })
    }

    fn subscribe(&self, filter: &str) {
        match self {
            Prober::V5(c) => drop(c.subscribe(filter).unwrap()),
            Prober::V311(c) => c.subscribe(filter).unwrap(),
        }
    }

    /// Publish at QoS 1, retained. MQTT 5 returns the PUBACK reason code.
    fn publish(&self, topic: &str, payload: &[u8]) -> Option<PubAckReason> {
        match self {
            Prober::V5(c) => c
                .publish(topic, payload, QoS::AtLeastOnce, true)
                .unwrap_or_else(|e| panic!("{topic}: {e}")),
            Prober::V311(c) => {
                c.publish(topic, payload, true)
                    .unwrap_or_else(|e| panic!("{topic}: {e}"));
                None
            }
        }
    }

    fn received(&self) -> Vec<Received> {
        match self {
            Prober::V5(c) => c.received(),
            Prober::V311(c) => c.received(),
        }
    }
}

fn payload_of(m: &Received) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

fn hostile_certificates_get_nothing_of_a_real_device(v5: bool) {
    let fleet = TestFleet::start();
    let b = TestClient::connect(&fleet.pki.device("dev-b"), &fleet.broker).unwrap();
    for kind in [Kind::Cmd, Kind::Desired] {
        b.subscribe(&kind.filter_for(&dev_b())).unwrap();
    }
    let op = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    op.subscribe("#").unwrap();
    // Retained state of dev-b that a late hostile subscriber might try to read.
    for topic in [&dev_b_topics()[0], &dev_b_topics()[3]] {
        b.publish(topic, b"dev-b", QoS::AtLeastOnce, true).unwrap();
    }
    for topic in [&dev_b_topics()[4], &dev_b_topics()[6]] {
        op.publish(topic, b"operator", QoS::AtLeastOnce, true)
            .unwrap();
    }

    let mut connected = Vec::new();
    for cn in hostile_cns() {
        let ident = fleet.pki.hostile(&cn);
        let prober = match Prober::connect(v5, &ident, &fleet) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{cn:?}: refused ({e})");
                continue;
            }
        };
        for f in FILTERS {
            prober.subscribe(f);
        }
        let payload = format!("hostile:{cn}");
        for topic in dev_b_topics() {
            let ack = prober.publish(&topic, payload.as_bytes());
            if v5 {
                assert_eq!(
                    ack,
                    Some(PubAckReason::NotAuthorized),
                    "{cn:?} may not write {topic}"
                );
            }
        }
        for topic in own_expansions(&cn) {
            let ack = prober.publish(&topic, payload.as_bytes());
            if v5 && !allows_cn(&cn, Access::Write, &topic) {
                assert_eq!(ack, Some(PubAckReason::NotAuthorized), "{cn:?} {topic}");
            }
        }
        connected.push((cn, prober));
    }
    assert!(
        connected.len() >= hostile_cns().len() - 3,
        "most hostile certificates connect (only wildcard names may be refused): {}",
        connected.len()
    );

    // A marker sent after every hostile publish was acknowledged: once dev-b
    // has it, anything routed to it earlier has arrived too.
    let marker = Topic::Cmd(dev_b(), CommandId::new("marker").unwrap()).render();
    op.publish(&marker, b"marker", QoS::AtLeastOnce, false)
        .unwrap();
    assert!(b.wait_for_topic(&marker, DEADLINE).is_some());
    assert!(op.wait_for_topic(&marker, DEADLINE).is_some());
    std::thread::sleep(SETTLE);

    let forged: Vec<_> = b
        .received()
        .into_iter()
        .filter(|m| payload_of(m).starts_with("hostile:"))
        .collect();
    assert!(forged.is_empty(), "dev-b received {forged:?}");
    for m in op.received() {
        let Some(cn) = payload_of(&m).strip_prefix("hostile:").map(str::to_owned) else {
            continue;
        };
        // The operator may see a hostile name only on that name's own
        // exact-depth topics: either a topic the fleet drops as foreign
        // (`edgebind/v2/status/..`) or the own topic of a valid id such as
        // `cmd`. Never anything the fleet would read as dev-b's.
        assert!(
            !dev_b_topics().contains(&m.topic),
            "{cn:?} forged {}",
            m.topic
        );
        let parsed = Topic::parse(&m.topic);
        assert!(
            parsed.as_ref().is_none_or(|t| t.device().as_str() == cn),
            "operator got {} from {cn:?}",
            m.topic
        );
    }
    for (cn, prober) in &connected {
        let got = prober.received();
        assert!(got.is_empty(), "{cn:?} received {got:?}");
    }
    // dev-b's own traffic still flows.
    assert!(
        b.received()
            .iter()
            .any(|m| m.topic == dev_b_topics()[6] && payload_of(m) == "operator")
    );
}

#[test]
fn hostile_certificates_get_nothing_of_a_real_device_mqtt5() {
    hostile_certificates_get_nothing_of_a_real_device(true);
}

#[test]
fn hostile_certificates_get_nothing_of_a_real_device_mqtt311() {
    hostile_certificates_get_nothing_of_a_real_device(false);
}

#[test]
fn non_device_principals_get_no_device_patterns_on_either_listener() {
    let mut fleet = TestFleet::start();
    let claim = fleet
        .pki
        .identity(&Principal::from_cn("claim:line-1").unwrap());
    let dev_a = fleet.pki.device("dev-a");
    fleet.broker.reload().unwrap();
    let op = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    op.subscribe("#").unwrap();
    let provisioning = fleet
        .broker
        .provisioning_port()
        .expect("the test broker has a provisioning listener");

    // One connection per CN at a time (the test client's id is its CN), so
    // the listeners are tried one after the other.
    let mut received = Vec::new();
    for port in [fleet.broker.port(), provisioning] {
        let client =
            TestClient::connect_addr(&claim, fleet.broker.host(), port, ClientOptions::default())
                .unwrap();
        client.subscribe("#").unwrap();
        for topic in own_expansions("claim:line-1") {
            assert_eq!(
                client
                    .publish(&topic, b"claim", QoS::AtLeastOnce, true)
                    .unwrap(),
                Some(PubAckReason::NotAuthorized),
                "claim on port {port}: {topic}"
            );
        }
        received.push(client);
    }
    // On the provisioning listener even a device's own patterns do not apply.
    let dev_on_provisioning = TestClient::connect_addr(
        &dev_a,
        fleet.broker.host(),
        provisioning,
        ClientOptions::default(),
    )
    .unwrap();
    dev_on_provisioning.subscribe("#").unwrap();
    for topic in own_expansions("dev-a") {
        assert_eq!(
            dev_on_provisioning
                .publish(&topic, b"dev-a", QoS::AtLeastOnce, false)
                .unwrap(),
            Some(PubAckReason::NotAuthorized),
            "dev-a on the provisioning listener: {topic}"
        );
    }
    // The operator's own pattern expansions are denied as well.
    let me = Principal::from_cn("operator:tester").unwrap();
    for topic in own_expansions("operator:tester") {
        assert!(!allows(&me, Access::Write, &topic));
        assert_eq!(
            op.publish(&topic, b"op", QoS::AtLeastOnce, false).unwrap(),
            Some(PubAckReason::NotAuthorized),
            "operator on {topic}"
        );
    }

    let marker = Topic::Cmd(
        DeviceId::new("dev-a").unwrap(),
        CommandId::new("m").unwrap(),
    )
    .render();
    // The provisioning-listener client of claim:line-1 is still connected:
    // the marker to dev-a must not reach it, nor dev-a's provisioning
    // connection (no patterns there), only dev-a on the device listener
    // (which replaces that connection: one session per CN).
    op.publish(&marker, b"m", QoS::AtLeastOnce, true).unwrap();
    assert!(
        dev_on_provisioning.received().is_empty(),
        "dev-a read its command on the provisioning listener"
    );
    let a = TestClient::connect(&dev_a, &fleet.broker).unwrap();
    a.subscribe(&Kind::Cmd.filter_for(&DeviceId::new("dev-a").unwrap()))
        .unwrap();
    assert!(
        a.wait_for_topic(&marker, DEADLINE).is_some(),
        "retained marker"
    );
    assert!(op.wait_for_topic(&marker, DEADLINE).is_some());
    std::thread::sleep(SETTLE);
    for client in &received {
        assert!(
            client.received().is_empty(),
            "a claim identity received {:?}",
            client.received()
        );
    }
    assert!(
        op.received()
            .iter()
            .all(|m| m.topic == marker || payload_of(m) != "claim"),
        "the operator received a claim identity's message"
    );
}
