//! The `edgebind-agent` command line: arguments, logging, signals, exit codes.
//!
//! Exit codes: 0 stopped cleanly (SIGTERM/SIGINT); 75 after `restart-agent`
//! (systemd's `Restart=` brings it back); 78 refused to start (configuration,
//! identity or state directory: the message says which file and key);
//! 64 bad command line; 1 unexpected runtime failure.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::{AgentConfig, CONFIG_ENV, DEFAULT_CONFIG_PATH};
use crate::runtime::{Agent, REFUSED_EXIT_CODE, RunOptions, shutdown_channel};

pub const USAGE_EXIT_CODE: i32 = 64;

const HELP: &str = "\
edgebind-agent: the Edgebind device agent (mTLS MQTT, status, telemetry, remote actions)

Usage: edgebind-agent [--config PATH] [--check]

Options:
  -c, --config PATH  configuration file (env EDGEBIND_AGENT_CONFIG;
                     default /var/lib/edgebind/identity/agent.toml)
      --check        check configuration, identity and state directory, then exit
  -V, --version      print the version
  -h, --help         print this help

Environment:
  EDGEBIND_LOG       log filter overriding the configured level, e.g. debug
  NOTIFY_SOCKET, WATCHDOG_USEC   set by systemd (Type=notify, WatchdogSec=)

Exit codes: 0 stopped, 75 restart requested, 78 refused to start, 64 usage.

Example:
  edgebind-agent --config /var/lib/edgebind/identity/agent.toml
";

#[derive(Debug, PartialEq)]
struct Args {
    config: PathBuf,
    check: bool,
}

enum Parsed {
    Run(Args),
    Exit(i32),
}

fn parse(mut args: impl Iterator<Item = OsString>) -> Parsed {
    let mut config = None;
    let mut check = false;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => {
                print!("{HELP}");
                return Parsed::Exit(0);
            }
            Some("-V" | "--version") => {
                println!("edgebind-agent {}", env!("CARGO_PKG_VERSION"));
                return Parsed::Exit(0);
            }
            Some("--check") => check = true,
            Some("-c" | "--config") => match args.next() {
                Some(p) => config = Some(PathBuf::from(p)),
                None => {
                    eprintln!("edgebind-agent: --config needs a PATH\n\n{HELP}");
                    return Parsed::Exit(USAGE_EXIT_CODE);
                }
            },
            Some(s) if s.starts_with("--config=") => {
                config = Some(PathBuf::from(&s["--config=".len()..]));
            }
            _ => {
                eprintln!(
                    "edgebind-agent: unexpected argument {:?}\n\n{HELP}",
                    arg.to_string_lossy()
                );
                return Parsed::Exit(USAGE_EXIT_CODE);
            }
        }
    }
    let config = config
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    Parsed::Run(Args { config, check })
}

/// The whole program; returns the exit code.
pub fn main() -> i32 {
    let args = match parse(std::env::args_os().skip(1)) {
        Parsed::Run(a) => a,
        Parsed::Exit(code) => return code,
    };
    let config = match AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => return refuse(&e),
    };
    let journald = crate::systemd::under_systemd();
    let (log, route) = crate::logging::init(config.log.level, journald);
    tracing::debug!(route, "logging initialised");

    let options = RunOptions {
        notifier: crate::systemd::Notifier::from_env(),
        watchdog: crate::systemd::watchdog_interval(),
        log: Some(log),
        ..RunOptions::default()
    };
    // One thread: the agent waits on the network almost all the time, and
    // every extra worker costs stack and RSS on small devices.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgebind-agent: error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        // The journal and the network task need the runtime to exist.
        let agent = match Agent::prepare(config, options) {
            Ok(a) => a,
            Err(e) => return refuse(&e),
        };
        if args.check {
            println!(
                "edgebind-agent: configuration {} and identity of {} are usable",
                args.config.display(),
                agent.device_id()
            );
            return 0;
        }
        let (handle, signal) = shutdown_channel();
        tokio::spawn(async move {
            wait_for_termination().await;
            handle.shutdown();
        });
        agent.run(signal).await.code()
    })
}

fn refuse(e: &dyn std::error::Error) -> i32 {
    eprintln!("edgebind-agent: error: {e}");
    eprintln!("edgebind-agent: refusing to start (exit code {REFUSED_EXIT_CODE})");
    REFUSED_EXIT_CODE
}

async fn wait_for_termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Option<Args> {
        match parse(args.iter().map(OsString::from)) {
            Parsed::Run(a) => Some(a),
            Parsed::Exit(_) => None,
        }
    }

    #[test]
    fn config_flag_forms() {
        assert_eq!(
            run(&["--config", "/x.toml"]).unwrap().config,
            PathBuf::from("/x.toml")
        );
        assert_eq!(
            run(&["-c", "/y.toml"]).unwrap().config,
            PathBuf::from("/y.toml")
        );
        assert_eq!(
            run(&["--config=/z.toml", "--check"]).unwrap(),
            Args {
                config: "/z.toml".into(),
                check: true
            }
        );
        assert!(run(&["--bogus"]).is_none());
        assert!(run(&["--config"]).is_none());
    }
}
