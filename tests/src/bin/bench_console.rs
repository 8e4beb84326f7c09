//! Benchmark: the web console at fleet scale.
//!
//! 1. Server time for the first page of the device list with N registered
//!    devices (default 100,000; 1 % online): `GET /devices` over HTTPS with
//!    curl, the console's own `Server-Timing` figure (the time the handler
//!    took, registry read and render) and curl's time to first byte; the
//!    median of 25 calls after one warm-up. Target: under 100 ms.
//! 2. Connect to online in the browser: a device (MQTT 5 over mutual TLS,
//!    its own certificate) connects and publishes `online`; the fleet
//!    service records it; the console's live region (server-sent events)
//!    turns its row online in headless Chromium, which notes the time
//!    (`Date.now()`, the same clock) when the badge changes. The delay from
//!    before the device's TLS connect to that moment, for 10 devices one
//!    after another; median and worst. Target: under 1 s.
//!
//! Both on SQLite (`<home>/registry.db`) and then on PostgreSQL (a
//! throwaway cluster, fsync off as in the tests), each with its own home,
//! broker, fleet service and console; `--backend sqlite|postgres` runs one.
//!
//! Everything real and on 127.0.0.1: Mosquitto, `edgebind fleet serve`,
//! `edgebind console`, Chromium with chromedriver, PostgreSQL.
//!
//! Run: `cargo run --release -p edgebind-tests --bin bench_console [-- N] [--backend B]`

use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use edgebind_fleet::ops::{self, FleetHome};
use edgebind_fleet::registry::{self, NewDevice, RegistryUrl, Retention, Update};
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::{Presence, Status};
use edgebind_protocol::topics::Topic;
use edgebind_tests::console::{Browser, ConsoleProc, Killed};
use edgebind_tests::{Broker, PgCluster, QoS, TestClient, TestPki, bin_path, spawn_tied};
use serde_json::Value;

const RUNS: usize = 25;
const PROBES: usize = 10;
const LIST_TARGET_MS: f64 = 100.0;
const ONLINE_TARGET_MS: f64 = 1000.0;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
        * 1000.0
}

/// The probes sort before the fleet (`a-probe-…` < `dev-…`): they are on
/// the list's first page.
fn probe(i: usize) -> String {
    format!("a-probe-{i:02}")
}

fn seed(url: &RegistryUrl, n: usize) -> anyhow::Result<()> {
    let mut store = registry::create_store(url, Retention::default())?;
    let board: registry::Board = "raspberrypi3-64".parse()?;
    let mut batch: Vec<NewDevice> = (0..n)
        .map(|i| NewDevice {
            id: DeviceId::new(format!("dev-{i:06}")).expect("valid id"),
            board: board.clone(),
            tags: BTreeSet::new(),
            cert: None,
        })
        .collect();
    batch.extend((0..PROBES).map(|i| NewDevice {
        id: DeviceId::new(probe(i)).expect("valid id"),
        board: board.clone(),
        tags: BTreeSet::new(),
        cert: None,
    }));
    store.add_devices(&batch)?;
    let online: Vec<Update> = (0..n)
        .step_by(100)
        .map(|i| Update::Status {
            device: DeviceId::new(format!("dev-{i:06}")).expect("valid id"),
            status: Status {
                state: Presence::Online,
                session: None,
                agent_version: Some("0.1.0".into()),
                boot_id: None,
                uptime_s: None,
                addresses: vec![],
                ts: Some(1_000),
            },
            received_at: 1_000,
        })
        .collect();
    store.apply(&online)?;
    Ok(())
}

/// `edgebind fleet serve` on `registry`, once it logged its broker connection.
fn fleet_service(home: &Path, registry: &RegistryUrl) -> anyhow::Result<Killed> {
    let log = home.join("fleet-service.log");
    let file = File::create(&log)?;
    let mut cmd = Command::new(bin_path("edgebind"));
    cmd.arg("--home")
        .arg(home)
        .args([
            "fleet",
            "serve",
            "--log-level",
            "info",
            "--no-inventory-on-connect",
        ])
        .env_remove("EDGEBIND_HOME")
        .env_remove("EDGEBIND_BROKER")
        .env("EDGEBIND_REGISTRY", registry_arg(registry))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut child = Killed(spawn_tied(cmd).context("spawn edgebind fleet serve")?);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("fleet service connected") {
            // Its subscriptions are acknowledged right after.
            std::thread::sleep(Duration::from_millis(500));
            return Ok(child);
        }
        if Instant::now() > deadline || !matches!(child.0.try_wait(), Ok(None)) {
            bail!("the fleet service did not connect; log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// curl the first page: (Server-Timing ms, time to first byte ms).
fn timed_get(base: &str, ca: &Path, token: &str) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-D", "-", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("authorization: Bearer {token}")])
        .args(["-w", "ttfb=%{time_starttransfer} pre=%{time_pretransfer}\n"])
        .arg(format!("{base}/devices"))
        .output()
        .context("run curl (Debian package curl)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.starts_with("HTTP/1.1 200"),
        "GET /devices: {text}"
    );
    let server = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("server-timing: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.split("dur=").nth(1).map(str::to_owned))
        .and_then(|d| d.trim().parse::<f64>().ok())
        .context("a Server-Timing header")?;
    let num = |key: &str| -> anyhow::Result<f64> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("curl's {key}"))
    };
    Ok((server, (num("ttfb=")? - num("pre=")?) * 1000.0))
}

fn api_token(base: &str, ca: &Path, code: &str) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(ca)
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(serde_json::json!({ "code": code }).to_string())
        .arg(format!("{base}/api/session"))
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("POST /api/session")?;
    Ok(v["token"].as_str().context("a token")?.to_owned())
}

/// A script in the page that notes when each probe's row first shows
/// online (`window.__online[id] = Date.now()`).
const WATCH_ROWS: &str = r#"
window.__online = {};
const note = () => document.querySelectorAll('tr[data-device]').forEach(tr => {
  const id = tr.dataset.device;
  if (!(id in window.__online) && tr.querySelector('.badge.online')) { window.__online[id] = Date.now(); }
});
note();
new MutationObserver(note).observe(document.getElementById('device-list'), {subtree: true, childList: true, characterData: true});
return true;
"#;

async fn connect_to_online(
    browser: &Browser,
    base: &str,
    pki: &TestPki,
    broker: &Broker,
) -> anyhow::Result<Vec<f64>> {
    let c = &browser.client;
    c.goto(&format!("{base}/devices")).await?;
    browser
        .wait_text(
            "tr[data-device=a-probe-00]",
            "never seen",
            Duration::from_secs(30),
        )
        .await;
    c.execute(WATCH_ROWS, vec![]).await?;
    let mut delays = Vec::new();
    let mut clients = Vec::new();
    for i in 0..PROBES {
        let id = probe(i);
        let identity = pki.device(&id);
        let topic = Topic::Status(DeviceId::new(&id)?).render();
        let status = Status {
            state: Presence::Online,
            session: Some(format!("bench-{i}")),
            agent_version: Some("bench".into()),
            boot_id: None,
            uptime_s: Some(1),
            addresses: vec![],
            ts: Some(edgebind_protocol::messages::now_unix()),
        };
        let started = now_ms();
        let client = TestClient::connect(&identity, broker)?;
        client.publish(
            &topic,
            &serde_json::to_vec(&status)?,
            QoS::AtLeastOnce,
            true,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let seen = loop {
            let v = c
                .execute(&format!("return window.__online['{id}'] || null;"), vec![])
                .await?;
            if let Some(t) = v.as_f64() {
                break t;
            }
            if Instant::now() > deadline {
                bail!("{id}'s row never turned online in the browser");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        delays.push(seen - started);
        clients.push(client);
    }
    Ok(delays)
}

/// `registry` as `EDGEBIND_REGISTRY` takes it.
fn registry_arg(registry: &RegistryUrl) -> String {
    match registry {
        RegistryUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
        RegistryUrl::Postgres(url) => url.clone(),
    }
}

fn main() -> anyhow::Result<()> {
    let mut n = 100_000;
    let mut backends = vec!["sqlite", "postgres"];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backend" => match args.next().as_deref() {
                Some("sqlite") => backends = vec!["sqlite"],
                Some("postgres") => backends = vec!["postgres"],
                other => bail!("--backend sqlite|postgres, not {other:?}"),
            },
            _ => n = a.parse().context("N: a number of devices")?,
        }
    }
    let cluster = if backends.contains(&"postgres") {
        Some(PgCluster::start().context("start PostgreSQL")?)
    } else {
        None
    };
    for backend in backends {
        let pki = TestPki::new();
        let registry = match &cluster {
            Some(c) if backend == "postgres" => c.database()?.parse()?,
            _ => RegistryUrl::Sqlite(pki.home().join("registry.db")),
        };
        bench(&pki, backend, &registry, n)?;
    }
    Ok(())
}

fn bench(pki: &TestPki, backend: &str, registry: &RegistryUrl, n: usize) -> anyhow::Result<()> {
    let setup = Instant::now();
    let broker = Broker::start(pki)?;
    let home = pki.home().to_owned();
    // Let `edgebind` find and signal the broker as in production.
    std::fs::write(
        broker.dir().join(edgebind_broker::layout::PID),
        format!("{}\n", broker.pid().context("broker pid")?),
    )?;
    seed(registry, n)?;
    let _service = fleet_service(&home, registry)?;
    let console = ConsoleProc::start(&home, Some(&registry_arg(registry)), &[]);
    let base = console.base();
    let ca = pki.root_ca();
    let fleet_home = FleetHome::new(&home).with_registry(Some(registry.clone()));
    let mut store = fleet_home.open_registry()?;
    let mut code = || -> anyhow::Result<String> {
        Ok(ops::issue_login_code(&fleet_home, store.as_mut(), "tester", 600)?.code)
    };
    eprintln!(
        "  setup ({backend}): PKI, broker, {n} devices, fleet service, console in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    // 1. The first page.
    let token = api_token(&base, &ca, &code()?)?;
    timed_get(&base, &ca, &token)?;
    let mut server = Vec::new();
    let mut ttfb = Vec::new();
    for _ in 0..RUNS {
        let (s, t) = timed_get(&base, &ca, &token)?;
        server.push(s);
        ttfb.push(t);
    }
    let (server, ttfb) = (median(server), median(ttfb));
    println!(
        "bench_console: list first page, {n} devices ({backend}): offered {RUNS} sequential GET /devices, \
         target < {LIST_TARGET_MS} ms, result server {server:.1} ms median (time to first byte {ttfb:.1} ms) {}",
        if server < LIST_TARGET_MS {
            "OK"
        } else {
            "OVER TARGET"
        }
    );

    // 2. Connect to online in the browser.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let work = tempfile::tempdir()?;
    let delays = runtime.block_on(async {
        let browser = Browser::start(
            &work.path().join("dl"),
            &work.path().join("profile"),
            1280,
            900,
        )
        .await;
        browser.log_in(&base, &code()?).await;
        let delays = connect_to_online(&browser, &base, pki, &broker).await;
        let _ = browser.client.clone().close().await;
        delays
    })?;
    let worst = delays.iter().cloned().fold(0.0, f64::max);
    let med = median(delays.clone());
    println!(
        "bench_console: connect to online in the browser, {n} devices ({backend}): offered {PROBES} devices \
         connecting one after another, target < {ONLINE_TARGET_MS} ms, result {med:.0} ms median, \
         {worst:.0} ms worst {}",
        if worst < ONLINE_TARGET_MS {
            "OK"
        } else {
            "OVER TARGET"
        }
    );
    drop(console);
    Ok(())
}
