//! The host side of the fleet for one boot test: a throwaway PKI (the test
//! harness's `TestPki`, a real fleet home), Mosquitto with OUR generated
//! least-privilege config on 127.0.0.1, the operator's MQTT connection, and
//! the device's identity bundle whose broker address is the guestfwd address.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgebind_agent::config::AgentConfig;
use edgebind_broker::BrokerSettings;
use edgebind_certs::Validity;
use edgebind_protocol::messages::{Action, Command, CommandResult, Presence, Status};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId, Principal};
use edgebind_tests::{Broker, PubAckReason, QoS, Received, TestClient, TestPki};

use crate::vm::{BROKER_GUEST_PORT, GUEST_HOST_ADDR};

pub struct Fleet {
    // Field order = drop order: operator, then broker, then the PKI tempdir.
    pub operator: TestClient,
    pub broker: Broker,
    pub pki: TestPki,
    pub device: DeviceId,
}

impl Fleet {
    /// PKI, broker (server certificate valid for the guest's broker address
    /// and 127.0.0.1) and an operator subscribed to the device's status and
    /// command results.
    pub fn start(device: &str, workdir: &Path) -> anyhow::Result<Fleet> {
        let device = DeviceId::new(device)?;
        let pki = TestPki::new();
        let guest_addr: IpAddr = GUEST_HOST_ADDR.parse()?;
        let mut settings =
            BrokerSettings::new(vec![], vec![guest_addr, IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        settings.port = free_port()?;
        settings.bind = "127.0.0.1".into();
        let broker = Broker::start_with(&pki, settings).context("starting mosquitto")?;
        if let Some(pid) = broker.pid() {
            std::fs::write(workdir.join("mosquitto.pid"), pid.to_string())?;
        }
        let operator = TestClient::connect(&pki.operator, &broker).context("operator connect")?;
        operator.subscribe(&Kind::Status.filter_for(&device))?;
        operator.subscribe(&Kind::CmdResult.filter_for(&device))?;
        Ok(Fleet {
            operator,
            broker,
            pki,
            device,
        })
    }

    /// Issues the device certificate and writes its identity bundle (dir +
    /// tar); the agent config names the broker as the guest sees it.
    pub fn device_bundle(&self) -> anyhow::Result<PathBuf> {
        let principal = Principal::from_cn(self.device.as_str())?;
        let issued = self.pki.pki().issue(&principal, Validity::days(30))?;
        let dir = self.pki.bundles_dir().join(self.device.as_str());
        let toml =
            AgentConfig::bundle_template(&self.device, GUEST_HOST_ADDR, BROKER_GUEST_PORT, None);
        let paths =
            edgebind_certs::bundle::write_bundle(&dir, &issued, self.pki.pki().root_pem(), &toml)?;
        Ok(paths.tar)
    }

    /// Revokes the device (inventory + CRL) and reloads the broker.
    pub fn revoke_device(&mut self) -> anyhow::Result<()> {
        self.pki.revoke(self.device.as_str());
        self.broker.reload()
    }

    /// Sends `action` as the operator (QoS 1). `retain` keeps it on the
    /// broker so that every reconnect of the device gets it delivered again.
    pub fn send(&self, id: &str, action: Action, retain: bool) -> anyhow::Result<CommandId> {
        let id = CommandId::new(id)?;
        let cmd = Command {
            id: id.clone(),
            action,
            args: Default::default(),
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
