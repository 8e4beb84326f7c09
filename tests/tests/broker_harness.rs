//! The harness itself works end to end: generated config, real mosquitto,
//! mTLS clients, restart and reload, bundles.

use edgebind_protocol::DeviceId;
use edgebind_protocol::topics::Topic;
use edgebind_tests::{DEADLINE, PubAckReason, QoS, TestClient, TestFleet};

#[test]
fn device_status_reaches_operator_and_survives_restart_and_reload() {
    let mut fleet = TestFleet::start();
    let dev = fleet.pki.device("dev-a");
    let status = Topic::Status(DeviceId::new("dev-a").unwrap()).render();

    let op = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    op.subscribe("edgebind/v2/#").unwrap();
    let a = TestClient::connect(&dev, &fleet.broker).unwrap();
    let ack = a
        .publish(&status, b"online", QoS::AtLeastOnce, true)
        .unwrap();
    assert_eq!(ack, Some(PubAckReason::Success));
    let got = op
        .wait_for_topic(&status, DEADLINE)
        .expect("operator sees dev-a status");
    assert_eq!(got.payload, b"online");

    // Reload keeps both connections (same CONNACK count, still connected).
    fleet.broker.reload().unwrap();
    assert!(a.is_connected() && op.is_connected());
    assert_eq!(a.connack_count(), 1);

    // Restart: connections drop, retained status persists (persistence true).
    drop(a);
    drop(op);
    fleet.broker.restart().unwrap();
    let op = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    op.subscribe(&status).unwrap();
    let again = op
        .wait_for_topic(&status, DEADLINE)
        .expect("retained status after restart");
    assert!(again.retain);
    assert!(fleet.broker.log().contains("Reloading config"));
}

#[test]
fn bundle_has_four_files_key_private_and_tar_beside_it() {
    use std::os::unix::fs::PermissionsExt;
    let fleet = TestFleet::start();
    let dir = fleet.pki.bundle("dev-b", &fleet.broker);
    for f in ["agent.toml", "device.crt", "device.key", "ca.crt"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let mode = std::fs::metadata(dir.join("device.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let tar = dir.with_file_name("dev-b.tar");
    let list = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(&tar)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&list.stdout);
    for f in ["agent.toml", "device.crt", "device.key", "ca.crt"] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {f}"))),
            "{f} not at tar top level:\n{listing}"
        );
    }
    assert!(
        listing.contains("-rw------- ")
            && listing
                .lines()
                .any(|l| l.starts_with("-rw-------") && l.ends_with("device.key"))
    );
}

#[test]
fn start_moves_to_a_new_port_when_the_chosen_one_is_taken() {
    let pki = edgebind_tests::TestPki::new();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let mut settings = edgebind_broker::BrokerSettings::new(
        vec!["localhost".into()],
        vec!["127.0.0.1".parse().unwrap()],
    );
    settings.port = taken;
    settings.bind = "127.0.0.1".into();
    let broker = edgebind_tests::Broker::start_with(&pki, settings).unwrap();
    assert_ne!(broker.port(), taken);
    TestClient::connect(&pki.operator, &broker).unwrap();
}

/// A broker must not outlive a test process that is killed (no Drop runs).
#[test]
fn broker_dies_with_a_killed_test_process() {
    use std::io::{BufRead, BufReader};
    const CHILD: &str = "EDGEBIND_HARNESS_CHILD";
    if std::env::var_os(CHILD).is_some() {
        // Child role: start a broker, report its pid, then wait to be killed.
        let fleet = TestFleet::start();
        println!("BROKER_PID={}", fleet.broker.pid().unwrap());
        std::thread::sleep(std::time::Duration::from_secs(120));
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "broker_dies_with_a_killed_test_process",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let pid: u32 = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("BROKER_PID=").map(|p| p.parse().unwrap()))
        .expect("child reports its broker pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    child.kill().unwrap(); // SIGKILL: no destructor runs in the child
    child.wait().unwrap();
    let gone = edgebind_tests::wait_until(DEADLINE, || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split(' ').nth(2) == Some("Z"))
            .unwrap_or(true)
    });
    assert!(gone, "mosquitto {pid} outlived its killed test process");
}

/// The test client receives anything up to the protocol's packet limit.
#[test]
fn large_messages_reach_the_test_client() {
    let fleet = TestFleet::start();
    let dev = fleet.pki.device("dev-a");
    let topic = Topic::Telemetry(DeviceId::new("dev-a").unwrap()).render();
    let op = TestClient::connect(&fleet.pki.operator, &fleet.broker).unwrap();
    op.subscribe(&topic).unwrap();
    let a = TestClient::connect(&dev, &fleet.broker).unwrap();
    let big = vec![b'x'; 200 * 1024];
    assert_eq!(
        a.publish(&topic, &big, QoS::AtLeastOnce, false).unwrap(),
        Some(PubAckReason::Success)
    );
    let got = op
        .wait_for_topic(&topic, DEADLINE)
        .expect("200 KiB message delivered");
    assert_eq!(got.payload.len(), big.len());
}
