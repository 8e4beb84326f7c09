//! Flags of every command that connects to the broker as a client.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Clone)]
pub struct ConnectArgs {
    /// Broker address `host:port` (default: from <home>/broker/settings.toml).
    #[arg(long, env = "EDGEBIND_BROKER")]
    pub broker: Option<String>,
    /// Directory with this client's identity (`<name>.crt`, `<name>.key`, `ca.crt`).
    #[arg(long)]
    pub identity: Option<PathBuf>,
}
