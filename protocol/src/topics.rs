//! The MQTT topic namespace.
//!
//! ```text
//! edgebind/v1/devices/{id}/status              device -> fleet, retained (online / offline will)
//! edgebind/v1/devices/{id}/telemetry           device -> fleet
//! edgebind/v1/devices/{id}/events              device -> fleet
//! edgebind/v1/devices/{id}/reported            device -> fleet, retained (settings in force)
//! edgebind/v1/devices/{id}/cmd/{cmd-id}        fleet -> device, QoS 1
//! edgebind/v1/devices/{id}/cmd-result/{cmd-id} device -> fleet, QoS 1
//! edgebind/v1/devices/{id}/desired             fleet -> device, retained
//! ```

use crate::ids::{CommandId, DeviceId};

/// Root of everything Edgebind publishes. Bump the version segment for
/// incompatible schema changes so old and new agents can share a broker.
pub const NAMESPACE: &str = "edgebind/v1";
const DEVICES: &str = "devices";

/// Which way a topic's messages flow; the ACL rules are derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromDevice,
    ToDevice,
}

/// The kinds of per-device topic, without the concrete ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Status,
    Telemetry,
    Events,
    Reported,
    Cmd,
    CmdResult,
    Desired,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Status,
        Kind::Telemetry,
        Kind::Events,
        Kind::Reported,
        Kind::Cmd,
        Kind::CmdResult,
        Kind::Desired,
    ];

    pub fn segment(self) -> &'static str {
        match self {
            Kind::Status => "status",
            Kind::Telemetry => "telemetry",
            Kind::Events => "events",
            Kind::Reported => "reported",
            Kind::Cmd => "cmd",
            Kind::CmdResult => "cmd-result",
            Kind::Desired => "desired",
        }
    }

    pub fn direction(self) -> Direction {
        match self {
            Kind::Cmd | Kind::Desired => Direction::ToDevice,
            _ => Direction::FromDevice,
        }
    }

    /// Whether the topic carries a command id as its last level.
    pub fn has_command_id(self) -> bool {
        matches!(self, Kind::Cmd | Kind::CmdResult)
    }

    /// A topic or filter for this kind with `device` and `command` already
    /// rendered (they may be ids, `+`, or Mosquitto's `%u`).
    fn render(self, device: &str, command: &str) -> String {
        let base = format!("{NAMESPACE}/{DEVICES}/{device}/{}", self.segment());
        if self.has_command_id() {
            format!("{base}/{command}")
        } else {
            base
        }
    }

    /// Filter matching this kind for one device (any command id).
    pub fn filter_for(self, device: &DeviceId) -> String {
        self.render(device.as_str(), "+")
    }

    /// Filter matching this kind for every device (for the fleet service).
    pub fn filter_all(self) -> String {
        self.render("+", "+")
    }

    /// Filter with Mosquitto's `%u` (the username = certificate CN) as the device.
    pub fn acl_pattern(self) -> String {
        self.render("%u", "+")
    }
}

/// A concrete per-device topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    Status(DeviceId),
    Telemetry(DeviceId),
    Events(DeviceId),
    Reported(DeviceId),
    Cmd(DeviceId, CommandId),
    CmdResult(DeviceId, CommandId),
    Desired(DeviceId),
}

impl Topic {
    pub fn kind(&self) -> Kind {
        match self {
            Topic::Status(_) => Kind::Status,
            Topic::Telemetry(_) => Kind::Telemetry,
            Topic::Events(_) => Kind::Events,
            Topic::Reported(_) => Kind::Reported,
            Topic::Cmd(..) => Kind::Cmd,
            Topic::CmdResult(..) => Kind::CmdResult,
            Topic::Desired(_) => Kind::Desired,
        }
    }

    pub fn device(&self) -> &DeviceId {
        match self {
            Topic::Status(d)
            | Topic::Telemetry(d)
            | Topic::Events(d)
            | Topic::Reported(d)
            | Topic::Desired(d)
            | Topic::Cmd(d, _)
            | Topic::CmdResult(d, _) => d,
        }
    }

    pub fn command_id(&self) -> Option<&CommandId> {
        match self {
            Topic::Cmd(_, c) | Topic::CmdResult(_, c) => Some(c),
            _ => None,
        }
    }

    /// The topic string to publish to.
    pub fn render(&self) -> String {
        let cmd = self.command_id().map(CommandId::as_str).unwrap_or("");
        self.kind().render(self.device().as_str(), cmd)
    }

    /// Parse a topic received from the broker. `None` for anything outside
    /// the namespace or with an invalid id, which callers drop.
    pub fn parse(topic: &str) -> Option<Topic> {
        let rest = topic.strip_prefix(NAMESPACE)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(DEVICES)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let device = DeviceId::new(parts.next()?).ok()?;
        let segment = parts.next()?;
        let kind = Kind::ALL.into_iter().find(|k| k.segment() == segment)?;
        let command = if kind.has_command_id() {
            Some(CommandId::new(parts.next()?).ok()?)
        } else {
            None
        };
        if parts.next().is_some() {
            return None;
        }
        Some(match (kind, command) {
            (Kind::Status, _) => Topic::Status(device),
            (Kind::Telemetry, _) => Topic::Telemetry(device),
            (Kind::Events, _) => Topic::Events(device),
            (Kind::Reported, _) => Topic::Reported(device),
            (Kind::Desired, _) => Topic::Desired(device),
            (Kind::Cmd, Some(c)) => Topic::Cmd(device, c),
            (Kind::CmdResult, Some(c)) => Topic::CmdResult(device, c),
            (Kind::Cmd | Kind::CmdResult, None) => return None,
        })
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn renders_the_documented_namespace() {
        let d = dev("dev-a");
        let c = CommandId::new("c1").unwrap();
        assert_eq!(
            Topic::Status(d.clone()).render(),
            "edgebind/v1/devices/dev-a/status"
        );
        assert_eq!(
            Topic::CmdResult(d.clone(), c.clone()).render(),
            "edgebind/v1/devices/dev-a/cmd-result/c1"
        );
        assert_eq!(Kind::Cmd.filter_for(&d), "edgebind/v1/devices/dev-a/cmd/+");
        assert_eq!(
            Kind::Telemetry.filter_all(),
            "edgebind/v1/devices/+/telemetry"
        );
        assert_eq!(Kind::Cmd.acl_pattern(), "edgebind/v1/devices/%u/cmd/+");
    }

    #[test]
    fn parse_inverts_render_for_every_kind() {
        let d = dev("dev-a");
        let c = CommandId::new("c-9").unwrap();
        let all = [
            Topic::Status(d.clone()),
            Topic::Telemetry(d.clone()),
            Topic::Events(d.clone()),
            Topic::Reported(d.clone()),
            Topic::Desired(d.clone()),
            Topic::Cmd(d.clone(), c.clone()),
            Topic::CmdResult(d.clone(), c.clone()),
        ];
        for t in all {
            assert_eq!(Topic::parse(&t.render()), Some(t));
        }
    }

    #[test]
    fn parse_drops_foreign_or_malformed_topics() {
        for bad in [
            "edgebind/v2/devices/a/status",
            "edgebind/v1/devices/a/status/extra",
            "edgebind/v1/devices/a/cmd",
            "edgebind/v1/devices/a+b/status",
            "edgebind/v1/devices/a/unknown",
            "$SYS/broker/uptime",
            "edgebind/v1/devices//status",
        ] {
            assert_eq!(Topic::parse(bad), None, "{bad}");
        }
    }
}
