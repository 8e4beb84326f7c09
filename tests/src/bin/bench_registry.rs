//! Benchmark: `edgebind devices` at fleet scale. Registers N devices (one
//! batch, `Store::add_devices`) on each backend, marks 1 % of them online,
//! then times the listing calls `edgebind devices` makes: the first page,
//! a page deep into the fleet, and filtered pages (tag + state, free text).
//!
//! Each figure is the median of 25 calls on an open store (the CLI opens
//! the store once per run; the open itself is printed separately).
//! SQLite is a file in a tempdir; PostgreSQL is a real server this process
//! starts and removes ([`PgCluster`], fsync off as in the tests: listing
//! reads, so durability settings do not change these figures).
//!
//! Run: `cargo run --release -p edgebind-tests --bin bench_registry [-- N]`
//! (default N = 100000; target: a first page well under a second).

use std::time::{Duration, Instant};

use anyhow::Context;
use edgebind_fleet::registry::{
    DeviceQuery, Lifecycle, NewDevice, RegistryUrl, Retention, Store, Update, create_store,
    open_store,
};
use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::{Presence, Status};
use edgebind_tests::PgCluster;

const PAGE: u32 = 100;
const RUNS: usize = 25;

fn devices(n: usize) -> Vec<NewDevice> {
    (0..n)
        .map(|i| {
            let mut tags = std::collections::BTreeSet::new();
            tags.insert(format!("line-{}", i % 20).parse().expect("valid tag"));
            if i % 10 == 0 {
                tags.insert("lab".parse().expect("valid tag"));
            }
            NewDevice {
                id: DeviceId::new(format!("dev-{i:06}")).expect("valid id"),
                board: "raspberrypi3-64".parse().expect("known board"),
                tags,
                cert: None,
            }
        })
        .collect()
}

fn online_batch(n: usize) -> Vec<Update> {
    (0..n)
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
        .collect()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn time_query(store: &dyn Store, query: &DeviceQuery) -> anyhow::Result<(Duration, usize)> {
    let mut times = Vec::with_capacity(RUNS);
    let mut found = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        let page = store.list_devices(query)?;
        times.push(start.elapsed());
        found = page.devices.len();
    }
    Ok((median(times), found))
}

fn run(backend: &str, url: &RegistryUrl, n: usize) -> anyhow::Result<()> {
    let batch = devices(n);
    let mut store = create_store(url, Retention::default())?;
    let start = Instant::now();
    store.add_devices(&batch)?;
    println!(
        "registry add {n} devices in one batch ({backend}): {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let report = store.apply(&online_batch(n))?;
    anyhow::ensure!(report.unknown_devices.is_empty(), "all devices known");
    drop(store);

    let start = Instant::now();
    let store = open_store(url, Retention::default())?;
    println!("registry open ({backend}): {}", ms(start.elapsed()));
    let first = DeviceQuery {
        limit: PAGE,
        ..DeviceQuery::default()
    };
    let start = Instant::now();
    store.list_devices(&first)?;
    println!(
        "registry list first page, first call after open ({n} devices, {backend}): {}",
        ms(start.elapsed())
    );
    let deep = DeviceId::new(format!("dev-{:06}", n * 9 / 10))?;
    let queries = [
        ("first page".to_owned(), first.clone()),
        (
            format!("page deep in the fleet (--after {deep})"),
            DeviceQuery {
                after: Some(deep.clone()),
                ..first.clone()
            },
        ),
        (
            "filtered page (--tag lab --state online)".to_owned(),
            DeviceQuery {
                tag: Some("lab".parse()?),
                lifecycle: None,
                online: Some(true),
                ..first.clone()
            },
        ),
        (
            "filtered page (--state never-seen)".to_owned(),
            DeviceQuery {
                lifecycle: Some(Lifecycle::Registered),
                ..first.clone()
            },
        ),
        (
            "filtered page (--search 99)".to_owned(),
            DeviceQuery {
                search: Some("99".into()),
                ..first.clone()
            },
        ),
    ];
    for (what, query) in &queries {
        let (t, found) = time_query(store.as_ref(), query)?;
        anyhow::ensure!(found > 0, "{what}: no devices");
        println!("registry list {what} ({n} devices, {backend}): {}", ms(t));
    }
    drop(store);
    apply_rate(backend, url)
}

/// How fast `Store::apply` writes telemetry batches the size the fleet
/// service's writer commits under load (a figure for the store alone, no
/// broker; `bench_ingest` measures the whole path).
fn apply_rate(backend: &str, url: &RegistryUrl) -> anyhow::Result<()> {
    const BATCH: usize = 2_000;
    const BATCHES: usize = 20;
    const DEVICES: usize = 200;
    let mut store = open_store(url, Retention::default())?;
    let payload = r#"{"ts":1,"cpu_pct":12.5,"mem_used_bytes":1000,"mem_total_bytes":4000}"#;
    let start = Instant::now();
    for b in 0..BATCHES {
        let batch: Vec<Update> = (0..BATCH)
            .map(|k| {
                let seq = (b * BATCH + k) as u64;
                Update::Telemetry {
                    device: DeviceId::new(format!("dev-{:06}", (k % DEVICES) * 100))
                        .expect("valid id"),
                    ts: seq,
                    payload: payload.to_owned(),
                    received_at: seq,
                }
            })
            .collect();
        store.apply(&batch)?;
    }
    let rate = (BATCH * BATCHES) as f64 / start.elapsed().as_secs_f64();
    println!(
        "registry apply telemetry, batches of {BATCH} over {DEVICES} devices ({backend}): {rate:.0} msg/s"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().context("N: a number of devices")?,
        None => 100_000,
    };
    println!("bench_registry: {n} devices, pages of {PAGE}, median of {RUNS} calls");

    let dir = tempfile::tempdir()?;
    run(
        "sqlite",
        &RegistryUrl::Sqlite(dir.path().join("registry.db")),
        n,
    )?;

    let cluster = PgCluster::start().context("start PostgreSQL")?;
    let url = cluster.database()?;
    run("postgres", &url.parse()?, n)?;
    Ok(())
}
