//! Shared set-up of the fleet integration tests: a fleet home with PKI and a
//! running Mosquitto (the harness), the `edgebind` CLI run against that home,
//! the fleet service as a real process, and real agent processes.

#![allow(dead_code)] // each test file uses a different part

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use edgebind_fleet::registry::{self, Device, SqliteStore, Store};
use edgebind_protocol::DeviceId;
use edgebind_tests::{TestFleet, bin_path, wait_for};

pub const LONG: Duration = Duration::from_secs(60);

pub struct Fleet {
    pub env: TestFleet,
    service: Option<Child>,
    service_starts: u32,
    /// `EDGEBIND_REGISTRY` for the CLI and the service; `None`: `<home>/registry.db`.
    registry_url: Option<String>,
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Settings written into a test agent's agent.toml.
#[derive(Clone)]
pub struct AgentTweaks {
    pub keep_alive_s: u64,
    pub telemetry_interval_s: u64,
    /// argv run for `reboot` (harmless in tests).
    pub reboot_command: Vec<String>,
}

impl Default for AgentTweaks {
    fn default() -> Self {
        AgentTweaks {
            keep_alive_s: 5,
            telemetry_interval_s: 1,
            reboot_command: vec!["/bin/true".into()],
        }
    }
}

impl Fleet {
    pub fn start() -> Fleet {
        let env = TestFleet::start();
        let me = Fleet {
            env,
            service: None,
            service_starts: 0,
            registry_url: None,
        };
        // The CLI's default operator identity lives in <home>/operator/.
        let op = &me.env.pki.operator;
        let dir = me.home().join("operator");
        std::fs::create_dir_all(&dir).unwrap();
        for (from, name) in [
            (&op.cert, "client.crt"),
            (&op.key, "client.key"),
            (&op.ca, "ca.crt"),
        ] {
            std::fs::copy(from, dir.join(name)).unwrap();
        }
        // Let `edgebind revoke` find and signal the broker as it would in production.
        let pid = me.env.broker.pid().expect("broker running");
        std::fs::write(
            me.env.broker.dir().join(edgebind_broker::layout::PID),
            format!("{pid}\n"),
        )
        .unwrap();
        me
    }

    /// A fleet whose registry is a fresh database on the test PostgreSQL.
    pub fn start_on_postgres() -> Fleet {
        let url = edgebind_tests::PgCluster::shared()
            .database()
            .expect("create the registry database");
        let mut fleet = Fleet::start();
        fleet.registry_url = Some(url);
        fleet
    }

    /// The registry the CLI and the service use, whichever backend it is on.
    pub fn store(&self) -> Box<dyn Store> {
        let url: registry::RegistryUrl = match &self.registry_url {
            Some(u) => u.parse().expect("registry URL"),
            None => self.registry_path().into(),
        };
        registry::open_store(&url, registry::Retention::default()).expect("open registry")
    }

    fn with_registry<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        match &self.registry_url {
            Some(url) => cmd.env("EDGEBIND_REGISTRY", url),
            None => cmd.env_remove("EDGEBIND_REGISTRY"),
        }
    }

    pub fn home(&self) -> &Path {
        self.env.pki.home()
    }

    pub fn registry_path(&self) -> PathBuf {
        self.home().join("registry.db")
    }

    pub fn registry(&self) -> SqliteStore {
        registry::open_or_create(&self.registry_path()).expect("open registry")
    }

    /// `edgebind --home <home> args...`
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = self
            .with_registry(&mut Command::new(bin_path("edgebind")))
            .arg("--home")
            .arg(self.home())
            .args(args)
            .env_remove("EDGEBIND_HOME")
            .env_remove("EDGEBIND_BROKER")
            .stdin(Stdio::null())
            .output()
            .expect("run edgebind");
        eprintln!(
            "$ edgebind {}\n  -> {:?}\n  stdout: {}\n  stderr: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        out
    }

    /// Like [`Fleet::cli`] but the command must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "edgebind {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Start `edgebind fleet serve` and wait until it is subscribed.
    pub fn start_service(&mut self) {
        self.start_service_with(&[]);
    }

    /// [`Fleet::start_service`] with more `fleet serve` arguments.
    pub fn start_service_with(&mut self, extra: &[&str]) {
        assert!(self.service.is_none(), "service already running");
        self.service_starts += 1;
        let log = self
            .home()
            .join(format!("fleet-service-{}.log", self.service_starts));
        let file = File::create(&log).unwrap();
        let child = self
            .with_registry(&mut Command::new(bin_path("edgebind")))
            .arg("--home")
            .arg(self.home())
            .args(["fleet", "serve", "--log-level", "info,edgebind_fleet=debug"])
            .arg("--identity")
            .arg(&self.env.pki.service.dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn fleet service");
        self.service = Some(child);
        let connected = wait_for(LONG, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("fleet service connected").then_some(())
        });
        assert!(
            connected.is_some(),
            "fleet service did not connect; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // Subscriptions follow the CONNACK; give the SUBACK a moment by
        // waiting for the broker to log them is not possible at this log
        // level, so probe with the registry instead: nothing to wait for.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Another `fleet serve` instance, `--instance NAME`, with its identity
    /// issued from the fleet home on first use (and the broker policy
    /// refreshed for it, as in production). Waits until it is connected.
    pub fn start_instance(&self, name: &str, attempt: u32) -> Proc {
        let log = self
            .home()
            .join(format!("fleet-service-{name}-{attempt}.log"));
        let file = File::create(&log).unwrap();
        let child = self
            .with_registry(&mut Command::new(bin_path("edgebind")))
            .arg("--home")
            .arg(self.home())
            .args(["fleet", "serve", "--instance", name, "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn fleet service instance");
        let proc = Proc { child, log };
        let connected = wait_for(LONG, || {
            proc.log().contains("fleet service connected").then_some(())
        });
        assert!(
            connected.is_some(),
            "instance {name} did not connect:\n{}",
            proc.log()
        );
        proc
    }

    /// The running service process, handed over to the test (it is then
    /// the test's to stop).
    pub fn take_service(&mut self) -> Option<std::process::Child> {
        self.service.take()
    }

    pub fn kill9_service(&mut self) {
        if let Some(mut c) = self.service.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop_service(&mut self) {
        if let Some(mut c) = self.service.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let status = c.wait().unwrap();
            assert!(status.success(), "fleet service exited with {status}");
        }
    }

    pub fn service_log(&self) -> String {
        let log = self
            .home()
            .join(format!("fleet-service-{}.log", self.service_starts));
        std::fs::read_to_string(log).unwrap_or_default()
    }

    /// `edgebind device add` and return the bundle directory.
    pub fn add_device(&self, id: &str, tags: &[&str]) -> PathBuf {
        let mut args = vec!["device", "add", id, "--board", "qemux86-64"];
        for t in tags {
            args.push("--tag");
            args.push(t);
        }
        self.cli_ok(&args);
        let dir = self.home().join("bundles").join(id);
        assert!(dir.join("agent.toml").is_file());
        dir
    }

    /// Rewrite the bundle's agent.toml for a test run: short keep-alive and
    /// telemetry interval, a state directory inside the bundle, harmless reboot.
    pub fn agent_config(&self, bundle: &Path, tweaks: &AgentTweaks) -> PathBuf {
        let path = bundle.join("agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut doc: toml::Table = toml::from_str(&text).unwrap();
        let table = |doc: &mut toml::Table, name: &str| -> toml::Table {
            doc.get(name)
                .and_then(|v| v.as_table())
                .cloned()
                .unwrap_or_default()
        };
        let mut broker = table(&mut doc, "broker");
        broker.insert("keep_alive_s".into(), (tweaks.keep_alive_s as i64).into());
        broker.insert("reconnect_max_s".into(), 2.into());
        doc.insert("broker".into(), broker.into());
        let mut telemetry = table(&mut doc, "telemetry");
        telemetry.insert(
            "interval_s".into(),
            (tweaks.telemetry_interval_s as i64).into(),
        );
        doc.insert("telemetry".into(), telemetry.into());
        let mut state = table(&mut doc, "state");
        state.insert("dir".into(), "state".into());
        doc.insert("state".into(), state.into());
        let mut reboot = toml::Table::new();
        reboot.insert("method".into(), "command".into());
        reboot.insert(
            "command".into(),
            toml::Value::Array(
                tweaks
                    .reboot_command
                    .iter()
                    .map(|s| toml::Value::from(s.as_str()))
                    .collect(),
            ),
        );
        let mut actions = toml::Table::new();
        actions.insert("reboot".into(), reboot.into());
        doc.insert("actions".into(), actions.into());
        let mut log = toml::Table::new();
        log.insert("level".into(), "debug".into());
        doc.insert("log".into(), log.into());
        std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
        path
    }

    /// Start `edgebind-agent --config <config>`.
    pub fn spawn_agent(&self, config: &Path) -> Proc {
        self.spawn_agent_bin(&bin_path("edgebind-agent"), config, &[])
    }

    /// Start agent binary `bin` (`edgebind_tests::agent_with_test_hooks()`,
    /// say) with `--config <config>` and extra environment `env`.
    pub fn spawn_agent_bin(
        &self,
        bin: &Path,
        config: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Proc {
        let log = config.with_file_name(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let file = File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn edgebind-agent");
        Proc { child, log }
    }

    /// Wait until the registry's record of `id` satisfies `pred`.
    pub fn wait_device(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Device) -> bool,
    ) -> Device {
        let store = self.store();
        let id = DeviceId::new(id).unwrap();
        let found = wait_for(timeout, || {
            let d = store.device(&id).ok()?;
            pred(&d).then_some(d)
        });
        match found {
            Some(d) => d,
            None => panic!(
                "device {id}: {what} not reached within {timeout:?}; registry has {:#?}\nservice log:\n{}",
                store.device(&id).ok(),
                self.service_log()
            ),
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill9_service();
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
