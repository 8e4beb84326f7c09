//! Just enough of the MBR partition table to find a disk image's FAT boot
//! partition (what wic writes for the Raspberry Pi and PC BIOS layouts).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};

const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as `fdisk` numbers primary partitions.
    pub number: usize,
    pub kind: u8,
    pub start_lba: u32,
    pub sectors: u32,
}

impl Partition {
    pub fn byte_offset(&self) -> u64 {
        u64::from(self.start_lba) * SECTOR
    }

    pub fn is_fat(&self) -> bool {
        matches!(self.kind, 0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e | 0xef)
    }
}

/// Parses the four primary entries of an MBR sector. Errors say what the image
/// looks like instead (compressed, GPT, not a disk image).
pub fn parse(sector: &[u8]) -> anyhow::Result<Vec<Partition>> {
    if sector.len() < 512 {
        bail!("shorter than one 512-byte sector: not a disk image");
    }
    if let Some(kind) = compression(sector) {
        bail!("it is {kind}-compressed: decompress it first (e.g. the .wic, not the .wic.{kind})");
    }
    if sector[510] != 0x55 || sector[511] != 0xaa {
        bail!("no MBR boot signature (0x55AA at byte 510): not a partitioned disk image");
    }
    let mut parts = Vec::new();
    for i in 0..4 {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        let kind = e[4];
        if kind == 0 {
            continue;
        }
        if kind == 0xee {
            bail!("it has a GPT partition table (protective MBR); only MBR images are supported");
        }
        let start_lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        let sectors = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
        parts.push(Partition {
            number: i + 1,
            kind,
            start_lba,
            sectors,
        });
    }
    if parts.is_empty() {
        bail!("its MBR has no partitions");
    }
    Ok(parts)
}

fn compression(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"BZh") {
        Some("bz2")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some("gz")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zst")
    } else {
        None
    }
}

/// The boot partition of `image`: partition `number` if given (must be FAT),
/// else the first FAT partition.
pub fn boot_partition(image: &Path, number: Option<usize>) -> anyhow::Result<Partition> {
    let mut sector = vec![0u8; 512];
    File::open(image)
        .and_then(|mut f| f.read_exact(&mut sector))
        .with_context(|| format!("cannot read the first sector of {}", image.display()))?;
    let parts = parse(&sector).with_context(|| format!("image {}", image.display()))?;
    let chosen = match number {
        Some(n) => *parts
            .iter()
            .find(|p| p.number == n)
            .with_context(|| format!("image {} has no partition {n}", image.display()))?,
        None => *parts.iter().find(|p| p.is_fat()).with_context(|| {
            format!(
                "image {} has no FAT partition (types: {})",
                image.display(),
                parts
                    .iter()
                    .map(|p| format!("{}=0x{:02x}", p.number, p.kind))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
    };
    if !chosen.is_fat() {
        bail!(
            "partition {} of {} has type 0x{:02x}, not FAT",
            chosen.number,
            image.display(),
            chosen.kind
        );
    }
    Ok(chosen)
}
