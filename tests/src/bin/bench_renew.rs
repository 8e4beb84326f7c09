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

#[path = "../agent_support.rs"]
mod agent_support;

use std::collections::BTreeSet;
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_support::{FastClient, FastEvent};
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
        "bench_renew: devices={devices} offered={devices} requests in {:.2} s (all at once) \
         signed={signed} refused={refused} lost={lost} in {:.2} s => {rate:.0} renewals/s \
         (one fleet service instance, SQLite, {profile})",
        offered.as_secs_f64(),
        last.as_secs_f64()
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(service.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = service.wait();
    if lost > 0 || refused > 0 {
        std::process::exit(1);
    }
}
