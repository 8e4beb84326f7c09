//! An expired device is not bricked: a unit provisioned by the claim flow
//! whose certificate expired while it was offline re-provisions under its
//! own id through its batch's claim identity, and nothing else may
//! (real Mosquitto with its provisioning listener, `edgebind fleet serve`
//! and real `edgebind-agent` processes; the policy is
//! `fleet::registry::rules::check_reprovision`).

mod fleet_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgebind_fleet::registry::{CertInfo, CertOrigin, CertState};
use edgebind_protocol::messages::now_unix;
use edgebind_protocol::provision::{Leg, Request, Response};
use edgebind_protocol::{DeviceId, UnitSerial};
use edgebind_tests::{ClientOptions, Identity, QoS, TestClient, wait_until};
use fleet_support::{AgentTweaks, Fleet, LONG};

const BATCH: &str = "line-1";
/// Re-provisioning waits for the claim backoff (up to a minute) after the
/// broker is back, on a loaded machine.
const RECOVER_WAIT: Duration = Duration::from_secs(180);

fn batch() -> DeviceId {
    DeviceId::new(BATCH).unwrap()
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
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
    std::fs::write(&list, serials.join("\n")).unwrap();
    fleet.cli_ok(&[
        "factory",
        "allow",
        "--batch",
        BATCH,
        "--serials",
        list.to_str().unwrap(),
    ]);
    out
}

/// A unit's copy of the claim bundle, configured for the test.
fn unit(fleet: &Fleet, bundle: &Path, name: &str, serial: &str) -> PathBuf {
    let dir = fleet.home().join("units").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(bundle).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let config = fleet.agent_config(&dir, &AgentTweaks::default());
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let claim = doc.get_mut("claim").unwrap().as_table_mut().unwrap();
    claim.remove("serial_file");
    claim.insert("serial".into(), serial.into());
    claim.insert("response_timeout_s".into(), 5.into());
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    config
}

fn provisioning(fleet: &Fleet) -> u16 {
    fleet.env.broker.provisioning_port().unwrap()
}

/// Ask the fleet, as unit `serial` holding the batch's claim key (a raw
/// client, not the agent), for a certificate naming `cn` with a new key.
fn ask(fleet: &Fleet, bundle: &Path, serial: &str, cn: &str) -> Response {
    let claim = Identity::from_dir(bundle, "claim", &format!("claim:{BATCH}"));
    let client = TestClient::connect_addr(
        &claim,
        fleet.env.broker.host(),
        provisioning(fleet),
        ClientOptions {
            client_id: Some(serial.into()),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let serial = UnitSerial::new(serial).unwrap();
    let response = Leg::Response.topic(&batch(), &serial);
    client.subscribe(&response).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();
    client
        .publish(
            &Leg::Request.topic(&batch(), &serial),
            &serde_json::to_vec(&Request { csr_pem }).unwrap(),
            QoS::AtLeastOnce,
            false,
        )
        .unwrap();
    let got = client
        .wait_for_topic(&response, LONG)
        .expect("the fleet answers on the unit's response topic");
    serde_json::from_slice(&got.payload).unwrap()
}

fn refused(r: Response) -> String {
    match r {
        Response::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn certificates_of(fleet: &Fleet, cn: &str) -> usize {
    fleet.env.pki.pki().inventory().unwrap().by_cn(cn).count()
}

#[test]
fn an_agent_whose_certificate_expired_while_the_broker_was_away_recovers_through_its_claim_identity()
 {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001"]);
    fleet.start_service();
    let config = unit(&fleet, &bundle, "u1", "SN-0001");
    let dir = config.parent().unwrap().to_owned();
    let mut agent = fleet.spawn_agent(&config);
    let dev = id("sn-0001");
    let claimed = fleet.wait_device("sn-0001", LONG, "online", |d| d.online);
    agent.terminate();
    // The claim key stays on the unit (0600): it is what recovery needs.
    assert!(dir.join("claim.key").exists());

    let short = short_lived(&fleet, &dir, &dev, 25, &claimed.cert.unwrap().serial);
    let short_not_after = short.not_after.unix_timestamp() as u64;
    let old = fleet.home().join("old-identity");
    std::fs::create_dir_all(&old).unwrap();
    for f in ["device.crt", "device.key", "ca.crt"] {
        std::fs::copy(dir.join(f), old.join(f)).unwrap();
    }

    // Online with it, then the broker goes away until the certificate expired.
    let started = now_unix();
    let agent = fleet.spawn_agent(&config);
    fleet.wait_device("sn-0001", LONG, "online with the short certificate", |d| {
        d.online && d.connected_at.is_some_and(|t| t >= started)
    });
    fleet.env.broker.stop();
    assert!(
        wait_until(LONG, || now_unix() > short_not_after + 1),
        "the certificate did not expire"
    );
    let back = now_unix();
    fleet.env.broker.restart().unwrap();

    // The agent re-provisions the same id with a new key and comes online.
    let device = fleet.wait_device("sn-0001", RECOVER_WAIT, "re-provisioned and online", |d| {
        d.online
            && d.connected_at.is_some_and(|t| t >= back)
            && d.cert.as_ref().is_some_and(|c| c.serial != short.serial)
    });
    let log = agent.log();
    assert!(
        log.contains("the device certificate has expired: re-provisioning"),
        "{log}"
    );
    assert!(log.contains("claiming the device identity again"), "{log}");
    let cert = std::fs::read_to_string(dir.join("device.crt")).unwrap();
    let key_sha = edgebind_certs::csr::cert_key_sha256(&cert).unwrap();
    assert_ne!(
        key_sha,
        edgebind_certs::csr::cert_key_sha256(&short.chain_pem).unwrap(),
        "the new certificate is for a new key"
    );
    assert_eq!(
        edgebind_certs::inspect::first_cert_cn(&dir.join("device.crt")).unwrap(),
        "sn-0001"
    );
    assert!(!dir.join("state").join("enroll").exists());

    // The registry's history shows the re-provisioning; the expired
    // certificate is retired and in the CRL.
    let history = fleet.store().cert_history(&dev).unwrap();
    let last = history.last().unwrap();
    assert_eq!(
        (last.origin, last.state, last.serial.as_str()),
        (
            CertOrigin::Reprovisioned,
            CertState::Current,
            device.cert.as_ref().unwrap().serial.as_str()
        ),
        "{history:?}"
    );
    assert!(
        history
            .iter()
            .any(|r| r.serial == short.serial && r.state == CertState::Retired),
        "{history:?}"
    );
    let inventory = fleet.env.pki.pki().inventory().unwrap();
    assert!(
        inventory
            .by_serial(&short.serial)
            .is_some_and(|e| e.revoked_at.is_some()),
        "the expired certificate is not revoked"
    );
    let audit = fleet.store().audit_log(20, None).unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.action == "device.reprovision" && e.target == "sn-0001"),
        "{audit:?}"
    );

    // The old certificate is refused by the broker.
    let why = TestClient::connect(
        &Identity::from_dir(&old, "device", "sn-0001"),
        &fleet.env.broker,
    )
    .err()
    .expect("the broker accepted the expired certificate")
    .to_string();
    assert!(
        why.contains("CertificateExpired") || why.contains("Revoked"),
        "{why}"
    );
}

/// Replace the unit's certificate with one valid `secs` (the fleet's PKI,
/// a new key, the registry told), as a fleet with short lifetimes would
/// have issued it; the certificate `replaced` is revoked.
fn short_lived(
    fleet: &Fleet,
    dir: &Path,
    dev: &DeviceId,
    secs: u64,
    replaced: &str,
) -> edgebind_certs::IssuedCert {
    let pki = edgebind_certs::Pki::open(&fleet.home().join("pki")).unwrap();
    let short = pki
        .issue_device(dev, edgebind_certs::Validity::seconds(secs))
        .unwrap();
    pki.revoke_serial(replaced).unwrap();
    std::fs::write(dir.join("device.crt"), &short.chain_pem).unwrap();
    std::fs::write(dir.join("device.key"), &short.key_pem).unwrap();
    fleet
        .store()
        .set_certificate(
            dev,
            &CertInfo {
                serial: short.serial.clone(),
                fingerprint_sha256: short.fingerprint_sha256.clone(),
                not_after: short.not_after.unix_timestamp() as u64,
            },
        )
        .unwrap();
    short
}

#[test]
fn an_agent_started_with_an_expired_certificate_reprovisions_before_it_runs() {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001"]);
    fleet.start_service();
    let config = unit(&fleet, &bundle, "u1", "SN-0001");
    let dir = config.parent().unwrap().to_owned();
    let mut agent = fleet.spawn_agent(&config);
    let dev = id("sn-0001");
    let claimed = fleet.wait_device("sn-0001", LONG, "online", |d| d.online);
    agent.terminate();
    // Offline across the expiry of its certificate.
    let short = short_lived(&fleet, &dir, &dev, 3, &claimed.cert.unwrap().serial);
    let expiry = short.not_after.unix_timestamp() as u64;
    assert!(wait_until(LONG, || now_unix() > expiry + 1));
    let started = now_unix();
    let agent = fleet.spawn_agent(&config);
    let device = fleet.wait_device("sn-0001", RECOVER_WAIT, "re-provisioned and online", |d| {
        d.online
            && d.connected_at.is_some_and(|t| t >= started)
            && d.cert.as_ref().is_some_and(|c| c.serial != short.serial)
    });
    let log = agent.log();
    assert!(
        log.contains("expired while the device was offline: re-provisioning the same id"),
        "{log}"
    );
    let last = fleet.store().cert_history(&dev).unwrap().pop().unwrap();
    assert_eq!(last.origin, CertOrigin::Reprovisioned);
    assert_eq!(last.serial, device.cert.unwrap().serial);
}

#[test]
fn only_an_expired_live_device_may_reprovision_and_only_under_its_own_serial() {
    let mut fleet = Fleet::start();
    let bundle = claim_batch(&fleet, &["SN-0001", "SN-0002", "SN-0003"]);
    fleet.start_service();
    let c1 = unit(&fleet, &bundle, "u1", "SN-0001");
    let c2 = unit(&fleet, &bundle, "u2", "SN-0002");
    let _a1 = fleet.spawn_agent(&c1);
    let mut a2 = fleet.spawn_agent(&c2);
    let d1 = fleet.wait_device("sn-0001", LONG, "online", |d| d.online);
    fleet.wait_device("sn-0002", LONG, "online", |d| d.online);
    a2.terminate();

    // A device whose certificate is valid: refused, whoever holds the
    // batch key; it renews over its own connection.
    let why = refused(ask(&fleet, &bundle, "SN-0001", "sn-0001"));
    assert!(why.contains("renews over its own connection"), "{why}");
    // Another device's id under a provisioned serial, or under a serial not
    // provisioned yet: refused; the id never moves to another serial.
    let why = refused(ask(&fleet, &bundle, "SN-0002", "sn-0001"));
    assert!(why.contains("device sn-0002 for good"), "{why}");
    let why = refused(ask(&fleet, &bundle, "SN-0003", "sn-0001"));
    assert!(why.contains("its serial names sn-0003"), "{why}");
    // A serial not on the list.
    let why = refused(ask(&fleet, &bundle, "SN-9999", "sn-9999"));
    assert!(why.contains("not on the allow-list"), "{why}");

    // A revoked device, its certificate expired by the registry's record:
    // refused all the same.
    let d2 = id("sn-0002");
    let mut cert = fleet.store().device(&d2).unwrap().cert.unwrap();
    cert.not_after = now_unix() - 60;
    fleet.store().set_certificate(&d2, &cert).unwrap();
    fleet.cli_ok(&["revoke", "sn-0002"]);
    let why = refused(ask(&fleet, &bundle, "SN-0002", "sn-0002"));
    assert!(why.contains("revoked"), "{why}");

    // Nothing was signed or changed by any of it.
    assert_eq!(certificates_of(&fleet, "sn-0001"), 1);
    assert_eq!(certificates_of(&fleet, "sn-0002"), 1);
    assert_eq!(certificates_of(&fleet, "sn-0003"), 0);
    assert_eq!(fleet.store().device(&id("sn-0001")).unwrap().cert, d1.cert);
    let log = fleet.service_log();
    assert!(
        log.contains("claim refused") && log.contains("renews over its own connection"),
        "{log}"
    );
}
