//! A real, throwaway PostgreSQL for tests and benchmarks.
//!
//! [`PgCluster::start`] runs Debian's `initdb` and `pg_ctl` (PostgreSQL
//! refuses to run as root, so as user `postgres` through `runuser` when we
//! are root) on a cluster in a temporary directory, listening on a free
//! 127.0.0.1 port with trust authentication for user `edgebind`; `pg_ctl -w`
//! waits until the server accepts connections. [`PgCluster::shared`] is one
//! cluster per test process, and [`PgCluster::database`] gives each test a
//! database of its own (`createdb`), so tests run in parallel.
//!
//! The cluster is stopped (`pg_ctl -m immediate stop`) and its directory
//! removed on drop, and also when the test process dies without dropping it
//! (the shared cluster lives in a static; a test binary may be killed): a
//! [`Watchdog`] does both when our end of its pipe closes.
//!
//! No PostgreSQL installed is a loud failure, never a skip: `scripts/setup`
//! installs the `postgresql` package.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

use crate::tied::Watchdog;

/// Longest `pg_ctl` waits for the server to accept connections; a loaded
/// 2-core machine needs a few seconds, never this many.
const START_DEADLINE_S: u32 = 120;

pub struct PgCluster {
    /// `None` once stopped.
    watchdog: Option<Watchdog>,
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// Held to keep the directory; removed after the server stopped.
    dir: Option<tempfile::TempDir>,
    run_as: Option<&'static str>,
}

/// The user the cluster runs as when we are root.
const SERVER_USER: &str = "postgres";
/// The database superuser `initdb` creates.
pub const DB_USER: &str = "edgebind";

impl PgCluster {
    /// The cluster of this test process, started on first use. Panics (the
    /// test fails) if PostgreSQL is missing or does not start.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| match PgCluster::start() {
            Ok(c) => c,
            Err(e) => panic!("cannot start the test PostgreSQL: {e:#}"),
        })
    }

    pub fn start() -> anyhow::Result<PgCluster> {
        let bin = bin_dir()?;
        let run_as = (unsafe { libc::geteuid() } == 0).then_some(SERVER_USER);
        let dir = tempfile::Builder::new()
            .prefix("edgebind-pg-")
            .tempdir()
            .context("create the cluster directory")?;
        let data = dir.path().join("pg");
        std::fs::create_dir(&data)?;
        if let Some(user) = run_as {
            // The server user must reach its data directory inside our tempdir.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
            run(Command::new("chown").arg(user).arg(&data))?;
        }
        let mut cluster = PgCluster {
            watchdog: None,
            bin,
            data,
            port: 0,
            dir: Some(dir),
            run_as,
        };
        // Armed before initdb, so even a half-made cluster is cleaned up.
        cluster.watchdog =
            Some(Watchdog::on_death(&cluster.stop_script()).context("start the cluster watchdog")?);
        run(cluster
            .server_cmd("initdb")
            .arg("-D")
            .arg(&cluster.data)
            .args(["-A", "trust", "-U", DB_USER, "-E", "UTF8"])
            .args(["--no-sync", "--no-instructions"]))
        .context("initdb")?;
        // A free port can be taken by a parallel test between our probe and
        // the server's bind: retry on another one then.
        for attempt in 0.. {
            cluster.port = crate::cli::free_port().context("find a free port")?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) if attempt < 3 && cluster.log().contains("could not bind") => {
                    eprintln!("postgres port {} was taken ({e:#}); retrying", cluster.port);
                }
                Err(e) => return Err(e.context(format!("server log:\n{}", cluster.log()))),
            }
        }
        unreachable!()
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        // Throwaway data: no fsync, so hundreds of test databases stay cheap.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            self.port,
            self.data.display()
        );
        run(self
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options])
            // The log must be writable by the server user: keep it inside its directory.
            .arg("-l")
            .arg(self.data.join("server.log"))
            .args(["-w", "-t", &START_DEADLINE_S.to_string(), "start"]))
        .context("pg_ctl start")
    }

    /// A new, empty database; returns its URL.
    pub fn database(&self) -> anyhow::Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                DB_USER,
            ])
            .arg(&name))
        .with_context(|| format!("createdb {name}"))?;
        Ok(self.url(&name))
    }

    /// Run `sql` with `psql` on the database of `url` (for tests that
    /// tamper with a registry behind the store's back).
    pub fn psql(&self, url: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output()
            .context("run psql")?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{DB_USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Where the server's Unix socket (`.s.PGSQL.<port>`) is.
    pub fn socket_dir(&self) -> &std::path::Path {
        &self.data
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }

    fn server_cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(path);
                cmd
            }
            None => Command::new(path),
        }
    }

    /// What the watchdog runs if we die: the same stop as [`Drop`], then the directory.
    fn stop_script(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = match self.run_as {
            Some(user) => format!("runuser -u {user} -- '{}'", pg_ctl.display()),
            None => format!("'{}'", pg_ctl.display()),
        };
        let dir = self
            .dir
            .as_ref()
            .map(|d| d.path().to_owned())
            .unwrap_or_default();
        format!(
            "{stop} -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}'",
            self.data.display(),
            dir.display()
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let stopped = run(self.server_cmd("pg_ctl").arg("-D").arg(&self.data).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]));
        if let Err(e) = stopped {
            eprintln!("stopping the test PostgreSQL: {e:#}");
        }
        if let Some(mut w) = self.watchdog.take() {
            w.disarm();
        }
        drop(self.dir.take());
    }
}

/// The newest installed PostgreSQL's programs (Debian keeps them out of PATH).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    bail!(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
         run `bash scripts/setup` or `apt-get install postgresql`"
    )
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
