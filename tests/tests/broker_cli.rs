//! `edgebind broker config/run/reload` and `edgebind pki revoke` end to end:
//! the real binary generates the configuration, runs Mosquitto in the
//! foreground and reloads it through the pid file.

use edgebind_tests::metrics::{metric, scrape};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgebind_tests::cli::{broker_home, free_port, run, show};
use edgebind_tests::{
    ClientOptions, Identity, PubAckReason, QoS, TestClient, bin_path, wait_until,
};

/// `edgebind broker run` in the background, killed on Drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn home() -> tempfile::TempDir {
    broker_home("edgebind-cli-")
}

#[test]
fn config_run_reload_and_revoke_with_the_cli() {
    let tmp = home();
    let home = tmp.path();
    assert!(
        run(home, &["pki", "init", "--fleet", "acme"])
            .status
            .success()
    );
    let port = free_port().unwrap().to_string();
    let out = run(
        home,
        &[
            "broker",
            "config",
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    let conf = std::fs::read_to_string(home.join("broker/mosquitto.conf")).unwrap();
    for line in [
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        "set_tcp_nodelay true",
        "max_packet_size 262144",
        &format!("listener {port} 127.0.0.1"),
    ] {
        assert!(
            conf.lines().any(|l| l == line),
            "missing {line:?} in:\n{conf}"
        );
    }
    assert_eq!(
        conf.matches("\nlistener ").count(),
        1,
        "one (TLS) listener only"
    );
    let key_mode = std::fs::metadata(home.join("broker/server.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );

    // Re-running keeps the server certificate; --renew-cert replaces it.
    let again = run(home, &["broker", "config"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("kept the existing server certificate"),
        "{}",
        show(&again)
    );
    let port: u16 = port.parse().unwrap();

    let log = std::fs::File::create(home.join("broker.log")).unwrap();
    let metrics_port = free_port().unwrap();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let child = Command::new(bin_path("edgebind"))
        .arg("--home")
        .arg(home)
        .args(["broker", "run", "--metrics", &metrics_addr])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let broker_pid = child.id();
    let _running = Running(child);
    assert!(
        wait_until(Duration::from_secs(20), || TcpStream::connect((
            Ipv4Addr::LOCALHOST,
            port
        ))
        .is_ok()),
        "broker did not come up:\n{}",
        std::fs::read_to_string(home.join("broker.log")).unwrap_or_default()
    );
    let pid_file = std::fs::read_to_string(home.join("broker/mosquitto.pid")).unwrap();
    assert_eq!(
        pid_file.trim(),
        broker_pid.to_string(),
        "the pid file names `broker run` (it forwards SIGHUP to its mosquitto child)"
    );

    let out = run(
        home,
        &["pki", "issue", "device", "dev-a", "--board", "qemux86-64"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let dev = Identity::from_dir(&home.join("bundles/dev-a"), "device", "dev-a");
    let op = Identity::from_dir(&home.join("operator"), "client", "operator:admin");
    let op = TestClient::connect_addr(&op, "127.0.0.1", port, ClientOptions::default()).unwrap();
    let a = TestClient::connect_addr(&dev, "localhost", port, ClientOptions::default()).unwrap();
    op.subscribe("edgebind/v2/#").unwrap();
    let ack = a
        .publish("edgebind/v2/status/dev-a", b"on", QoS::AtLeastOnce, false)
        .unwrap();
    assert_eq!(ack, Some(PubAckReason::Success));

    // A command waiting for dev-a, to see `pki revoke` drop it like `revoke` does.
    let queued = run(home, &["send", "dev-a", "ping", "--queue", "--json"]);
    assert!(queued.status.success(), "{}", show(&queued));

    let out = run(home, &["pki", "revoke", "dev-a"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reloaded"),
        "{}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("registry: dev-a is revoked, 1 queued command(s) dropped"),
        "{}",
        show(&out)
    );
    let shown = run(home, &["device", "show", "dev-a", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["device"]["lifecycle"], "revoked", "{shown}");
    assert_eq!(shown["commands"][0]["state"], "rejected", "{shown}");
    // The CLI's SIGHUP is handled asynchronously: wait for the deny to bite.
    assert!(
        wait_until(Duration::from_secs(10), || {
            a.publish("edgebind/v2/status/dev-a", b"x", QoS::AtLeastOnce, false)
                .unwrap()
                == Some(PubAckReason::NotAuthorized)
        }),
        "revocation did not reach the open connection"
    );
    assert!(
        op.is_connected() && op.connack_count() == 1,
        "the operator was not disturbed"
    );

    let out = run(home, &["broker", "reload"]);
    assert!(out.status.success(), "{}", show(&out));

    // The supervisor's metrics: Mosquitto up, the CRL's expiry as in the
    // CRL file, and the reloads `pki revoke` and `broker reload` caused.
    let crl =
        edgebind_certs::pki::crl_status(&home.join("broker").join(edgebind_broker::layout::CRL))
            .unwrap();
    let text = edgebind_tests::wait_for(Duration::from_secs(20), || {
        let t = scrape(metrics_port);
        (metric(&t, "edgebind_broker_reloads_total").is_some_and(|n| n >= 2.0)).then_some(t)
    })
    .unwrap_or_else(|| panic!("reloads never counted:\n{}", scrape(metrics_port)));
    assert_eq!(metric(&text, "edgebind_broker_up"), Some(1.0), "{text}");
    let expiry = metric(&text, "edgebind_broker_crl_expiry_seconds").unwrap();
    let expected = (crl.next_update - time::OffsetDateTime::now_utc()).whole_seconds() as f64;
    assert!(
        (expiry - expected).abs() < 60.0,
        "{expiry} vs {expected}: {text}"
    );
    assert!(expiry > 0.0, "{text}");
    assert_eq!(
        metric(&text, "edgebind_broker_crl_refresh_failures_total"),
        Some(0.0)
    );
    assert!(
        metric(&text, "edgebind_broker_uptime_seconds").is_some(),
        "{text}"
    );
}

#[test]
fn broker_run_refuses_metrics_on_a_non_loopback_address() {
    let tmp = home();
    let home = tmp.path();
    assert!(
        run(home, &["pki", "init", "--fleet", "acme"])
            .status
            .success()
    );
    let port = free_port().unwrap().to_string();
    assert!(
        run(
            home,
            &["broker", "config", "--host", "localhost", "--port", &port]
        )
        .status
        .success()
    );
    let out = run(home, &["broker", "run", "--metrics", "0.0.0.0:9465"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{}",
        show(&out)
    );
    assert!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, port.parse::<u16>().unwrap())).is_err(),
        "mosquitto must not have been started"
    );
}

#[test]
fn clear_errors_for_missing_mosquitto_and_missing_configuration() {
    let tmp = home();
    let home = tmp.path();
    let out = run(home, &["broker", "run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("edgebind broker config"),
        "{}",
        show(&out)
    );

    assert!(
        run(home, &["pki", "init", "--fleet", "acme"])
            .status
            .success()
    );
    let out = run(home, &["broker", "config"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--host"),
        "{}",
        show(&out)
    );

    assert!(
        run(home, &["broker", "config", "--host", "localhost"])
            .status
            .success()
    );
    let out = Command::new(bin_path("edgebind"))
        .arg("--home")
        .arg(home)
        .args(["broker", "run"])
        .env("EDGEBIND_MOSQUITTO", "/nonexistent/mosquitto")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mosquitto was not found"),
        "{}",
        show(&out)
    );

    let out = run(home, &["broker", "reload"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not reloaded"),
        "{}",
        show(&out)
    );
}

/// `edgebind broker audit` flags a certificate whose name the fleet must not
/// sign (here an entry an older edgebind could have written: an upper-case
/// id, and a `/` name) and fails while one is usable; revoking it clears
/// the failure but keeps it listed.
#[test]
fn broker_audit_flags_misissued_certificates() {
    let tmp = home();
    let home = tmp.path();
    assert!(
        run(home, &["pki", "init", "--fleet", "acme"])
            .status
            .success()
    );
    let clean = run(home, &["broker", "audit"]);
    assert!(clean.status.success(), "{}", show(&clean));

    let path = home.join("pki/inventory.json");
    let mut inv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let template = inv["entries"][0].clone();
    for (serial, cn) in [("aa01", "Dev-B"), ("aa02", "dev-b/cmd")] {
        let mut e = template.clone();
        e["serial"] = serial.into();
        e["cn"] = cn.into();
        e["role"] = "device".into();
        e["revoked_at"] = serde_json::Value::Null;
        inv["entries"].as_array_mut().unwrap().push(e);
    }
    std::fs::write(&path, serde_json::to_string(&inv).unwrap()).unwrap();

    let flagged = run(home, &["broker", "audit"]);
    assert_eq!(flagged.status.code(), Some(1), "{}", show(&flagged));
    let text = String::from_utf8_lossy(&flagged.stdout);
    assert!(
        text.contains("\"Dev-B\"") && text.contains("lowercase"),
        "{text}"
    );
    assert!(
        text.contains("\"dev-b/cmd\"") && text.contains("'/'"),
        "{text}"
    );
    let json = run(home, &["broker", "audit", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["findings"].as_array().unwrap().len(), 2, "{v}");

    for e in inv["entries"].as_array_mut().unwrap() {
        if e["serial"].as_str().unwrap().starts_with("aa") {
            e["revoked_at"] = e["issued_at"].clone();
        }
    }
    std::fs::write(&path, serde_json::to_string(&inv).unwrap()).unwrap();
    let revoked = run(home, &["broker", "audit"]);
    assert!(revoked.status.success(), "{}", show(&revoked));
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("2 flagged, 0 of them still usable"));
}
