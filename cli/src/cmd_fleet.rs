//! `edgebind fleet ...` (placeholder until its issue lands).

use std::process::ExitCode;

use clap::Subcommand;

use crate::home::Home;

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Not available yet.
    Todo,
}

pub fn run(_cmd: FleetCommand, _home: &Home) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`edgebind fleet` is not available yet")
}
