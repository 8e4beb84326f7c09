//! `edgebind broker ...` (placeholder until its issue lands).

use std::process::ExitCode;

use clap::Subcommand;

use crate::home::Home;

#[derive(Subcommand)]
pub enum BrokerCommand {
    /// Not available yet.
    Todo,
}

pub fn run(_cmd: BrokerCommand, _home: &Home) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`edgebind broker` is not available yet")
}
