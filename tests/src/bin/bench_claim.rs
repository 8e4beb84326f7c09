//! Benchmark: devices provisioned per second by the claim flow when a whole
//! batch boots at once.
//!
//! Real Mosquitto with its provisioning listener, the fleet service in this
//! process (SQLite registry, the provisioning connection of `fleet serve`),
//! and N units (default 100) of one batch, each running the agent's first
//! boot ([`edgebind_agent::claim::ensure_identity`]) from its own copy of the
//! claim bundle: key made on the unit, CSR over MQTT, chain verified and
//! installed. All units start at the same instant; the clock stops when the
//! last one has installed its identity (or at the deadline: failures).
//!
//! Run: `cargo run --release -p edgebind-tests --bin bench_claim [-- N [RATE [BURST]]]`
//! (RATE, BURST: the service's per-batch limit, default 50/s and 100).

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgebind_agent::claim::{ClaimStats, FirstBoot, ensure_identity};
use edgebind_agent::config::{AgentConfig, BrokerConfig, ClaimConfig, IdentityConfig};
use edgebind_agent::shutdown_channel;
use edgebind_agent::systemd::Notifier;
use edgebind_certs::Validity;
use edgebind_fleet::mqtt::{BrokerEndpoint, ClientIdentity};
use edgebind_fleet::registry;
use edgebind_fleet::service::provision::{ProvisionConfig, RateLimit};
use edgebind_fleet::service::{ServiceConfig, ServiceHandle};
use edgebind_protocol::bundle::{SerialSource, claim_agent_toml};
use edgebind_protocol::{DeviceId, Principal, UnitSerial};
use edgebind_tests::{Broker, TestPki};

const DEADLINE: Duration = Duration::from_secs(120);

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let rate: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50.0);
    let burst: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);

    let pki = TestPki::new();
    let broker = Broker::start(&pki)?;
    let provisioning_port = broker
        .provisioning_port()
        .expect("the harness broker has a provisioning listener");
    let batch = DeviceId::new("bench-line")?;
    let claim = pki
        .pki()
        .issue(&Principal::Claim(batch.clone()), Validity::days(1))?;
    let serials: Vec<UnitSerial> = (0..n)
        .map(|i| UnitSerial::new(format!("BENCH-{i:05}")))
        .collect::<Result<_, _>>()?;
    let registry_path = pki.home().join("registry.db");
    registry::open_store(&registry_path.clone().into(), Default::default())?
        .allow_serials(&batch, &serials)?;

    let service = pki.service.clone();
    let mut config = ServiceConfig::new(
        registry_path,
        BrokerEndpoint {
            host: broker.host().into(),
            port: broker.port(),
        },
        ClientIdentity {
            cert: service.cert.clone(),
            key: service.key.clone(),
            ca: service.ca.clone(),
        },
    );
    config.provisioning = Some(ProvisionConfig {
        endpoint: BrokerEndpoint {
            host: broker.host().into(),
            port: provisioning_port,
        },
        pki_dir: pki.pki_dir(),
        board: "qemux86-64".parse()?,
        validity_days: 30,
        rate: RateLimit {
            per_second: rate,
            burst,
        },
    });
    let handle = ServiceHandle::start(config)?;
    let counters = handle.counters.clone();
    // Units would retry until the service listens; the clock starts once it does.
    let ready = edgebind_tests::wait_until(Duration::from_secs(30), || {
        counters
            .provision
            .subscribed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    });
    anyhow::ensure!(
        ready,
        "the fleet service never subscribed on the provisioning listener"
    );

    // Each unit: its own copy of the claim bundle (the claim key is deleted
    // by a unit once it has its identity).
    let units = tempfile::tempdir()?;
    let mut configs = Vec::with_capacity(n);
    let toml = claim_agent_toml(
        broker.host(),
        broker.port(),
        Some(broker.server_name()),
        provisioning_port,
        &SerialSource::Literal(serials[0].clone()),
    );
    for serial in &serials {
        let dir = units.path().join(serial.as_str());
        edgebind_certs::bundle::write_claim_bundle(&dir, &claim, pki.pki().root_pem(), &toml)?;
        let mut c = AgentConfig::new({
            let mut b = BrokerConfig::new(broker.host(), broker.port());
            b.server_name = Some(broker.server_name().into());
            b
        });
        c.identity = IdentityConfig {
            cert: dir.join("device.crt"),
            key: dir.join("device.key"),
            ca: dir.join("ca.crt"),
        };
        c.state.dir = dir.join("state");
        let mut cc = ClaimConfig::new(provisioning_port, serial.clone());
        cc.cert = dir.join("claim.crt");
        cc.key = dir.join("claim.key");
        cc.response_timeout_s = 10;
        c.claim = Some(cc);
        configs.push(c);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stats = Arc::new(ClaimStats::default());
    let start = Instant::now();
    let latencies = runtime.block_on(async {
        let mut tasks = Vec::with_capacity(n);
        for c in configs {
            let stats = stats.clone();
            tasks.push(tokio::spawn(async move {
                let (_stop, mut signal) = shutdown_channel();
                let got = tokio::time::timeout(
                    DEADLINE,
                    ensure_identity(&c, &stats, &Notifier::disabled(), None, &mut signal),
                )
                .await;
                match got {
                    Ok(Ok(FirstBoot::Provisioned(_))) => Some(start.elapsed()),
                    _ => None,
                }
            }));
        }
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.ok().flatten());
        }
        out
    });
    let elapsed = start.elapsed();
    let mut done: Vec<Duration> = latencies.iter().flatten().copied().collect();
    done.sort();
    let failures = n - done.len();
    let last = done.last().copied().unwrap_or(elapsed);
    let pct = |p: f64| {
        done.get(((done.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map(|d| format!("{:.0}ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let p = &counters.provision;
    use std::sync::atomic::Ordering::Relaxed;
    println!(
        "bench_claim: offered {n} devices of one batch booting at once (service limit {rate}/s burst {burst}, 1 instance, SQLite), \
         achieved {:.1} devices/s ({} provisioned in {:.2}s; first {}, median {}, p99 {}), failures {failures} \
         (requests {}, deferred {}, refused {}, rejected answers {})",
        done.len() as f64 / last.as_secs_f64(),
        done.len(),
        last.as_secs_f64(),
        pct(0.0),
        pct(0.5),
        pct(0.99),
        p.requests.load(Relaxed),
        p.deferred.load(Relaxed),
        p.refused.load(Relaxed),
        stats.get(&stats.rejected),
    );
    handle.stop()?;
    drop(broker);
    if failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}
