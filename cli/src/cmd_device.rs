//! `edgebind device ...`, `devices`, `send`, `set`, `revoke` (placeholder until the fleet issue lands).

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::home::Home;

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// List devices.
    List(ListArgs),
    /// Revoke a device.
    Revoke(RevokeArgs),
}

#[derive(Args)]
pub struct ListArgs {}

#[derive(Args)]
pub struct SendArgs {}

#[derive(Args)]
pub struct SetArgs {}

#[derive(Args)]
pub struct RevokeArgs {}

pub fn run(_cmd: DeviceCommand, _home: &Home) -> anyhow::Result<ExitCode> {
    anyhow::bail!("device commands are not available yet")
}

pub fn send(_args: SendArgs, _home: &Home) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`edgebind send` is not available yet")
}

pub fn set(_args: SetArgs, _home: &Home) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`edgebind set` is not available yet")
}
