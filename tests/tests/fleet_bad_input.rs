//! Every bad input to the device commands is a clear error that changes
//! nothing: not the registry, not the PKI, not the bundles. Revocation goes
//! through registry, CRL and broker.

mod fleet_support;

use std::path::Path;

use edgebind_fleet::registry::{Lifecycle, Selector, Store};
use edgebind_protocol::DeviceId;
use edgebind_tests::TestClient;
use fleet_support::{Fleet, stderr, stdout};

/// Everything a device command could change, as comparable text.
fn snapshot(fleet: &Fleet) -> String {
    let store = fleet.registry();
    let mut out = String::new();
    for d in store.devices(&Selector::All).unwrap() {
        out.push_str(&format!("{d:?}\n"));
        for c in store.commands_for(&d.id, 1000).unwrap() {
            out.push_str(&format!("  {c:?}\n"));
        }
        for r in store.on_connect_rules(&d.id).unwrap() {
            out.push_str(&format!("  {r:?}\n"));
        }
    }
    out.push_str(&std::fs::read_to_string(fleet.home().join("pki/inventory.json")).unwrap());
    let mut bundles: Vec<String> = std::fs::read_dir(fleet.home().join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    bundles.sort();
    out.push_str(&bundles.join(","));
    out
}

fn assert_refused(fleet: &Fleet, args: &[&str], expect: &[&str]) {
    let before = snapshot(fleet);
    let out = fleet.cli(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "edgebind {} must fail; stdout {}",
        args.join(" "),
        stdout(&out)
    );
    let err = stderr(&out);
    for e in expect {
        assert!(
            err.contains(e),
            "edgebind {}: error {err:?} should mention {e:?}",
            args.join(" ")
        );
    }
    assert_eq!(
        snapshot(fleet),
        before,
        "edgebind {} changed state",
        args.join(" ")
    );
}

#[test]
fn each_bad_input_is_a_clear_error_and_changes_nothing() {
    let fleet = Fleet::start();
    fleet.add_device("dev-a", &["lab"]);
    fleet.cli_ok(&["send", "dev-a", "ping", "--queue"]);

    // device add
    assert_refused(
        &fleet,
        &["device", "add", "bad/id", "--board", "qemux86-64"],
        &["device id", "'/'"],
    );
    // Case: `DEV-A` next to `dev-a` would be one device to DNS and factory
    // systems, so upper case is refused with the lowercase spelling.
    assert_refused(
        &fleet,
        &["device", "add", "DEV-A", "--board", "qemux86-64"],
        &["device id", "lowercase", "\"dev-a\""],
    );
    assert_refused(
        &fleet,
        &["device", "show", "Dev-A"],
        &["device id", "lowercase"],
    );
    assert_refused(
        &fleet,
        &["device", "add", "dev-x", "--board", "esp32"],
        &["unknown board", "esp32", "raspberrypi3-64"],
    );
    assert_refused(
        &fleet,
        &["device", "add", "dev-a", "--board", "qemux86-64"],
        &["dev-a", "already registered"],
    );
    assert_refused(
        &fleet,
        &[
            "device",
            "add",
            "dev-y",
            "--board",
            "qemux86-64",
            "--tag",
            "bad tag",
        ],
        &["invalid tag", "bad tag"],
    );
    // unknown id, everywhere
    for args in [
        &["device", "show", "ghost"][..],
        &["revoke", "ghost"],
        &["device", "revoke", "ghost"],
        &["set", "ghost", "log_level=debug"],
        &["send", "ghost", "ping", "--timeout", "1"],
        &["send", "ghost", "ping", "--queue"],
        &["send", "ghost", "reboot", "--on-connect"],
    ] {
        assert_refused(&fleet, args, &["ghost", "not in the registry"]);
    }
    // invalid ids where an id is expected
    assert_refused(&fleet, &["device", "show", "a+b"], &["device id", "'+'"]);
    assert_refused(&fleet, &["set", "#", "x=1"], &["device id"]);
    // bad settings and arguments
    assert_refused(&fleet, &["set", "dev-a", "Bad-Key=1"], &["Bad-Key"]);
    assert_refused(&fleet, &["set", "dev-a", "novalue"], &["key=value"]);
    assert_refused(
        &fleet,
        &["send", "dev-a", "ping", "a=1", "b", "--queue"],
        &["key=value"],
    );
    assert_refused(
        &fleet,
        &["send", "dev-a", "Dance/1", "--queue"],
        &["Dance/1"],
    );
    assert_refused(
        &fleet,
        &["send", "--tag", "nosuch", "ping", "--queue"],
        &["no (non-revoked) device"],
    );
    assert_refused(&fleet, &["device", "on-connect-remove", "999"], &["999"]);
    assert_refused(&fleet, &["devices", "--tag", "a b"], &["invalid tag"]);
    // A reconnect window for a broker that accepts nothing is a usage error:
    // refused before the service starts.
    for rate in ["0", "-3", "nan", "inf"] {
        let arg = format!("--reconnect-accept-rate={rate}");
        let out = fleet.cli(&["fleet", "serve", &arg]);
        assert_eq!(out.status.code(), Some(2), "rate {rate}: {}", stderr(&out));
        assert!(stderr(&out).contains("positive number"), "{}", stderr(&out));
    }
}

#[test]
fn revoke_marks_the_registry_revokes_the_certificate_and_the_broker_refuses_it() {
    let mut fleet = Fleet::start();
    let bundle = fleet.add_device("dev-r", &[]);
    let identity = edgebind_tests::Identity {
        principal: None,
        name: "dev-r".into(),
        dir: bundle.clone(),
        cert: bundle.join("device.crt"),
        key: bundle.join("device.key"),
        ca: bundle.join("ca.crt"),
        serial: String::new(),
    };
    // Before: the device's identity connects.
    TestClient::connect(&identity, &fleet.env.broker)
        .expect("registered device connects")
        .disconnect();

    let out = fleet.cli_ok(&["revoke", "dev-r"]);
    assert!(out.contains("broker reloaded"), "{out}");
    let store = fleet.registry();
    let d = store.device(&DeviceId::new("dev-r").unwrap()).unwrap();
    assert_eq!(d.lifecycle, Lifecycle::Revoked);
    let inventory: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fleet.home().join("pki/inventory.json")).unwrap(),
    )
    .unwrap();
    let entry = inventory.to_string().contains("revoked_at");
    assert!(entry, "{inventory}");
    // The broker applies the CRL: give the SIGHUP a moment via the harness's
    // log-based wait (the CLI already sent it; this sends another and waits).
    fleet.env.broker.hup().unwrap();
    assert!(
        TestClient::connect(&identity, &fleet.env.broker).is_err(),
        "revoked certificate must be refused"
    );

    // Repeating it, or using the device, is refused and changes nothing.
    assert_refused(&fleet, &["revoke", "dev-r"], &["dev-r", "already revoked"]);
    assert_refused(
        &fleet,
        &["send", "dev-r", "ping", "--queue"],
        &["dev-r", "revoked"],
    );
    assert_refused(
        &fleet,
        &["set", "dev-r", "log_level=info"],
        &["dev-r", "revoked"],
    );
    // It is still listed, as revoked.
    let table = fleet.cli_ok(&["devices"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("dev-r") && l.contains("revoked")),
        "{table}"
    );
    assert!(
        Path::new(&bundle).exists(),
        "the bundle stays for the record"
    );
}
