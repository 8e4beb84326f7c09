//! Every way an identity bundle can be wrong makes the agent refuse to
//! start, before any connection, with a message that names the file (and
//! config key) and says what is wrong, and exit code 78 (EX_CONFIG).

#[path = "../src/agent_support.rs"]
mod agent_support;

use std::path::{Path, PathBuf};

use agent_support::run_to_exit;
use edgebind_protocol::Principal;
use edgebind_tests::{Identity, TestPki};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose};

const REFUSED: Option<i32> = Some(78);

/// An agent.toml in its own directory with absolute identity paths; the
/// broker address is never reached because the checks come first.
fn config(dir: &Path, cert: &Path, key: &Path, ca: &Path, device_id: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let id_line = device_id
        .map(|d| format!("device_id = \"{d}\"\n"))
        .unwrap_or_default();
    let toml = format!(
        "{id_line}[broker]\nhost = \"127.0.0.1\"\nport = 1\n\n[identity]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n[state]\ndir = \"state\"\n",
        cert.display(),
        key.display(),
        ca.display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn config_for(pki: &TestPki, name: &str, id: &Identity, device_id: Option<&str>) -> PathBuf {
    config(
        &pki.home().join("cfg").join(name),
        &id.cert,
        &id.key,
        &id.ca,
        device_id,
    )
}

fn assert_refused(config: &Path, needles: &[&str]) {
    let (code, stderr) = run_to_exit(config);
    assert_eq!(code, REFUSED, "exit code; stderr:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
    assert!(
        !stderr.contains("connected to broker"),
        "refused before connecting:\n{stderr}"
    );
    assert!(
        !stderr.contains("PRIVATE KEY"),
        "no key material in messages:\n{stderr}"
    );
}

fn device_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

#[test]
fn a_good_identity_passes_the_check() {
    let pki = TestPki::new();
    let dev = pki.device("dev-ok");
    let cfg = config_for(&pki, "ok", &dev, Some("dev-ok"));
    let out = std::process::Command::new(edgebind_tests::bin_path("edgebind-agent"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("dev-ok"));
}

#[test]
fn missing_files_are_named_with_their_config_key() {
    let pki = TestPki::new();
    let dev = pki.device("dev-a");
    let missing = pki.home().join("nowhere/device.key");
    let cfg = config(
        &pki.home().join("cfg/missing-key"),
        &dev.cert,
        &missing,
        &dev.ca,
        None,
    );
    assert_refused(
        &cfg,
        &[
            "device private key",
            missing.to_str().unwrap(),
            "identity.key",
            "No such file",
        ],
    );
    let missing_ca = pki.home().join("nowhere/ca.crt");
    let cfg = config(
        &pki.home().join("cfg/missing-ca"),
        &dev.cert,
        &dev.key,
        &missing_ca,
        None,
    );
    assert_refused(&cfg, &["fleet CA certificate", "identity.ca"]);
}

#[test]
fn a_file_without_pem_content_is_refused() {
    let pki = TestPki::new();
    let dev = pki.device("dev-a");
    let junk = pki.home().join("junk.crt");
    std::fs::write(&junk, "hello, not a certificate\n").unwrap();
    let cfg = config(&pki.home().join("cfg/junk"), &junk, &dev.key, &dev.ca, None);
    assert_refused(&cfg, &["identity.cert", "contains no PEM certificate"]);
}

#[test]
fn a_key_of_another_device_is_refused() {
    let pki = TestPki::new();
    let a = pki.device("dev-a");
    let b = pki.device("dev-b");
    let cfg = config(
        &pki.home().join("cfg/mismatch"),
        &a.cert,
        &b.key,
        &a.ca,
        None,
    );
    assert_refused(
        &cfg,
        &[
            "does not belong to the device certificate",
            b.key.to_str().unwrap(),
        ],
    );
}

#[test]
fn an_expired_certificate_is_refused() {
    let pki = TestPki::new();
    let mut p = device_params("dev-old");
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2020, 1, 2);
    let old = pki.custom("dev-old", p);
    let cfg = config_for(&pki, "expired", &old, None);
    assert_refused(
        &cfg,
        &["expired at 2020-01-02", "issue a new identity bundle"],
    );
}

#[test]
fn a_certificate_not_yet_valid_is_refused() {
    let pki = TestPki::new();
    let mut p = device_params("dev-future");
    p.not_before = rcgen::date_time_ymd(2090, 1, 1);
    p.not_after = rcgen::date_time_ymd(2091, 1, 1);
    let future = pki.custom("dev-future", p);
    let cfg = config_for(&pki, "future", &future, None);
    assert_refused(&cfg, &["not valid yet", "check the clock"]);
}

#[test]
fn a_certificate_from_another_fleet_is_refused() {
    let ours = TestPki::new();
    let theirs = TestPki::new();
    let foreign = theirs.device("dev-a");
    let cfg = config(
        &ours.home().join("cfg/foreign"),
        &foreign.cert,
        &foreign.key,
        &ours.root_ca(),
        None,
    );
    assert_refused(
        &cfg,
        &[
            "was not issued by the fleet CA",
            foreign.cert.to_str().unwrap(),
            "belongs to another fleet",
        ],
    );
}

#[test]
fn a_configured_device_id_other_than_the_cn_is_refused() {
    let pki = TestPki::new();
    let dev = pki.device("dev-a");
    let cfg = config_for(&pki, "wrong-id", &dev, Some("dev-z"));
    assert_refused(
        &cfg,
        &[
            "device_id \"dev-z\"",
            "certificate CN \"dev-a\"",
            "wrong identity bundle",
        ],
    );
}

#[test]
fn a_cn_that_is_not_a_device_id_is_refused() {
    let pki = TestPki::new();
    let op = pki.identity(&Principal::from_cn("operator:alice").unwrap());
    let cfg = config_for(&pki, "operator", &op, None);
    assert_refused(&cfg, &["CN \"operator:alice\"", "not a valid device id"]);
}

#[test]
fn a_typo_in_the_configuration_names_file_and_key() {
    let pki = TestPki::new();
    let dir = pki.home().join("cfg/typo");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, "[broker]\nhost = \"127.0.0.1\"\nprot = 8883\n").unwrap();
    assert_refused(
        &cfg,
        &[cfg.to_str().unwrap(), "broker.prot", "unknown field"],
    );
    std::fs::write(
        &cfg,
        "[broker]\nhost = \"127.0.0.1\"\n[telemetry]\ninterval_s = 0\n",
    )
    .unwrap();
    assert_refused(&cfg, &["telemetry.interval_s"]);
}

#[test]
fn an_unusable_state_directory_is_refused() {
    let pki = TestPki::new();
    let dev = pki.device("dev-a");
    let cfg = config_for(&pki, "state-file", &dev, None);
    // `state` (relative to the config) exists but is a file.
    std::fs::write(cfg.with_file_name("state"), "not a directory").unwrap();
    assert_refused(&cfg, &["state directory", "state.dir"]);
}
