//! Who is on the other end of a connection, read from the certificate CN.
//!
//! Devices use their bare id as CN. Every other role carries a prefix with a
//! `:`, a character a [`DeviceId`] can never contain, so an operator or
//! service name can never collide with (or impersonate) a device.

use std::fmt;

use crate::ids::{DeviceId, IdError};

pub const OPERATOR_PREFIX: &str = "operator:";
pub const SERVICE_PREFIX: &str = "service:";
pub const CLAIM_PREFIX: &str = "claim:";

/// A role plus a name; `Display` gives the certificate CN (and the MQTT username).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Device(DeviceId),
    /// A person at the operator CLI: reads everything, commands devices.
    Operator(DeviceId),
    /// A fleet back-end process (the registry service).
    Service(DeviceId),
    /// A factory/provisioning identity used by the zero-touch claim flow.
    Claim(DeviceId),
}

impl Principal {
    /// Parse a certificate CN. Names after a role prefix use the device-id charset.
    pub fn from_cn(cn: &str) -> Result<Self, IdError> {
        let prefixed = [
            (
                OPERATOR_PREFIX,
                Principal::Operator as fn(DeviceId) -> Principal,
            ),
            (SERVICE_PREFIX, Principal::Service),
            (CLAIM_PREFIX, Principal::Claim),
        ];
        for (prefix, make) in prefixed {
            if let Some(name) = cn.strip_prefix(prefix) {
                return DeviceId::new(name).map(make);
            }
        }
        DeviceId::new(cn).map(Principal::Device)
    }

    pub fn cn(&self) -> String {
        self.to_string()
    }

    pub fn role(&self) -> &'static str {
        match self {
            Principal::Device(_) => "device",
            Principal::Operator(_) => "operator",
            Principal::Service(_) => "service",
            Principal::Claim(_) => "claim",
        }
    }

    pub fn name(&self) -> &DeviceId {
        match self {
            Principal::Device(n)
            | Principal::Operator(n)
            | Principal::Service(n)
            | Principal::Claim(n) => n,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Device(id) => write!(f, "{id}"),
            Principal::Operator(n) => write!(f, "{OPERATOR_PREFIX}{n}"),
            Principal::Service(n) => write!(f, "{SERVICE_PREFIX}{n}"),
            Principal::Claim(n) => write!(f, "{CLAIM_PREFIX}{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_role() {
        for cn in ["dev-a", "operator:alice", "service:fleet", "claim:line-3"] {
            assert_eq!(Principal::from_cn(cn).unwrap().cn(), cn);
        }
        assert_eq!(
            Principal::from_cn("operator:alice").unwrap().role(),
            "operator"
        );
    }

    #[test]
    fn refuses_bad_names_in_any_role() {
        for cn in [
            "operator:",
            "operator:a/b",
            "service:#",
            "other:x",
            "a:b",
            "",
        ] {
            assert!(Principal::from_cn(cn).is_err(), "{cn:?}");
        }
    }
}
