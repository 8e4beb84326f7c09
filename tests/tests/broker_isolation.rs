//! Least privilege proved by DELIVERY on a real Mosquitto running the
//! generated configuration: two devices, an operator, a claim identity, a
//! stranger (a valid fleet certificate for an unrelated id) and hostile
//! certificates the fleet should never have signed (`dev-b/cmd`, `/dev-b`,
//! `DEV-B`), each also trying the topics its own CN expands to; every topic kind
//! of every device, both directions, live and retained, through wildcard
//! subscriptions. Mosquitto grants SUBACKs for forbidden filters and filters
//! at delivery, so only what arrives counts.
//!
//! The expectation comes from `edgebind_protocol::acl::allows` and, so that a
//! wrong model cannot pass, a few literal expectations are checked as well.

use std::collections::BTreeSet;
use std::time::Duration;

use edgebind_protocol::acl::{Access, allows_cn as allows, pattern_grants};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId, Principal};
use edgebind_tests::{
    ClientOptions, DEADLINE, Identity, PubAckReason, QoS, TestClient, TestFleet, wait_until,
};

const SETTLE: Duration = Duration::from_millis(500);
const FILTERS: [&str; 4] = ["#", "edgebind/v2/+/dev-b/#", "edgebind/v2/+/+/#", "$SYS/#"];

fn topic_of(kind: Kind, device: &str) -> String {
    let d = DeviceId::new(device).unwrap();
    let c = CommandId::new("c1").unwrap();
    match kind {
        Kind::Status => Topic::Status(d),
        Kind::Telemetry => Topic::Telemetry(d),
        Kind::Events => Topic::Events(d),
        Kind::Reported => Topic::Reported(d),
        Kind::Cmd => Topic::Cmd(d, c),
        Kind::CmdResult => Topic::CmdResult(d, c),
        Kind::Desired => Topic::Desired(d),
    }
    .render()
}

/// Every topic kind of dev-a, dev-b and the stranger, what the device
/// patterns expand to for every CN of the cast, plus topics outside the namespace.
fn all_topics(cast: &Cast) -> Vec<String> {
    let mut topics: Vec<String> = ["dev-a", "dev-b", "stranger"]
        .iter()
        .flat_map(|d| Kind::ALL.into_iter().map(move |k| topic_of(k, d)))
        .collect();
    for (cn, _) in &cast.people {
        for g in pattern_grants(cn) {
            let t = g.filter.replace('+', "c1");
            if !topics.contains(&t) {
                topics.push(t);
            }
        }
    }
    topics.push("edgebind/v2/fleet/announce".into());
    topics.push("elsewhere/topic".into());
    topics
}

/// The cast, by certificate CN (hostile ones are no valid principal).
struct Cast {
    fleet: TestFleet,
    people: Vec<(String, Identity)>,
}

fn cast() -> Cast {
    let mut fleet = TestFleet::start();
    let mut people = Vec::new();
    for cn in ["dev-a", "dev-b", "claim:factory", "stranger"] {
        let p = Principal::from_cn(cn).unwrap();
        let ident = fleet.pki.identity(&p);
        people.push((cn.to_owned(), ident));
    }
    let op = fleet.pki.operator.clone();
    people.insert(2, (op.name.clone(), op));
    for cn in ["dev-b/cmd", "/dev-b", "DEV-B"] {
        people.push((cn.to_owned(), fleet.pki.hostile(cn)));
    }
    // The claim identity was issued after the broker started: its ACL block.
    fleet.broker.reload().unwrap();
    Cast { fleet, people }
}

fn connect_all(c: &Cast) -> Vec<TestClient> {
    c.people
        .iter()
        .map(|(_, ident)| {
            let client = TestClient::connect(ident, &c.fleet.broker).unwrap();
            for f in FILTERS {
                client.subscribe(f).unwrap();
            }
            client
        })
        .collect()
}

fn got(client: &TestClient) -> BTreeSet<(String, String)> {
    client
        .received()
        .into_iter()
        .map(|m| (m.topic, String::from_utf8(m.payload).unwrap()))
        .collect()
}

#[test]
fn live_messages_reach_exactly_the_allowed_readers() {
    let c = cast();
    let clients = connect_all(&c);
    let topics = all_topics(&c);

    // Every principal publishes to every topic (QoS 1): the PUBACK says
    // whether the broker accepted it, the payload names the publisher.
    for ((publisher, _), client) in c.people.iter().zip(&clients) {
        for t in &topics {
            let ack = client
                .publish(t, publisher.as_bytes(), QoS::AtLeastOnce, false)
                .unwrap()
                .unwrap();
            let allowed = allows(publisher, Access::Write, t);
            if allowed {
                assert!(
                    matches!(
                        ack,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ),
                    "{publisher} -> {t}: {ack:?}"
                );
            } else {
                assert_eq!(
                    ack,
                    PubAckReason::NotAuthorized,
                    "{publisher} may not write {t}"
                );
            }
        }
    }

    // Each reader must receive exactly the (topic, publisher) pairs the model allows.
    let expected: Vec<BTreeSet<(String, String)>> = c
        .people
        .iter()
        .map(|(reader, _)| {
            let mut set = BTreeSet::new();
            for (writer, _) in &c.people {
                for t in &topics {
                    if allows(writer, Access::Write, t) && allows(reader, Access::Read, t) {
                        set.insert((t.clone(), writer.clone()));
                    }
                }
            }
            set
        })
        .collect();
    for (client, want) in clients.iter().zip(&expected) {
        assert!(
            wait_until(DEADLINE, || got(client).is_superset(want)),
            "{} missing {:?}",
            client.name(),
            want.difference(&got(client)).collect::<Vec<_>>()
        );
    }
    std::thread::sleep(SETTLE);
    for (client, want) in clients.iter().zip(&expected) {
        assert_eq!(
            &got(client),
            want,
            "{} got exactly the allowed set",
            client.name()
        );
    }

    // Literal expectations, independent of the model.
    let by = |cn: &str| &clients[c.people.iter().position(|(p, _)| p == cn).unwrap()];
    let dev_a: BTreeSet<_> = got(by("dev-a")).into_iter().collect();
    assert_eq!(
        dev_a,
        BTreeSet::from([
            (
                "edgebind/v2/cmd/dev-a/c1".to_owned(),
                "operator:tester".to_owned()
            ),
            (
                "edgebind/v2/desired/dev-a".to_owned(),
                "operator:tester".to_owned()
            ),
        ])
    );
    assert!(got(by("claim:factory")).is_empty());
    for hostile in ["dev-b/cmd", "/dev-b", "DEV-B"] {
        // At most what was sent to the topics its own CN spells (`DEV-B` is
        // another string than dev-b to the broker), never dev-b's.
        let own: Vec<String> = pattern_grants(hostile)
            .into_iter()
            .map(|g| g.filter.replace('+', "c1"))
            .collect();
        for (t, _) in got(by(hostile)) {
            assert!(own.contains(&t), "{hostile} read {t}");
        }
        assert!(
            !got(by("operator:tester")).iter().any(|(t, w)| w == hostile
                && Topic::parse(t).is_some_and(|t| t.device().as_str() == "dev-b")),
            "{hostile} forged dev-b"
        );
    }
    let op = got(by("operator:tester"));
    assert!(op.contains(&("edgebind/v2/telemetry/dev-b".into(), "dev-b".into())));
    assert!(op.contains(&("edgebind/v2/cmd-result/dev-a/c1".into(), "dev-a".into())));
    assert!(
        !op.iter().any(|(t, w)| t.contains("/dev-a") && w == "dev-b"),
        "dev-b forged dev-a"
    );
    assert!(
        !op.iter()
            .any(|(t, _)| t.starts_with("$SYS") || t.starts_with("elsewhere"))
    );
    assert!(
        !op.iter()
            .any(|(t, w)| t == "edgebind/v2/status/dev-a" && w == "operator:tester"),
        "the operator must not forge device status"
    );
    let stranger = got(by("stranger"));
    assert!(
        stranger
            .iter()
            .all(|(t, _)| Topic::parse(t).is_some_and(|t| t.device().as_str() == "stranger"))
    );
}

#[test]
fn retained_messages_reach_only_allowed_late_subscribers() {
    let c = cast();
    let topics = all_topics(&c);
    {
        // Everyone tries to leave a retained message everywhere.
        let clients: Vec<TestClient> = c
            .people
            .iter()
            .map(|(_, i)| TestClient::connect(i, &c.fleet.broker).unwrap())
            .collect();
        for ((publisher, _), client) in c.people.iter().zip(&clients) {
            for t in &topics {
                client
                    .publish(t, publisher.as_bytes(), QoS::AtLeastOnce, true)
                    .unwrap();
            }
        }
    }
    // Late subscribers (new connections) get the retained message of each
    // topic they may read, from the last writer allowed to write it.
    let clients = connect_all(&c);
    for ((reader, _), client) in c.people.iter().zip(&clients) {
        let mut want = BTreeSet::new();
        for t in &topics {
            let last_writer = c
                .people
                .iter()
                .rev()
                .find(|(w, _)| allows(w, Access::Write, t))
                .map(|(w, _)| w.clone());
            if let Some(w) = last_writer
                && allows(reader, Access::Read, t)
            {
                want.insert((t.clone(), w));
            }
        }
        assert!(
            wait_until(DEADLINE, || got(client).is_superset(&want)),
            "{reader}: missing {:?}",
            want.difference(&got(client)).collect::<Vec<_>>()
        );
        std::thread::sleep(SETTLE);
        assert_eq!(got(client), want, "{reader} retained set");
        assert!(client.received().iter().all(|m| m.retain));
    }
    let dev_b = &clients[1];
    assert_eq!(
        got(dev_b),
        BTreeSet::from([
            (
                "edgebind/v2/cmd/dev-b/c1".to_owned(),
                "operator:tester".to_owned()
            ),
            (
                "edgebind/v2/desired/dev-b".to_owned(),
                "operator:tester".to_owned()
            ),
        ])
    );
}

#[test]
fn client_id_takeover_fails() {
    let fleet = TestFleet::start();
    let a_ident = fleet.pki.device("dev-a");
    let b_ident = fleet.pki.device("dev-b");
    let a = TestClient::connect(&a_ident, &fleet.broker).unwrap();
    a.subscribe("edgebind/v2/cmd/dev-a/+").unwrap();

    // dev-b presents dev-a's client id: the broker uses the CN instead.
    let opts = ClientOptions {
        client_id: Some("dev-a".into()),
        ..Default::default()
    };
    let b = TestClient::connect_with(&b_ident, &fleet.broker, opts).unwrap();
    assert_eq!(
        b.publish("edgebind/v2/status/dev-a", b"x", QoS::AtLeastOnce, false)
            .unwrap(),
        Some(PubAckReason::NotAuthorized),
        "dev-b must not act as dev-a"
    );
    assert!(matches!(
        b.publish("edgebind/v2/status/dev-b", b"x", QoS::AtLeastOnce, false)
            .unwrap(),
        Some(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
    ));

    // dev-a was not kicked: same connection, still receiving its commands.
    let op = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    op.publish("edgebind/v2/cmd/dev-a/k1", b"{}", QoS::AtLeastOnce, false)
        .unwrap();
    assert!(
        a.wait_for_topic("edgebind/v2/cmd/dev-a/k1", DEADLINE)
            .is_some()
    );
    assert!(a.is_connected());
    assert_eq!(a.connack_count(), 1);
    assert!(
        !fleet
            .broker
            .log()
            .contains("Client dev-a already connected")
    );
}
