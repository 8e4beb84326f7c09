//! Writing device identity bundles: what a factory line puts into an image.
//!
//! The contract (file names, modes, the `agent.toml` template) is
//! [`edgebind_protocol::bundle`], shared with the agent; this module only
//! writes it: a directory (0700) with the four files, and a tar of the same
//! four files at the top level (no directory prefix) beside it as `<dir>.tar`
//! (0600, because it contains the key).

use std::path::{Path, PathBuf};

pub use edgebind_protocol::bundle::{AGENT_CONFIG, CA_CERT, DEVICE_CERT, DEVICE_KEY, agent_toml};
use edgebind_protocol::bundle::{DIR_MODE, Kind, PRIVATE_MODE};

use crate::files::{create_dir, write_private, write_public};
use crate::{Error, IssuedCert};

/// Where a bundle was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundlePaths {
    pub dir: PathBuf,
    pub tar: PathBuf,
}

/// `<dir>.tar` beside the bundle directory.
pub fn tar_path_for(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tar");
    dir.with_file_name(name)
}

/// Write the bundle directory `dir` (created 0700) and `<dir>.tar`.
/// `agent_toml` is the rendered agent configuration ([`agent_toml`]).
pub fn write_bundle(
    dir: &Path,
    issued: &IssuedCert,
    root_pem: &str,
    agent_toml: &str,
) -> Result<BundlePaths, Error> {
    write_bundle_of(Kind::Device, dir, issued, root_pem, agent_toml)
}

/// [`write_bundle`] for a claim bundle: `issued` is a batch's claim
/// identity, `agent_toml` a [`edgebind_protocol::bundle::claim_agent_toml`].
pub fn write_claim_bundle(
    dir: &Path,
    issued: &IssuedCert,
    root_pem: &str,
    agent_toml: &str,
) -> Result<BundlePaths, Error> {
    write_bundle_of(Kind::Claim, dir, issued, root_pem, agent_toml)
}

fn write_bundle_of(
    kind: Kind,
    dir: &Path,
    issued: &IssuedCert,
    root_pem: &str,
    agent_toml: &str,
) -> Result<BundlePaths, Error> {
    create_dir(dir, DIR_MODE)?;
    let files = files_of(kind, issued, root_pem, agent_toml);
    for (name, bytes, mode) in files {
        if mode == PRIVATE_MODE {
            write_private(&dir.join(name), bytes)?;
        } else {
            write_public(&dir.join(name), bytes)?;
        }
    }
    let tar = tar_path_for(dir);
    write_tar_file(&tar, &files)?;
    Ok(BundlePaths {
        dir: dir.to_owned(),
        tar,
    })
}

/// Write only the tar form of a bundle (what a factory line copies onto the
/// boot partition): one file per device, mode 0600.
pub fn write_tar(
    tar: &Path,
    issued: &IssuedCert,
    root_pem: &str,
    agent_toml: &str,
) -> Result<(), Error> {
    let files = bundle_files(issued, root_pem, agent_toml);
    write_tar_file(tar, &files)
}

/// The bundle tar in memory (what a factory line writes onto a boot
/// partition without a file in between).
pub fn tar_of(issued: &IssuedCert, root_pem: &str, agent_toml: &str) -> Result<Vec<u8>, Error> {
    tar_bytes(&bundle_files(issued, root_pem, agent_toml))
        .map_err(|e| Error::Invalid(format!("building the bundle tar: {e}")))
}

/// The four bundle files with their contract modes, in bundle order.
fn bundle_files<'a>(
    issued: &'a IssuedCert,
    root_pem: &'a str,
    agent_toml: &'a str,
) -> [(&'static str, &'a [u8], u32); 4] {
    files_of(Kind::Device, issued, root_pem, agent_toml)
}

/// The four files of a bundle of `kind`: the configuration, the
/// certificate chain, its key, the fleet root, in contract order.
fn files_of<'a>(
    kind: Kind,
    issued: &'a IssuedCert,
    root_pem: &'a str,
    agent_toml: &'a str,
) -> [(&'static str, &'a [u8], u32); 4] {
    use edgebind_protocol::bundle::{CLAIM_CERT, CLAIM_KEY};
    (*kind.files()).map(|(name, mode)| {
        let bytes = match name {
            AGENT_CONFIG => agent_toml.as_bytes(),
            DEVICE_CERT | CLAIM_CERT => issued.chain_pem.as_bytes(),
            DEVICE_KEY | CLAIM_KEY => issued.key_pem.as_bytes(),
            _ => root_pem.as_bytes(),
        };
        (name, bytes, mode)
    })
}

/// What a batch writes per device into its output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleForm {
    /// `<out>/<id>/` and `<out>/<id>.tar`.
    DirectoryAndTar,
    /// Only `<out>/<id>.tar`: one file per device, the cheapest for a factory line.
    TarOnly,
}

/// Write the bundle of `issued` (a device certificate) into `out`, named by
/// its device id, in the given form.
pub fn write_into(
    out: &Path,
    form: BundleForm,
    id: &edgebind_protocol::DeviceId,
    issued: &IssuedCert,
    root_pem: &str,
    agent_toml: &str,
) -> Result<(), Error> {
    match form {
        BundleForm::TarOnly => {
            write_tar(&out.join(format!("{id}.tar")), issued, root_pem, agent_toml)
        }
        BundleForm::DirectoryAndTar => {
            write_bundle(&out.join(id.as_str()), issued, root_pem, agent_toml).map(|_| ())
        }
    }
}

fn write_tar_file(tar: &Path, files: &[(&str, &[u8], u32)]) -> Result<(), Error> {
    let bytes = tar_bytes(files).map_err(|e| Error::io(tar, e))?;
    // The tar holds the key: private mode.
    write_private(tar, &bytes)
}

fn tar_bytes(files: &[(&str, &[u8], u32)]) -> std::io::Result<Vec<u8>> {
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes, mode) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(*mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, *bytes)?;
    }
    builder.into_inner()
}
