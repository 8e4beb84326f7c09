//! Helpers for the agent's integration tests and benchmark: write an agent
//! configuration into an identity bundle, run the real `edgebind-agent`
//! binary (killed on Drop), and talk to it as an operator.
//!
//! Included with `#[path]` by tests/tests/agent_*.rs and the agent benchmark,
//! so each user compiles only what it needs.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use edgebind_protocol::messages::{CommandResult, CommandStatus, Status};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId};
use edgebind_tests::{Broker, QoS, TestClient, TestPki, bin_path, wait_for};

/// Deadline for anything the agent does through the broker.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(20);

/// Knobs of the test agent configuration.
#[derive(Debug, Clone)]
pub struct AgentSetup {
    pub telemetry_interval_s: u64,
    /// Extra TOML appended at the top level (before any table).
    pub top_level: String,
    /// Overrides the broker's real name (to prove it is checked).
    pub server_name: Option<String>,
    /// Extra TOML lines of the `[actions]` table (its `dir` is the bundle's
    /// `actions.d`, see [`AgentBundle::actions_dir`]).
    pub actions: String,
}

impl Default for AgentSetup {
    fn default() -> Self {
        AgentSetup {
            telemetry_interval_s: 60,
            top_level: String::new(),
            server_name: None,
            actions: String::new(),
        }
    }
}

/// An identity bundle with a test configuration: state under the bundle,
/// reboot = append a line to `marker` (harmless), fast reconnects.
#[derive(Debug, Clone)]
pub struct AgentBundle {
    pub id: DeviceId,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    /// One line per executed reboot.
    pub marker: PathBuf,
    /// The agent's `actions.dir` (not created).
    pub actions_dir: PathBuf,
}

impl AgentBundle {
    /// Issue `id`'s bundle via the PKI harness and replace its agent.toml.
    pub fn new(pki: &TestPki, broker: &Broker, id: &str, setup: &AgentSetup) -> AgentBundle {
        let dir = pki.bundle(id, broker);
        let marker = dir.join("reboots.log");
        let config = dir.join("agent.toml");
        let toml = format!(
            r#"device_id = "{id}"
{top}
[broker]
host = "{host}"
port = {port}
server_name = "{server_name}"
keep_alive_s = 5
reconnect_min_ms = 100
reconnect_max_s = 1

[telemetry]
interval_s = {interval}

[state]
dir = "state"

[actions]
dir = "actions.d"
{actions}

[actions.reboot]
method = "command"
command = ["/bin/sh", "-c", "echo reboot >> '{marker}'"]

[log]
level = "debug"
"#,
            top = setup.top_level,
            host = broker.host(),
            port = broker.port(),
            server_name = setup.server_name.as_deref().unwrap_or(broker.server_name()),
            interval = setup.telemetry_interval_s,
            marker = marker.display(),
            actions = setup.actions,
        );
        std::fs::write(&config, toml).expect("write agent.toml");
        AgentBundle {
            id: DeviceId::new(id).expect("valid device id"),
            state_dir: dir.join("state"),
            actions_dir: dir.join("actions.d"),
            dir,
            config,
            marker,
        }
    }

    /// Reboots executed so far (lines in the marker file).
    pub fn reboots(&self) -> usize {
        std::fs::read_to_string(&self.marker)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

/// A running `edgebind-agent` process; SIGKILLed on Drop if still running.
pub struct AgentProcess {
    child: Child,
    stderr: PathBuf,
}

impl AgentProcess {
    pub fn spawn(config: &Path) -> AgentProcess {
        Self::spawn_with_env(config, &[])
    }

    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> AgentProcess {
        let stderr = config.with_file_name(format!(
            "agent-stderr-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = Command::new(bin_path("edgebind-agent"));
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr log"))
            // Never pick up a systemd environment from the test runner.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn edgebind-agent");
        AgentProcess { child, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.child.try_wait().ok().flatten())
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill9();
        }
    }
}

/// Run the agent on `config` expecting it to refuse to start; returns the
/// exit code and stderr.
pub fn run_to_exit(config: &Path) -> (Option<i32>, String) {
    let mut p = AgentProcess::spawn(config);
    let status = p
        .wait_exit(AGENT_DEADLINE)
        .unwrap_or_else(|| panic!("agent did not exit; stderr:\n{}", p.stderr()));
    (status.code(), p.stderr())
}

/// An operator connection watching one device's status, results and
/// telemetry.
pub struct Operator {
    pub client: TestClient,
    pub device: DeviceId,
}

impl Operator {
    pub fn watch(pki: &TestPki, broker: &Broker, device: &DeviceId) -> Operator {
        let client = TestClient::connect(&pki.operator, broker).expect("operator connects");
        for kind in [
            Kind::Status,
            Kind::CmdResult,
            Kind::Telemetry,
            Kind::Reported,
            Kind::Events,
        ] {
            client
                .subscribe(&kind.filter_for(device))
                .expect("operator subscribes");
        }
        Operator {
            client,
            device: device.clone(),
        }
    }

    pub fn status_topic(&self) -> String {
        Topic::Status(self.device.clone()).render()
    }

    /// All status messages seen so far, decoded, with their retain flag.
    pub fn statuses(&self) -> Vec<(Status, bool)> {
        let topic = self.status_topic();
        self.client
            .received()
            .into_iter()
            .filter(|m| m.topic == topic)
            .filter_map(|m| Some((serde_json::from_slice(&m.payload).ok()?, m.retain)))
            .collect()
    }

    /// Wait for a status message matching `pred`.
    pub fn wait_status(&self, pred: impl Fn(&Status, bool) -> bool) -> Option<Status> {
        wait_for(AGENT_DEADLINE, || {
            self.statuses()
                .into_iter()
                .find(|(s, r)| pred(s, *r))
                .map(|(s, _)| s)
        })
    }

    /// Publish raw bytes as command `id` (QoS 1).
    pub fn send_raw(&self, id: &str, payload: &[u8]) {
        let topic = Topic::Cmd(self.device.clone(), CommandId::new(id).expect("id")).render();
        let ack = self
            .client
            .publish(&topic, payload, QoS::AtLeastOnce, false)
            .expect("publish command");
        assert!(
            matches!(
                ack,
                Some(edgebind_tests::PubAckReason::Success)
                    | Some(edgebind_tests::PubAckReason::NoMatchingSubscribers)
            ),
            "command publish refused: {ack:?}"
        );
    }

    /// Send `{"id":id,"action":action}` plus `extra` JSON fields.
    pub fn send(&self, id: &str, action: &str, extra: &str) {
        let payload = format!(r#"{{"id":"{id}","action":"{action}"{extra}}}"#);
        self.send_raw(id, payload.as_bytes());
    }

    /// Every result published for command `id`, in arrival order.
    pub fn results(&self, id: &str) -> Vec<CommandResult> {
        let topic = Topic::CmdResult(self.device.clone(), CommandId::new(id).expect("id")).render();
        self.client
            .received()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| serde_json::from_slice(&m.payload).expect("result decodes"))
            .collect()
    }

    /// Wait until command `id` has a result with `status`.
    pub fn wait_result(&self, id: &str, status: CommandStatus) -> Option<CommandResult> {
        wait_for(AGENT_DEADLINE, || {
            self.results(id).into_iter().find(|r| r.status == status)
        })
    }

    /// Wait until command `id` has a final result (whatever it is).
    pub fn wait_final(&self, id: &str) -> Option<CommandResult> {
        wait_for(AGENT_DEADLINE, || {
            self.results(id).into_iter().find(|r| r.status.is_final())
        })
    }
}

/// Wait until `f` is true, polling; panics with `what` on timeout.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A lean MQTT 5 client for latency measurements: TCP_NODELAY on (without
/// it every QoS 1 exchange waits ~40 ms for Nagle + delayed ACK, which would
/// hide what is being measured), no recording, events through a channel.
pub struct FastClient {
    client: rumqttc::v5::Client,
    events: std::sync::mpsc::Receiver<FastEvent>,
}

#[derive(Debug)]
pub enum FastEvent {
    Message { topic: String, payload: Vec<u8> },
    SubAck,
    Lost(String),
}

/// Where `broker` listens, for the workspace's client setup.
pub fn endpoint_of(broker: &Broker) -> edgebind_link::BrokerEndpoint {
    edgebind_link::BrokerEndpoint {
        host: broker.host().to_owned(),
        port: broker.port(),
    }
}

/// rustls client configuration presenting `identity` (ring provider).
pub fn client_tls(identity: &edgebind_tests::Identity) -> rustls::ClientConfig {
    edgebind_tests::tls_config(identity, true).expect("client TLS configuration")
}

impl FastClient {
    pub fn connect(identity: &edgebind_tests::Identity, broker: &Broker) -> FastClient {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{Client, Event};

        let opts = edgebind_link::options(
            &identity.name,
            &endpoint_of(broker),
            std::sync::Arc::new(client_tls(identity)),
            Duration::from_secs(30),
        );
        let (client, mut connection) = Client::new(opts, 64);
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for ev in connection.iter() {
                let out = match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => FastEvent::Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                    },
                    Ok(Event::Incoming(Packet::SubAck(_))) => FastEvent::SubAck,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(FastEvent::Lost(e.to_string()));
                        return;
                    }
                };
                if tx.send(out).is_err() {
                    return;
                }
            }
        });
        FastClient { client, events }
    }

    pub fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .expect("subscribe");
        self.wait(AGENT_DEADLINE, |e| matches!(e, FastEvent::SubAck))
            .expect("SUBACK");
    }

    /// Publish at QoS 1 without waiting for the PUBACK.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .expect("publish");
    }

    /// Consume events until one matches (others are dropped).
    pub fn wait(&self, timeout: Duration, pred: impl Fn(&FastEvent) -> bool) -> Option<FastEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.events.recv_timeout(left) {
                Ok(FastEvent::Lost(e)) => panic!("connection lost: {e}"),
                Ok(ev) if pred(&ev) => return Some(ev),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Wait for a message on `topic` whose payload contains `needle`.
    pub fn wait_message(&self, topic: &str, needle: &[u8], timeout: Duration) -> bool {
        self.wait(timeout, |e| match e {
            FastEvent::Message { topic: t, payload } => {
                t == topic
                    && (needle.is_empty() || payload.windows(needle.len()).any(|w| w == needle))
            }
            _ => false,
        })
        .is_some()
    }
}

/// A subscriber whose session outlives broker restarts (clean start off,
/// session expiry, on a broker with persistence): what a device publishes
/// while the collector is away is queued for it, so a test sees everything
/// that reached the broker, across outages. Reconnects by itself.
/// (topic, payload) in arrival order.
type Inbox = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

pub struct Collector {
    received: Inbox,
    subacks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    client: rumqttc::v5::Client,
}

impl Collector {
    /// Subscribe `identity` to `kinds` of `device` and wait for the SUBACKs.
    pub fn start(
        identity: &edgebind_tests::Identity,
        broker: &Broker,
        device: &DeviceId,
        kinds: &[Kind],
    ) -> Collector {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{Client, Event};
        use std::sync::atomic::Ordering;

        let mut opts = edgebind_link::options(
            &identity.name,
            &endpoint_of(broker),
            std::sync::Arc::new(client_tls(identity)),
            Duration::from_secs(5),
        );
        opts.set_clean_start(false)
            .set_session_expiry_interval(Some(3600));
        let (client, mut connection) = Client::new(opts, 64);
        let filters: Vec<String> = kinds.iter().map(|k| k.filter_for(device)).collect();
        let received: Inbox = Default::default();
        let subacks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, a, c) = (received.clone(), subacks.clone(), client.clone());
        std::thread::spawn(move || {
            let mut subscribed = false;
            for ev in connection.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        // Once: the broker keeps the subscription in the
                        // session from then on.
                        if !subscribed || !ack.session_present {
                            for f in &filters {
                                if c.try_subscribe(f.clone(), QoS::AtLeastOnce).is_err() {
                                    return;
                                }
                            }
                            subscribed = true;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        r.lock().unwrap_or_else(|e| e.into_inner()).push((
                            String::from_utf8_lossy(&p.topic).into_owned(),
                            p.payload.to_vec(),
                        ));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(rumqttc::v5::ConnectionError::RequestsDone) => return,
                    // The broker is down: try again shortly.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        let n = kinds.len();
        assert!(
            wait_for(AGENT_DEADLINE, || (subacks.load(Ordering::SeqCst) >= n)
                .then_some(()))
            .is_some(),
            "collector subscriptions not acknowledged"
        );
        Collector {
            received,
            subacks,
            client,
        }
    }

    /// Payloads received on `topic`, in arrival order.
    pub fn on(&self, topic: &str) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}
