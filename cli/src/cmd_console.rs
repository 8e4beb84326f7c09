//! `edgebind console` (serve the web console) and `edgebind console login`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use edgebind_console::ConsoleConfig;
use edgebind_fleet::ops::{self, FleetHome, login::LOGIN_CODE_TTL_S};

use crate::render;

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        edgebind console\n  \
        edgebind console --listen 0.0.0.0:8443 --host console.example.net --images /srv/golden\n  \
        edgebind console login --operator alice\n\n\
        The console serves HTTPS with a server certificate from the fleet PKI \
        (<home>/console/server.crt, issued on first start; trust the fleet's ca.crt in the \
        browser). Log in with a single-use code from `edgebind console login`."
)]
pub struct ConsoleArgs {
    #[command(subcommand)]
    pub command: Option<ConsoleCommand>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand)]
pub enum ConsoleCommand {
    /// Print a single-use login code (and URL) for an operator of this fleet.
    #[command(
        after_help = "The operator must hold a usable certificate in the fleet PKI \
        (`edgebind pki init --operator NAME` or `edgebind pki issue operator NAME`). The code \
        works once, until it expires; the registry keeps only its SHA-256."
    )]
    Login(LoginArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Directory of golden images offered for personalized images.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Host names for the server certificate (besides localhost and the listen address).
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// Issue a new server certificate even if one exists.
    #[arg(long)]
    pub renew_cert: bool,
    /// Session lifetime in minutes.
    #[arg(long, default_value_t = 480)]
    pub session_minutes: u64,
    /// Log filter (`info`, `debug`, `edgebind_console=debug`...).
    #[arg(long, env = "EDGEBIND_LOG", default_value = "info")]
    pub log_level: String,
}

#[derive(Args)]
pub struct LoginArgs {
    /// The operator's name (principal operator:NAME).
    #[arg(long)]
    pub operator: String,
    /// Minutes the code stays valid.
    #[arg(long, default_value_t = LOGIN_CODE_TTL_S / 60)]
    pub minutes: u64,
    /// The console's address, for the printed URL.
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    pub url: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ConsoleArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(ConsoleCommand::Login(a)) => login(a, home),
        None => serve(args.serve, home),
    }
}

fn login(args: LoginArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    let mut store = home.open_registry()?;
    let issued = ops::issue_login_code(home, store.as_mut(), &args.operator, args.minutes * 60)?;
    let url = format!(
        "{}/login?code={}",
        args.url.trim_end_matches('/'),
        issued.code
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "operator": issued.operator,
                "code": issued.code,
                "url": url,
                "expires_at": issued.expires_at,
            }))?
        );
    } else {
        println!(
            "login code for operator:{}: {}",
            issued.operator, issued.code
        );
        println!("open: {url}");
        println!(
            "valid once, until {}",
            render::unix_time(Some(issued.expires_at))
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(args: ServeArgs, home: &FleetHome) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .with_context(|| format!("invalid --log-level {:?}", args.log_level))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let mut hosts = vec!["localhost".to_owned()];
    hosts.extend(args.hosts.iter().cloned());
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
    if !args.listen.ip().is_unspecified() && !ips.contains(&args.listen.ip()) {
        ips.push(args.listen.ip());
    }
    let (tls, issued) = edgebind_console::tls_config(home, &hosts, &ips, args.renew_cert)?;
    if let Some(serial) = issued {
        eprintln!(
            "edgebind console: issued server certificate serial {serial} for {hosts:?} {ips:?}"
        );
    }
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let mut config = ConsoleConfig::new(home.clone());
    config.images = args.images;
    config.session_ttl = Duration::from_secs(args.session_minutes.max(1) * 60);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    // Printed once bound, so a script (or a test) can wait for it.
    println!("edgebind console: listening on https://{addr}/");
    runtime.block_on(edgebind_console::serve(
        config,
        tls,
        listener,
        crate::cmd_fleet::shutdown_signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}
