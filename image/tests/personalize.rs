//! Personalizing MBR and GPT disk images in-process, checked with
//! independent tools: the FAT file system is made by `mkfs.vfat`
//! (dosfstools) and the bundle is read back with `mcopy` (mtools); every
//! byte outside the boot partition must be unchanged.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use edgebind_image::{Error, Scheme, personalize};

const MIB: u64 = 1024 * 1024;
const BOOT_START: u64 = MIB;
const BOOT_LEN: u64 = 32 * MIB;

/// A sparse image of `size` bytes: partition 1 FAT (at 1 MiB, 32 MiB long,
/// made by mkfs.vfat), partition 2 Linux filling the rest, with a
/// recognisable pattern at both ends so a stray write would show.
fn image(dir: &Path, scheme: Scheme, size: u64) -> PathBuf {
    let path = dir.join(format!("{scheme:?}-{size}.img"));
    let mut f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let sectors = size / 512;
    let boot = (BOOT_START / 512, BOOT_LEN / 512);
    let linux = (boot.0 + boot.1, sectors - (boot.0 + boot.1) - 64);
    common::write_table(&mut f, scheme, boot, linux);
    let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i * 31 % 251) as u8).collect();
    for at in [linux.0 * 512, (linux.0 + linux.1) * 512 - MIB] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&pattern).unwrap();
    }
    drop(f);
    let status = Command::new("mkfs.vfat")
        .args(["-n", "BOOT", "--offset"])
        .arg((BOOT_START / 512).to_string())
        .arg(&path)
        .arg((BOOT_LEN / 1024).to_string())
        .output()
        .expect("mkfs.vfat (dosfstools) must be installed");
    assert!(status.status.success(), "{status:?}");
    path
}

/// The bundle as mtools reads it, or None when the file is absent.
fn mtools_read(img: &Path, file: &str) -> Option<Vec<u8>> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-n", "-i"])
        .arg(format!("{}@@{BOOT_START}", img.display()))
        .arg(format!("::/{file}"))
        .arg(out.path())
        .output()
        .expect("mtools must be installed");
    status
        .status
        .success()
        .then(|| std::fs::read(out.path()).unwrap())
}

/// Every byte outside the boot partition.
fn outside_boot(img: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(img).unwrap();
    bytes.drain(BOOT_START as usize..(BOOT_START + BOOT_LEN) as usize);
    bytes
}

fn bundle(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(tag)).collect()
}

fn round_trip(scheme: Scheme) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), scheme, 64 * MIB);
    let before = outside_boot(&img);

    let first = bundle(3, 10_000);
    let p = personalize(&img, None, &first).unwrap();
    assert_eq!((p.number, p.scheme, p.start), (1, scheme, BOOT_START));
    assert_eq!(
        mtools_read(&img, "edgebind/identity.tar").as_deref(),
        Some(&first[..])
    );

    // Again, with another (larger) bundle: replaced, nothing pending left.
    let second = bundle(7, 50_000);
    personalize(&img, Some(1), &second).unwrap();
    assert_eq!(
        mtools_read(&img, "edgebind/identity.tar").as_deref(),
        Some(&second[..])
    );
    assert!(mtools_read(&img, "edgebind/identity.tar.new").is_none());
    assert!(
        outside_boot(&img) == before,
        "bytes outside the boot partition changed"
    );
}

#[test]
fn mbr_image_gets_the_bundle_and_nothing_else_changes() {
    round_trip(Scheme::Mbr);
}

#[test]
fn gpt_image_gets_the_bundle_and_nothing_else_changes() {
    round_trip(Scheme::Gpt);
}

#[test]
fn bad_images_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("image.wic.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let err = personalize(&gz, None, b"x").unwrap_err();
    assert!(err.to_string().contains("gzip"), "{err}");

    let zeros = dir.path().join("zeros.img");
    File::create(&zeros).unwrap().set_len(MIB).unwrap();
    let err = personalize(&zeros, None, b"x").unwrap_err();
    assert!(matches!(err, Error::NotADiskImage(_)), "{err}");

    // Partition 2 is Linux, not FAT.
    let img = image(dir.path(), Scheme::Mbr, 64 * MIB);
    let err = personalize(&img, Some(2), b"x").unwrap_err();
    assert!(matches!(err, Error::NotFat(2)), "{err}");
    let err = personalize(&img, Some(9), b"x").unwrap_err();
    assert!(matches!(err, Error::NoSuchPartition(9)), "{err}");

    // A FAT-typed partition whose file system was wiped: no boot partition.
    let mut f = OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(BOOT_START)).unwrap();
    f.write_all(&[0u8; 512]).unwrap();
    drop(f);
    let err = personalize(&img, None, b"x").unwrap_err();
    assert!(matches!(err, Error::NoBootPartition(2)), "{err}");
}

#[test]
fn a_full_partition_is_refused_and_the_old_bundle_stays() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), Scheme::Gpt, 64 * MIB);
    let old = bundle(5, 4096);
    personalize(&img, None, &old).unwrap();
    let huge = vec![0xa5u8; 40 * MIB as usize];
    let err = personalize(&img, None, &huge).unwrap_err();
    assert!(matches!(err, Error::Full { partition: 1, .. }), "{err}");
    assert!(err.to_string().contains("is full"), "{err}");
    assert_eq!(
        mtools_read(&img, "edgebind/identity.tar").as_deref(),
        Some(&old[..])
    );
}
