//! Renewal under faults, with real `edgebind-agent` processes, the real
//! `edgebind fleet serve` and a real Mosquitto: a kill -9 at each step of the
//! switch, a broker outage across the renewal point, and a renewed
//! certificate the broker refuses.
//!
//! The kill test stops the agent at a step with the pause points of
//! `edgebind-agent-test-hooks` (feature `test-hooks`, see
//! `edgebind_agent::test_hooks`); the other tests run the plain agent.

mod fleet_support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgebind_agent::test_hooks::step;
use edgebind_fleet::registry::{CertOrigin, CertRecord, CertState, Store};
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::now_unix;
use edgebind_tests::{Identity, TestClient, agent_with_test_hooks, bin_path, wait_for, wait_until};
use fleet_support::{AgentTweaks, Fleet, LONG, Proc};

/// Renewals may take a while on a loaded machine (several agents, each
/// with a backoff of up to 2 s, and keep-alive timeouts of 7.5 s).
const RENEW_WAIT: Duration = Duration::from_secs(180);

/// Lifetime of the certificates the fleet signs for renewals: long enough
/// that, with the PKI's 5 minutes of backdating, even `at_fraction = 0.1`
/// puts the next renewal 7 minutes away, so each test sees only the
/// renewals it causes.
const RENEWED_S: &str = "7200";

fn start_service(fleet: &mut Fleet) {
    fleet.start_service_with(&[
        "--device-cert-seconds",
        RENEWED_S,
        "--renewal-min-interval-s",
        "0",
        "--renewal-grace-s",
        "2",
    ]);
}

/// A registered device's bundle and its first certificate.
struct Dev {
    bundle: PathBuf,
    config: PathBuf,
    first: edgebind_certs::IssuedCert,
}

/// Register `id` with a first certificate valid `secs` (plus the PKI's
/// backdating) and an agent.toml renewing at `at_fraction` without jitter.
fn device(fleet: &Fleet, id: &str, secs: u64, at_fraction: f64) -> Dev {
    let bundle = fleet.add_device(id, &[]);
    let pki = edgebind_certs::Pki::open(&fleet.home().join("pki")).unwrap();
    let dev = DeviceId::new(id).unwrap();
    let added = fleet.store().device(&dev).unwrap().cert.unwrap().serial;
    let first = pki
        .issue_device(&dev, edgebind_certs::Validity::seconds(secs))
        .unwrap();
    // The bundle's certificate is replaced: revoked, so the device has one
    // usable certificate, as in the field.
    pki.revoke_serial(&added).unwrap();
    std::fs::write(bundle.join("device.crt"), &first.chain_pem).unwrap();
    std::fs::write(bundle.join("device.key"), &first.key_pem).unwrap();
    fleet
        .store()
        .set_certificate(
            &dev,
            &edgebind_fleet::registry::CertInfo {
                serial: first.serial.clone(),
                fingerprint_sha256: first.fingerprint_sha256.clone(),
                not_after: first.not_after.unix_timestamp() as u64,
            },
        )
        .unwrap();
    let config = fleet.agent_config(&bundle, &AgentTweaks::default());
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let mut renewal = toml::Table::new();
    renewal.insert("at_fraction".into(), at_fraction.into());
    renewal.insert("jitter_fraction".into(), 0.0.into());
    renewal.insert("trial_timeout_s".into(), 5.into());
    renewal.insert("retry_s".into(), 3.into());
    renewal.insert("response_timeout_s".into(), 10.into());
    doc.insert("renewal".into(), renewal.into());
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    Dev {
        bundle,
        config,
        first,
    }
}

fn renewed_and_confirmed(h: &[CertRecord]) -> Vec<&CertRecord> {
    h.iter()
        .filter(|r| r.origin == CertOrigin::Renewed && r.confirmed_at.is_some())
        .collect()
}

/// Wait until `id` has a confirmed renewal that is its current certificate
/// and it is online; returns that certificate's serial.
fn wait_renewed(fleet: &Fleet, store: &dyn Store, id: &str, agent: &Proc) -> String {
    let dev = DeviceId::new(id).unwrap();
    let got = wait_for(RENEW_WAIT, || {
        let d = store.device(&dev).ok()?;
        let current = d.cert.as_ref()?.serial.clone();
        let h = store.cert_history(&dev).ok()?;
        (d.online
            && renewed_and_confirmed(&h)
                .iter()
                .any(|r| r.serial == current))
        .then_some(current)
    });
    got.unwrap_or_else(|| {
        panic!(
            "{id}: no confirmed renewal online: {:#?}\nagent:\n{}\nservice:\n{}",
            store.cert_history(&dev),
            agent.log(),
            fleet.service_log()
        )
    })
}

/// The serial of the certificate in `bundle`'s identity files.
fn serial_on_disk(bundle: &Path) -> String {
    let pem = std::fs::read(bundle.join("device.crt")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    edgebind_agent::renewal::leaf_serial(&der).unwrap()
}

/// `edgebind-agent --check`: the identity files on disk are one usable pair.
fn check_identity(config: &Path) {
    let out = std::process::Command::new(bin_path("edgebind-agent"))
        .arg("--check")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the identity on disk is not usable: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Crash {
    step: &'static str,
    id: String,
    dev: Dev,
    pause_file: PathBuf,
    agent: Proc,
}

#[test]
fn an_agent_killed_at_each_step_of_the_switch_comes_back_with_a_working_identity() {
    let mut fleet = Fleet::start();
    start_service(&mut fleet);
    let steps = [
        step::KEY_WRITTEN,
        step::CERT_RECEIVED,
        step::TRIAL_CONNECTED,
        step::BEFORE_REPLACE,
        step::BETWEEN_RENAMES,
    ];
    let hooked = agent_with_test_hooks();
    // Renewal due at once (a tenth of the life has passed with the
    // backdating); the first certificate outlives the test.
    let mut crashes: Vec<Crash> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let id = format!("dev-k{i}");
            let dev = device(&fleet, &id, 900, 0.1);
            let pause_file = dev.bundle.join("paused");
            let agent = fleet.spawn_agent_bin(
                &hooked,
                &dev.config,
                &[
                    ("EDGEBIND_AGENT_TEST_PAUSE_AT", OsStr::new(s)),
                    ("EDGEBIND_AGENT_TEST_PAUSE_FILE", pause_file.as_os_str()),
                ],
            );
            Crash {
                step: s,
                id,
                dev,
                pause_file,
                agent,
            }
        })
        .collect();
    for c in &mut crashes {
        let paused = wait_until(RENEW_WAIT, || c.pause_file.exists());
        assert!(
            paused,
            "{}: the agent never reached the step:\n{}\nservice:\n{}",
            c.step,
            c.agent.log(),
            fleet.service_log()
        );
        c.agent.kill9();
        // What the power cut left on disk.
        let bundle = &c.dev.bundle;
        let state = bundle.join("state");
        let key_on_disk = std::fs::read_to_string(bundle.join("device.key")).unwrap();
        assert_eq!(serial_on_disk(bundle), c.dev.first.serial, "{}", c.step);
        if c.step == step::BETWEEN_RENAMES {
            // The new key in place, the old certificate still: not a pair.
            let kept = std::fs::read_to_string(state.join("renewal/key.pem")).unwrap();
            assert_eq!(
                key_on_disk, kept,
                "{}: the renewal key is installed",
                c.step
            );
            assert_ne!(key_on_disk, c.dev.first.key_pem);
        } else {
            assert_eq!(key_on_disk, c.dev.first.key_pem, "{}: the old key", c.step);
        }
        if c.step == step::CERT_RECEIVED || c.step == step::TRIAL_CONNECTED {
            assert!(
                state.join("renewal-trial/device.crt").exists(),
                "{}",
                c.step
            );
        }
        assert!(
            state.join("renewal/key.pem").exists(),
            "{}: the kept key",
            c.step
        );
    }
    // Restart each with the plain agent: back online, the renewal completed.
    let store = fleet.store();
    for c in &mut crashes {
        let _ = std::fs::remove_file(&c.pause_file);
        fleet.wait_device(&c.id, LONG, "offline after the kill", |d| !d.online);
        c.agent = fleet.spawn_agent(&c.dev.config);
    }
    for c in &mut crashes {
        let serial = wait_renewed(&fleet, store.as_ref(), &c.id, &c.agent);
        assert_ne!(serial, c.dev.first.serial, "{}", c.step);
        c.agent.terminate();
        assert!(!c.agent.log().contains("panicked"), "{}", c.agent.log());
        check_identity(&c.dev.config);
        assert_eq!(serial_on_disk(&c.dev.bundle), serial, "{}", c.step);
        assert!(
            !c.dev.bundle.join("state/renewal-trial").exists(),
            "{}",
            c.step
        );
        // One renewal signed, whatever the step: the kept key asked again
        // and got the same certificate back.
        let h = store.cert_history(&DeviceId::new(&c.id).unwrap()).unwrap();
        let signed = h.iter().filter(|r| r.origin == CertOrigin::Renewed).count();
        assert_eq!(signed, 1, "{}: {h:#?}", c.step);
    }
}

#[test]
fn a_broker_outage_across_the_renewal_point_delays_the_renewal_until_it_is_back() {
    let mut fleet = Fleet::start();
    // Due about 40 s after the start, by the agent's own rule.
    let Dev {
        bundle,
        config,
        first,
    } = device(&fleet, "dev-o", 180, 0.7);
    let first_serial = first.serial.clone();
    let due = edgebind_agent::renewal::renew_at(
        first.not_before.unix_timestamp(),
        first.not_after.unix_timestamp(),
        0.7,
        0.0,
        first_serial.as_bytes(),
    );
    assert!(
        due > now_unix() as i64 + 20,
        "due too soon to stop the broker first"
    );
    start_service(&mut fleet);
    let agent = fleet.spawn_agent(&config);
    fleet.wait_device("dev-o", LONG, "online", |d| d.online);

    fleet.env.broker.stop();
    let passed = wait_until(Duration::from_secs(120), || now_unix() as i64 > due + 5);
    assert!(passed);
    let store = fleet.store();
    let dev = DeviceId::new("dev-o").unwrap();
    assert!(
        renewed_and_confirmed(&store.cert_history(&dev).unwrap()).is_empty(),
        "renewed without a broker?"
    );
    let back_at = now_unix();
    fleet.env.broker.restart().expect("broker restarts");

    let serial = wait_renewed(&fleet, store.as_ref(), "dev-o", &agent);
    assert_ne!(serial, first_serial);
    let h = store.cert_history(&dev).unwrap();
    let renewed: Vec<_> = h
        .iter()
        .filter(|r| r.origin == CertOrigin::Renewed)
        .collect();
    assert_eq!(renewed.len(), 1, "{h:#?}");
    assert!(
        renewed[0].issued_at >= back_at,
        "signed while the broker was down?"
    );
    // And it stays online on the renewed certificate once the old one is retired.
    let pki = edgebind_certs::Pki::open(&fleet.home().join("pki")).unwrap();
    let retired = wait_until(LONG, || {
        pki.inventory()
            .ok()
            .and_then(|i| i.by_serial(&first_serial).map(|e| e.is_revoked()))
            .unwrap_or(false)
    });
    assert!(
        retired,
        "the old certificate was not retired:\n{}",
        fleet.service_log()
    );
    fleet.wait_device("dev-o", LONG, "online on the renewed certificate", |d| {
        d.online && d.cert.as_ref().is_some_and(|c| c.serial == serial)
    });
    assert_eq!(serial_on_disk(&bundle), serial);
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

#[test]
fn a_renewed_certificate_the_broker_refuses_leaves_the_device_online_on_the_old_one_and_it_retries()
{
    let mut fleet = Fleet::start();
    let Dev {
        bundle,
        config,
        first,
    } = device(&fleet, "dev-x", 900, 0.1);
    let first_serial = first.serial.clone();
    // A retry well after the fallback, so the connection seen right after
    // it is the old identity's, not the next attempt's trial.
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    doc["renewal"]["retry_s"] = 20.into();
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    start_service(&mut fleet);
    let pause_file = bundle.join("paused");
    let mut agent = fleet.spawn_agent_bin(
        &agent_with_test_hooks(),
        &config,
        &[
            (
                "EDGEBIND_AGENT_TEST_PAUSE_AT",
                OsStr::new(step::CERT_RECEIVED),
            ),
            ("EDGEBIND_AGENT_TEST_PAUSE_FILE", pause_file.as_os_str()),
        ],
    );
    assert!(
        wait_until(RENEW_WAIT, || pause_file.exists()),
        "no renewed certificate arrived:\n{}\nservice:\n{}",
        agent.log(),
        fleet.service_log()
    );
    // The renewed certificate is revoked right after signing and the broker's
    // CRL reloaded (what `pki revoke --serial` does), before the agent tries it.
    let trial = bundle.join("state/renewal-trial");
    let refused_serial = {
        let pem = std::fs::read(trial.join("device.crt")).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        edgebind_agent::renewal::leaf_serial(&der).unwrap()
    };
    fleet.cli_ok(&["pki", "revoke", "--serial", &refused_serial]);
    let probe = fleet.home().join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    for f in ["device.crt", "device.key"] {
        std::fs::copy(trial.join(f), probe.join(f)).unwrap();
    }
    std::fs::copy(bundle.join("ca.crt"), probe.join("ca.crt")).unwrap();
    let refused = wait_until(LONG, || {
        TestClient::connect(
            &Identity::from_dir(&probe, "device", "dev-x"),
            &fleet.env.broker,
        )
        .is_err()
    });
    assert!(refused, "the broker still takes the revoked certificate");
    let store = fleet.store();
    let dev = DeviceId::new("dev-x").unwrap();
    assert_ne!(
        store.device(&dev).unwrap().lifecycle,
        edgebind_fleet::registry::Lifecycle::Revoked,
        "the device still has its old certificate: it must not be revoked"
    );
    std::fs::remove_file(&pause_file).unwrap();

    // The trial fails, the agent is back online on the old certificate...
    let fell_back = wait_until(LONG, || agent.log().contains("back to the current one"));
    assert!(fell_back, "no fallback:\n{}", agent.log());
    let after_fallback = now_unix();
    fleet.wait_device("dev-x", LONG, "online again on the old certificate", |d| {
        d.online
            && d.connected_at
                .is_some_and(|t| t >= after_fallback.saturating_sub(1))
            && d.cert.as_ref().is_some_and(|c| c.serial == first_serial)
    });
    // No other renewal signed yet: the revoked one cannot connect, so that
    // connection is the old certificate's.
    let signed = store
        .cert_history(&dev)
        .unwrap()
        .iter()
        .filter(|r| r.origin == CertOrigin::Renewed)
        .count();
    assert_eq!(signed, 1, "the retry came before the fallback was seen");
    // ...and retries with a new key, which the fleet signs and the broker takes.
    let serial = wait_renewed(&fleet, store.as_ref(), "dev-x", &agent);
    assert_ne!(serial, refused_serial);
    assert_ne!(serial, first_serial);
    let h = store.cert_history(&dev).unwrap();
    let refused_record = h.iter().find(|r| r.serial == refused_serial);
    assert!(
        refused_record.is_some_and(|r| r.state != CertState::Current && r.confirmed_at.is_none()),
        "{h:#?}"
    );
    agent.terminate();
    check_identity(&config);
    assert_eq!(serial_on_disk(&bundle), serial);
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

#[test]
fn an_issuing_ca_rollover_moves_online_devices_to_the_new_ca_without_an_outage() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut fleet = Fleet::start();
    start_service(&mut fleet);
    let ids: Vec<String> = (0..3).map(|i| format!("dev-c{i}")).collect();
    // Not due by themselves during the test: the devices move when asked.
    let devs: Vec<Dev> = ids.iter().map(|id| device(&fleet, id, 3600, 0.9)).collect();
    let agents: Vec<Proc> = devs.iter().map(|d| fleet.spawn_agent(&d.config)).collect();
    for id in &ids {
        fleet.wait_device(id, LONG, "online", |d| d.online);
    }
    // Every offline moment of every device, seen every 100 ms from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let offline: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let watcher = {
        let (stop, offline, ids) = (stop.clone(), offline.clone(), ids.clone());
        let store = fleet.store();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for id in &ids {
                    let d = store.device(&DeviceId::new(id).unwrap()).unwrap();
                    if !d.online {
                        offline.lock().unwrap().push((id.clone(), now_unix()));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let pki_dir = fleet.home().join("pki");
    let old_issuer = edgebind_certs::Pki::open(&pki_dir)
        .unwrap()
        .issuer_id()
        .to_owned();
    fleet.cli_ok(&["pki", "rollover"]);
    let new_issuer = edgebind_certs::Pki::open(&pki_dir)
        .unwrap()
        .issuer_id()
        .to_owned();
    assert_ne!(new_issuer, old_issuer);
    // The overlap: a certificate of the old CA still connects.
    let old_probe = fleet.home().join("probe-old");
    std::fs::create_dir_all(&old_probe).unwrap();
    std::fs::write(old_probe.join("device.crt"), &devs[0].first.chain_pem).unwrap();
    std::fs::write(old_probe.join("device.key"), &devs[0].first.key_pem).unwrap();
    std::fs::copy(devs[0].bundle.join("ca.crt"), old_probe.join("ca.crt")).unwrap();

    // Devices move over as they renew: ask each (the README's procedure).
    let store = fleet.store();
    for (id, agent) in ids.iter().zip(&agents) {
        fleet.cli_ok(&["device", "renew", id]);
        let serial = wait_renewed(&fleet, store.as_ref(), id, agent);
        let inv = edgebind_certs::Pki::open(&pki_dir)
            .unwrap()
            .inventory()
            .unwrap();
        let entry = inv.by_serial(&serial).expect("the renewed certificate");
        assert_eq!(
            entry.issuer.as_deref(),
            Some(new_issuer.as_str()),
            "{id} renewed onto the old CA"
        );
    }
    // The old certificates are retired (revoked, the old CA's CRL reloaded):
    // the broker refuses them, while the renewed ones keep working.
    let pki = edgebind_certs::Pki::open(&pki_dir).unwrap();
    for d in &devs {
        let retired = wait_until(LONG, || {
            pki.inventory()
                .ok()
                .and_then(|i| i.by_serial(&d.first.serial).map(|e| e.is_revoked()))
                .unwrap_or(false)
        });
        assert!(retired, "not retired:\n{}", fleet.service_log());
    }
    let refused = wait_until(LONG, || {
        TestClient::connect(
            &Identity::from_dir(&old_probe, "device", "dev-c0"),
            &fleet.env.broker,
        )
        .is_err()
    });
    assert!(
        refused,
        "the broker still takes a retired certificate of the old CA"
    );
    for id in &ids {
        fleet.wait_device(id, LONG, "online on the new CA", |d| d.online);
    }
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();

    // No device certificate depends on the old CA any more.
    let inv = pki.inventory().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let on_old: Vec<_> = inv
        .entries
        .iter()
        .filter(|e| e.issuer.as_deref() == Some(old_issuer.as_str()) && e.is_active(now))
        .filter(|e| matches!(e.principal(), Some(edgebind_protocol::Principal::Device(_))))
        .map(|e| e.cn.clone())
        .collect();
    assert!(on_old.is_empty(), "devices still on the old CA: {on_old:?}");
    // Online throughout: each device was seen offline only around its own
    // switch (one reconnect, a few seconds at most), never twice.
    let seen = offline.lock().unwrap().clone();
    for id in &ids {
        let times: Vec<u64> = seen
            .iter()
            .filter(|(d, _)| d == id)
            .map(|(_, t)| *t)
            .collect();
        if let (Some(first), Some(last)) = (times.first(), times.last()) {
            assert!(
                last - first <= 10,
                "{id} offline from {first} to {last} (or twice): {times:?}"
            );
        }
    }
    eprintln!("offline samples during the rollover: {seen:?}");
    for (d, a) in devs.iter().zip(&agents) {
        assert!(!a.log().contains("panicked"), "{}", a.log());
        assert_ne!(serial_on_disk(&d.bundle), d.first.serial);
    }
}
