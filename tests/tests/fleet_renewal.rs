//! Certificate renewal over a device's own connection, against a real
//! Mosquitto and the real `edgebind fleet serve`: the device's side is
//! played by a test client with a key made here (rcgen), so every check of
//! the fleet and the broker is seen by what is delivered.

mod fleet_support;

use std::path::Path;
use std::time::Duration;

use edgebind_protocol::DeviceId;
use edgebind_protocol::renewal::{Leg, Request, Response};
use edgebind_tests::{ClientOptions, Identity, PubAckReason, QoS, TestClient, wait_for};
use fleet_support::{Fleet, LONG};
use rcgen::{CertificateParams, DnType, KeyPair};

fn csr(cn: &str, key: &KeyPair) -> String {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn connect(identity: &Identity, fleet: &Fleet) -> TestClient {
    TestClient::connect_with(
        identity,
        &fleet.env.broker,
        ClientOptions {
            clean_start: true,
            ..ClientOptions::default()
        },
    )
    .expect("connect")
}

fn current_serial(fleet: &Fleet, id: &str) -> String {
    fleet
        .store()
        .device(&DeviceId::new(id).unwrap())
        .unwrap()
        .cert
        .unwrap()
        .serial
}

/// Ask over `client`'s connection; the fleet's answer on its response topic.
fn ask(client: &TestClient, id: &str, request: &Request) -> Response {
    let d = DeviceId::new(id).unwrap();
    client.clear();
    let ack = client
        .publish(
            &Leg::Request.topic(&d),
            &serde_json::to_vec(request).unwrap(),
            QoS::AtLeastOnce,
            false,
        )
        .unwrap();
    assert_eq!(ack, Some(PubAckReason::Success));
    let got = client
        .wait_for_topic(&Leg::Response.topic(&d), LONG)
        .expect("an answer from the fleet");
    serde_json::from_slice(&got.payload).unwrap()
}

/// The new identity as files a client can present.
fn write_identity(dir: &Path, chain: &str, key: &KeyPair, ca: &Path) -> Identity {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("device.crt"), chain).unwrap();
    std::fs::write(dir.join("device.key"), key.serialize_pem()).unwrap();
    std::fs::copy(ca, dir.join("ca.crt")).unwrap();
    Identity::from_dir(dir, "device", "dev-a")
}

#[test]
fn a_device_renews_over_its_own_connection_and_its_previous_certificate_is_retired() {
    let mut fleet = Fleet::start();
    let bundle_a = fleet.add_device("dev-a", &[]);
    let bundle_b = fleet.add_device("dev-b", &[]);
    fleet.start_service_with(&[
        "--device-cert-seconds",
        "300",
        "--renewal-min-interval-s",
        "0",
        "--renewal-grace-s",
        "2",
    ]);
    let a_old = Identity::from_dir(&bundle_a, "device", "dev-a");
    let a = connect(&a_old, &fleet);
    let b = connect(&Identity::from_dir(&bundle_b, "device", "dev-b"), &fleet);
    let dev_a = DeviceId::new("dev-a").unwrap();
    a.subscribe(&Leg::Response.topic(&dev_a)).unwrap();
    // dev-b can neither read dev-a's answers nor ask in dev-a's name.
    let codes = b.subscribe(&Leg::Response.topic(&dev_a)).unwrap();
    eprintln!("dev-b subscribing to dev-a's response: {codes:?}");
    let key_b = KeyPair::generate().unwrap();
    let forged = Request::Renew {
        csr_pem: csr("dev-a", &key_b),
        current_serial: current_serial(&fleet, "dev-a"),
    };
    assert_eq!(
        b.publish(
            &Leg::Request.topic(&dev_a),
            &serde_json::to_vec(&forged).unwrap(),
            QoS::AtLeastOnce,
            false
        )
        .unwrap(),
        Some(PubAckReason::NotAuthorized)
    );

    let first = current_serial(&fleet, "dev-a");
    let key = KeyPair::generate().unwrap();
    let answer = ask(
        &a,
        "dev-a",
        &Request::Renew {
            csr_pem: csr("dev-a", &key),
            current_serial: first.clone(),
        },
    );
    let Response::Issued {
        serial, chain_pem, ..
    } = answer
    else {
        panic!("renewal refused: {answer:?}\n{}", fleet.service_log());
    };
    assert_ne!(serial, first);
    // Nothing of it reached dev-b.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        b.received().iter().all(|m| !m.topic.contains("renew")),
        "dev-b saw {:?}",
        b.received()
    );
    // Still the old one in the registry until the device connected with the new one.
    assert_eq!(current_serial(&fleet, "dev-a"), first);

    a.disconnect();
    let new = write_identity(
        &fleet.home().join("dev-a-renewed"),
        &chain_pem,
        &key,
        &bundle_a.join("ca.crt"),
    );
    let a2 = connect(&new, &fleet);
    a2.publish(
        &Leg::Request.topic(&dev_a),
        &serde_json::to_vec(&Request::Connected {
            serial: serial.clone(),
        })
        .unwrap(),
        QoS::AtLeastOnce,
        false,
    )
    .unwrap();
    fleet.wait_device("dev-a", LONG, "the renewed certificate current", |d| {
        d.cert.as_ref().is_some_and(|c| c.serial == serial)
    });
    // After the grace period the previous certificate is revoked and the
    // broker refuses it (CRL reloaded), while the renewed one still works.
    let pki = edgebind_certs::Pki::open(&fleet.home().join("pki")).unwrap();
    let revoked = wait_for(LONG, || {
        pki.inventory()
            .ok()?
            .by_serial(&first)
            .is_some_and(|e| e.is_revoked())
            .then_some(())
    });
    assert!(
        revoked.is_some(),
        "previous certificate not retired:\n{}",
        fleet.service_log()
    );
    let refused = wait_for(LONG, || {
        TestClient::connect(&a_old, &fleet.env.broker)
            .is_err()
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "the broker still takes the retired certificate"
    );
    drop(a2);
    let again = TestClient::connect(&new, &fleet.env.broker);
    assert!(
        again.is_ok(),
        "the renewed certificate is refused: {:?}",
        again.err()
    );
    let out = fleet.cli_ok(&["device", "show", "dev-a"]);
    assert!(out.contains(&serial) && out.contains("retired"), "{out}");
    let history = fleet.store().cert_history(&dev_a).unwrap();
    assert_eq!(history.len(), 2, "{history:#?}");
}

#[test]
fn a_mismatched_or_unreadable_request_is_refused_and_signs_nothing() {
    let mut fleet = Fleet::start();
    let bundle = fleet.add_device("dev-a", &[]);
    fleet.add_device("dev-b", &[]);
    fleet.start_service();
    let a = connect(&Identity::from_dir(&bundle, "device", "dev-a"), &fleet);
    let dev_a = DeviceId::new("dev-a").unwrap();
    a.subscribe(&Leg::Response.topic(&dev_a)).unwrap();
    let pki = edgebind_certs::Pki::open(&fleet.home().join("pki")).unwrap();
    let before = pki.inventory().unwrap().entries.len();
    let key = KeyPair::generate().unwrap();
    for (request, want) in [
        (
            Request::Renew {
                csr_pem: csr("dev-b", &key),
                current_serial: current_serial(&fleet, "dev-a"),
            },
            "asks for dev-b",
        ),
        (
            Request::Renew {
                csr_pem: csr("dev-a", &key),
                current_serial: current_serial(&fleet, "dev-b"),
            },
            "not the current certificate",
        ),
        (
            Request::Renew {
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
                current_serial: current_serial(&fleet, "dev-a"),
            },
            "certificate signing request",
        ),
    ] {
        match ask(&a, "dev-a", &request) {
            Response::Refused { reason, .. } => assert!(reason.contains(want), "{reason}"),
            other => panic!("{want}: {other:?}"),
        }
    }
    // Not JSON at all: refused too, and the service keeps going.
    a.clear();
    a.publish(
        &Leg::Request.topic(&dev_a),
        b"\xff{",
        QoS::AtLeastOnce,
        false,
    )
    .unwrap();
    let got = a
        .wait_for_topic(&Leg::Response.topic(&dev_a), LONG)
        .expect("an answer");
    assert!(matches!(
        serde_json::from_slice::<Response>(&got.payload).unwrap(),
        Response::Refused { .. }
    ));
    assert_eq!(
        pki.inventory().unwrap().entries.len(),
        before,
        "nothing signed"
    );
}

#[test]
fn a_real_agent_renews_several_times_in_a_row_and_the_history_follows() {
    let mut fleet = Fleet::start();
    let bundle = fleet.add_device("dev-r", &[]);
    // The first certificate as short-lived as the renewed ones (a renewal
    // must expire later than the certificate it replaces).
    let pki = edgebind_certs::Pki::open(&fleet.home().join("pki")).unwrap();
    let id = DeviceId::new("dev-r").unwrap();
    let first = pki
        .issue_device(&id, edgebind_certs::Validity::seconds(90))
        .unwrap();
    std::fs::write(bundle.join("device.crt"), &first.chain_pem).unwrap();
    std::fs::write(bundle.join("device.key"), &first.key_pem).unwrap();
    fleet
        .store()
        .set_certificate(
            &id,
            &edgebind_fleet::registry::CertInfo {
                serial: first.serial.clone(),
                fingerprint_sha256: first.fingerprint_sha256.clone(),
                not_after: first.not_after.unix_timestamp() as u64,
            },
        )
        .unwrap();
    fleet.start_service_with(&[
        "--device-cert-seconds",
        "90",
        "--renewal-min-interval-s",
        "0",
        "--renewal-grace-s",
        "1",
    ]);
    let config = fleet.agent_config(&bundle, &fleet_support::AgentTweaks::default());
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let mut renewal = toml::Table::new();
    renewal.insert("at_fraction".into(), 0.5.into());
    renewal.insert("trial_timeout_s".into(), 10.into());
    renewal.insert("retry_s".into(), 5.into());
    doc.insert("renewal".into(), renewal.into());
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    let agent = fleet.spawn_agent(&config);
    fleet.wait_device("dev-r", LONG, "online", |d| d.online);

    // Three renewals in a row, each confirmed by the agent connecting with it.
    let store = fleet.store();
    let done = wait_for(Duration::from_secs(240), || {
        let h = store.cert_history(&id).ok()?;
        let renewed = h
            .iter()
            .filter(|r| r.origin == edgebind_fleet::registry::CertOrigin::Renewed)
            .filter(|r| r.confirmed_at.is_some())
            .count();
        (renewed >= 3).then_some(h)
    });
    let Some(history) = done else {
        panic!(
            "not three renewals: {:#?}\nagent:\n{}\nservice:\n{}",
            store.cert_history(&id),
            agent.log(),
            fleet.service_log()
        );
    };
    use edgebind_fleet::registry::CertState;
    let current: Vec<_> = history
        .iter()
        .filter(|r| r.state == CertState::Current)
        .collect();
    assert_eq!(current.len(), 1, "{history:#?}");
    assert!(history[0].serial == first.serial && history[0].state != CertState::Current);
    // The agent's files hold the registry's current certificate.
    let on_disk = std::fs::read_to_string(bundle.join("device.crt")).unwrap();
    let dev = store.device(&id).unwrap();
    let current_serial = dev.cert.unwrap().serial;
    assert_eq!(current[0].serial, current_serial);
    assert_eq!(
        edgebind_certs::csr::cert_key_sha256(&on_disk).unwrap(),
        edgebind_certs::csr::cert_key_sha256(current[0].chain_pem.as_deref().unwrap()).unwrap()
    );
    // Past the first certificate's expiry and still online.
    fleet.wait_device("dev-r", LONG, "online", |d| d.online);
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}
