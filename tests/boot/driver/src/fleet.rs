//! The host side of the fleet for one boot test, run the way an operator
//! runs it: the `edgebind` CLI makes the PKI (`pki init`), the broker's
//! least-privilege Mosquitto config (`broker config`, server certificate for
//! the guest's broker address and 127.0.0.1), runs it (`broker run`, on
//! 127.0.0.1 only), writes the device's identity bundle (`pki bundle`, broker
//! = the guestfwd address) and revokes it (`pki revoke`, which reloads the
//! running broker). The operator's MQTT connection is the test harness's
//! `TestClient` with the operator identity `pki init` wrote.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgebind_protocol::messages::{
    Action, Command as DeviceCommand, CommandResult, Presence, Status,
};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId};
use edgebind_tests::{ClientOptions, Identity, PubAckReason, QoS, Received, TestClient};

use crate::vm::{BROKER_GUEST_PORT, GUEST_HOST_ADDR};

const OPERATOR: &str = "boottest";
const LATE_OPERATOR: &str = "late";

/// `edgebind broker run` (which execs mosquitto), killed on Drop.
struct BrokerProcess {
    child: Child,
    /// Removed once reaped, so that run's trap never kills a reused pid.
    pid_file: PathBuf,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

pub struct Fleet {
    // Field order = drop order: the operator disconnects before the broker stops.
    operator: TestClient,
    broker: BrokerProcess,
    edgebind: PathBuf,
    home: PathBuf,
    broker_log: PathBuf,
    pub broker_port: u16,
    /// The broker's provisioning listener, when it has one.
    pub provisioning_port: Option<u16>,
    pub device: DeviceId,
}

/// Where a [`Fleet`] keeps its files in the run's directory, and what its broker listens on.
#[derive(Default)]
pub struct FleetOptions<'a> {
    /// Prefix of its file names ("": the bundle scenario's), so that two
    /// fleets of one run never share a file (the pid files stay in the run's
    /// directory, where tests/boot/run's trap finds them).
    pub tag: &'a str,
    /// A provisioning listener for claim first boot (`broker config --provisioning-port`).
    pub provisioning: bool,
}

impl Fleet {
    /// PKI, broker config, running broker, operator subscribed to the
    /// device's status and command results.
    pub fn start(edgebind: &Path, device: &str, workdir: &Path) -> anyhow::Result<Fleet> {
        Self::start_with(edgebind, device, workdir, &FleetOptions::default())
    }

    pub fn start_with(
        edgebind: &Path,
        device: &str,
        workdir: &Path,
        opts: &FleetOptions<'_>,
    ) -> anyhow::Result<Fleet> {
        let device = DeviceId::new(device)?;
        let tag = opts.tag;
        // Mosquitto drops to its own user and must traverse to <home>/broker;
        // the CLI keeps pki/ and operator/ at 0700 itself.
        std::fs::set_permissions(workdir, std::fs::Permissions::from_mode(0o755))?;
        let home = workdir.join(format!("{tag}fleet-home"));
        let port = free_port()?;
        let provisioning_port = opts.provisioning.then(free_port).transpose()?;
        let cli = |args: &[&str]| run_cli(edgebind, &home, args);
        cli(&["pki", "init", "--fleet", "boottest", "--operator", OPERATOR])?;
        let port_arg = port.to_string();
        let mut config = vec![
            "broker",
            "config",
            "--ip",
            GUEST_HOST_ADDR,
            "--ip",
            "127.0.0.1",
            "--port",
            &port_arg,
            "--bind",
            "127.0.0.1",
        ];
        let provisioning_arg = provisioning_port.map(|p| p.to_string());
        if let Some(p) = &provisioning_arg {
            config.extend(["--provisioning-port", p]);
        }
        cli(&config)?;
        // A second operator, to see what a late subscriber gets (the same
        // CN twice would kick the first connection). Issued before the broker
        // starts so that `broker run` puts it in the ACL.
        cli(&["pki", "issue", "operator", LATE_OPERATOR])?;
        let broker_log = workdir.join(format!("{tag}broker.log"));
        let child = Command::new(edgebind)
            .arg("--home")
            .arg(&home)
            .args(["broker", "run"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(
                workdir.join(format!("{tag}broker.stdout")),
            )?)
            .stderr(std::fs::File::create(&broker_log)?)
            .spawn()
            .context("starting `edgebind broker run`")?;
        // `broker run` execs mosquitto: this pid is the broker's.
        let pid_file = workdir.join(format!("{tag}mosquitto.pid"));
        std::fs::write(&pid_file, child.id().to_string())?;
        let mut broker = BrokerProcess { child, pid_file };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Some(status) = broker.child.try_wait()? {
                bail!(
                    "the broker exited ({status}):\n{}",
                    std::fs::read_to_string(&broker_log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("the broker does not accept connections on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let identity = Identity::from_dir(
            &home.join("operator"),
            "client",
            &format!("operator:{OPERATOR}"),
        );
        let operator =
            TestClient::connect_addr(&identity, "127.0.0.1", port, ClientOptions::default())
                .context("operator connect")?;
        operator.subscribe(&Kind::Status.filter_for(&device))?;
        operator.subscribe(&Kind::CmdResult.filter_for(&device))?;
        Ok(Fleet {
            operator,
            broker,
            edgebind: edgebind.to_owned(),
            home,
            broker_log,
            broker_port: port,
            provisioning_port,
            device,
        })
    }

    /// The fleet home the CLI runs against.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `edgebind --home <home> <args>`; fails with its output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        run_cli(&self.edgebind, &self.home, args)
    }

    /// `edgebind pki bundle`: a device certificate and its identity bundle
    /// whose agent.toml dials the broker as the guest sees it. Returns the tar.
    pub fn device_bundle(&self) -> anyhow::Result<PathBuf> {
        self.cli(&[
            "pki",
            "bundle",
            self.device.as_str(),
            "--board",
            "qemux86-64",
            "--broker-host",
            GUEST_HOST_ADDR,
            "--broker-port",
            &BROKER_GUEST_PORT.to_string(),
        ])?;
        let tar = self
            .home
            .join("bundles")
            .join(format!("{}.tar", self.device));
        if !tar.is_file() {
            bail!("`edgebind pki bundle` wrote no {}", tar.display());
        }
        Ok(tar)
    }

    /// `edgebind pki revoke` (inventory, CRL, ACL, and it reloads the running
    /// broker); returns once the broker logged the reload.
    pub fn revoke_device(&self) -> anyhow::Result<()> {
        let before = self.broker_log().matches("Reloading config").count();
        self.cli(&["pki", "revoke", self.device.as_str()])?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.broker_log().matches("Reloading config").count() <= before {
            if Instant::now() > deadline {
                bail!("the broker did not log a reload after `edgebind pki revoke`");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Everything the broker logged so far.
    pub fn broker_log(&self) -> String {
        std::fs::read_to_string(&self.broker_log).unwrap_or_default()
    }

    /// Whether the broker process is still alive.
    pub fn broker_running(&mut self) -> bool {
        matches!(self.broker.child.try_wait(), Ok(None))
    }

    /// Sends `action` as the operator (QoS 1). `retain` keeps it on the
    /// broker so that every reconnect of the device gets it delivered again.
    pub fn send(&self, id: &str, action: Action, retain: bool) -> anyhow::Result<CommandId> {
        self.send_with_args(id, action, Default::default(), retain)
    }

    pub fn send_with_args(
        &self,
        id: &str,
        action: Action,
        args: serde_json::Map<String, serde_json::Value>,
        retain: bool,
    ) -> anyhow::Result<CommandId> {
        let id = CommandId::new(id)?;
        let cmd = DeviceCommand {
            id: id.clone(),
            action: action.clone(),
            args,
            expires_at: None,
        };
        let topic = Topic::Cmd(self.device.clone(), id.clone()).render();
        let ack = self
            .operator
            .publish(&topic, &cmd.encode(), QoS::AtLeastOnce, retain)?;
        match ack {
            Some(PubAckReason::Success | PubAckReason::NoMatchingSubscribers) => Ok(id),
            other => bail!("the broker did not accept the {action} command: {other:?}"),
        }
    }
    /// Waits for an `online` status whose boot id is `boot_id`.
    pub fn wait_online(
        &self,
        boot_id: &str,
        timeout: Duration,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        let want = normalize_boot_id(boot_id);
        loop {
            alive()?;
            if self.statuses().iter().any(|s| is_online_from(s, &want)) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("no `online` status with boot id {boot_id} within {timeout:?}");
            }
            self.operator
                .wait_for_message(Duration::from_millis(500), |m| {
                    status_of(m).is_some_and(|s| is_online_from(&s, &want))
                });
        }
    }

    /// Whether a new subscriber gets the device's `online` status of boot
    /// `boot_id` as a retained message.
    pub fn retained_online(&self, boot_id: &str) -> anyhow::Result<bool> {
        let identity = Identity::from_dir(
            &self
                .home
                .join("identities")
                .join(format!("operator-{LATE_OPERATOR}")),
            "client",
            &format!("operator:{LATE_OPERATOR}"),
        );
        let late = TestClient::connect_addr(
            &identity,
            "127.0.0.1",
            self.broker_port,
            ClientOptions::default(),
        )
        .context("second operator connect")?;
        late.subscribe(&Kind::Status.filter_for(&self.device))?;
        let want = normalize_boot_id(boot_id);
        let got = late.wait_for_message(Duration::from_secs(10), |m| {
            m.retain && status_of(m).is_some_and(|s| is_online_from(&s, &want))
        });
        late.disconnect();
        Ok(got.is_some())
    }

    /// Whether an `online` status from boot `boot_id` has arrived so far.
    pub fn saw_online(&self, boot_id: &str) -> bool {
        let want = normalize_boot_id(boot_id);
        self.statuses().iter().any(|s| is_online_from(s, &want))
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.operator
            .received()
            .iter()
            .filter_map(status_of)
            .collect()
    }

    /// Every result the device published for command `id`.
    /// The final result of command `id` (not `accepted`), waiting up to `timeout`.
    pub fn wait_final(&self, id: &CommandId, timeout: Duration) -> anyhow::Result<CommandResult> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.results(id).into_iter().find(|r| r.status.is_final()) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!(
                    "no final result for {id} within {timeout:?} (results: {:?})",
                    self.results(id)
                );
            }
            let topic = Topic::CmdResult(self.device.clone(), id.clone()).render();
            self.operator
                .wait_for_message(Duration::from_millis(500), |m| m.topic == topic);
        }
    }

    pub fn results(&self, id: &CommandId) -> Vec<CommandResult> {
        let topic = Topic::CmdResult(self.device.clone(), id.clone()).render();
        self.operator
            .received()
            .iter()
            .filter(|m| m.topic == topic)
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect()
    }

    /// What the operator received, for failure reports.
    pub fn transcript(&self) -> String {
        self.operator
            .received()
            .iter()
            .map(|m| {
                format!(
                    "  {}{} {}\n",
                    m.topic,
                    if m.retain { " (retained)" } else { "" },
                    String::from_utf8_lossy(&m.payload)
                )
            })
            .collect()
    }
}

fn status_of(m: &Received) -> Option<Status> {
    matches!(Topic::parse(&m.topic), Some(Topic::Status(_)))
        .then(|| serde_json::from_slice(&m.payload).ok())
        .flatten()
}

fn is_online_from(s: &Status, boot_id: &str) -> bool {
    s.state == Presence::Online
        && s.boot_id.as_deref().map(normalize_boot_id).as_deref() == Some(boot_id)
}

/// The kernel prints boot ids with dashes, journalctl without.
pub fn normalize_boot_id(id: &str) -> String {
    id.trim().replace('-', "").to_ascii_lowercase()
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Runs `edgebind --home <home> <args>`; fails with its output.
fn run_cli(edgebind: &Path, home: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(edgebind)
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .with_context(|| format!("running {}", edgebind.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "`edgebind {}` failed ({}):\n{text}",
            args.join(" "),
            out.status
        );
    }
    Ok(text)
}
