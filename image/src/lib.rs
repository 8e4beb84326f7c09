//! Disk images of an Edgebind fleet: find the FAT boot partition of a `.wic`
//! or `.img` (MBR or GPT) and write a device's identity bundle into it, the
//! way a flashing station personalizes one golden image per unit.
//!
//! Everything happens in-process on the image file (or a card's block
//! device): `mbrman`/`gptman` read the partition table and `fatfs` writes
//! the file. Compared with driving mtools (what `edgebind image personalize`
//! did before) there is no external tool to install or version-skew, errors
//! are typed, and the write is crash-safe (see [`fat::write_file`]). Bytes
//! outside the FAT file system's own metadata and the file's clusters are
//! never written, so every other partition stays byte-identical.

pub mod fat;
pub mod partition;

use std::fs::File;
use std::path::{Path, PathBuf};

pub use partition::{Partition, Scheme};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {0}: {1}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("not a disk image: {0}")]
    NotADiskImage(String),
    #[error(
        "the image has no FAT boot partition ({0} partition(s), none of FAT type with a FAT file system)"
    )]
    NoBootPartition(usize),
    #[error("the image has no partition {0}")]
    NoSuchPartition(usize),
    #[error("partition {0} holds no FAT file system")]
    NotFat(usize),
    #[error("partition {0}: the FAT file system cannot be read: {1}")]
    BadFat(usize, #[source] std::io::Error),
    #[error(
        "partition {partition} is full: {free} bytes free, the bundle needs {needed}{}",
        existing.map(|e| format!(" (the current one, {e} bytes, is freed only after the new one is written)")).unwrap_or_default()
    )]
    Full {
        partition: usize,
        free: u64,
        needed: u64,
        existing: Option<u64>,
    },
    #[error("{0} read back differs from what was written")]
    ReadBack(String),
    #[error("{0}")]
    Io(#[source] std::io::Error),
}

use edgebind_protocol::bundle::{IDENTITY_DIR_ON_BOOT, IDENTITY_TAR_ON_BOOT};

/// Write an identity bundle (tar bytes) into the image's boot partition
/// (`number`, or the first FAT one) as `edgebind/identity.tar`. Returns
/// the partition it used.
pub fn personalize(
    image: &Path,
    number: Option<usize>,
    bundle_tar: &[u8],
) -> Result<Partition, Error> {
    let partition = {
        let mut file = File::open(image).map_err(|e| Error::Open(image.to_owned(), e))?;
        partition::boot_partition(&mut file, number)?
    };
    // The bundle contract names the path; the FAT writer wants directory and name.
    let name = IDENTITY_TAR_ON_BOOT
        .strip_prefix(IDENTITY_DIR_ON_BOOT)
        .and_then(|rest| rest.strip_prefix('/'))
        .expect("the identity tar lies in the identity directory");
    fat::write_file(image, &partition, IDENTITY_DIR_ON_BOOT, name, bundle_tar)?;
    Ok(partition)
}
