//! The claim exchange of zero-touch first boot, on the provisioning listener.
//!
//! ```text
//! edgebind/v2/provision/request/{claim-cn}/{serial}    device (claim identity) -> fleet, QoS 1
//! edgebind/v2/provision/response/{claim-cn}/{serial}   fleet -> device, QoS 1
//! ```
//!
//! A device of a production batch connects to the provisioning listener
//! with the batch's claim identity (`claim:BATCH`, one certificate shared by
//! every unit of the batch) and its serial number as MQTT client id. The
//! listener maps the certificate CN to the username but not to the client
//! id, so units of one batch have distinct client ids, and its ACL patterns
//! (`%u` = CN, `%c` = client id) let each write only its own request topic
//! and read only its own response topic: units provisioning at the same
//! time never see each other's responses. Both levels are the principal's
//! and the client's own, so the fleet reads the sender off the topic: a
//! name containing `/` only makes a deeper topic, which the fleet's
//! exact-depth subscription never receives.
//!
//! The request carries a PKCS#10 CSR whose subject CN is the device id the
//! unit asks for; the response carries the certificate chain, or why not.
//! Nothing secret crosses: the private key never leaves the device.
//!
//! The same exchange re-provisions a unit whose device certificate expired
//! while it was offline: same serial, same id, a new key. The fleet answers
//! it only for the id the serial was provisioned as, a device not revoked,
//! and a certificate that has expired; a device whose certificate is valid
//! is refused (it renews over its own connection, [`crate::renewal`]).

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, UnitSerial};
use crate::principal::{CLAIM_PREFIX, Principal};
use crate::topics::{FLEET_SHARE_GROUP, NAMESPACE};

/// The level after the namespace: every provisioning topic is under it.
pub const SEGMENT: &str = "provision";

/// Which way a provisioning message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Device (claim identity) -> fleet.
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

    fn render(self, cn: &str, client: &str) -> String {
        format!("{NAMESPACE}/{SEGMENT}/{}/{cn}/{client}", self.segment())
    }

    /// The topic of one unit of one batch.
    pub fn topic(self, batch: &DeviceId, serial: &UnitSerial) -> String {
        self.render(&Principal::Claim(batch.clone()).cn(), serial.as_str())
    }

    /// Every unit of every batch (what the fleet service subscribes to, or
    /// may write on), exact depth.
    pub fn filter_all(self) -> String {
        self.render("+", "+")
    }

    /// [`Leg::filter_all`] as a shared subscription of the fleet group.
    pub fn filter_shared(self) -> String {
        format!("$share/{FLEET_SHARE_GROUP}/{}", self.filter_all())
    }

    /// The ACL pattern: the client's own CN (`%u`) and client id (`%c`).
    pub fn acl_pattern(self) -> String {
        self.render("%u", "%c")
    }

    /// Levels below the namespace: `provision`, the leg, CN, client id.
    pub const DEPTH: usize = 4;
}

/// A request topic, parsed: the batch the claim identity names and the
/// unit's serial (its client id). `None` for anything else, including a CN
/// that is not a claim identity: only claim identities provision.
pub fn parse_request(topic: &str) -> Option<(DeviceId, UnitSerial)> {
    let rest = topic
        .strip_prefix(NAMESPACE)?
        .strip_prefix('/')?
        .strip_prefix(SEGMENT)?
        .strip_prefix('/')?
        .strip_prefix(Leg::Request.segment())?
        .strip_prefix('/')?;
    let mut parts = rest.split('/');
    let cn = parts.next()?;
    let serial = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let batch = DeviceId::new(cn.strip_prefix(CLAIM_PREFIX)?).ok()?;
    Some((batch, UnitSerial::new(serial).ok()?))
}

/// What a unit sends: its CSR (PEM), subject CN = the device id it asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub csr_pem: String,
}

/// What the fleet answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The device certificate followed by the issuing CA (PEM).
    Issued {
        device_id: DeviceId,
        chain_pem: String,
    },
    /// Refused for good (not on the allow-list, a bad CSR, provisioned with
    /// another key and its certificate still valid, a revoked device): the
    /// unit keeps retrying with backoff, an operator has to act.
    Refused { reason: String },
    /// Not now (the batch's rate limit, or another service instance is on
    /// this serial): ask again after about `retry_after_s` seconds.
    Deferred { reason: String, retry_after_s: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_render_and_parse() {
        let batch = DeviceId::new("line-1").unwrap();
        let serial = UnitSerial::new("SN-0001").unwrap();
        let t = Leg::Request.topic(&batch, &serial);
        assert_eq!(t, "edgebind/v2/provision/request/claim:line-1/SN-0001");
        assert_eq!(parse_request(&t), Some((batch.clone(), serial.clone())));
        assert_eq!(
            Leg::Response.topic(&batch, &serial),
            "edgebind/v2/provision/response/claim:line-1/SN-0001"
        );
        assert_eq!(
            Leg::Request.filter_shared(),
            "$share/edgebind-fleet/edgebind/v2/provision/request/+/+"
        );
        assert_eq!(
            Leg::Response.acl_pattern(),
            "edgebind/v2/provision/response/%u/%c"
        );
        for f in [Leg::Request.filter_all(), Leg::Response.acl_pattern()] {
            assert_eq!(f.split('/').count(), 2 + Leg::DEPTH, "{f}");
        }
    }

    #[test]
    fn only_claim_identities_with_valid_serials_are_requests() {
        for bad in [
            "edgebind/v2/provision/request/dev-a/SN1",
            "edgebind/v2/provision/request/service:fleet/SN1",
            "edgebind/v2/provision/request/claim:line-1/SN 1",
            "edgebind/v2/provision/request/claim:line-1/SN1/x",
            "edgebind/v2/provision/request/claim:line-1",
            "edgebind/v2/provision/response/claim:line-1/SN1",
            "edgebind/v2/provision/request/claim:Line/SN1",
        ] {
            assert_eq!(parse_request(bad), None, "{bad}");
        }
    }

    #[test]
    fn messages_round_trip() {
        let r = Response::Issued {
            device_id: DeviceId::new("sn-1").unwrap(),
            chain_pem: "x".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"status\":\"issued\""), "{text}");
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
        let q: Request = serde_json::from_str(r#"{"csr_pem":"p"}"#).unwrap();
        assert_eq!(q.csr_pem, "p");
        assert!(serde_json::from_str::<Request>(r#"{"csr_pem":"p","x":1}"#).is_err());
    }
}
