//! Certificate renewal by the device, over its own authenticated connection.
//!
//! ```text
//! edgebind/v2/renew/request/{id}     device -> fleet, QoS 1
//! edgebind/v2/renew/response/{id}    fleet -> device, QoS 1
//! ```
//!
//! The same exchange as the claim flow ([`crate::provision`]), on the device
//! listener and under the device's own id: a device writes only its own
//! request topic and reads only its own response topic (the `%u` patterns,
//! see [`crate::acl::device_patterns`]); the fleet service reads every
//! request and writes every response. The broker has already authenticated
//! the connection with a certificate whose CN is the id in the topic, so the
//! fleet reads the sender off the topic; a CN containing `/` only makes a
//! deeper topic that the fleet's exact-depth subscription never receives.
//!
//! A renewal, as the device sees it:
//! 1. [`Request::Renew`]: a CSR for a key made on the device (subject CN =
//!    its own id) and the serial of the certificate it is connected with;
//! 2. [`Response::Issued`]: the new chain (or [`Response::Refused`]);
//! 3. it reconnects with the new identity and, once connected, sends
//!    [`Request::Connected`] with the new serial: the fleet then retires the
//!    previous certificate after a grace period.
//!
//! Asking again with the same key (a response lost, a restart) gets the
//! chain already issued for it, not a second certificate.

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
use crate::topics::{FLEET_SHARE_GROUP, NAMESPACE};

/// The level after the namespace: every renewal topic is under it.
pub const SEGMENT: &str = "renew";

/// Which way a renewal message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Device -> fleet.
    Request,
    /// Fleet -> device.
    Response,
}

impl Leg {
    pub const ALL: [Leg; 2] = [Leg::Request, Leg::Response];

    pub fn segment(self) -> &'static str {
        match self {
            Leg::Request => "request",
            Leg::Response => "response",
        }
    }

    fn render(self, device: &str) -> String {
        format!("{NAMESPACE}/{SEGMENT}/{}/{device}", self.segment())
    }

    /// The topic of one device.
    pub fn topic(self, device: &DeviceId) -> String {
        self.render(device.as_str())
    }

    /// Every device (exact depth): what the fleet service reads or writes.
    pub fn filter_all(self) -> String {
        self.render("+")
    }

    /// [`Leg::filter_all`] as a shared subscription of the fleet group.
    pub fn filter_shared(self) -> String {
        format!("$share/{FLEET_SHARE_GROUP}/{}", self.filter_all())
    }

    /// The ACL pattern: the client's own certificate CN (`%u`).
    pub fn acl_pattern(self) -> String {
        self.render("%u")
    }

    /// Who writes this leg: a device writes its requests, reads its responses.
    pub fn from_device(self) -> bool {
        self == Leg::Request
    }

    /// Levels below the namespace: `renew`, the leg, the device id.
    pub const DEPTH: usize = 3;
}

/// A request topic, parsed: the device that sent it. `None` for anything
/// else (another depth, an invalid id, a response topic).
pub fn parse_request(topic: &str) -> Option<DeviceId> {
    let rest = topic
        .strip_prefix(NAMESPACE)?
        .strip_prefix('/')?
        .strip_prefix(SEGMENT)?
        .strip_prefix('/')?
        .strip_prefix(Leg::Request.segment())?
        .strip_prefix('/')?;
    if rest.contains('/') {
        return None;
    }
    DeviceId::new(rest).ok()
}

/// What a device sends on its request topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sign a certificate for the key of this CSR (PEM, subject CN = the
    /// device's own id). `current_serial` is the serial (hex) of the
    /// certificate the device is connected with: the fleet signs only for
    /// the device's current certificate.
    Renew {
        csr_pem: String,
        current_serial: String,
    },
    /// The device is connected with the certificate `serial` (hex): a new
    /// certificate is confirmed in use, the previous one can be retired.
    Connected { serial: String },
}

/// What the fleet answers a [`Request::Renew`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The new device certificate followed by the issuing CA (PEM).
    Issued {
        device_id: DeviceId,
        serial: String,
        chain_pem: String,
    },
    /// Not signed. `retry_after_s`: when asking again can succeed (rate
    /// limit); `None` when an operator has to act (revoked, not the current
    /// certificate, a bad CSR).
    Refused {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_s: Option<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_render_and_parse() {
        let d = DeviceId::new("dev-a").unwrap();
        assert_eq!(Leg::Request.topic(&d), "edgebind/v2/renew/request/dev-a");
        assert_eq!(Leg::Response.topic(&d), "edgebind/v2/renew/response/dev-a");
        assert_eq!(parse_request(&Leg::Request.topic(&d)), Some(d));
        assert_eq!(
            Leg::Request.filter_shared(),
            "$share/edgebind-fleet/edgebind/v2/renew/request/+"
        );
        assert_eq!(Leg::Response.acl_pattern(), "edgebind/v2/renew/response/%u");
        for f in [Leg::Request.filter_all(), Leg::Response.acl_pattern()] {
            assert_eq!(f.split('/').count(), 2 + Leg::DEPTH, "{f}");
        }
    }

    #[test]
    fn only_a_device_request_topic_parses() {
        for bad in [
            "edgebind/v2/renew/response/dev-a",
            "edgebind/v2/renew/request/dev-a/x",
            "edgebind/v2/renew/request/",
            "edgebind/v2/renew/request/Dev-A",
            "edgebind/v2/renew/request/service:fleet",
            "edgebind/v2/renew/request",
            "edgebind/v2/status/dev-a",
            "edgebind/v1/renew/request/dev-a",
        ] {
            assert_eq!(parse_request(bad), None, "{bad}");
        }
    }

    #[test]
    fn messages_round_trip_and_refuse_unknown_fields() {
        let q = Request::Renew {
            csr_pem: "p".into(),
            current_serial: "01ab".into(),
        };
        let text = serde_json::to_string(&q).unwrap();
        assert!(text.contains("\"kind\":\"renew\""), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), q);
        let c: Request = serde_json::from_str(r#"{"kind":"connected","serial":"01"}"#).unwrap();
        assert_eq!(
            c,
            Request::Connected {
                serial: "01".into()
            }
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"kind":"connected","serial":"01","x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"csr_pem":"p"}"#).is_err());
        let r = Response::Refused {
            reason: "slow down".into(),
            retry_after_s: Some(30),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
        let r: Response = serde_json::from_str(r#"{"status":"refused","reason":"x"}"#).unwrap();
        assert!(matches!(
            r,
            Response::Refused {
                retry_after_s: None,
                ..
            }
        ));
    }
}
