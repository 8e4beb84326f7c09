//! Benchmark: device identities issued per second for a factory batch.
//!
//! Each identity = a fresh P-256 key, a device certificate signed by the
//! issuing CA, and a complete bundle on disk (agent.toml, device.crt,
//! device.key, ca.crt + the .tar) plus the PKI's copy of the certificate and
//! one inventory update for the batch. Two figures:
//!
//! * library: `Pki::issue_devices` inside this process (1 thread, then all cores);
//! * CLI, whole process: `edgebind pki issue device --batch FILE` spawned and
//!   timed from spawn to exit (what a factory line runs);
//!
//! each for full bundles (directory + tar) and for `--tar-only` (the tar is
//! what the image personalization consumes). Bundles go to a tempdir
//! (`TMPDIR` picks the disk; the default /tmp is the root ext4 here).
//!
//! Run: `cargo run --release -p edgebind-tests --bin bench_pki [-- N [THREADS]]`
//! (default N = 1000; target >= 3000 identities/s on 2 cores).

use std::process::Command;
use std::time::Instant;

use edgebind_certs::{InitOptions, IssuedCert, Pki, Validity, bundle};
use edgebind_protocol::DeviceId;

fn ids(prefix: &str, n: usize) -> Vec<DeviceId> {
    (0..n)
        .map(|i| DeviceId::new(format!("{prefix}-{i:06}")).expect("valid id"))
        .collect()
}

/// Tempdirs are kept until the end: deleting thousands of files (with the
/// `discard` mount option here) would stall the disk during the next run.
type Keep = Vec<tempfile::TempDir>;

fn library_run(n: usize, threads: usize, tar_only: bool, keep: &mut Keep) -> anyhow::Result<f64> {
    let home = tempfile::tempdir()?;
    let pki = Pki::init(&home.path().join("pki"), &InitOptions::new("bench"))?;
    let out = home.path().join("bundles");
    std::fs::create_dir_all(&out)?;
    let ids = ids("lib", n);
    let start = Instant::now();
    let each = |issued: &IssuedCert| {
        let id = DeviceId::new(issued.cn.clone())?;
        let toml = bundle::agent_toml(&id, "broker.example.net", 8883, None);
        let form = if tar_only {
            bundle::BundleForm::TarOnly
        } else {
            bundle::BundleForm::DirectoryAndTar
        };
        bundle::write_into(&out, form, &id, issued, pki.root_pem(), &toml)
    };
    let issued = pki.issue_devices(&ids, Validity::days(1825), threads, each, |_| {})?;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(issued.len(), n);
    assert!(out.join(format!("{}.tar", ids[n - 1])).is_file());
    keep.push(home);
    Ok(secs)
}

fn cli_run(n: usize, tar_only: bool, keep: &mut Keep) -> anyhow::Result<(f64, f64)> {
    let edgebind = edgebind_tests::bin_path("edgebind");
    let home = tempfile::tempdir()?;
    let init = Command::new(&edgebind)
        .arg("--home")
        .arg(home.path())
        .args(["pki", "init", "--fleet", "bench"])
        .output()?;
    anyhow::ensure!(init.status.success(), "pki init failed: {init:?}");
    let list = home.path().join("ids.txt");
    let text: Vec<String> = ids("cli", n).iter().map(|i| i.to_string()).collect();
    std::fs::write(&list, text.join("\n"))?;
    let mut cmd = Command::new(&edgebind);
    cmd.arg("--home")
        .arg(home.path())
        .args(["pki", "issue", "device", "--batch"])
        .arg(&list)
        .args([
            "--broker-host",
            "broker.example.net",
            "--board",
            "qemux86-64",
        ]);
    if tar_only {
        cmd.arg("--tar-only");
    }
    let start = Instant::now();
    let out = cmd.output()?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(out.status.success(), "batch failed: {out:?}");
    let bundles = std::fs::read_dir(home.path().join("bundles"))?
        .filter(|e| {
            e.as_ref()
                .map(|e| e.path().extension().is_some_and(|x| x == "tar"))
                .unwrap_or(false)
        })
        .count();
    anyhow::ensure!(bundles == n, "expected {n} tars, found {bundles}");
    // The CLI's own figure (excludes process start-up and the final inventory write).
    let reported = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix('(')
                .and_then(|w| w.strip_suffix("/s)"))
                .map(str::to_owned)
        })
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    keep.push(home);
    Ok((secs, reported))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map_or(Ok(1000), |a| a.parse())?;
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    let threads: usize = args.get(1).map_or(Ok(cores), |a| a.parse())?;
    println!(
        "bench_pki: {n} device identities (P-256 key + cert + bundle dir + tar), {cores} cores"
    );

    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    println!("median of {rounds} rounds (BENCH_ROUNDS); identities per second");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut keep = Keep::new();
    for (label, tar_only) in [("dir + tar", false), ("tar only ", true)] {
        let (mut one, mut par, mut cli) = (vec![], vec![], vec![]);
        for _ in 0..rounds {
            one.push(n as f64 / library_run(n, 1, tar_only, &mut keep)?);
            par.push(n as f64 / library_run(n, threads, tar_only, &mut keep)?);
            cli.push(n as f64 / cli_run(n, tar_only, &mut keep)?.0);
        }
        println!(
            "{label}: library 1 thread {:>6.0} | library {threads} threads {:>6.0} | \
             CLI whole process (spawn to exit) {:>6.0}   [CLI runs: {}]",
            median(one),
            median(par),
            median(cli.clone()),
            cli.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
