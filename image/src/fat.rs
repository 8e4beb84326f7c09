//! Writing one file into a FAT file system inside a disk image, in-process
//! with `fatfs` over a slice of the image file (`fscommon::StreamSlice`):
//! no mount, no root, no mtools, and only the FAT metadata and the file's
//! own clusters are touched, so the cost follows the file, not the image.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;

use fscommon::StreamSlice;

use crate::Error;
use crate::partition::Partition;

/// Suffix of the file being written; renamed onto the final name once it is
/// complete and flushed.
pub const PENDING_SUFFIX: &str = ".new";

/// Write `data` as `<dir>/<name>` on the FAT file system of `partition`.
///
/// Crash safety, since FAT has no atomic rename over an existing file: the
/// data goes to `<name>.new` first and is flushed; only then is the old
/// `<name>` removed and `<name>.new` renamed to it. A crash before the
/// removal leaves the old file; after it, the complete new one under
/// `<name>.new`, which the image's first-boot import also accepts. The file
/// is read back before this returns.
pub fn write_file(
    image: &Path,
    partition: &Partition,
    dir: &str,
    name: &str,
    data: &[u8],
) -> Result<(), Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| Error::Open(image.to_owned(), e))?;
    let slice = StreamSlice::new(file, partition.start, partition.start + partition.len)
        .map_err(Error::Io)?;
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new())
        .map_err(|e| Error::BadFat(partition.number, e))?;
    {
        let root = fs.root_dir();
        let target = root.create_dir(dir).map_err(Error::Io)?;
        let pending = format!("{name}{PENDING_SUFFIX}");
        let existing = file_len(&target, name);
        let free = u64::from(fs.stats().map_err(Error::Io)?.free_clusters())
            * u64::from(fs.cluster_size());
        // The old file's clusters are freed only after the new one is complete.
        let needed = (data.len() as u64).div_ceil(u64::from(fs.cluster_size()))
            * u64::from(fs.cluster_size());
        if needed > free + file_len(&target, &pending).unwrap_or(0) {
            return Err(Error::Full {
                partition: partition.number,
                free,
                needed,
                existing,
            });
        }
        {
            let mut f = target.create_file(&pending).map_err(Error::Io)?;
            f.truncate().map_err(Error::Io)?;
            f.write_all(data).map_err(Error::Io)?;
            f.flush().map_err(Error::Io)?;
        }
        if existing.is_some() {
            target.remove(name).map_err(Error::Io)?;
        }
        target.rename(&pending, &target, name).map_err(Error::Io)?;
        let mut back = Vec::with_capacity(data.len());
        target
            .open_file(name)
            .and_then(|mut f| f.read_to_end(&mut back))
            .map_err(Error::Io)?;
        if back != data {
            return Err(Error::ReadBack(format!("{dir}/{name}")));
        }
    }
    fs.unmount().map_err(Error::Io)?;
    Ok(())
}

fn file_len<T: fatfs::ReadWriteSeek>(dir: &fatfs::Dir<'_, T>, name: &str) -> Option<u64> {
    dir.iter()
        .filter_map(Result::ok)
        .find(|e| e.file_name().eq_ignore_ascii_case(name))
        .map(|e| e.len())
}
