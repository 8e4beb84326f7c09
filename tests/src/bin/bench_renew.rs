//! Renewal benchmark (prints figures; not a test).
//!
//! Run: `cargo run --release -p edgebind-tests --bin bench_renew [-- DEVICES]`
//!
//! Against a real Mosquitto and the real `edgebind fleet serve` (one
//! instance, SQLite registry), DEVICES (default 1,000) registered devices
//! connected over mTLS each send a renewal request (a CSR for a key made
//! here) at the same moment; reported: renewals signed per second, from the
//! first request sent to the last certificate received, and how many were
//! refused or lost. The offered load is the whole burst at once, so the
//! figure is the service's ceiling for renewals.
//!
//! Then one real `edgebind-agent` process (same profile) renews its own
//! certificate through the same service, a certificate of 80 s whose renewal
//! falls 20 s after the agent starts: reported are its resident memory
//! (VmRSS, sampled every 20 ms) while connected before the renewal, the
//! highest during the renewal (key, CSR, verification, trial connection,
//! install) and 5 s after it; the renewal's extra RSS is the difference.
//!
//! The burst uses plain MQTT clients with CSRs made here rather than
//! `edgebind sim`: 1,000 simulated agents reconnecting with their new
//! certificates would spend the two cores on TLS handshakes and measure
//! those, not the service's signing.

#[path = "../agent_support.rs"]
mod agent_support;

use std::collections::BTreeSet;
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_support::{AgentBundle, AgentProcess, AgentSetup, FastClient, FastEvent};
use edgebind_certs::Validity;
use edgebind_fleet::registry::{CertInfo, NewDevice, Store};
use edgebind_protocol::DeviceId;
use edgebind_protocol::renewal::{Leg, Request, Response};
use edgebind_tests::{Identity, TestFleet, bin_path, wait_for};

const DEFAULT_DEVICES: usize = 1000;

fn main() {
    let devices: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(DEFAULT_DEVICES);
    let profile = if cfg!(debug_assertions) {
        "debug (run with --release for real figures)"
    } else {
        "release"
    };
    println!("renewal benchmark, {devices} devices renewing at once ({profile} build)");
    let fleet = TestFleet::start();
    let home = fleet.pki.home().to_owned();
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::new(format!("bench-{i:05}")).unwrap())
        .collect();
    let bundles = home.join("bundles");
    std::fs::create_dir_all(&bundles).unwrap();
    let root = std::fs::read_to_string(fleet.pki.root_ca()).unwrap();
    let issued = fleet
        .pki
        .pki()
        .issue_devices(
            &ids,
            Validity::days(90),
            2,
            |c| c.write_identity(&bundles.join(&c.cn), "device", &root),
            |_| {},
        )
        .expect("issue device certificates");
    let mut store =
        edgebind_fleet::registry::open_or_create(&home.join("registry.db")).expect("registry");
    let rows: Vec<NewDevice> = ids
        .iter()
        .zip(&issued)
        .map(|(id, c)| NewDevice {
            id: id.clone(),
            board: "qemux86-64".parse().unwrap(),
            tags: BTreeSet::new(),
            cert: Some(CertInfo {
                serial: c.serial.clone(),
                fingerprint_sha256: c.fingerprint_sha256.clone(),
                not_after: c.not_after.unix_timestamp() as u64,
            }),
        })
        .collect();
    store.add_devices(&rows).expect("register devices");
    drop(store);

    let log = home.join("fleet-service.log");
    let mut service = Command::new(bin_path("edgebind"))
        .arg("--home")
        .arg(&home)
        .args(["fleet", "serve", "--log-level", "warn,edgebind_fleet=info"])
        .arg("--identity")
        .arg(&fleet.pki.service.dir)
        .args(["--renewal-min-interval-s", "0", "--no-inventory-on-connect"])
        .stdin(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the fleet service");
    let up = wait_for(Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("fleet service connected")
            .then_some(())
    });
    assert!(up.is_some(), "fleet service did not connect");

    let started = Instant::now();
    let clients: Vec<(DeviceId, FastClient, String)> = ids
        .iter()
        .zip(&issued)
        .map(|(id, c)| {
            let identity = Identity::from_dir(&bundles.join(id.as_str()), "device", id.as_str());
            let client = FastClient::connect(&identity, &fleet.broker);
            client.subscribe(&Leg::Response.topic(id));
            (id.clone(), client, c.serial.clone())
        })
        .collect();
    println!(
        "{devices} devices connected and subscribed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let requests: Vec<Vec<u8>> = clients
        .iter()
        .map(|(id, _, serial)| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, id.as_str());
            let csr_pem = p.serialize_request(&key).unwrap().pem().unwrap();
            serde_json::to_vec(&Request::Renew {
                csr_pem,
                current_serial: serial.clone(),
            })
            .unwrap()
        })
        .collect();

    let t0 = Instant::now();
    for ((id, client, _), payload) in clients.iter().zip(&requests) {
        client.publish(&Leg::Request.topic(id), payload);
    }
    let offered = t0.elapsed();
    let (mut signed, mut refused, mut lost) = (0usize, 0usize, 0usize);
    let mut last = t0.elapsed();
    for (id, client, _) in &clients {
        let topic = Leg::Response.topic(id);
        let got = client.wait(
            Duration::from_secs(600),
            |e| matches!(e, FastEvent::Message { topic: t, .. } if *t == topic),
        );
        match got {
            Some(FastEvent::Message { payload, .. }) => {
                match serde_json::from_slice::<Response>(&payload) {
                    Ok(Response::Issued { .. }) => signed += 1,
                    _ => refused += 1,
                }
                last = last.max(t0.elapsed());
            }
            _ => lost += 1,
        }
    }
    let rate = signed as f64 / last.as_secs_f64();
    println!(
        "burst: {signed} signed, {refused} refused, {lost} lost in {:.2} s",
        last.as_secs_f64()
    );
    drop(clients);

    let rss = agent_renewal_rss(&fleet, &home);
    let agent_ok = rss.is_some();
    let rss_text = match rss {
        Some(r) => format!(
            "agent_rss_before={}KiB agent_rss_peak_renewing={}KiB agent_rss_after={}KiB renewal_extra_rss={}KiB",
            r.before / 1024,
            r.peak / 1024,
            r.after / 1024,
            r.peak.saturating_sub(r.before) / 1024
        ),
        None => "agent_renewal=FAILED".to_owned(),
    };
    println!(
        "bench_renew: devices={devices} offered={devices} requests in {:.2} s (all at once) \
         signed={signed} refused={refused} lost={lost} in {:.2} s => {rate:.0} renewals/s \
         (one fleet service instance, SQLite, {profile}) {rss_text} result={}",
        offered.as_secs_f64(),
        last.as_secs_f64(),
        if lost == 0 && refused == 0 && agent_ok {
            "ok"
        } else {
            "FAIL"
        }
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(service.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = service.wait();
    if lost > 0 || refused > 0 || !agent_ok {
        std::process::exit(1);
    }
}

struct RenewalRss {
    before: u64,
    peak: u64,
    after: u64,
}

/// One real agent renewing through the running service; its RSS around
/// the renewal. `None` (with the agent's log printed) if it did not renew.
fn agent_renewal_rss(fleet: &TestFleet, home: &std::path::Path) -> Option<RenewalRss> {
    const AT: f64 = 0.25;
    // Built (if need be) before the short certificate's clock starts.
    bin_path("edgebind-agent");
    let setup = AgentSetup {
        top_level: format!("[renewal]\nat_fraction = {AT}\njitter_fraction = 0.0\n"),
        ..AgentSetup::default()
    };
    let bundle = AgentBundle::new(&fleet.pki, &fleet.broker, "bench-agent", &setup);
    let now = time::OffsetDateTime::now_utc();
    let first = fleet
        .pki
        .pki()
        .issue_device(
            &bundle.id,
            Validity::between(now, now + time::Duration::seconds(80)),
        )
        .expect("issue the agent's certificate");
    std::fs::write(bundle.dir.join("device.crt"), &first.chain_pem).unwrap();
    std::fs::write(bundle.dir.join("device.key"), &first.key_pem).unwrap();
    let mut store =
        edgebind_fleet::registry::open_or_create(&home.join("registry.db")).expect("registry");
    store
        .add_devices(&[NewDevice {
            id: bundle.id.clone(),
            board: "qemux86-64".parse().unwrap(),
            tags: BTreeSet::new(),
            cert: Some(CertInfo {
                serial: first.serial.clone(),
                fingerprint_sha256: first.fingerprint_sha256.clone(),
                not_after: first.not_after.unix_timestamp() as u64,
            }),
        }])
        .expect("register the agent's device");
    let due = edgebind_agent::renewal::renew_at(
        first.not_before.unix_timestamp(),
        first.not_after.unix_timestamp(),
        AT,
        0.0,
        first.serial.as_bytes(),
    );
    let agent = AgentProcess::spawn(&bundle.config);
    let online = wait_for(Duration::from_secs(30), || {
        store.device(&bundle.id).ok()?.online.then_some(())
    });
    if online.is_none() {
        eprintln!("the agent did not come online:\n{}", agent.stderr());
        return None;
    }
    let now_s = || time::OffsetDateTime::now_utc().unix_timestamp();
    let sample = || rss_of(agent.pid());
    // Connected and idle, up to a second before the renewal is due.
    let mut before = 0;
    while now_s() < due - 1 {
        before = before.max(sample());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let renewed = loop {
        peak = peak.max(sample());
        let done = store
            .device(&bundle.id)
            .ok()
            .and_then(|d| d.cert)
            .map(|c| c.serial)
            != Some(first.serial.clone());
        if done {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !renewed {
        eprintln!("the agent did not renew:\n{}", agent.stderr());
        return None;
    }
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle {
        peak = peak.max(sample());
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = sample();
    Some(RenewalRss {
        before,
        peak,
        after,
    })
}

/// VmRSS of `pid`, in bytes (0 if unreadable).
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
