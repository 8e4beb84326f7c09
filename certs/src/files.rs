//! Writing PKI files with the right permissions, atomically.
//!
//! Keys are created 0600 from the first byte (never chmod-ed after the fact)
//! and existing files are replaced through a temporary name and a rename, so
//! a concurrent reader never sees half a certificate.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

pub const PRIVATE_MODE: u32 = 0o600;
pub const PUBLIC_MODE: u32 = 0o644;

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Write `bytes` to `path` with `mode`. A new file is created in place
/// (exclusive create: nothing else can have it open); an existing one is
/// replaced atomically through a temporary file and a rename, so a reader
/// never sees half a certificate. (Creating in place saves a rename per file:
/// metadata operations dominate batch issuance on a busy disk.)
pub fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    match create_with(path, bytes, mode) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        other => return other.map_err(|e| Error::io(path, e)),
    }
    let tmp = tmp_name(path);
    let _ = fs::remove_file(&tmp);
    create_with(&tmp, bytes, mode).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn create_with(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    if mode != PRIVATE_MODE {
        // A strict umask may have removed read bits the broker user needs.
        // (A private file is created 0600: the umask can only remove bits.)
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    file.write_all(bytes)
}

/// A private key or anything containing one: mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_mode(path, bytes, PRIVATE_MODE)
}

/// Certificates, CRLs, configs: mode 0644.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_mode(path, bytes, PUBLIC_MODE)
}

pub fn read_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotInitialized {
                path: path.to_owned(),
            }
        } else {
            Error::io(path, e)
        }
    })
}

/// Create `path` (and missing parents) with `mode`; an existing directory is
/// given `mode`. A new directory costs one mkdir (batch issuance makes
/// thousands), parents get the default mode.
pub fn create_dir(path: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) if mode & 0o022 == 0 => return Ok(()), // the umask cannot have widened it
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        }
        Err(e) => return Err(Error::io(path, e)),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| Error::io(path, e))
}

/// The permission bits of a file (tests and sanity checks).
pub fn mode_of(path: &Path) -> Result<u32, Error> {
    Ok(fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .permissions()
        .mode()
        & 0o7777)
}
