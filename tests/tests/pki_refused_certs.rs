//! Certificates the broker must refuse, each tried against a real Mosquitto
//! running the generated configuration, next to a valid control identity
//! that connects (so a refusal is never just a broken broker), with the
//! hostile-name crowd connected throughout (it must receive nothing).

use edgebind_certs::Validity;
use edgebind_certs::profile;
use edgebind_protocol::Principal;
use edgebind_tests::{ClientOptions, HostileCrowd, Identity, QoS, TestClient, TestFleet, TestPki};
use rcgen::{DistinguishedName, ExtendedKeyUsagePurpose};
use time::{Duration, OffsetDateTime};

fn dev(cn: &str) -> Principal {
    Principal::from_cn(cn).unwrap()
}

fn refused(fleet: &TestFleet, ident: &Identity, opts: ClientOptions) -> String {
    match TestClient::connect_with(ident, &fleet.broker, opts) {
        Ok(client) => {
            // Connected? Then it must at least be unable to do anything.
            let ack = client.publish(
                &format!("edgebind/v2/status/{}", ident.name),
                b"x",
                QoS::AtLeastOnce,
                false,
            );
            panic!("{} connected (publish: {ack:?})", ident.name)
        }
        Err(e) => {
            eprintln!("refused as expected: {e}");
            e.to_string()
        }
    }
}

/// The valid control identity connects and publishes; the hostile crowd,
/// connected since the start, received nothing that is not its own.
fn assert_control_connects(fleet: &TestFleet, crowd: &HostileCrowd) {
    let ok = fleet.pki.device("control");
    let control =
        TestClient::connect(&ok, &fleet.broker).expect("a valid device certificate connects");
    let status = edgebind_protocol::topics::Topic::Status("control".parse().unwrap()).render();
    control
        .publish(&status, b"x", QoS::AtLeastOnce, true)
        .unwrap();
    crowd.assert_received_nothing_foreign();
}

#[test]
fn certificate_from_a_foreign_ca_is_refused() {
    let fleet = TestFleet::start();
    let crowd = HostileCrowd::connect(&fleet);
    let foreign = TestPki::new();
    let mut ident = foreign.device("dev-a");
    ident.ca = fleet.pki.root_ca(); // trust our broker, present the foreign cert
    let why = refused(&fleet, &ident, ClientOptions::default());
    assert!(why.contains("UnknownCA"), "{why}");
    assert_control_connects(&fleet, &crowd);
}

#[test]
fn expired_certificate_is_refused() {
    let fleet = TestFleet::start();
    let crowd = HostileCrowd::connect(&fleet);
    let now = OffsetDateTime::now_utc();
    let params = profile::client(
        &dev("dev-old"),
        Validity::between(now - Duration::days(30), now - Duration::days(1)),
    )
    .unwrap();
    let ident = fleet.pki.custom("dev-old", params);
    let why = refused(&fleet, &ident, ClientOptions::default());
    assert!(why.contains("CertificateExpired"), "{why}");
    assert_control_connects(&fleet, &crowd);
}

#[test]
fn revoked_certificate_is_refused() {
    let mut fleet = TestFleet::start();
    let crowd = HostileCrowd::connect(&fleet);
    let ident = fleet.pki.device("dev-gone");
    TestClient::connect(&ident, &fleet.broker)
        .expect("valid before revocation")
        .disconnect();
    fleet.pki.revoke("dev-gone");
    fleet.broker.reload().unwrap();
    let why = refused(&fleet, &ident, ClientOptions::default());
    assert!(why.contains("CertificateRevoked"), "{why}");
    assert_control_connects(&fleet, &crowd);
}

#[test]
fn certificate_without_cn_is_refused() {
    let fleet = TestFleet::start();
    let crowd = HostileCrowd::connect(&fleet);
    let mut params = profile::client(&dev("dev-nocn"), Validity::days(1)).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::DnsName("dev-nocn".try_into().unwrap())];
    let ident = fleet.pki.custom("dev-nocn", params);
    let why = refused(&fleet, &ident, ClientOptions::default());
    // TLS accepts it (the chain is valid); Mosquitto has no username to use.
    assert!(why.contains("BadUserNamePassword"), "{why}");
    assert_control_connects(&fleet, &crowd);
}

#[test]
fn server_auth_only_certificate_is_refused_as_client() {
    let fleet = TestFleet::start();
    let crowd = HostileCrowd::connect(&fleet);
    let mut params = profile::client(&dev("dev-srv"), Validity::days(1)).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let ident = fleet.pki.custom("dev-srv", params);
    let why = refused(&fleet, &ident, ClientOptions::default());
    assert!(why.contains("UnsupportedCertificate"), "{why}");
    assert_control_connects(&fleet, &crowd);
}

#[test]
fn connection_without_client_certificate_is_refused() {
    let fleet = TestFleet::start();
    let crowd = HostileCrowd::connect(&fleet);
    let ident = fleet.pki.device("dev-a");
    let opts = ClientOptions {
        no_client_cert: true,
        ..Default::default()
    };
    let why = refused(&fleet, &ident, opts);
    assert!(why.contains("CertificateRequired"), "{why}");
    assert_control_connects(&fleet, &crowd);
}
