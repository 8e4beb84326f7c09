//! `edgebind device add|show|list|revoke|renew|reissue|on-connect-remove`, `devices`,
//! `send`, `set`, `revoke`: one file per command, each parsing its
//! arguments, calling `edgebind_fleet::ops` and rendering the result.

mod add;
pub mod args;
mod list;
mod renew;
mod revoke;
mod send;
mod set;
mod show;

use std::process::ExitCode;

use edgebind_fleet::ops::FleetHome;

pub use args::{DeviceCommand, ListArgs, RevokeArgs, SendArgs, SetArgs};
pub use send::send;
pub use set::set;

pub fn run(cmd: DeviceCommand, home: &FleetHome) -> anyhow::Result<ExitCode> {
    match cmd {
        DeviceCommand::Add(a) => add::add(a, home),
        DeviceCommand::Show(a) => show::show(a, home),
        DeviceCommand::List(a) => list::list(a, home),
        DeviceCommand::Revoke(a) => revoke::revoke(a, home),
        DeviceCommand::Renew(a) => renew::renew(a, home),
        DeviceCommand::Reissue(a) => renew::reissue(a, home),
        DeviceCommand::OnConnectRemove(a) => {
            home.open_registry()?.remove_on_connect(a.rule)?;
            println!("removed on-connect rule {}", a.rule);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    pub struct Cli {
        #[command(subcommand)]
        pub cmd: Top,
    }

    #[derive(clap::Subcommand)]
    pub enum Top {
        #[command(subcommand)]
        Device(DeviceCommand),
        Send(SendArgs),
        Set(SetArgs),
    }

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }
}
