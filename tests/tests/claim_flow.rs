//! Claim-based first boot end to end: real Mosquitto with its provisioning
//! listener, `edgebind fleet serve` as a process, real `edgebind-agent`
//! processes that hold only a claim bundle (made by `edgebind factory
//! claim-identity`) and a serial on the allow-list (`edgebind factory allow`).

mod fleet_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgebind_protocol::provision::{Leg, Request, Response};
use edgebind_protocol::{DeviceId, Principal, UnitSerial};
use edgebind_tests::{ClientOptions, Identity, PubAckReason, QoS, TestClient, wait_for};
use fleet_support::{AgentTweaks, Fleet, LONG, Proc};

const BATCH: &str = "line-1";
/// Long enough for a few answers to go unseen; short enough for a test.
const QUIET: Duration = Duration::from_secs(3);

fn batch() -> DeviceId {
    DeviceId::new(BATCH).unwrap()
}

/// The batch's claim bundle (from the CLI) and its allow-list.
fn claim_batch(fleet: &Fleet, serials: &[&str]) -> PathBuf {
    let out = fleet.home().join("claim-line-1");
    fleet.cli_ok(&[
        "factory",
        "claim-identity",
        "--batch",
        BATCH,
        "--out",
        out.to_str().unwrap(),
    ]);
    let list = fleet.home().join("serials.txt");
    std::fs::write(&list, format!("# batch {BATCH}\n{}\n", serials.join("\n"))).unwrap();
    let out_json = fleet.cli_ok(&[
        "factory",
        "allow",
        "--batch",
        BATCH,
        "--serials",
        list.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out_json).unwrap();
    assert_eq!(v["added"].as_array().unwrap().len(), serials.len(), "{v}");
    out
}

/// A unit's copy of the claim bundle (what the image's first-boot import
/// installs), configured for the test: its serial, quick timeouts.
fn unit(fleet: &Fleet, bundle: &Path, name: &str, serial: &str) -> PathBuf {
    let dir = fleet.home().join("units").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(bundle).unwrap() {
        let entry = entry.unwrap();
        let to = dir.join(entry.file_name());
        std::fs::copy(entry.path(), &to).unwrap();
    }
    assert!(!dir.join("device.key").exists() && !dir.join("device.crt").exists());
    let config = fleet.agent_config(&dir, &AgentTweaks::default());
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let claim = doc.get_mut("claim").unwrap().as_table_mut().unwrap();
    claim.remove("serial_file");
    claim.insert("serial".into(), serial.into());
    claim.insert("response_timeout_s".into(), 5.into());
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    config
}

fn claim_identity(bundle: &Path) -> Identity {
    Identity::from_dir(bundle, "claim", &format!("claim:{BATCH}"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn wait_log(agent: &Proc, needle: &str, timeout: Duration) -> bool {
    wait_for(timeout, || agent.log().contains(needle).then_some(())).is_some()
}

fn provisioning(fleet: &Fleet) -> u16 {
    fleet.env.broker.provisioning_port().unwrap()
}

#[test]
fn a_unit_with_only_a_claim_bundle_comes_online_under_its_own_id_with_its_own_key() {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001"]);
    // The claim bundle holds no device key; its agent.toml says it is a claim bundle.
    let toml = std::fs::read_to_string(bundle.join("agent.toml")).unwrap();
    assert_eq!(
        edgebind_protocol::bundle::Kind::of_agent_toml(&toml),
        edgebind_protocol::bundle::Kind::Claim
    );
    assert_eq!(mode(&bundle.join("claim.key")), 0o600);
    fleet.start_service();
    let config = unit(&fleet, &bundle, "u1", "SN-0001");
    let dir = config.parent().unwrap().to_owned();
    let mut agent = fleet.spawn_agent(&config);

    let device = fleet.wait_device("sn-0001", LONG, "online", |d| d.online);
    assert!(device.cert.is_some());
    // The key was made on the device, is private, and is the certified one.
    let key = dir.join("device.key");
    assert_eq!(mode(&key), 0o600);
    let cert = std::fs::read_to_string(dir.join("device.crt")).unwrap();
    let key_sha = edgebind_certs::csr::cert_key_sha256(&cert).unwrap();
    let entry = fleet
        .store()
        .claim_serial(&UnitSerial::new("SN-0001").unwrap())
        .unwrap()
        .unwrap();
    let done = entry.provisioned.expect("the serial is provisioned");
    assert_eq!(done.device.as_str(), "sn-0001");
    assert_eq!(done.key_sha256, key_sha);
    // The key file holds the certified key: a request signed with it has
    // the certificate's key.
    let pair = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key).unwrap()).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sn-0001");
    let csr = params.serialize_request(&pair).unwrap().pem().unwrap();
    assert_eq!(
        edgebind_certs::DeviceCsr::parse(&csr).unwrap().key_sha256(),
        key_sha
    );
    // The claim identity stays on the unit (0600: it re-provisions the
    // device if its certificate expires offline); the enrollment finished.
    assert_eq!(mode(&dir.join("claim.key")), 0o600);
    assert!(!dir.join("state").join("enroll").exists());
    assert!(agent.log().contains("claiming a device identity"));

    // A restart runs as the device straight away (nothing claimed again).
    agent.terminate();
    fleet.wait_device("sn-0001", LONG, "offline", |d| !d.online);
    let mut again = fleet.spawn_agent(&config);
    fleet.wait_device("sn-0001", LONG, "online again", |d| d.online);
    assert!(
        !again.log().contains("claiming a device identity"),
        "{}",
        again.log()
    );
    again.terminate();
    assert!(fleet.service_log().contains("unit provisioned"));
}

#[test]
fn two_units_of_a_batch_provision_at_once_and_never_see_each_others_exchange() {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001", "SN-0002"]);
    // On the provisioning listener each unit reads only its own response
    // topic and writes only its own request topic, though both hold one
    // certificate: the listener tells them apart by client id.
    let claim = claim_identity(&bundle);
    let opts = |id: &str| ClientOptions {
        client_id: Some(id.into()),
        ..ClientOptions::default()
    };
    let host = fleet.env.broker.host();
    let one =
        TestClient::connect_addr(&claim, host, provisioning(&fleet), opts("SN-0001")).unwrap();
    let two =
        TestClient::connect_addr(&claim, host, provisioning(&fleet), opts("SN-0002")).unwrap();
    let serial_1 = UnitSerial::new("SN-0001").unwrap();
    let response_1 = Leg::Response.topic(&batch(), &serial_1);
    one.subscribe(&response_1).unwrap();
    // Mosquitto grants the subscription and checks each delivery: unit 2
    // subscribes to unit 1's responses, the fleet answers unit 1, and only
    // unit 1 gets it.
    two.subscribe(&response_1).unwrap();
    two.subscribe("edgebind/v2/provision/#").unwrap();
    let service = TestClient::connect_addr(
        &fleet.env.pki.service,
        host,
        provisioning(&fleet),
        opts("service-probe"),
    )
    .unwrap();
    let answer = br#"{"status":"refused","reason":"for unit 1 only"}"#;
    assert_eq!(
        service
            .publish(&response_1, answer, QoS::AtLeastOnce, false)
            .unwrap(),
        Some(PubAckReason::Success)
    );
    assert!(
        one.wait_for_topic(&response_1, LONG).is_some(),
        "unit 1 missed its answer"
    );
    one.clear();
    assert_eq!(
        two.publish(
            &response_1,
            b"{\"status\":\"refused\",\"reason\":\"x\"}",
            QoS::AtLeastOnce,
            false
        )
        .unwrap(),
        Some(PubAckReason::NotAuthorized),
        "unit 2 may answer for the fleet"
    );
    assert_eq!(
        two.publish(
            &Leg::Request.topic(&batch(), &serial_1),
            b"{}",
            QoS::AtLeastOnce,
            false
        )
        .unwrap(),
        Some(PubAckReason::NotAuthorized),
        "unit 2 may ask in unit 1's name"
    );
    std::thread::sleep(QUIET);
    assert!(one.received().is_empty(), "{:?}", one.received());
    assert!(
        two.received().is_empty(),
        "unit 2 saw unit 1's exchange: {:?}",
        two.received()
    );
    drop((one, two, service));

    fleet.start_service();
    let c1 = unit(&fleet, &bundle, "u1", "SN-0001");
    let c2 = unit(&fleet, &bundle, "u2", "SN-0002");
    let a1 = fleet.spawn_agent(&c1);
    let a2 = fleet.spawn_agent(&c2);
    let d1 = fleet.wait_device("sn-0001", LONG, "online", |d| d.online);
    let d2 = fleet.wait_device("sn-0002", LONG, "online", |d| d.online);
    assert_ne!(
        d1.cert.unwrap().fingerprint_sha256,
        d2.cert.unwrap().fingerprint_sha256
    );
    for (agent, dir) in [(&a1, &c1), (&a2, &c2)] {
        assert!(
            !agent.log().contains("refused the issued certificate"),
            "{}",
            agent.log()
        );
        assert_eq!(mode(&dir.with_file_name("device.key")), 0o600);
    }
}

#[test]
fn a_serial_not_on_the_allow_list_is_refused_and_nothing_is_registered() {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001"]);
    fleet.start_service();
    let config = unit(&fleet, &bundle, "stranger", "SN-0999");
    let agent = fleet.spawn_agent(&config);
    assert!(
        wait_log(&agent, "not on the allow-list of batch line-1", LONG),
        "{}",
        agent.log()
    );
    let id = DeviceId::new("sn-0999").unwrap();
    assert!(
        fleet.store().device(&id).is_err(),
        "a refused unit was registered"
    );
    assert_eq!(
        fleet
            .env
            .pki
            .pki()
            .inventory()
            .unwrap()
            .by_cn("sn-0999")
            .count(),
        0,
        "a certificate was issued for a refused unit"
    );
    assert!(!config.with_file_name("device.crt").exists());
    // It keeps its key and asks again (an operator may still allow it).
    assert!(
        config
            .with_file_name("state")
            .join("enroll")
            .join("key.pem")
            .exists()
    );
    assert!(config.with_file_name("claim.key").exists());
}

#[test]
fn a_replayed_serial_with_another_key_is_refused() {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001"]);
    fleet.start_service();
    let first = unit(&fleet, &bundle, "u1", "SN-0001");
    let _a1 = fleet.spawn_agent(&first);
    let device = fleet.wait_device("sn-0001", LONG, "online", |d| d.online);
    // A second unit claiming the same serial (a cloned board, a leaked
    // serial) makes its own, other key: refused, the first keeps its identity.
    let clone = unit(&fleet, &bundle, "clone", "SN-0001");
    let a2 = fleet.spawn_agent(&clone);
    assert!(
        wait_log(&a2, "renews over its own connection", LONG),
        "{}",
        a2.log()
    );
    assert!(!clone.with_file_name("device.crt").exists());
    let now = fleet
        .store()
        .device(&DeviceId::new("sn-0001").unwrap())
        .unwrap();
    assert_eq!(
        now.cert, device.cert,
        "the replay changed the device's certificate"
    );
    assert_eq!(
        fleet
            .env
            .pki
            .pki()
            .inventory()
            .unwrap()
            .by_cn("sn-0001")
            .count(),
        1
    );
}

/// Who could answer in the fleet's name on the provisioning listener? Only
/// a fleet service identity may write responses (the broker refuses units,
/// devices and operators: the isolation test above and below). So the
/// forger here holds a service identity, the strongest position there is,
/// and the unit must still refuse everything that does not verify.
#[test]
fn a_forged_or_mismatched_answer_is_refused_and_the_unit_asks_again() {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001"]);
    let config = unit(&fleet, &bundle, "u1", "SN-0001");
    let serial = UnitSerial::new("SN-0001").unwrap();

    // Nobody but a service may answer: a device on the device listener, an
    // operator and another unit of the batch are refused by the broker.
    let response = Leg::Response.topic(&batch(), &serial);
    let forged = br#"{"status":"refused","reason":"forged"}"#;
    let dev = fleet.env.pki.device("dev-x");
    let on_device = TestClient::connect(&dev, &fleet.env.broker).unwrap();
    assert_eq!(
        on_device
            .publish(&response, forged, QoS::AtLeastOnce, false)
            .unwrap(),
        Some(PubAckReason::NotAuthorized)
    );
    let op = TestClient::connect_addr(
        &fleet.env.pki.operator,
        fleet.env.broker.host(),
        provisioning(&fleet),
        ClientOptions::default(),
    )
    .unwrap();
    assert_eq!(
        op.publish(&response, forged, QoS::AtLeastOnce, false)
            .unwrap(),
        Some(PubAckReason::NotAuthorized)
    );

    let forger = TestClient::connect_addr(
        &fleet.env.pki.service,
        fleet.env.broker.host(),
        provisioning(&fleet),
        ClientOptions {
            client_id: Some("forger".into()),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    forger.subscribe(&Leg::Request.filter_all()).unwrap();
    let agent = fleet.spawn_agent(&config);
    let request_topic = Leg::Request.topic(&batch(), &serial);
    let foreign = foreign_ca();
    type Forgery<'f> = Box<dyn Fn(&str) -> Vec<u8> + 'f>;
    let forgeries: Vec<Forgery> = vec![
        // The unit's own key and id, signed by another CA.
        Box::new(|csr: &str| issued("sn-0001", &sign_with(&foreign, csr, "sn-0001"))),
        // A real fleet certificate for the id, but not for the unit's key.
        Box::new(|_csr: &str| {
            let other = fleet
                .env
                .pki
                .pki()
                .issue(
                    &Principal::Device(DeviceId::new("sn-0001").unwrap()),
                    edgebind_certs::Validity::days(1),
                )
                .unwrap();
            issued("sn-0001", &other.chain_pem)
        }),
        // Not even a response.
        Box::new(|_csr: &str| b"{\"status\":\"issued\"".to_vec()),
    ];
    for forge in &forgeries {
        let req = forger
            .wait_for_topic(&request_topic, LONG)
            .expect("the unit asks");
        forger.clear();
        let csr = serde_json::from_slice::<Request>(&req.payload)
            .unwrap()
            .csr_pem;
        assert_eq!(
            forger
                .publish(&response, &forge(&csr), QoS::AtLeastOnce, false)
                .unwrap(),
            Some(PubAckReason::Success)
        );
    }
    assert!(
        wait_for(LONG, || (agent.log().matches("claim not done").count()
            >= 3)
            .then_some(()))
        .is_some(),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert_eq!(
        log.matches("refused the issued certificate").count(),
        2,
        "{log}"
    );
    assert!(log.contains("does not chain to the fleet CA"), "{log}");
    assert!(log.contains("for another key than ours"), "{log}");
    assert!(log.contains("unreadable answer"), "{log}");
    assert!(
        !config.with_file_name("device.crt").exists(),
        "a forged certificate was installed"
    );
    drop(forger);
    drop(forgeries);

    // The real fleet answers the next request: the unit comes online.
    fleet.start_service();
    fleet.wait_device("sn-0001", LONG, "online", |d| d.online);
    let cert = std::fs::read_to_string(config.with_file_name("device.crt")).unwrap();
    assert!(cert.contains(fleet.env.pki.pki().issuing_pem().trim()));
}

fn issued(id: &str, chain: &str) -> Vec<u8> {
    serde_json::to_vec(&Response::Issued {
        device_id: DeviceId::new(id).unwrap(),
        chain_pem: chain.to_owned(),
    })
    .unwrap()
}

fn foreign_ca() -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "evil root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rcgen::Issuer::new(p, key)
}

fn sign_with(ca: &rcgen::Issuer<'static, rcgen::KeyPair>, csr: &str, cn: &str) -> String {
    let req = rcgen::CertificateSigningRequestParams::from_pem(csr).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.signed_by(&req.public_key, ca).unwrap().pem()
}

#[test]
fn a_claim_identity_cannot_touch_device_topics() {
    let fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001"]);
    let claim = claim_identity(&bundle);
    let op = TestClient::connect(&fleet.env.pki.operator, &fleet.env.broker).unwrap();
    op.subscribe("edgebind/v2/#").unwrap();
    let target = DeviceId::new("sn-0001").unwrap();
    let topics = [
        edgebind_protocol::topics::Topic::Status(target.clone()).render(),
        edgebind_protocol::topics::Topic::Telemetry(target.clone()).render(),
    ];
    let mut clients = Vec::new();
    for port in [fleet.env.broker.port(), provisioning(&fleet)] {
        let c = TestClient::connect_addr(
            &claim,
            fleet.env.broker.host(),
            port,
            ClientOptions {
                client_id: Some("SN-0001".into()),
                ..ClientOptions::default()
            },
        )
        .unwrap();
        for t in &topics {
            assert_eq!(
                c.publish(t, b"{\"forged\":true}", QoS::AtLeastOnce, true)
                    .unwrap(),
                Some(PubAckReason::NotAuthorized),
                "claim identity on port {port}: {t}"
            );
        }
        // Mosquitto grants subscriptions and checks each delivery.
        c.subscribe(&edgebind_protocol::topics::Kind::Cmd.filter_for(&target))
            .unwrap();
        clients.push(c);
    }
    let cmd = edgebind_protocol::topics::Topic::Cmd(
        target.clone(),
        edgebind_protocol::CommandId::new("probe").unwrap(),
    )
    .render();
    assert_eq!(
        op.publish(&cmd, b"{}", QoS::AtLeastOnce, false).unwrap(),
        Some(PubAckReason::Success)
    );
    assert!(op.wait_for_topic(&cmd, LONG).is_some());
    std::thread::sleep(QUIET);
    for c in &clients {
        assert!(
            c.received().is_empty(),
            "a claim identity read a device command: {:?}",
            c.received()
        );
    }
    let got = op.received();
    assert!(
        got.iter()
            .all(|m| !String::from_utf8_lossy(&m.payload).contains("forged")),
        "a denied publish arrived: {got:?}"
    );
}

#[test]
fn revoking_a_batch_claim_stops_new_provisioning_and_keeps_provisioned_devices_online() {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001", "SN-0002"]);
    fleet.start_service();
    let c1 = unit(&fleet, &bundle, "u1", "SN-0001");
    let _a1 = fleet.spawn_agent(&c1);
    fleet.wait_device("sn-0001", LONG, "online", |d| d.online);

    fleet.cli_ok(&["pki", "revoke", &format!("claim:{BATCH}")]);
    let c2 = unit(&fleet, &bundle, "u2", "SN-0002");
    let a2 = fleet.spawn_agent(&c2);
    // The broker refuses the revoked claim certificate (CRL); were it let
    // through, the fleet would refuse it too (fleet::ops tests).
    assert!(
        wait_log(&a2, "provisioning connection failed", LONG),
        "{}",
        a2.log()
    );
    std::thread::sleep(QUIET);
    assert!(
        fleet
            .store()
            .device(&DeviceId::new("sn-0002").unwrap())
            .is_err()
    );
    assert!(!c2.with_file_name("device.crt").exists());
    let d1 = fleet
        .store()
        .device(&DeviceId::new("sn-0001").unwrap())
        .unwrap();
    assert!(d1.online, "the provisioned device went offline");
    assert_ne!(d1.lifecycle, edgebind_fleet::registry::Lifecycle::Revoked);
    // And it is still served: an operator's ping gets its answer.
    fleet.cli_ok(&["send", "sn-0001", "ping"]);
}

/// The shared subscription under a tray of units: two `fleet serve`
/// instances on one PostgreSQL registry, 20 units of one batch booting at
/// once. Each unit is provisioned exactly once (one certificate per serial,
/// the one the unit holds), every unit comes online, and both instances did
/// part of the work.
#[test]
fn twenty_units_booting_at_once_are_provisioned_once_each_by_two_instances_on_postgresql() {
    const UNITS: usize = 20;
    let fleet = Fleet::start_on_postgres();
    let serials: Vec<String> = (1..=UNITS).map(|i| format!("SN-{i:04}")).collect();
    let serial_refs: Vec<&str> = serials.iter().map(String::as_str).collect();
    let bundle = claim_batch(&fleet, &serial_refs);
    let instances = [
        fleet.start_instance("fleet", 1),
        fleet.start_instance("fleet-2", 1),
    ];
    for i in &instances {
        assert!(
            wait_log(i, "provisioning listener connected", LONG),
            "{}",
            i.log()
        );
    }
    let configs: Vec<PathBuf> = serials
        .iter()
        .enumerate()
        .map(|(n, s)| unit(&fleet, &bundle, &format!("u{n}"), s))
        .collect();
    let t_boot = std::time::Instant::now();
    let agents: Vec<Proc> = configs.iter().map(|c| fleet.spawn_agent(c)).collect();

    let store = fleet.store();
    let inventory = || fleet.env.pki.pki().inventory().unwrap();
    for (serial, config) in serials.iter().zip(&configs) {
        let id = serial.to_ascii_lowercase();
        // Generous: 20 agents and two instances share a loaded machine.
        let device = fleet.wait_device(&id, 3 * LONG, "online", |d| d.online);
        // One certificate for the serial, and it is the one the unit holds.
        let inv = inventory();
        let issued: Vec<_> = inv.by_cn(&id).collect();
        assert_eq!(issued.len(), 1, "{id} was issued {issued:?}");
        assert_eq!(
            device.cert.as_ref().map(|c| &c.fingerprint_sha256),
            Some(&issued[0].fingerprint_sha256),
            "{id}: the registry holds another certificate than the one issued"
        );
        let cert = std::fs::read_to_string(config.with_file_name("device.crt")).unwrap();
        let entry = store
            .claim_serial(&UnitSerial::new(serial).unwrap())
            .unwrap()
            .unwrap();
        let done = entry.provisioned.expect("the serial is provisioned");
        assert_eq!(done.device.as_str(), id);
        assert_eq!(
            done.key_sha256,
            edgebind_certs::csr::cert_key_sha256(&cert).unwrap(),
            "{id}: the unit's certificate is not the provisioned one"
        );
        assert_eq!(mode(&config.with_file_name("device.key")), 0o600);
    }
    for (agent, serial) in agents.iter().zip(&serials) {
        assert!(
            !agent.log().contains("refused the issued certificate"),
            "{serial}: {}",
            agent.log()
        );
    }
    // The broker shared the requests between the instances.
    let provisioned_by = |i: &Proc| -> std::collections::BTreeSet<String> {
        i.log()
            .lines()
            .filter(|l| l.contains("unit provisioned"))
            .filter_map(|l| serials.iter().find(|s| l.contains(s.as_str())).cloned())
            .collect()
    };
    let (a, b) = (provisioned_by(&instances[0]), provisioned_by(&instances[1]));
    assert!(
        !a.is_empty() && !b.is_empty(),
        "one instance did all the work: {a:?} / {b:?}"
    );
    assert_eq!(a.union(&b).count(), UNITS, "{a:?} / {b:?}");
    println!(
        "{UNITS} units provisioned once each, online and checked {:.1}s after they booted: {} by instance fleet, {} by fleet-2",
        t_boot.elapsed().as_secs_f64(),
        a.len(),
        b.len()
    );
}
