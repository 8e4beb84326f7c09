//! Benchmark: the flashing station's throughput, units per minute.
//!
//! One batch of N units (default 500) through `fleet::ops::factory::run`, the
//! function `edgebind factory run` calls: per unit a P-256 key and device
//! certificate (one PKI inventory update each), its manufacturing record and
//! device row in one SQLite transaction, and its output:
//!
//! * bundle mode: `<out>/<id>.tar` (what a duplicator copies);
//! * image mode: a personalized copy of a small golden image (8 MiB, MBR,
//!   4 MiB FAT boot partition made by mkfs.vfat at 1 MiB): copy, write the
//!   bundle onto the boot partition in-process, rename.
//!
//! Run: `cargo run --release -p edgebind-tests --bin bench_factory [-- --units N]`.
//! Output goes to a tempdir (`TMPDIR` picks the disk), removed at the end.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use edgebind_certs::{InitOptions, Pki};
use edgebind_fleet::ops::factory::{self, FactoryOutput, FactoryRun};
use edgebind_fleet::ops::{AgentBroker, FleetHome};

const MIB: u64 = 1024 * 1024;

fn golden(dir: &Path) -> PathBuf {
    let path = dir.join("golden.wic");
    let mut f = File::create(&path).unwrap();
    f.set_len(8 * MIB).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut f, 512, [3, 1, 4, 1]).unwrap();
    for (i, start, len, sys) in [(1usize, 2048u32, 8192u32, 0x0cu8), (2, 10240, 6144, 0x83)] {
        mbr[i] = mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys,
            last_chs: mbrman::CHS::empty(),
            starting_lba: start,
            sectors: len,
        };
    }
    mbr.write_into(&mut f).unwrap();
    drop(f);
    let out = Command::new("mkfs.vfat")
        .args(["-n", "BOOT", "--offset", "2048"])
        .arg(&path)
        .arg("4096")
        .output()
        .expect("mkfs.vfat (dosfstools)");
    assert!(out.status.success(), "{out:?}");
    path
}

fn batch(label: &str, n: usize, output: FactoryOutput) {
    let dir = tempfile::tempdir().unwrap();
    let home = FleetHome::new(dir.path().join("home"));
    Pki::init(&home.pki_dir(), &InitOptions::new("bench")).unwrap();
    let mut store = home.create_registry().unwrap();
    let mut csv = String::from("serial,board,tags\n");
    for i in 0..n {
        csv.push_str(&format!("BENCH-{i:06},raspberrypi3-64,bench\n"));
    }
    let units = factory::manifest::parse_manifest("bench.csv", csv.as_bytes()).unwrap();
    let output = match output {
        FactoryOutput::Image { .. } => FactoryOutput::Image {
            golden: golden(dir.path()),
            partition: None,
        },
        other => other,
    };
    let run = FactoryRun {
        units,
        output,
        out: dir.path().join("out"),
        station: "bench".into(),
        operator: "bench".into(),
        validity_days: 30,
        broker: Some(AgentBroker::from_addr("broker.bench:8883").unwrap()),
        reissue: false,
    };
    let start = Instant::now();
    let report = factory::run(&home, store.as_mut(), &run, |_| {}).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(report.made, n, "{:?}", report.stopped);
    assert_eq!(store.manufacturing_records().unwrap().len(), n);
    println!(
        "factory run, {label}, {n} units (issue + register + record + output): {secs:.1} s, {:.0} units/min ({:.1} ms/unit)",
        n as f64 * 60.0 / secs,
        secs * 1e3 / n as f64
    );
}

fn main() {
    let n: usize = std::env::args()
        .skip_while(|a| a != "--units")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    batch("bundle mode (one .tar each)", n, FactoryOutput::Bundles);
    batch(
        "image mode (8 MiB MBR golden, 4 MiB FAT)",
        n,
        FactoryOutput::Image {
            golden: PathBuf::new(),
            partition: None,
        },
    );
}
