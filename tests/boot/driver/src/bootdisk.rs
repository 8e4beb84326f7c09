//! The device's "boot partition" as a factory line sees it: a small raw disk
//! with an MBR and one FAT partition (like the first partition of a .wic),
//! attached to the VM as its second virtio disk (/dev/vdb1). The factory step
//! itself is the real tool: `edgebind image personalize`. Inspected from the
//! host with mtools (never mounted), only while the VM is not running.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// The partition starts at 1 MiB, as image tools align it.
const PART_OFFSET: u64 = 1024 * 1024;
const PART_SIZE: u64 = 32 * 1024 * 1024;

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// mtools' name for the FAT file system inside the disk image.
fn drive(image: &Path) -> String {
    format!("{}@@{PART_OFFSET}", image.display())
}

/// Creates an empty boot disk: MBR with partition 1 = FAT32 (LBA), formatted.
pub fn create_blank(image: &Path, scratch: &Path) -> anyhow::Result<()> {
    let part = scratch.join("bootpart.vfat");
    let _ = std::fs::remove_file(&part);
    std::fs::File::create(&part)?.set_len(PART_SIZE)?;
    run(Command::new("mkfs.vfat")
        .args(["-n", "EDGEBOOT"])
        .arg(&part))?;

    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[4] = 0x0c; // FAT32 with LBA addressing
    entry[8..12].copy_from_slice(&((PART_OFFSET / 512) as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&((PART_SIZE / 512) as u32).to_le_bytes());
    mbr[440..444].copy_from_slice(&0x4544_4745u32.to_le_bytes()); // disk signature
    mbr[510] = 0x55;
    mbr[511] = 0xaa;

    let mut disk = std::fs::File::create(image)
        .with_context(|| format!("creating boot disk {}", image.display()))?;
    disk.write_all(&mbr)?;
    disk.seek(SeekFrom::Start(PART_OFFSET))?;
    std::io::copy(&mut std::fs::File::open(&part)?, &mut disk)?;
    std::fs::remove_file(&part)?;
    Ok(())
}

/// Whether `edgebind/identity.tar` is still listed on the boot partition.
pub fn has_identity(image: &Path) -> anyhow::Result<bool> {
    let listing = listing(image)?;
    Ok(listing
        .lines()
        .any(|l| l.to_ascii_lowercase().ends_with("edgebind/identity.tar")))
}

/// Every file and directory on the boot partition (recursive, bare).
pub fn listing(image: &Path) -> anyhow::Result<String> {
    let out = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &drive(image), "-/", "-b", "::"])
        .output()
        .context("running mdir")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // mdir -b exits 1 with `File "::" not found` on an empty file system.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let empty_fs = stdout.is_empty() && stderr.contains("File \"::\" not found");
    if !out.status.success() && !empty_fs {
        bail!("mdir on {} failed: {stderr}", image.display());
    }
    Ok(stdout)
}

/// Whether private key material (a PEM private key header) is still anywhere
/// on the disk, including unallocated clusters a plain `rm` leaves behind.
pub fn key_bytes_remain(image: &Path) -> anyhow::Result<bool> {
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let needle = b"PRIVATE KEY-----";
    Ok(bytes.windows(needle.len()).any(|w| w == needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtool(args: &[&str]) {
        run(Command::new(args[0]).args(&args[1..])).unwrap();
    }

    /// Why the boot test scans the raw disk: deleting a file on FAT only
    /// unlinks it, the key stays readable in the free clusters.
    #[test]
    fn a_deleted_file_leaves_its_bytes_on_fat_and_the_scan_finds_them() {
        let dir = std::env::temp_dir().join(format!("edgebind-bootdisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("boot.img");
        create_blank(&disk, &dir).unwrap();
        assert!(!has_identity(&disk).unwrap());
        assert!(!key_bytes_remain(&disk).unwrap());

        let tar = dir.join("identity.tar");
        std::fs::write(
            &tar,
            "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let drive = drive(&disk);
        mtool(&["mmd", "-i", &drive, "::edgebind"]);
        mtool(&[
            "mcopy",
            "-i",
            &drive,
            tar.to_str().unwrap(),
            "::edgebind/identity.tar",
        ]);
        assert!(has_identity(&disk).unwrap());

        mtool(&["mdel", "-i", &drive, "::edgebind/identity.tar"]);
        assert!(!has_identity(&disk).unwrap());
        assert!(key_bytes_remain(&disk).unwrap(), "mdel should only unlink");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
