//! `edgebind image ...` (placeholder until its issue lands).

use std::process::ExitCode;

use clap::Subcommand;

use crate::home::Home;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Not available yet.
    Todo,
}

pub fn run(_cmd: ImageCommand, _home: &Home) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`edgebind image` is not available yet")
}
