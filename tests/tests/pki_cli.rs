//! `edgebind pki ...` as an operator or a factory line uses it: the real
//! binary, its files, its exit codes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use edgebind_agent::config::AgentConfig;
use edgebind_certs::Inventory;
use edgebind_tests::cli::{run, show};
use edgebind_tests::{Broker, PubAckReason, QoS, TestClient, TestPki};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn inventory(home: &Path) -> Inventory {
    serde_json::from_str(&std::fs::read_to_string(home.join("pki/inventory.json")).unwrap())
        .unwrap()
}

#[test]
fn init_writes_private_keys_and_never_overwrites_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let out = run(
        home,
        &["pki", "init", "--fleet", "acme", "--operator", "alice"],
    );
    assert!(out.status.success(), "{}", show(&out));
    for key in [
        "pki/root-ca.key",
        "pki/issuing-ca.key",
        "operator/client.key",
        "identities/service-fleet/client.key",
    ] {
        assert_eq!(mode(&home.join(key)), 0o600, "{key}");
    }
    assert_eq!(mode(&home.join("pki")), 0o700);
    let root = std::fs::read(home.join("pki/root-ca.key")).unwrap();

    let again = run(home, &["pki", "init", "--fleet", "acme"]);
    assert_eq!(again.status.code(), Some(1), "{}", show(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{}",
        show(&again)
    );
    assert_eq!(
        std::fs::read(home.join("pki/root-ca.key")).unwrap(),
        root,
        "untouched"
    );

    let forced = run(home, &["pki", "init", "--fleet", "acme", "--force"]);
    assert!(forced.status.success(), "{}", show(&forced));
    assert_ne!(std::fs::read(home.join("pki/root-ca.key")).unwrap(), root);
}

#[test]
fn bad_device_ids_are_refused_with_a_clear_error_and_nothing_is_issued() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    assert!(
        run(home, &["pki", "init", "--fleet", "acme"])
            .status
            .success()
    );
    let before = inventory(home).entries.len();
    for bad in ["a/#", "+", "dev a", "%u", "operator:x", ""] {
        let out = run(home, &["pki", "issue", "device", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("device id"), "{bad:?}: {err}");
    }
    let out = run(home, &["pki", "bundle", "a/#", "--broker-host", "b"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("contains '/' at position 1"));

    let batch = home.join("ids.txt");
    std::fs::write(&batch, "good-1\n# comment\n\nbad/one\ngood-2\n").unwrap();
    let out = run(
        home,
        &[
            "pki",
            "issue",
            "device",
            "--batch",
            batch.to_str().unwrap(),
            "--broker-host",
            "b",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ids.txt:4"),
        "{}",
        show(&out)
    );
    assert_eq!(inventory(home).entries.len(), before, "nothing issued");
}

#[test]
fn bundle_directory_and_tar_are_ready_for_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    assert!(
        run(home, &["pki", "init", "--fleet", "acme"])
            .status
            .success()
    );
    let out = run(
        home,
        &[
            "pki",
            "bundle",
            "rpi-0001",
            "--board",
            "raspberrypi3-64",
            "--broker-host",
            "broker.example.net",
            "--broker-port",
            "18883",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    let dir = home.join("bundles/rpi-0001");
    assert_eq!(mode(&dir.join("device.key")), 0o600);
    assert_eq!(mode(&home.join("bundles/rpi-0001.tar")), 0o600);
    let config =
        AgentConfig::load(&dir.join("agent.toml")).expect("agent accepts the bundle config");
    assert_eq!(config.device_id.unwrap().as_str(), "rpi-0001");
    assert_eq!(config.broker.host, "broker.example.net");
    assert_eq!(config.broker.port, 18883);

    // The tar holds the same four files at the top level, key 0600.
    let list = Command::new("tar")
        .arg("-tvf")
        .arg(home.join("bundles/rpi-0001.tar"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&list.stdout);
    let names: Vec<&str> = listing
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["agent.toml", "device.crt", "device.key", "ca.crt"],
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rw------- ") && l.ends_with(" device.key")),
        "{listing}"
    );
    let unpack = home.join("unpacked");
    std::fs::create_dir(&unpack).unwrap();
    assert!(
        Command::new("tar")
            .arg("-xf")
            .arg(home.join("bundles/rpi-0001.tar"))
            .arg("-C")
            .arg(&unpack)
            .status()
            .unwrap()
            .success()
    );
    for f in ["agent.toml", "device.crt", "device.key", "ca.crt"] {
        assert_eq!(
            std::fs::read(unpack.join(f)).unwrap(),
            std::fs::read(dir.join(f)).unwrap(),
            "{f}"
        );
    }

    let inv = inventory(home);
    let entry = inv.by_cn("rpi-0001").next().expect("recorded");
    assert_eq!(entry.role, "device");
    assert_eq!(entry.fingerprint_sha256.len(), 64);
    assert!(entry.revoked_at.is_none());
}

#[test]
fn batch_issues_one_bundle_per_id() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    assert!(
        run(home, &["pki", "init", "--fleet", "acme"])
            .status
            .success()
    );
    let batch = home.join("ids.txt");
    let ids: Vec<String> = (0..20).map(|i| format!("line-{i:04}")).collect();
    std::fs::write(&batch, ids.join("\n")).unwrap();
    let out = run(
        home,
        &[
            "pki",
            "issue",
            "device",
            "--batch",
            batch.to_str().unwrap(),
            "--broker-host",
            "b.example",
            "--board",
            "qemux86-64",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("issued 20/20"),
        "{}",
        show(&out)
    );
    for id in &ids {
        assert!(home.join(format!("bundles/{id}/device.key")).is_file());
        assert!(home.join(format!("bundles/{id}.tar")).is_file());
    }
    assert_eq!(
        inventory(home)
            .entries
            .iter()
            .filter(|e| e.role == "device")
            .count(),
        20
    );
    let devices = run(home, &["devices", "--json"]);
    let devices: serde_json::Value = serde_json::from_slice(&devices.stdout).unwrap();
    assert_eq!(devices.as_array().unwrap().len(), 20, "each one registered");
}

fn device_json(home: &Path, id: &str) -> serde_json::Value {
    let out = run(home, &["device", "show", id, "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_device_identity_is_registered_or_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    assert!(
        run(home, &["pki", "init", "--fleet", "acme"])
            .status
            .success()
    );
    let before = inventory(home).entries.len();
    let batch = home.join("ids.txt");
    std::fs::write(&batch, "new-2\nnew-3\n").unwrap();
    for args in [
        &["pki", "bundle", "new-1", "--broker-host", "b"][..],
        &["pki", "issue", "device", "new-1"],
        &[
            "pki",
            "issue",
            "device",
            "--batch",
            batch.to_str().unwrap(),
            "--broker-host",
            "b",
        ],
    ] {
        let out = run(home, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--board"), "{args:?}: {err}");
    }
    let out = run(home, &["pki", "bundle", "new-1", "--broker-host", "b"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("edgebind device add new-1"),
        "{}",
        show(&out)
    );
    assert_eq!(inventory(home).entries.len(), before, "nothing issued");
    assert!(!home.join("bundles/new-1").exists());

    // With --board the identity is a registration, like `device add`.
    let out = run(
        home,
        &[
            "pki",
            "bundle",
            "new-1",
            "--board",
            "qemux86-64",
            "--tag",
            "line-a",
            "--broker-host",
            "b",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    let first = inventory(home)
        .by_cn("new-1")
        .next()
        .unwrap()
        .serial
        .clone();
    let d = device_json(home, "new-1");
    assert_eq!(d["device"]["cert"]["serial"], first.as_str(), "{d}");
    assert_eq!(d["device"]["tags"][0], "line-a", "{d}");

    // Again: a renewal, and the registry records the new certificate.
    let out = run(home, &["pki", "bundle", "new-1", "--broker-host", "b"]);
    assert!(out.status.success(), "{}", show(&out));
    let serials: Vec<String> = inventory(home)
        .by_cn("new-1")
        .map(|e| e.serial.clone())
        .collect();
    assert_eq!(serials.len(), 2);
    let d = device_json(home, "new-1");
    assert_eq!(d["device"]["cert"]["serial"], serials[1].as_str(), "{d}");

    // Revoking the old serial leaves a usable certificate: still registered.
    let out = run(home, &["pki", "revoke", "--serial", &serials[0]]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        device_json(home, "new-1")["device"]["lifecycle"],
        "registered"
    );
    // Revoking the last one leaves none: the registry says revoked too.
    let out = run(home, &["pki", "revoke", "--serial", &serials[1]]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("registry: new-1 is revoked"),
        "{}",
        show(&out)
    );
    assert_eq!(device_json(home, "new-1")["device"]["lifecycle"], "revoked");
    let again = run(home, &["revoke", "new-1"]);
    assert_eq!(again.status.code(), Some(1), "{}", show(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already revoked"));
}

#[test]
fn renewal_keeps_the_id_and_the_old_certificate_works_until_revoked() {
    let pki = TestPki::new();
    let mut broker = Broker::start(&pki).unwrap();
    let old = pki.device("dev-r");
    let old_copy = pki.home().join("old-dev-r");
    // Keep the first identity's files: the renewal writes over the directory.
    std::fs::create_dir(&old_copy).unwrap();
    for f in ["client.crt", "client.key", "ca.crt"] {
        std::fs::copy(old.dir.join(f), old_copy.join(f)).unwrap();
    }
    let mut old = old.clone();
    old.cert = old_copy.join("client.crt");
    old.key = old_copy.join("client.key");
    old.ca = old_copy.join("ca.crt");
    let new = pki.device("dev-r");
    assert_ne!(old.serial, new.serial);

    for ident in [&old, &new] {
        let c = TestClient::connect(ident, &broker).expect("both certificates are valid");
        let ack = c
            .publish("edgebind/v2/status/dev-r", b"x", QoS::AtLeastOnce, false)
            .unwrap();
        assert!(matches!(
            ack,
            Some(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
        ));
        c.disconnect();
    }

    // Revoke only the old serial with the CLI; the renewed certificate stays in service.
    let out = run(pki.home(), &["pki", "revoke", "--serial", &old.serial]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reloaded"),
        "{}",
        show(&out)
    );
    broker.hup().unwrap(); // the CLI already sent SIGHUP; this one waits for a logged reload
    let err = TestClient::connect(&old, &broker)
        .err()
        .expect("old certificate revoked");
    assert!(err.to_string().contains("CertificateRevoked"), "{err}");
    let c = TestClient::connect(&new, &broker).expect("renewed certificate still valid");
    let ack = c
        .publish("edgebind/v2/status/dev-r", b"y", QoS::AtLeastOnce, false)
        .unwrap();
    assert!(matches!(
        ack,
        Some(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
    ));
}
