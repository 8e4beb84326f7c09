//! Who may read or write which topic, derived from [`crate::topics::Kind`].
//!
//! The broker-config generator renders these grants into Mosquitto's
//! `acl_file`; tests use [`allows`] as the model of least privilege that the
//! real broker must match. Nothing here is written as a topic string by hand:
//! a device's grants follow from each topic kind's [`Direction`].

use crate::principal::Principal;
use crate::provision::Leg;
use crate::renewal;
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

/// Grants every device has on its own topics, as `%u` patterns: write what it
/// reports, read what it is told, and its own renewal exchange (write its
/// request, read its response). Mosquitto applies pattern lines to every
/// authenticated user of the listener, whatever its CN.
pub fn device_patterns() -> Vec<Grant> {
    let kinds = Kind::ALL.into_iter().map(|kind| Grant {
        access: direction_access(kind),
        filter: kind.acl_pattern(),
    });
    let renewal = renewal::Leg::ALL.into_iter().map(|leg| Grant {
        access: if leg.from_device() {
            Access::Write
        } else {
            Access::Read
        },
        filter: leg.acl_pattern(),
    });
    kinds.chain(renewal).collect()
}

/// Grants every client has whatever its CN: reading the fleet-wide
/// throttle and reconnect hint. Plain filters (no `%u`), rendered as
/// `pattern` lines so that they apply to every authenticated user; nobody
/// but the fleet services may write them ([`user_grants`]).
pub fn fleet_wide_patterns() -> Vec<Grant> {
    [crate::throttle::TOPIC, crate::reconnect::TOPIC]
        .into_iter()
        .map(|topic| Grant {
            access: Access::Read,
            filter: topic.to_owned(),
        })
        .collect()
}

/// Mosquitto's `%u` substitution: the username (the certificate CN) is
/// pasted in verbatim, `/` included. Mosquitto 2.0 refuses pattern access
/// altogether to a username containing `+` or `#` (`None` here), so no name
/// can turn a pattern into a wildcard.
pub fn expand_pattern(filter: &str, username: &str) -> Option<String> {
    if username.contains(['+', '#']) {
        return None;
    }
    Some(filter.replace("%u", username))
}

/// What the device patterns give a client whose certificate CN is `cn`,
/// valid principal name or not: the expansions Mosquitto would check.
pub fn pattern_grants(cn: &str) -> Vec<Grant> {
    device_patterns()
        .into_iter()
        .filter_map(|g| {
            expand_pattern(&g.filter, cn).map(|filter| Grant {
                access: g.access,
                filter,
            })
        })
        .collect()
}

/// Filters denied to a non-device principal ahead of the patterns: the
/// device patterns expanded with its own CN. Mosquitto applies patterns to
/// every user; these `topic deny` lines in its `user` block take them away
/// again, so an operator, service or claim identity holds no device-side
/// grant at all. A device principal has none.
pub fn pattern_denies(principal: &Principal) -> Vec<String> {
    match principal {
        Principal::Device(_) => Vec::new(),
        _ => pattern_grants(&principal.cn())
            .into_iter()
            .map(|g| g.filter)
            .collect(),
    }
}

/// Grants of the back-end roles: read every kind (what devices report and
/// what they are told, so operators see the fleet's intent), write only what
/// devices are told (commands, desired settings): an operator cannot forge a
/// device's status or results. Exact-depth filters, like every consumer of
/// the namespace, so a deeper topic a hostile CN could write reaches no one.
fn backend_grants() -> Vec<Grant> {
    let read = Kind::ALL.into_iter().map(|kind| Grant {
        access: Access::Read,
        filter: kind.filter_all(),
    });
    let write = Kind::ALL
        .into_iter()
        .filter(|k| k.direction() == Direction::ToDevice)
        .map(|kind| Grant {
            access: Access::Write,
            filter: kind.filter_all(),
        });
    read.chain(write).collect()
}

/// Grants given to one named principal on the device listener, in addition
/// to the device patterns. Devices need none; claim identities get none
/// there (the claim exchange lives on the provisioning listener).
pub fn user_grants(principal: &Principal) -> Vec<Grant> {
    match principal {
        Principal::Device(_) | Principal::Claim(_) => Vec::new(),
        Principal::Operator(_) => backend_grants(),
        Principal::Service(_) => service_grants(),
    }
}

/// A fleet service's grants: the back-end role's, read access to the
/// broker counters it watches for overload (and no other `$SYS` topic),
/// writing the fleet-wide throttle, and the fleet side of every device's
/// renewal exchange (read requests, write responses), which nobody else gets:
/// an operator can neither see a device's CSR nor answer it.
fn service_grants() -> Vec<Grant> {
    let mut grants = backend_grants();
    grants.extend(
        crate::topics::BROKER_COUNTERS
            .into_iter()
            .map(|counter| Grant {
                access: Access::Read,
                filter: counter.to_owned(),
            }),
    );
    grants.push(Grant {
        access: Access::Write,
        filter: crate::throttle::TOPIC.to_owned(),
    });
    grants.push(Grant {
        access: Access::Write,
        filter: crate::reconnect::TOPIC.to_owned(),
    });
    grants.push(Grant {
        access: Access::Read,
        filter: renewal::Leg::Request.filter_all(),
    });
    grants.push(Grant {
        access: Access::Write,
        filter: renewal::Leg::Response.filter_all(),
    });
    grants
}

/// Patterns of the provisioning listener, for every client on it: write
/// its own request topic and read its own response topic, both named by its
/// certificate CN (`%u`) and its client id (`%c`, the unit's serial). The
/// listener does not turn the CN into the client id, so the units of one
/// batch (one claim CN) are told apart by their client ids.
pub fn provisioning_patterns() -> Vec<Grant> {
    vec![
        Grant {
            access: Access::Write,
            filter: Leg::Request.acl_pattern(),
        },
        Grant {
            access: Access::Read,
            filter: Leg::Response.acl_pattern(),
        },
    ]
}

/// Mosquitto's `%u`/`%c` substitution in one pattern: both pasted in
/// verbatim. Mosquitto 2.0 refuses pattern access to a username or client id
/// containing `+` or `#` (`None` here).
pub fn expand_pattern_with_client(filter: &str, username: &str, client: &str) -> Option<String> {
    if username.contains(['+', '#']) || client.contains(['+', '#']) {
        return None;
    }
    // One pass, as Mosquitto does: what was pasted in is not scanned again.
    let mut out = String::with_capacity(filter.len() + username.len() + client.len());
    let mut rest = filter;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(t) = tail.strip_prefix("%u") {
            out.push_str(username);
            rest = t;
        } else if let Some(t) = tail.strip_prefix("%c") {
            out.push_str(client);
            rest = t;
        } else {
            out.push('%');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Some(out)
}

/// What the provisioning patterns give a client with certificate CN `cn`
/// and client id `client`.
pub fn provisioning_pattern_grants(cn: &str, client: &str) -> Vec<Grant> {
    provisioning_patterns()
        .into_iter()
        .filter_map(|g| {
            expand_pattern_with_client(&g.filter, cn, client).map(|filter| Grant {
                access: g.access,
                filter,
            })
        })
        .collect()
}

/// Filters denied to a principal on the provisioning listener ahead of the
/// patterns: everything a pattern could give its CN, whatever its client id.
/// Only claim identities keep the patterns.
pub fn provisioning_denies(principal: &Principal) -> Vec<String> {
    match principal {
        Principal::Claim(_) => Vec::new(),
        _ => Leg::ALL
            .into_iter()
            .map(|leg| {
                leg.acl_pattern()
                    .replace("%u", &principal.cn())
                    .replace("%c", "+")
            })
            .collect(),
    }
}

/// Named grants on the provisioning listener. The fleet service instances
/// read every request (as members of the fleet's shared subscription) and
/// write every response; nobody else gets any (a claim identity has only the
/// patterns: its own exchange).
pub fn provisioning_grants(principal: &Principal) -> Vec<Grant> {
    match principal {
        Principal::Service(_) => vec![
            Grant {
                access: Access::Read,
                filter: Leg::Request.filter_all(),
            },
            Grant {
                access: Access::Write,
                filter: Leg::Response.filter_all(),
            },
        ],
        Principal::Device(_) | Principal::Operator(_) | Principal::Claim(_) => Vec::new(),
    }
}

/// The policy model of the provisioning listener: may `principal` (not
/// revoked), connected with client id `client`, do `access` on `topic`?
pub fn allows_provisioning(
    principal: &Principal,
    client: &str,
    access: Access,
    topic: &str,
) -> bool {
    if provisioning_denies(principal)
        .iter()
        .any(|f| filter_matches(f, topic))
    {
        return false;
    }
    any_grant(&provisioning_grants(principal), access, topic)
        || any_grant(
            &provisioning_pattern_grants(&principal.cn(), client),
            access,
            topic,
        )
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

/// Whether some topic matches both filters (wildcards on either side).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    if a.starts_with('$') != b.starts_with('$') {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

fn any_grant(grants: &[Grant], access: Access, topic: &str) -> bool {
    grants
        .iter()
        .any(|g| g.access == access && filter_matches(&g.filter, topic))
}

/// The policy model of the device listener: may `principal` (not revoked)
/// do `access` on `topic`? Mirrors Mosquitto's order: the user block's
/// denies, then its grants, then the patterns.
pub fn allows(principal: &Principal, access: Access, topic: &str) -> bool {
    if pattern_denies(principal)
        .iter()
        .any(|f| filter_matches(f, topic))
    {
        return false;
    }
    any_grant(&user_grants(principal), access, topic)
        || any_grant(&pattern_grants(&principal.cn()), access, topic)
        || any_grant(&fleet_wide_patterns(), access, topic)
}

/// The model for a certificate CN that is not a valid principal name (one
/// the fleet should never have signed, so it has no `user` block): only the
/// pattern expansions apply.
pub fn allows_cn(cn: &str, access: Access, topic: &str) -> bool {
    match Principal::from_cn(cn) {
        Ok(p) => allows(&p, access, topic),
        Err(_) => {
            any_grant(&pattern_grants(cn), access, topic)
                || any_grant(&fleet_wide_patterns(), access, topic)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CommandId, DeviceId, UnitSerial};
    use crate::provision::parse_request;
    use crate::topics::Topic;

    fn p(cn: &str) -> Principal {
        Principal::from_cn(cn).unwrap()
    }

    #[test]
    fn device_touches_only_its_own_topics() {
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
        assert!(!allows(&op, Access::Read, crate::topics::BROKER_DROPPED));
        let service = Principal::from_cn("service:fleet").unwrap();
        assert!(allows(
            &service,
            Access::Read,
            crate::topics::BROKER_DROPPED
        ));
        assert!(!allows(
            &service,
            Access::Write,
            crate::topics::BROKER_DROPPED
        ));
        assert!(!allows(&service, Access::Read, "$SYS/broker/uptime"));
        assert!(!allows(
            &service,
            Access::Read,
            "$SYS/broker/publish/messages/received"
        ));
        for counter in crate::topics::BROKER_COUNTERS {
            assert!(allows(&service, Access::Read, counter), "{counter}");
            assert!(!allows(&op, Access::Read, counter), "{counter}");
            assert!(!allows(&p("dev-a"), Access::Read, counter), "{counter}");
        }
    }

    #[test]
    fn only_fleet_services_write_the_throttle_and_reconnect_hint_and_every_device_reads_them() {
        for topic in [crate::throttle::TOPIC, crate::reconnect::TOPIC] {
            for cn in [
                "dev-a",
                "throttle",
                "reconnect",
                "operator:alice",
                "claim:line-1",
            ] {
                assert!(!allows(&p(cn), Access::Write, topic), "{cn} {topic}");
            }
            for cn in ["dev-a", "throttle", "service:fleet", "service:fleet-2"] {
                assert!(allows(&p(cn), Access::Read, topic), "{cn} {topic}");
            }
            assert!(allows(&p("service:fleet-2"), Access::Write, topic));
            // No CN, valid or not, writes it through the patterns.
            for cn in [
                "edgebind/v2",
                "",
                "/",
                "x/../throttle",
                "%u",
                "throttle/",
                "reconnect",
            ] {
                assert!(!allows_cn(cn, Access::Write, topic), "{cn:?} {topic}");
            }
        }
    }

    #[test]
    fn non_device_principals_get_no_device_patterns() {
        for cn in ["operator:alice", "service:fleet", "claim:line-1"] {
            let who = p(cn);
            let denied = pattern_denies(&who);
            assert_eq!(denied.len(), device_patterns().len(), "{cn}");
            for g in pattern_grants(cn) {
                let topic = g.filter.replace('+', "c1");
                assert!(!allows(&who, g.access, &topic), "{cn} must not {topic}");
            }
        }
        assert!(pattern_denies(&p("dev-a")).is_empty());
        // A claim identity has no named grant on either listener: on the
        // provisioning listener only the patterns of its own exchange.
        let claim = p("claim:line-1");
        assert!(user_grants(&claim).is_empty() && provisioning_grants(&claim).is_empty());
        assert!(provisioning_denies(&claim).is_empty());
    }

    #[test]
    fn filter_matching_follows_mqtt_rules() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches("a/+", "a/"));
    }

    #[test]
    fn overlap_is_symmetric_and_sees_wildcards_on_both_sides() {
        for (a, b, want) in [
            ("a/+/c", "a/b/+", true),
            ("a/b", "a/b/c", false),
            ("a/#", "a/b/+", true),
            ("a/+", "b/+", false),
            ("#", "$SYS/x", false),
            ("a//b", "a/+/b", true),
        ] {
            assert_eq!(filters_overlap(a, b), want, "{a} vs {b}");
            assert_eq!(filters_overlap(b, a), want, "{b} vs {a}");
        }
    }

    /// Names a certificate could carry if the fleet ever signed one it should
    /// not have: every concatenation of up to three hostile fragments (ids,
    /// kind segments, `/`, empty, `..`, wildcards, Mosquitto substitutions,
    /// upper case, unicode, NUL), plus very long names.
    fn hostile_names(victims: &[&str]) -> Vec<String> {
        let mut fragments: Vec<String> = victims.iter().map(|v| (*v).to_owned()).collect();
        fragments.extend(
            [
                "", "/", "//", "..", ".", "+", "#", "%u", "%c", "c1", "DEV-B", "é", "\0", " ",
            ]
            .map(String::from),
        );
        fragments.extend(Kind::ALL.map(|k| k.segment().to_owned()));
        fragments
            .extend([renewal::SEGMENT, "request", "response", "renew/request"].map(String::from));
        fragments.push(NAMESPACE.to_owned());
        let mut names = vec![String::new()];
        let mut frontier = vec![String::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for prefix in &frontier {
                for f in &fragments {
                    next.push(format!("{prefix}{f}"));
                }
            }
            names.extend(next.iter().cloned());
            frontier = next;
        }
        for v in victims {
            names.push(format!("{v}/").repeat(200));
            names.push(format!("{}{v}", "/".repeat(1000)));
            names.push(format!("{v}/{}", "x".repeat(10_000)));
        }
        names.sort();
        names.dedup();
        names
    }

    /// The property the namespace exists for: whatever a certificate CN
    /// holds, the device patterns expanded with it never equal or match a
    /// topic of another principal, and the fleet's own consumers never read
    /// such an expansion as another device's message.
    #[test]
    fn no_certificate_name_reaches_another_principals_topics() {
        // Legitimate devices, including ids that spell kind segments.
        let victims = ["dev-b", "dev-a", "cmd", "status", "cmd-result", "x"];
        let names = hostile_names(&victims);
        assert!(names.len() > 10_000, "{} names", names.len());
        let victim_filters: Vec<(&str, String)> = victims
            .iter()
            .flat_map(|v| {
                let id = DeviceId::new(*v).unwrap();
                let renewal = renewal::Leg::ALL.map(|l| (*v, l.topic(&id)));
                Kind::ALL
                    .map(|k| (*v, k.filter_for(&id)))
                    .into_iter()
                    .chain(renewal)
            })
            .collect();
        let mut checked = 0u64;
        for name in &names {
            let grants = pattern_grants(name);
            if name.contains(['+', '#']) {
                assert!(grants.is_empty(), "Mosquitto refuses patterns for {name:?}");
                continue;
            }
            for g in &grants {
                for fleet_wide in [crate::throttle::TOPIC, crate::reconnect::TOPIC] {
                    assert!(
                        !(g.access == Access::Write && filters_overlap(&g.filter, fleet_wide)),
                        "CN {name:?} writes {fleet_wide} through {}",
                        g.filter
                    );
                }
                for (victim, filter) in &victim_filters {
                    if name == victim {
                        continue; // the victim's own certificate
                    }
                    checked += 1;
                    assert!(
                        !filters_overlap(&g.filter, filter),
                        "CN {name:?} gets {:?} {}, which reaches {victim}'s {filter}",
                        g.access,
                        g.filter
                    );
                }
                // What the fleet service would make of a message there.
                let concrete = g.filter.replace('+', "c1");
                if let Some(topic) = Topic::parse(&concrete) {
                    assert_eq!(topic.device().as_str(), name, "{concrete}");
                }
                if let Some(device) = renewal::parse_request(&concrete) {
                    assert_eq!(device.as_str(), name, "{concrete}");
                }
                // No subscription filter any consumer uses sees it as another device's.
                for kind in Kind::ALL {
                    if filter_matches(&kind.filter_all(), &concrete) {
                        let parsed = Topic::parse(&concrete);
                        assert!(
                            parsed.is_none_or(|t| t.device().as_str() == name),
                            "{concrete} read as another device's {kind:?}"
                        );
                    }
                }
            }
        }
        assert!(checked > 2_000_000, "{checked} checks");
    }

    #[test]
    fn claim_identity_touches_only_its_own_exchange() {
        let batch = DeviceId::new("line-1").unwrap();
        let mine = UnitSerial::new("SN-1").unwrap();
        let other = UnitSerial::new("SN-2").unwrap();
        let claim = p("claim:line-1");
        let (req, resp) = (Leg::Request, Leg::Response);
        assert!(allows_provisioning(
            &claim,
            "SN-1",
            Access::Write,
            &req.topic(&batch, &mine)
        ));
        assert!(allows_provisioning(
            &claim,
            "SN-1",
            Access::Read,
            &resp.topic(&batch, &mine)
        ));
        assert!(!allows_provisioning(
            &claim,
            "SN-1",
            Access::Read,
            &resp.topic(&batch, &other)
        ));
        assert!(!allows_provisioning(
            &claim,
            "SN-1",
            Access::Write,
            &req.topic(&batch, &other)
        ));
        assert!(!allows_provisioning(
            &claim,
            "SN-1",
            Access::Write,
            &resp.topic(&batch, &mine)
        ));
        // No device topic at all, on either listener, whatever its client id.
        let dev = DeviceId::new("sn-1").unwrap();
        let c = CommandId::new("c1").unwrap();
        for t in [
            Topic::Status(dev.clone()),
            Topic::Telemetry(dev.clone()),
            Topic::Cmd(dev.clone(), c.clone()),
            Topic::CmdResult(dev.clone(), c),
            Topic::Desired(dev),
        ] {
            for access in [Access::Read, Access::Write] {
                assert!(!allows(&claim, access, &t.render()), "{t}");
                assert!(
                    !allows_provisioning(&claim, "sn-1", access, &t.render()),
                    "{t}"
                );
            }
        }
        // The fleet service reads requests and answers; it cannot forge requests.
        let svc = p("service:fleet");
        assert!(allows_provisioning(
            &svc,
            "service:fleet",
            Access::Read,
            &req.topic(&batch, &mine)
        ));
        assert!(allows_provisioning(
            &svc,
            "service:fleet",
            Access::Write,
            &resp.topic(&batch, &mine)
        ));
        assert!(!allows_provisioning(
            &svc,
            "x",
            Access::Write,
            &req.topic(&batch, &mine)
        ));
        // Operators and devices get nothing of a batch's exchange.
        for who in [p("operator:alice"), p("dev-a")] {
            for leg in Leg::ALL {
                for access in [Access::Read, Access::Write] {
                    assert!(!allows_provisioning(
                        &who,
                        "SN-1",
                        access,
                        &leg.topic(&batch, &mine)
                    ));
                }
            }
        }
    }

    /// The provisioning patterns' version of the property: whatever a
    /// certificate CN and a client id hold, their expansions reach no other
    /// (claim CN, serial)'s request or response topic, and the fleet never
    /// reads a request there as another unit's.
    #[test]
    fn no_name_or_client_id_reaches_another_units_exchange() {
        let victims = [("line-1", "SN-2"), ("line-1", "SN-1"), ("line-2", "SN-2")];
        let victim_topics: Vec<((String, String), String)> = victims
            .iter()
            .flat_map(|(b, s)| {
                let batch = DeviceId::new(*b).unwrap();
                let serial = UnitSerial::new(*s).unwrap();
                Leg::ALL.map(|leg| {
                    (
                        (format!("claim:{b}"), (*s).to_owned()),
                        leg.topic(&batch, &serial),
                    )
                })
            })
            .collect();
        let mut fragments: Vec<String> = [
            "",
            "/",
            "..",
            "+",
            "#",
            "%u",
            "%c",
            "claim:",
            "claim:line-1",
            "line-1",
            "SN-2",
            "SN-1",
            "sn-2",
            "request",
            "response",
            "provision",
            "é",
            "\0",
        ]
        .map(String::from)
        .to_vec();
        fragments.push(NAMESPACE.to_owned());
        let pairs: Vec<String> = fragments
            .iter()
            .flat_map(|a| fragments.iter().map(move |b| format!("{a}{b}")))
            .chain(fragments.iter().map(|a| format!("{a}/{a}")))
            .collect();
        let mut checked = 0u64;
        for cn in &pairs {
            for client in &pairs {
                let grants = provisioning_pattern_grants(cn, client);
                if cn.contains(['+', '#']) || client.contains(['+', '#']) {
                    assert!(grants.is_empty());
                    continue;
                }
                for g in &grants {
                    for ((vcn, vclient), topic) in &victim_topics {
                        if cn == vcn && client == vclient {
                            continue;
                        }
                        checked += 1;
                        assert!(
                            !filters_overlap(&g.filter, topic),
                            "CN {cn:?} client {client:?} gets {}, which reaches {topic}",
                            g.filter
                        );
                    }
                    if let Some((batch, serial)) = parse_request(&g.filter) {
                        assert_eq!(format!("claim:{batch}"), *cn);
                        assert_eq!(serial.as_str(), client);
                    }
                }
            }
        }
        assert!(checked > 1_000_000, "{checked} checks");
    }

    #[test]
    fn a_device_renews_only_for_itself_and_only_the_service_answers() {
        let a = DeviceId::new("dev-a").unwrap();
        let b = DeviceId::new("dev-b").unwrap();
        let (req, resp) = (renewal::Leg::Request, renewal::Leg::Response);
        let me = p("dev-a");
        assert!(allows(&me, Access::Write, &req.topic(&a)));
        assert!(allows(&me, Access::Read, &resp.topic(&a)));
        // Not its own response (no forging), not its request back.
        assert!(!allows(&me, Access::Write, &resp.topic(&a)));
        assert!(!allows(&me, Access::Read, &req.topic(&a)));
        // Nothing of another device's exchange: no renewing for dev-b, no
        // reading dev-b's new certificate.
        for access in [Access::Read, Access::Write] {
            for leg in renewal::Leg::ALL {
                assert!(!allows(&me, access, &leg.topic(&b)), "{access:?} {leg:?}");
            }
        }
        let svc = p("service:fleet");
        assert!(allows(&svc, Access::Read, &req.topic(&a)));
        assert!(allows(&svc, Access::Write, &resp.topic(&a)));
        assert!(!allows(&svc, Access::Write, &req.topic(&a)));
        // Operators and claim identities get nothing of it.
        for who in [p("operator:alice"), p("claim:line-1")] {
            for access in [Access::Read, Access::Write] {
                for leg in renewal::Leg::ALL {
                    assert!(!allows(&who, access, &leg.topic(&a)), "{who} {leg:?}");
                }
            }
        }
    }

    /// The same check catches the v1 layout's flaw, so it is not vacuous.
    #[test]
    fn the_property_check_rejects_the_v1_layout() {
        let v1_status = ["edgebind", "v1", "devices", "%u", "status"].join("/");
        let v1_cmd_of_b = ["edgebind", "v1", "devices", "dev-b", "cmd", "+"].join("/");
        let hostile = expand_pattern(&v1_status, "dev-b/cmd").unwrap();
        assert!(filters_overlap(&hostile, &v1_cmd_of_b));
    }

    #[test]
    fn consumers_use_exact_depth_filters() {
        let d = DeviceId::new("dev-a").unwrap();
        for kind in Kind::ALL {
            for f in [kind.filter_all(), kind.filter_for(&d), kind.acl_pattern()] {
                assert!(!f.contains('#'), "{f}");
                assert_eq!(f.split('/').count(), 2 + kind.depth(), "{f}");
            }
        }
        for g in backend_grants().into_iter().chain(service_grants()) {
            assert!(!g.filter.contains('#'), "{}", g.filter);
        }
        for leg in renewal::Leg::ALL {
            for f in [leg.filter_all(), leg.acl_pattern()] {
                assert_eq!(f.split('/').count(), 2 + renewal::Leg::DEPTH, "{f}");
            }
        }
    }
}
