//! Finding the FAT boot partition of a disk image, with an MBR or a GPT
//! partition table (read with `mbrman` / `gptman`, so odd tables are the
//! crates' problem, not a parser of ours).

use std::io::{Read, Seek, SeekFrom};

use crate::Error;

const SECTOR: u64 = 512;

/// GPT partition types a boot partition can carry: the EFI System Partition
/// and Microsoft basic data (what wic's `--fstype=vfat` writes), as they are
/// stored on disk (mixed endian).
const GPT_FAT_TYPES: [[u8; 16]; 2] = [
    guid(
        0xC12A7328,
        0xF81F,
        0x11D2,
        [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
    ),
    guid(
        0xEBD0A0A2,
        0xB9E5,
        0x4433,
        [0x87, 0xC0, 0x68, 0xB6, 0xB7, 0x26, 0x99, 0xC7],
    ),
];

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Which partition table the image has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Mbr,
    Gpt,
}

/// One partition, in bytes from the start of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as `fdisk` and `sgdisk` number them.
    pub number: usize,
    pub scheme: Scheme,
    pub start: u64,
    pub len: u64,
}

fn mbr_type_is_fat(sys: u8) -> bool {
    matches!(sys, 0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e | 0xef)
}

/// What the first sector says the file is, when it is no disk image.
fn not_a_disk_image(sector: &[u8]) -> Option<String> {
    let compressed = [
        (&[0x1f, 0x8b][..], "gzip"),
        (&[0xfd, b'7', b'z', b'X', b'Z'][..], "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd][..], "zstd"),
        (&[b'B', b'Z', b'h'][..], "bzip2"),
    ];
    for (magic, kind) in compressed {
        if sector.starts_with(magic) {
            return Some(format!(
                "it is {kind}-compressed: decompress it first (the .wic, not the .wic.{kind})"
            ));
        }
    }
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xaa {
        return Some("it has no partition table (no boot signature in sector 0)".into());
    }
    None
}

/// All partitions of the image, MBR or GPT.
pub fn partitions<D: Read + Seek>(disk: &mut D) -> Result<Vec<Partition>, Error> {
    let mut sector = [0u8; 512];
    disk.seek(SeekFrom::Start(0)).map_err(Error::Io)?;
    let read = read_full(disk, &mut sector)?;
    if let Some(why) = not_a_disk_image(&sector[..read]) {
        return Err(Error::NotADiskImage(why));
    }
    // A protective MBR (one entry of type 0xEE) announces a GPT.
    let protective = (0..4).any(|i| sector[446 + i * 16 + 4] == 0xee);
    if protective {
        disk.seek(SeekFrom::Start(0)).map_err(Error::Io)?;
        let gpt = gptman::GPT::read_from(disk, SECTOR)
            .map_err(|e| Error::NotADiskImage(format!("its GPT cannot be read: {e}")))?;
        return Ok(gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(n, p)| Partition {
                number: n as usize,
                scheme: Scheme::Gpt,
                start: p.starting_lba * gpt.sector_size,
                len: (p.ending_lba + 1 - p.starting_lba) * gpt.sector_size,
            })
            .collect());
    }
    disk.seek(SeekFrom::Start(0)).map_err(Error::Io)?;
    let mbr = mbrman::MBR::read_from(disk, SECTOR as u32)
        .map_err(|e| Error::NotADiskImage(format!("its MBR cannot be read: {e}")))?;
    Ok(mbr
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(n, p)| Partition {
            number: n,
            scheme: Scheme::Mbr,
            start: u64::from(p.starting_lba) * SECTOR,
            len: u64::from(p.sectors) * SECTOR,
        })
        .collect())
}

/// The boot partition: `number` if given (it must hold a FAT file system),
/// else the first partition whose type says FAT and whose first sector is a
/// FAT boot sector.
pub fn boot_partition<D: Read + Seek>(
    disk: &mut D,
    number: Option<usize>,
) -> Result<Partition, Error> {
    let all = partitions(disk)?;
    let types = partition_types(disk, &all)?;
    if let Some(n) = number {
        let p = *all
            .iter()
            .find(|p| p.number == n)
            .ok_or(Error::NoSuchPartition(n))?;
        if !has_fat_boot_sector(disk, &p)? {
            return Err(Error::NotFat(n));
        }
        return Ok(p);
    }
    for (p, fat_type) in all.iter().zip(types) {
        if fat_type && has_fat_boot_sector(disk, p)? {
            return Ok(*p);
        }
    }
    Err(Error::NoBootPartition(all.len()))
}

/// Whether each partition's table entry says FAT.
fn partition_types<D: Read + Seek>(disk: &mut D, all: &[Partition]) -> Result<Vec<bool>, Error> {
    let Some(first) = all.first() else {
        return Ok(Vec::new());
    };
    disk.seek(SeekFrom::Start(0)).map_err(Error::Io)?;
    Ok(match first.scheme {
        Scheme::Gpt => {
            let gpt = gptman::GPT::read_from(disk, SECTOR)
                .map_err(|e| Error::NotADiskImage(format!("its GPT cannot be read: {e}")))?;
            all.iter()
                .map(|p| GPT_FAT_TYPES.contains(&gpt[p.number as u32].partition_type_guid))
                .collect()
        }
        Scheme::Mbr => {
            let mbr = mbrman::MBR::read_from(disk, SECTOR as u32)
                .map_err(|e| Error::NotADiskImage(format!("its MBR cannot be read: {e}")))?;
            all.iter()
                .map(|p| mbr_type_is_fat(mbr[p.number].sys))
                .collect()
        }
    })
}

/// A FAT boot sector: jump instruction, 0x55AA, and "FAT" where FAT12/16
/// or FAT32 name their type.
fn has_fat_boot_sector<D: Read + Seek>(disk: &mut D, p: &Partition) -> Result<bool, Error> {
    let mut bs = [0u8; 512];
    disk.seek(SeekFrom::Start(p.start)).map_err(Error::Io)?;
    if read_full(disk, &mut bs)? < 512 {
        return Ok(false);
    }
    let jump = bs[0] == 0xeb || bs[0] == 0xe9;
    let signature = bs[510] == 0x55 && bs[511] == 0xaa;
    let named = &bs[54..57] == b"FAT" || &bs[82..85] == b"FAT";
    Ok(jump && signature && named)
}

fn read_full<D: Read>(disk: &mut D, buf: &mut [u8]) -> Result<usize, Error> {
    let mut n = 0;
    while n < buf.len() {
        match disk.read(&mut buf[n..]).map_err(Error::Io)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
