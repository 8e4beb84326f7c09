use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use edgebind_broker::{BrokerSettings, GenerateOptions};
use edgebind_certs::Pki;

use crate::pki::TestPki;
use crate::wait::wait_until;

/// A real Mosquitto running OUR generated configuration (see the crate docs).
pub struct Broker {
    dir: PathBuf,
    pki_dir: PathBuf,
    port: u16,
    provisioning_port: Option<u16>,
    child: Option<Child>,
    watchdog: Option<crate::tied::Watchdog>,
    log: PathBuf,
    starts: u32,
}

const START_DEADLINE: Duration = Duration::from_secs(20);

/// A free port for the provisioning listener: the OS may hand out the port it
/// just gave for the device listener again, since that probe closed it.
fn second_port(first: u16) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let p = crate::cli::free_port().context("bind a free port")?;
        if p != first {
            return Ok(p);
        }
    }
    bail!("no second free port")
}

impl Broker {
    /// Generate `<home>/broker` for 127.0.0.1 / localhost on a free port and start mosquitto.
    pub fn start(pki: &TestPki) -> anyhow::Result<Broker> {
        let mut settings = BrokerSettings::new(
            vec!["localhost".into()],
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        );
        settings.port = crate::cli::free_port().context("bind a free port")?;
        settings.provisioning_port = Some(second_port(settings.port)?);
        settings.bind = "127.0.0.1".into();
        Self::start_with(pki, settings)
    }

    /// Start with explicit settings (e.g. a short `crl_days`).
    pub fn start_with(pki: &TestPki, settings: BrokerSettings) -> anyhow::Result<Broker> {
        let dir = pki.broker_dir();
        edgebind_broker::generate(&dir, pki.pki(), &settings, &GenerateOptions::default())
            .context("generate broker config")?;
        let mut broker = Broker {
            log: pki.home().join("mosquitto.log"),
            dir,
            pki_dir: pki.pki_dir(),
            port: settings.port,
            provisioning_port: settings.provisioning_port,
            child: None,
            watchdog: None,
            starts: 0,
        };
        // A free port can be taken by a parallel test between our probe and
        // mosquitto's bind: retry on a new port then.
        for attempt in 0.. {
            match broker.spawn() {
                Ok(()) => return Ok(broker),
                Err(e) if attempt < 3 && broker.log().contains("Address already in use") => {
                    eprintln!("broker port {} was taken ({e}); retrying", broker.port);
                    let mut settings = settings.clone();
                    settings.port = crate::cli::free_port().context("bind a free port")?;
                    if settings.provisioning_port.is_some() {
                        settings.provisioning_port = Some(second_port(settings.port)?);
                    }
                    edgebind_broker::generate(
                        &broker.dir,
                        pki.pki(),
                        &settings,
                        &GenerateOptions::default(),
                    )?;
                    broker.port = settings.port;
                    broker.provisioning_port = settings.provisioning_port;
                    std::fs::write(&broker.log, "")?;
                    broker.starts = 0;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let mut cmd = edgebind_broker::process::command(&self.dir)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawn mosquitto")?;
        // Mosquitto drops root, which clears PR_SET_PDEATHSIG: a watchdog
        // kills it if this test process dies without running Drop.
        self.watchdog = Some(crate::tied::Watchdog::watch(child.id())?);
        // Same pid file `edgebind broker run` writes, so the real CLI
        // (`edgebind broker reload`, `pki crl`, `device revoke`) can signal it.
        edgebind_certs::files::write_public(
            &self.dir.join(edgebind_broker::layout::PID),
            format!("{}\n", child.id()).as_bytes(),
        )?;
        self.child = Some(child);
        self.starts += 1;
        let port = self.port;
        let starts = self.starts as usize;
        // Mosquitto logs "running" once its listeners are open; counting the
        // lines tells this start from earlier ones, and waiting for it (not
        // just for the port) cannot mistake another process on a reused port
        // for ours.
        let up = wait_until(START_DEADLINE, || {
            if self.has_exited() {
                return true;
            }
            self.log().matches(" running").count() >= starts
                && TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
        });
        if self.has_exited() || !up {
            bail!(
                "mosquitto did not start listening on 127.0.0.1:{port}; log:\n{}",
                self.log()
            );
        }
        Ok(())
    }

    fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// True while the mosquitto process is alive.
    pub fn is_running(&mut self) -> bool {
        !self.has_exited()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Address clients dial.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Name in the server certificate clients may verify instead of the IP.
    pub fn server_name(&self) -> &'static str {
        "localhost"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Port of the provisioning listener (claim identities; no device patterns).
    pub fn provisioning_port(&self) -> Option<u16> {
        self.provisioning_port
    }

    /// `<home>/broker` (mosquitto.conf, acl, crl.pem, ...).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything mosquitto logged so far (all starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn reload_count(&self) -> usize {
        self.log().matches("Reloading config").count()
    }

    /// Stop the broker (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let exited = wait_until(Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
    }

    /// Stop and start again on the same port with the same files.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    /// Send SIGHUP without regenerating anything; returns once the broker
    /// logged that it reloaded its configuration.
    pub fn hup(&mut self) -> anyhow::Result<()> {
        let before = self.reload_count();
        let pid = self.pid().context("broker not running")?;
        // A SIGHUP that arrives while another is pending merges with it (a
        // CLI's own SIGHUP, say), so send again until a new reload is logged:
        // reloading twice is harmless.
        let mut reloaded = false;
        for _ in 0..10 {
            edgebind_broker::process::send_hup(pid)?;
            if wait_until(Duration::from_secs(3), || self.reload_count() > before) {
                reloaded = true;
                break;
            }
        }
        if !reloaded {
            bail!(
                "mosquitto did not log a reload after SIGHUP; log:\n{}",
                self.log()
            );
        }
        // The broker logs the line and then reloads in the same iteration of
        // its single-threaded loop, so anything a client sends from now on is
        // handled under the new configuration.
        Ok(())
    }

    /// Regenerate the ACL and CRL from the PKI inventory (what `edgebind
    /// broker reload` does) and SIGHUP the broker.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        let pki = Pki::open(&self.pki_dir)?;
        let settings = BrokerSettings::load(&self.dir)?;
        edgebind_broker::regenerate_policy(&self.dir, &pki, &settings)?;
        self.hup()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
