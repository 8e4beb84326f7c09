//! The `edgebind-agent` command line: arguments, logging, signals, exit codes.
//!
//! Exit codes: 0 stopped cleanly (SIGTERM/SIGINT); 75 after `restart-agent`
//! (systemd's `Restart=` brings it back); 78 refused to start (configuration,
//! identity or state directory: the message says which file and key);
//! 64 bad command line; 1 unexpected runtime failure.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use clap::error::ErrorKind;

use crate::config::AgentConfig;
use crate::runtime::{Agent, REFUSED_EXIT_CODE, RunOptions, shutdown_channel};

pub const USAGE_EXIT_CODE: i32 = 64;

// Must match config::CONFIG_ENV and config::DEFAULT_CONFIG_PATH: clap's
// attributes need literals, the `consts_match_clap_attributes` test checks.
const AFTER_HELP: &str = "\
Environment:
  EDGEBIND_AGENT_CONFIG  configuration file when --config is not given
  EDGEBIND_LOG           log filter overriding the configured level, e.g. debug
  NOTIFY_SOCKET, WATCHDOG_USEC
                         set by systemd (Type=notify, WatchdogSec=)

Exit codes:
  0 stopped (SIGTERM/SIGINT), 75 restart requested (systemd restarts it),
  78 refused to start (the message names the file and key), 64 bad command line,
  1 unexpected runtime failure.

Example:
  edgebind-agent --config /var/lib/edgebind/identity/agent.toml
  edgebind-agent --config ./bundle/agent.toml --check";

/// edgebind-agent: the Edgebind device agent (mTLS MQTT, status, telemetry,
/// remote actions)
#[derive(Debug, PartialEq, Parser)]
#[command(name = "edgebind-agent", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file (an identity bundle's agent.toml)
    /// [env: EDGEBIND_AGENT_CONFIG] [default: /var/lib/edgebind/identity/agent.toml]
    // Written out above (clap would append both to the first line, 150
    // columns wide without the wrap_help feature the binary goes without).
    #[arg(
        short,
        long,
        verbatim_doc_comment,
        hide_env = true,
        hide_default_value = true,
        value_name = "PATH",
        env = "EDGEBIND_AGENT_CONFIG",
        default_value = "/var/lib/edgebind/identity/agent.toml"
    )]
    config: PathBuf,
    /// Check configuration, identity and state directory, then exit
    #[arg(long)]
    check: bool,
}

/// Parses the arguments (`args` includes the program name).
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Args, clap::Error> {
    Args::try_parse_from(args)
}

/// Help and version are successes (exit 0); any other problem is 64
/// (EX_USAGE) rather than clap's own 2, which systemd and scripts would take
/// for a runtime failure.
fn exit_code_for(e: &clap::Error) -> i32 {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
        _ => USAGE_EXIT_CODE,
    }
}

/// The whole program; returns the exit code.
pub fn main() -> i32 {
    let args = match parse(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            // print() sends help/version to stdout and errors to stderr.
            let _ = e.print();
            return exit_code_for(&e);
        }
    };
    let config = match AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => return refuse(&e),
    };
    let journald = crate::systemd::under_systemd();
    let (log, route) = crate::logging::init(config.log.level, journald);
    tracing::debug!(route, "logging initialised");

    let run_options = move || RunOptions {
        notifier: crate::systemd::Notifier::from_env(),
        watchdog: crate::systemd::watchdog_interval(),
        log: Some(log.clone()),
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
        let (handle, mut signal) = shutdown_channel();
        if args.check {
            if let Some(claim) = &config.claim
                && !config.identity.cert.exists()
            {
                return match crate::claim::read_serial(claim) {
                    Ok(serial) => {
                        println!(
                            "edgebind-agent: configuration {} is a claim bundle: unit {serial} will claim the identity of {}",
                            args.config.display(),
                            serial.device_id()
                        );
                        0
                    }
                    Err(e) => refuse(&e),
                };
            }
        } else {
            tokio::spawn(async move {
                wait_for_termination().await;
                handle.shutdown();
            });
        }
        // Until stopped: a claim bundle obtains the device identity first,
        // and again whenever the agent ends because its certificate expired.
        loop {
            let options = run_options();
            if !args.check {
                let stats = crate::claim::ClaimStats::default();
                match crate::claim::ensure_identity(
                    &config,
                    &stats,
                    &options.notifier,
                    options.watchdog,
                    &mut signal,
                )
                .await
                {
                    Ok(crate::claim::FirstBoot::Stopped) => return 0,
                    Ok(_) => {}
                    Err(e) => return refuse(&e),
                }
            }
            // The journal and the network task need the runtime to exist.
            let agent = match Agent::prepare(config.clone(), options) {
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
            match agent.run(signal.clone()).await {
                crate::runtime::Exit::IdentityExpired if config.claim.is_some() => continue,
                exit => return exit.code(),
            }
        }
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
    use crate::config::{CONFIG_ENV, DEFAULT_CONFIG_PATH};

    fn parse_args(args: &[&str]) -> Result<Args, clap::Error> {
        parse(
            std::iter::once("edgebind-agent")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    fn run(args: &[&str]) -> Option<Args> {
        parse_args(args).ok()
    }

    fn exit_code(args: &[&str]) -> Option<i32> {
        parse_args(args).err().map(|e| exit_code_for(&e))
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
    }

    #[test]
    fn usage_errors_exit_64_help_and_version_exit_0() {
        assert_eq!(exit_code(&["--bogus"]), Some(USAGE_EXIT_CODE));
        assert_eq!(exit_code(&["--config"]), Some(USAGE_EXIT_CODE));
        assert_eq!(exit_code(&["stray"]), Some(USAGE_EXIT_CODE));
        assert_eq!(exit_code(&["--check", "--check"]), Some(USAGE_EXIT_CODE));
        assert_eq!(exit_code(&["--help"]), Some(0));
        assert_eq!(exit_code(&["-h"]), Some(0));
        assert_eq!(exit_code(&["--version"]), Some(0));
        assert_eq!(exit_code(&["-V"]), Some(0));
    }

    #[test]
    fn consts_match_clap_attributes() {
        use clap::CommandFactory;
        let cmd = Args::command();
        let config = cmd
            .get_arguments()
            .find(|a| a.get_id() == "config")
            .unwrap();
        assert_eq!(config.get_env(), Some(std::ffi::OsStr::new(CONFIG_ENV)));
        assert_eq!(
            config.get_default_values(),
            [std::ffi::OsStr::new(DEFAULT_CONFIG_PATH)]
        );
        cmd.debug_assert();
    }

    /// The only test in this crate that touches EDGEBIND_AGENT_CONFIG (every
    /// other one passes --config), so changing it here races with nothing.
    #[test]
    fn config_from_env_then_default() {
        // SAFETY: no other test in this process reads or writes this variable.
        unsafe { std::env::set_var(CONFIG_ENV, "/from/env.toml") };
        let from_env = run(&[]).unwrap().config;
        let flag_wins = run(&["-c", "/flag.toml"]).unwrap().config;
        unsafe { std::env::remove_var(CONFIG_ENV) };
        let default = run(&["--check"]).unwrap();
        assert_eq!(from_env, PathBuf::from("/from/env.toml"));
        assert_eq!(flag_wins, PathBuf::from("/flag.toml"));
        assert_eq!(
            default,
            Args {
                config: DEFAULT_CONFIG_PATH.into(),
                check: true
            }
        );
    }
}
