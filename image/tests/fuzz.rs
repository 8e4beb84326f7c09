//! The fuzz set of the disk image reader: a flashing station is handed
//! whatever file an operator names (a truncated download, a compressed
//! image, a card with a damaged table). Any bytes, and valid MBR/GPT images
//! with their tables or FAT metadata damaged, give a partition or a clear
//! error, never a panic; a write that reports success reads back exactly.

mod common;

use std::io::Cursor;
use std::sync::OnceLock;

use edgebind_image::{Scheme, partition};
use fscommon::StreamSlice;
use proptest::prelude::*;
use proptest::sample::Index;

const SECTOR: u64 = 512;
const BOOT_START_LBA: u64 = 64;
const BOOT_SECTORS: u64 = 2048;
const IMAGE_SECTORS: u64 = 3072;

/// A small image: partition 1 FAT (1 MiB, formatted by `fatfs`), partition 2
/// Linux, with an MBR or a GPT.
fn build(scheme: Scheme) -> Vec<u8> {
    let mut disk = Cursor::new(vec![0u8; (IMAGE_SECTORS * SECTOR) as usize]);
    let boot = (BOOT_START_LBA, BOOT_SECTORS);
    let linux = (boot.0 + boot.1, IMAGE_SECTORS - boot.0 - boot.1 - 64);
    common::write_table(&mut disk, scheme, boot, linux);
    let start = BOOT_START_LBA * SECTOR;
    let slice = StreamSlice::new(&mut disk, start, start + BOOT_SECTORS * SECTOR).unwrap();
    fatfs::format_volume(slice, fatfs::FormatVolumeOptions::new()).unwrap();
    disk.into_inner()
}

fn golden(scheme: Scheme) -> &'static [u8] {
    static MBR: OnceLock<Vec<u8>> = OnceLock::new();
    static GPT: OnceLock<Vec<u8>> = OnceLock::new();
    match scheme {
        Scheme::Mbr => MBR.get_or_init(|| build(Scheme::Mbr)),
        Scheme::Gpt => GPT.get_or_init(|| build(Scheme::Gpt)),
    }
}

fn scheme() -> impl Strategy<Value = Scheme> {
    prop_oneof![Just(Scheme::Mbr), Just(Scheme::Gpt)]
}

/// Flips within the first `span` bytes of the image: where the tables are.
fn flips(span: u64) -> impl Strategy<Value = Vec<(u64, u8)>> {
    prop::collection::vec((0..span, 1..=255u8), 1..6)
}

fn damaged(scheme: Scheme, flips: &[(u64, u8)]) -> Vec<u8> {
    let mut bytes = golden(scheme).to_vec();
    for (at, mask) in flips {
        bytes[*at as usize] ^= mask;
    }
    bytes
}

/// What the reader says: a partition inside the image, or an error that says something.
fn read_tables(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let len = bytes.len() as u64;
    let mut disk = Cursor::new(bytes);
    match partition::partitions(&mut disk) {
        Ok(all) => {
            for p in &all {
                prop_assert!(p.number >= 1);
            }
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    match partition::boot_partition(&mut disk, None) {
        Ok(p) => prop_assert!(p.start < len, "{:?} starts beyond the image", p),
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

#[test]
fn the_golden_images_have_their_boot_partition() {
    for s in [Scheme::Mbr, Scheme::Gpt] {
        let p = partition::boot_partition(&mut Cursor::new(golden(s)), None).unwrap();
        assert_eq!(
            (p.number, p.scheme, p.start, p.len),
            (1, s, BOOT_START_LBA * SECTOR, BOOT_SECTORS * SECTOR)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_are_an_image_or_a_clear_error(
        mut bytes in prop::collection::vec(any::<u8>(), 0..2048),
        signed in any::<bool>(),
    ) {
        // Half the inputs carry the boot signature, so the table parsers run.
        if signed && bytes.len() >= 512 {
            bytes[510] = 0x55;
            bytes[511] = 0xaa;
        }
        read_tables(bytes)?;
    }

    #[test]
    fn a_damaged_partition_table_is_read_or_refused(
        s in scheme(),
        flips in flips(34 * SECTOR),
    ) {
        read_tables(damaged(s, &flips))?;
    }

    #[test]
    fn a_truncated_image_is_read_or_refused(s in scheme(), cut in any::<Index>()) {
        let mut bytes = golden(s).to_vec();
        bytes.truncate(cut.index(bytes.len()));
        read_tables(bytes)?;
    }
}

/// One raw MBR entry: (type, starting LBA, sectors); FAT, Linux, extended
/// (CHS and LBA) and GPT-protective types, and any other.
fn mbr_entry() -> impl Strategy<Value = (u8, u32, u32)> {
    (
        prop_oneof![
            Just(0x0cu8),
            Just(0x83),
            Just(0x05),
            Just(0x0f),
            Just(0xee),
            any::<u8>()
        ],
        prop_oneof![0u32..64, any::<u32>()],
        prop_oneof![0u32..64, any::<u32>()],
    )
}

fn put_entry(sector: &mut [u8], slot: usize, (sys, start, len): (u8, u32, u32)) {
    let e = &mut sector[446 + slot * 16..446 + (slot + 1) * 16];
    e[4] = sys;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&len.to_le_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Tables written byte by byte (not by a crate that refuses odd values):
    /// any four entries, and behind an extended one a chain of EBRs with any
    /// entries, so the logical-partition walk meets huge and wrapping offsets.
    #[test]
    fn any_mbr_entries_and_ebr_chains_are_read_or_refused(
        primary in prop::collection::vec(mbr_entry(), 4),
        ebrs in prop::collection::vec((mbr_entry(), mbr_entry()), 0..4),
    ) {
        let mut bytes = vec![0u8; 64 * SECTOR as usize];
        let mut sector0 = [0u8; 512];
        for (i, e) in primary.iter().enumerate() {
            put_entry(&mut sector0, i, *e);
        }
        sector0[510] = 0x55;
        sector0[511] = 0xaa;
        bytes[..512].copy_from_slice(&sector0);
        // EBRs in the sectors an extended partition at LBA 1.. would reach.
        for (i, (logical, next)) in ebrs.iter().enumerate() {
            let at = (1 + i) * 512;
            let mut ebr = [0u8; 512];
            put_entry(&mut ebr, 0, *logical);
            put_entry(&mut ebr, 1, *next);
            ebr[510] = 0x55;
            ebr[511] = 0xaa;
            bytes[at..at + 512].copy_from_slice(&ebr);
        }
        read_tables(bytes)?;
    }
}

proptest! {
    // Each case writes an image file: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_damaged_boot_file_system_is_written_or_refused(
        s in scheme(),
        // The FAT metadata: boot sector, FATs and root directory.
        flips in prop::collection::vec((0..16 * 1024u64, 1..=255u8), 1..6),
        bundle in prop::collection::vec(any::<u8>(), 1..3000),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let offset = BOOT_START_LBA * SECTOR;
        let shifted: Vec<(u64, u8)> = flips.iter().map(|(at, m)| (offset + at, *m)).collect();
        std::fs::write(&path, damaged(s, &shifted)).unwrap();
        // personalize reads its own write back and fails if it differs.
        if let Err(e) = edgebind_image::personalize(&path, None, &bundle) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
