//! Personalizing one unit in place, against the image size: the same
//! 48 MiB FAT16 boot partition (mkfs.vfat) at 4 MiB in a sparse image file of
//! 64 MiB and of 4 GiB, an identity-bundle-sized file (6 KiB) written into it
//! `--runs` times. The time must not grow with the image (target: under
//! 200 ms, flat from 64 MiB to 4 GiB).

use std::fs::File;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const BOOT_START: u64 = 4 * MIB;
const BOOT_LEN: u64 = 48 * MIB;

fn image(dir: &std::path::Path, size: u64) -> std::path::PathBuf {
    let path = dir.join(format!("golden-{}.wic", size / MIB));
    let mut f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut f, 512, [9, 9, 9, 9]).unwrap();
    let boot = (BOOT_START / 512, BOOT_LEN / 512);
    let rest = (boot.0 + boot.1, size / 512 - boot.0 - boot.1 - 8);
    for (i, (start, len), sys) in [(1usize, boot, 0x0cu8), (2, rest, 0x83)] {
        mbr[i] = mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys,
            last_chs: mbrman::CHS::empty(),
            starting_lba: start as u32,
            sectors: len as u32,
        };
    }
    mbr.write_into(&mut f).unwrap();
    drop(f);
    let out = Command::new("mkfs.vfat")
        .args(["-F", "16", "-n", "BOOT", "--offset"])
        .arg((BOOT_START / 512).to_string())
        .arg(&path)
        .arg((BOOT_LEN / 1024).to_string())
        .output()
        .expect("mkfs.vfat (dosfstools)");
    assert!(out.status.success(), "{out:?}");
    path
}

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let bundle: Vec<u8> = (0..6144u32).map(|i| (i % 251) as u8).collect();
    for size in [64 * MIB, 4096 * MIB] {
        let img = image(dir.path(), size);
        let mut times: Vec<Duration> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                edgebind_image::personalize(&img, None, &bundle).unwrap();
                t.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "personalize in place, {:>4} MiB image (48 MiB FAT16 boot partition, 6 KiB bundle, {runs} runs): median {:.1} ms, max {:.1} ms",
            size / MIB,
            times[runs / 2].as_secs_f64() * 1e3,
            times[runs - 1].as_secs_f64() * 1e3
        );
        std::fs::remove_file(&img).unwrap();
    }
}
