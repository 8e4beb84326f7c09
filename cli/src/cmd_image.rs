//! `edgebind image ...`: helpers around the Yocto image.
//!
//! * `crates-inc` writes the agent's build workspace (`agent-workspace/`: its
//!   manifest and the root `Cargo.lock` pruned to the agent's crates) and the
//!   recipe's crate list from it, in the format of oe-core's
//!   `cargo-update-recipe-crates` class, and `--check`s that all three still
//!   match the root lock (CI runs the check, then builds the agent offline
//!   from exactly those crates).
//! * `personalize` writes a device identity bundle onto the FAT boot partition of
//!   a raw disk image (`.wic` / `.img`, MBR or GPT) as `edgebind/identity.tar`,
//!   where the image's first-boot import unit looks for it, in-process with
//!   `edgebind-image` (no mount, no root, no mtools).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use edgebind_fleet::ops::FleetHome;

mod crates_inc;
mod tarball;

/// Where the agent recipe keeps its crate list, relative to the repository root.
const DEFAULT_CRATES_INC: &str =
    "meta-edgebind/recipes-edgebind/edgebind-agent/edgebind-agent-crates.inc";

use edgebind_protocol::bundle::IDENTITY_TAR_ON_BOOT;

/// The agent's build workspace (see `crates_inc`), beside the root Cargo.toml.
const AGENT_WORKSPACE: &str = "agent-workspace";

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Generate (or --check) the agent's build workspace and recipe crate list from Cargo.lock.
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
    /// Raw disk image with an MBR or GPT partition table (uncompressed .wic or
    /// .img), or a flashed card's block device.
    #[arg(long)]
    image: PathBuf,
    /// Identity bundle: a tar of agent.toml, device.crt, device.key and ca.crt,
    /// or a directory holding those four files.
    #[arg(long)]
    bundle: PathBuf,
    /// Write a personalized copy here instead of modifying --image in place.
    #[arg(long)]
    output: Option<PathBuf>,
    /// 1-based partition number of the boot partition (default: the first FAT one).
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
    let root_dir = args.lock.parent().unwrap_or(Path::new("."));
    let root_manifest = root_dir.join("Cargo.toml");
    let manifest_text = fs::read_to_string(&root_manifest)
        .with_context(|| format!("cannot read {}", root_manifest.display()))?;
    let agent_manifest = crates_inc::agent_workspace_manifest(&manifest_text)?;
    let agent_lock = crates_inc::agent_lock(root_dir, &agent_manifest, &lock_text)
        .with_context(|| format!("pruning {} for the agent", args.lock.display()))?;
    let crates = crates_inc::crates_from_lock(&agent_lock)
        .with_context(|| format!("in lock file {}", args.lock.display()))?;
    let rendered = crates_inc::render(&crates);

    if args.output.as_os_str() == "-" {
        print!("{rendered}");
        return Ok(ExitCode::SUCCESS);
    }
    let ws = root_dir.join(AGENT_WORKSPACE);
    let files = [
        (ws.join("Cargo.toml"), agent_manifest),
        (ws.join("Cargo.lock"), agent_lock),
        (args.output.clone(), rendered),
    ];
    if args.check {
        let mut stale = 0;
        for (path, want) in &files {
            let have = fs::read_to_string(path).unwrap_or_default();
            if &have != want {
                stale += 1;
                eprintln!(
                    "crates-inc: {} disagrees with {}:",
                    path.display(),
                    args.lock.display()
                );
                for line in crates_inc::describe_differences(&have, want)
                    .into_iter()
                    .take(20)
                {
                    eprintln!("  {line}");
                }
            }
        }
        for member in crates_inc::AGENT_MEMBER_DIRS {
            let link = ws.join(member);
            let target = fs::read_link(&link).ok();
            if target.as_deref() != Some(Path::new(&format!("../{member}"))) {
                stale += 1;
                eprintln!(
                    "crates-inc: {} must be a symlink to ../{member}",
                    link.display()
                );
            }
        }
        if stale > 0 {
            eprintln!("regenerate with: edgebind image crates-inc");
            return Ok(ExitCode::FAILURE);
        }
        println!(
            "crates-inc: {} and {} match {} ({} crates for the agent)",
            args.output.display(),
            ws.display(),
            args.lock.display(),
            crates.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    fs::create_dir_all(&ws).with_context(|| format!("cannot create {}", ws.display()))?;
    for member in crates_inc::AGENT_MEMBER_DIRS {
        let link = ws.join(member);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("../{member}"), &link)
                .with_context(|| format!("cannot create {}", link.display()))?;
        }
    }
    for (path, text) in &files {
        fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "crates-inc: wrote {} crates to {}, and {}",
        crates.len(),
        args.output.display(),
        ws.display()
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
    let partition = edgebind_image::personalize(&target, args.partition, &bundle)
        .with_context(|| format!("personalize {}", target.display()))?;
    println!(
        "personalize: wrote {} ({} bytes) to partition {} ({:?}) of {}",
        IDENTITY_TAR_ON_BOOT,
        bundle.len(),
        partition.number,
        partition.scheme,
        target.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads the bundle as tar bytes, validating that it holds exactly the four
/// identity files (the image's import unit refuses anything else).
fn load_bundle(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = if path.is_dir() {
        let mut files = Vec::new();
        use edgebind_protocol::bundle::{CLAIM_CERT, Kind};
        let kind = if path.join(CLAIM_CERT).exists() {
            Kind::Claim
        } else {
            Kind::Device
        };
        for &(name, mode) in kind.files() {
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

#[cfg(test)]
mod tests;
