//! The MQTT topic namespace.
//!
//! ```text
//! edgebind/v2/status/{id}                 device -> fleet, retained (online / offline will)
//! edgebind/v2/telemetry/{id}              device -> fleet
//! edgebind/v2/events/{id}                 device -> fleet
//! edgebind/v2/reported/{id}               device -> fleet, retained (settings in force)
//! edgebind/v2/cmd/{id}/{cmd-id}           fleet -> device, QoS 1
//! edgebind/v2/cmd-result/{id}/{cmd-id}    device -> fleet, QoS 1
//! edgebind/v2/desired/{id}                fleet -> device, retained
//! edgebind/v2/throttle                    fleet -> every device, retained (see crate::throttle)
//! edgebind/v2/reconnect                   fleet -> every device, retained (see crate::reconnect)
//! ```
//!
//! Why the kind comes before the id: Mosquitto expands `%u` in an ACL
//! pattern with the certificate CN verbatim, `/` included. In the v1 layout
//! (`edgebind/v1/devices/{id}/{kind}`) a certificate named `dev-b/cmd` turned
//! `devices/%u/status` into `devices/dev-b/cmd/status`, one of dev-b's
//! command topics. Here every kind fixes the level right after the namespace
//! and has a fixed depth below it (one level for the id, one more for the
//! command id), so whatever a CN contains, its expansions stay under their
//! own kind and either equal that principal's own topic or are deeper than
//! any real topic of that kind. Every consumer subscribes with exact-depth
//! filters (`+`, never `#` below the id), so those deeper topics reach no one.
//! `acl::tests` proves this for a generated set of hostile names, and the
//! broker tests prove it by delivery.

use crate::ids::{CommandId, DeviceId};

/// Root of everything Edgebind publishes. Bump the version segment for
/// incompatible layout or schema changes so old and new agents are not
/// confused on one broker (v1 put the id before the kind; see the module doc).
pub const NAMESPACE: &str = "edgebind/v2";

/// Mosquitto's count of the messages it dropped since it started (a
/// client's queue over `max_queued_messages`/`max_queued_bytes`): read by
/// the fleet service, so a drop is never silent.
pub const BROKER_DROPPED: &str = "$SYS/broker/publish/messages/dropped";

/// Mosquitto's count of the messages it holds: queued for sessions, in
/// flight, and retained. Less [`BROKER_RETAINED`], that is what waits at the
/// broker, mostly for the fleet service: the push-back's measure.
pub const BROKER_STORED: &str = "$SYS/broker/store/messages/count";

/// Mosquitto's count of retained messages (the space is Mosquitto's).
pub const BROKER_RETAINED: &str = "$SYS/broker/retained messages/count";

/// Every `$SYS` topic the fleet service reads, and so may read: nothing else
/// of `$SYS`, and nobody else any of it.
pub const BROKER_COUNTERS: [&str; 3] = [BROKER_DROPPED, BROKER_STORED, BROKER_RETAINED];

/// The shared-subscription group of the fleet service instances: every
/// instance subscribes as a member, so several share the ingest work.
pub const FLEET_SHARE_GROUP: &str = "edgebind-fleet";

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

    /// The kind whose [`Kind::segment`] is `segment`.
    pub fn from_segment(segment: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.segment() == segment)
    }

    /// Number of topic levels below the namespace: the kind, the id, and the
    /// command id where there is one. Fixed per kind, which is what keeps a
    /// hostile `%u` expansion out of other principals' topics.
    pub fn depth(self) -> usize {
        if self.has_command_id() { 3 } else { 2 }
    }

    /// A topic or filter for this kind with `device` and `command` already
    /// rendered (they may be ids, `+`, or Mosquitto's `%u`).
    fn render(self, device: &str, command: &str) -> String {
        let base = format!("{NAMESPACE}/{}/{device}", self.segment());
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

    /// [`Kind::filter_all`] as an MQTT 5 shared subscription of the fleet
    /// service group: the broker hands each message to one member only.
    pub fn filter_shared(self) -> String {
        format!("$share/{FLEET_SHARE_GROUP}/{}", self.filter_all())
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
        let mut parts = rest.split('/');
        let kind = Kind::from_segment(parts.next()?)?;
        let device = DeviceId::new(parts.next()?).ok()?;
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
            "edgebind/v2/status/dev-a"
        );
        assert_eq!(
            Topic::CmdResult(d.clone(), c.clone()).render(),
            "edgebind/v2/cmd-result/dev-a/c1"
        );
        assert_eq!(Kind::Cmd.filter_for(&d), "edgebind/v2/cmd/dev-a/+");
        assert_eq!(Kind::Telemetry.filter_all(), "edgebind/v2/telemetry/+");
        assert_eq!(
            Kind::Telemetry.filter_shared(),
            "$share/edgebind-fleet/edgebind/v2/telemetry/+"
        );
        assert_eq!(Kind::Cmd.acl_pattern(), "edgebind/v2/cmd/%u/+");
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
            "edgebind/v1/devices/a/status",
            "edgebind/v3/status/a",
            "edgebind/v2/status/a/extra",
            "edgebind/v2/status/a/cmd/c1",
            "edgebind/v2/cmd/a",
            "edgebind/v2/cmd/a/c1/extra",
            "edgebind/v2/status/a+b",
            "edgebind/v2/status/A",
            "edgebind/v2/unknown/a",
            "edgebind/v2/devices/a/status",
            "$SYS/broker/uptime",
            "edgebind/v2/status/",
            "edgebind/v2/status",
            "edgebind/v2//a",
            crate::throttle::TOPIC,
            crate::reconnect::TOPIC,
        ] {
            assert_eq!(Topic::parse(bad), None, "{bad}");
        }
    }
}
