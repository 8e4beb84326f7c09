//! Who may read or write which topic, derived from [`crate::topics::Kind`].
//!
//! The broker-config generator renders these grants into Mosquitto's
//! `acl_file`; tests use [`allows`] as the model of least privilege that the
//! real broker must match. Nothing here is written as a topic string by hand:
//! a device's grants follow from each topic kind's [`Direction`].

use crate::principal::Principal;
use crate::topics::{Direction, Kind, NAMESPACE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// The keyword Mosquitto's `acl_file` uses.
    pub fn mosquitto_keyword(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// One allowed (access, topic filter) pair. In device grants the filter
/// contains `%u`, which the broker replaces with the client's certificate CN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub access: Access,
    pub filter: String,
}

fn direction_access(kind: Kind) -> Access {
    match kind.direction() {
        Direction::FromDevice => Access::Write,
        Direction::ToDevice => Access::Read,
    }
}

/// Grants every device has on its own subtree, as `%u` patterns: write what it
/// reports, read what it is told. Nothing outside `devices/%u/`.
pub fn device_patterns() -> Vec<Grant> {
    Kind::ALL
        .into_iter()
        .map(|kind| Grant {
            access: direction_access(kind),
            filter: kind.acl_pattern(),
        })
        .collect()
}

/// Grants of the back-end roles: read everything devices report, write what
/// devices are told (commands, desired settings). Never device-side topics,
/// so an operator cannot forge a device's status or results.
fn backend_grants() -> Vec<Grant> {
    let mut grants = vec![Grant {
        access: Access::Read,
        filter: format!("{NAMESPACE}/#"),
    }];
    grants.extend(
        Kind::ALL
            .into_iter()
            .filter(|k| k.direction() == Direction::ToDevice)
            .map(|kind| Grant {
                access: Access::Write,
                filter: kind.filter_all(),
            }),
    );
    grants
}

/// Grants given to one named principal in addition to the device patterns
/// (which Mosquitto applies to every user). Devices need none; claim
/// identities get none until the claim flow defines its topics.
pub fn user_grants(principal: &Principal) -> Vec<Grant> {
    match principal {
        Principal::Device(_) | Principal::Claim(_) => Vec::new(),
        Principal::Operator(_) | Principal::Service(_) => backend_grants(),
    }
}

/// Everything under the namespace: what a revoked principal is denied.
pub fn revoked_deny_filter() -> String {
    format!("{NAMESPACE}/#")
}

/// MQTT filter matching (`+`, `#`), as the broker applies it to ACL entries.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') != filter.starts_with('$') {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The policy model: may `principal` (not revoked) do `access` on `topic`?
pub fn allows(principal: &Principal, access: Access, topic: &str) -> bool {
    let cn = principal.cn();
    let by_pattern = device_patterns()
        .iter()
        .any(|g| g.access == access && filter_matches(&g.filter.replace("%u", &cn), topic));
    by_pattern
        || user_grants(principal)
            .iter()
            .any(|g| g.access == access && filter_matches(&g.filter, topic))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CommandId, DeviceId};
    use crate::topics::Topic;

    fn p(cn: &str) -> Principal {
        Principal::from_cn(cn).unwrap()
    }

    #[test]
    fn device_touches_only_its_own_subtree() {
        let a = DeviceId::new("dev-a").unwrap();
        let b = DeviceId::new("dev-b").unwrap();
        let c = CommandId::new("c1").unwrap();
        let me = p("dev-a");
        assert!(allows(
            &me,
            Access::Write,
            &Topic::Status(a.clone()).render()
        ));
        assert!(allows(
            &me,
            Access::Read,
            &Topic::Cmd(a.clone(), c.clone()).render()
        ));
        assert!(!allows(
            &me,
            Access::Write,
            &Topic::Cmd(a.clone(), c.clone()).render()
        ));
        assert!(!allows(
            &me,
            Access::Read,
            &Topic::Telemetry(a.clone()).render()
        ));
        for t in [
            Topic::Status(b.clone()),
            Topic::Cmd(b.clone(), c.clone()),
            Topic::Desired(b.clone()),
        ] {
            assert!(!allows(&me, Access::Read, &t.render()));
            assert!(!allows(&me, Access::Write, &t.render()));
        }
        assert!(!allows(&me, Access::Read, "$SYS/broker/uptime"));
    }

    #[test]
    fn operator_commands_but_cannot_forge_device_reports() {
        let a = DeviceId::new("dev-a").unwrap();
        let c = CommandId::new("c1").unwrap();
        let op = p("operator:alice");
        assert!(allows(
            &op,
            Access::Write,
            &Topic::Cmd(a.clone(), c.clone()).render()
        ));
        assert!(allows(
            &op,
            Access::Read,
            &Topic::Telemetry(a.clone()).render()
        ));
        assert!(!allows(
            &op,
            Access::Write,
            &Topic::Status(a.clone()).render()
        ));
        assert!(!allows(
            &op,
            Access::Write,
            &Topic::CmdResult(a, c).render()
        ));
        assert!(!allows(&op, Access::Read, "$SYS/broker/uptime"));
    }

    #[test]
    fn filter_matching_follows_mqtt_rules() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
    }
}
