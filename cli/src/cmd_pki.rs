//! `edgebind pki ...` (placeholder until its issue lands).

use std::process::ExitCode;

use clap::Subcommand;

use crate::home::Home;

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Not available yet.
    Todo,
}

pub fn run(_cmd: PkiCommand, _home: &Home) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`edgebind pki` is not available yet")
}
