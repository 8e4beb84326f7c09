//! `edgebind image ...`: helpers around the Yocto image.
//!
//! * `crates-inc` writes the agent recipe's crate list from `Cargo.lock`, in the
//!   format of oe-core's `cargo-update-recipe-crates` class, and `--check`s that
//!   the committed list still matches the lock file (CI runs the check).
//! * `personalize` writes a device identity bundle onto the FAT boot partition of
//!   a raw disk image (`.wic` / `.img`) as `edgebind/identity.tar`, where the
//!   image's first-boot import unit looks for it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use edgebind_fleet::ops::FleetHome;

mod crates_inc;
mod mbr;
mod tarball;

/// Where the agent recipe keeps its crate list, relative to the repository root.
const DEFAULT_CRATES_INC: &str =
    "meta-edgebind/recipes-edgebind/edgebind-agent/edgebind-agent-crates.inc";

use edgebind_protocol::bundle::{IDENTITY_DIR_ON_BOOT, IDENTITY_TAR_ON_BOOT};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Generate (or --check) the agent recipe's crate list from Cargo.lock.
    #[command(after_help = "Examples:\n  \
        edgebind image crates-inc                 # rewrite the recipe's .inc\n  \
        edgebind image crates-inc --check         # exit 1 if the .inc is stale\n  \
        edgebind image crates-inc --output -      # print to stdout")]
    CratesInc(CratesIncArgs),
    /// Write a device identity bundle onto the FAT boot partition of a disk image.
    #[command(
        after_help = "The bundle lands on the first FAT partition as edgebind/identity.tar; \
        on first boot the image installs it under /var/lib/edgebind/identity and erases it.\n\n\
        Examples:\n  \
        edgebind image personalize --image edgebind-image.wic --bundle rpi-0001.tar\n  \
        edgebind image personalize --image edgebind-image.wic --bundle bundles/rpi-0001/ \\\n      \
        --output rpi-0001.wic"
    )]
    Personalize(PersonalizeArgs),
}

#[derive(Args)]
pub struct CratesIncArgs {
    /// The workspace lock file to read.
    #[arg(long, default_value = "Cargo.lock")]
    lock: PathBuf,
    /// The .inc to write (or compare with --check); `-` prints to stdout.
    #[arg(long, default_value = DEFAULT_CRATES_INC)]
    output: PathBuf,
    /// Do not write: exit 1 and name the differences if the file disagrees with the lock.
    #[arg(long)]
    check: bool,
}

#[derive(Args)]
pub struct PersonalizeArgs {
    /// Raw disk image with an MBR partition table (uncompressed .wic or .img).
    #[arg(long)]
    image: PathBuf,
    /// Identity bundle: a tar of agent.toml, device.crt, device.key and ca.crt,
    /// or a directory holding those four files.
    #[arg(long)]
    bundle: PathBuf,
    /// Write a personalized copy here instead of modifying --image in place.
    #[arg(long)]
    output: Option<PathBuf>,
    /// 1-based MBR partition number of the boot partition (default: the first FAT one).
    #[arg(long)]
    partition: Option<usize>,
}

pub fn run(cmd: ImageCommand, _home: &FleetHome) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::CratesInc(args) => crates_inc_cmd(&args),
        ImageCommand::Personalize(args) => personalize_cmd(&args),
    }
}

fn crates_inc_cmd(args: &CratesIncArgs) -> anyhow::Result<ExitCode> {
    let lock_text = fs::read_to_string(&args.lock)
        .with_context(|| format!("cannot read lock file {}", args.lock.display()))?;
    let crates = crates_inc::crates_from_lock(&lock_text)
        .with_context(|| format!("in lock file {}", args.lock.display()))?;
    let rendered = crates_inc::render(&crates);

    if args.output.as_os_str() == "-" {
        print!("{rendered}");
        return Ok(ExitCode::SUCCESS);
    }
    if args.check {
        let committed = fs::read_to_string(&args.output)
            .with_context(|| format!("cannot read crate list {}", args.output.display()))?;
        if committed == rendered {
            println!(
                "crates-inc: {} matches {} ({} crates)",
                args.output.display(),
                args.lock.display(),
                crates.len()
            );
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "crates-inc: {} disagrees with {}:",
            args.output.display(),
            args.lock.display()
        );
        for line in crates_inc::describe_differences(&committed, &rendered) {
            eprintln!("  {line}");
        }
        eprintln!("regenerate it with: edgebind image crates-inc");
        return Ok(ExitCode::FAILURE);
    }
    fs::write(&args.output, &rendered)
        .with_context(|| format!("cannot write crate list {}", args.output.display()))?;
    println!(
        "crates-inc: wrote {} crates to {}",
        crates.len(),
        args.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn personalize_cmd(args: &PersonalizeArgs) -> anyhow::Result<ExitCode> {
    let bundle = load_bundle(&args.bundle)?;
    let target = match &args.output {
        Some(out) => {
            fs::copy(&args.image, out).with_context(|| {
                format!("cannot copy {} to {}", args.image.display(), out.display())
            })?;
            out.clone()
        }
        None => args.image.clone(),
    };
    let partition = mbr::boot_partition(&target, args.partition)?;
    write_to_fat(&target, partition.byte_offset(), &bundle)?;
    println!(
        "personalize: wrote {} ({} bytes) to partition {} of {}",
        IDENTITY_TAR_ON_BOOT,
        bundle.len(),
        partition.number,
        target.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads the bundle as tar bytes, validating that it holds exactly the four
/// identity files (the image's import unit refuses anything else).
fn load_bundle(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = if path.is_dir() {
        let mut files = Vec::new();
        for (name, mode) in edgebind_protocol::bundle::FILES {
            let file = path.join(name);
            let data = fs::read(&file)
                .with_context(|| format!("identity bundle {} lacks {name}", path.display()))?;
            files.push(tarball::Entry {
                name: name.to_string(),
                mode,
                data,
            });
        }
        tarball::write(&files)?
    } else {
        fs::read(path).with_context(|| format!("cannot read bundle {}", path.display()))?
    };
    let entries =
        tarball::read(&bytes).with_context(|| format!("bundle {} is not a tar", path.display()))?;
    tarball::check_identity_files(&entries)
        .with_context(|| format!("bundle {} is not an identity bundle", path.display()))?;
    Ok(bytes)
}

/// Copies the bundle into the FAT file system at `offset` with mtools, then reads
/// it back to prove it landed intact.
fn write_to_fat(image: &Path, offset: u64, bundle: &[u8]) -> anyhow::Result<()> {
    let drive = format!("{}@@{offset}", image.display());
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let staged = scratch.path().join("identity.tar");
    fs::write(&staged, bundle).context("cannot stage the bundle")?;

    // Re-personalizing an image finds edgebind/ already there (mmd would fail).
    let dir = format!("::/{IDENTITY_DIR_ON_BOOT}");
    if mtool("mdir", &["-b", "-i", &drive, &dir]).is_err() {
        mtool("mmd", &["-i", &drive, &dir])?;
    }
    let staged_arg = staged.to_string_lossy();
    mtool(
        "mcopy",
        &[
            "-o",
            "-i",
            &drive,
            &staged_arg,
            &format!("::/{IDENTITY_TAR_ON_BOOT}"),
        ],
    )?;

    let readback = scratch.path().join("readback.tar");
    let readback_arg = readback.to_string_lossy();
    mtool(
        "mcopy",
        &[
            "-n",
            "-i",
            &drive,
            &format!("::/{IDENTITY_TAR_ON_BOOT}"),
            &readback_arg,
        ],
    )?;
    if fs::read(&readback).context("cannot read the bundle back")? != bundle {
        bail!(
            "{IDENTITY_TAR_ON_BOOT} read back from {} differs from the bundle",
            image.display()
        );
    }
    Ok(())
}

fn mtool(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(tool)
        .args(args)
        // The partition need not start on a cylinder boundary mtools expects.
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .with_context(|| format!("cannot run {tool} (install mtools)"))?;
    if !output.status.success() {
        bail!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
