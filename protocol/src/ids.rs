//! Identifiers that end up inside MQTT topics.
//!
//! A device id is the CN of the device certificate and Mosquitto substitutes
//! it for `%u` in pattern ACLs. An id containing `/`, `+` or `#` would widen
//! that pattern to other devices' topics, so ids are restricted to a small,
//! boring charset here, once, and every other crate accepts only the
//! validated types. (The topic layout does not rely on this: see
//! [`crate::topics`] for why a hostile CN still cannot reach other topics.)
//!
//! Device ids, and the names of every other principal, are lowercase only.
//! Host names, DNS and many factory systems ignore case, so `Rpi-1` and
//! `rpi-1` would be one device to them and two to the broker. Refusing upper
//! case (rather than folding it) keeps the certificate CN, the MQTT username
//! and the registry key byte-identical, with no second spelling to confuse.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest device or command id. Keeps topics and certificate CNs (max 64) short.
pub const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is {len} bytes long; at most {MAX_ID_LEN} are allowed")]
    TooLong {
        kind: &'static str,
        value: String,
        len: usize,
    },
    #[error(
        "{kind} {value:?} contains {ch:?} at position {pos}; only ASCII letters, digits, '-', '_' and '.' are allowed"
    )]
    BadChar {
        kind: &'static str,
        value: String,
        ch: char,
        pos: usize,
    },
    #[error("{kind} {value:?} must start with an ASCII letter or digit")]
    BadStart { kind: &'static str, value: String },
    #[error(
        "{kind} {value:?} contains upper case; {kind}s are lowercase (host names and factory systems ignore case, so two ids differing only in case would be one device to them): use {lower:?}"
    )]
    UpperCase {
        kind: &'static str,
        value: String,
        lower: String,
    },
}

/// Which letters an id may use.
#[derive(Clone, Copy)]
enum Case {
    Lower,
    Any,
}

fn validate(kind: &'static str, value: &str, case: Case) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            value: value.chars().take(MAX_ID_LEN).collect::<String>() + "…",
            len: value.len(),
        });
    }
    for (pos, ch) in value.chars().enumerate() {
        let ok = ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.');
        if !ok {
            return Err(IdError::BadChar {
                kind,
                value: value.to_owned(),
                ch,
                pos,
            });
        }
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(IdError::BadStart {
            kind,
            value: value.to_owned(),
        });
    }
    if matches!(case, Case::Lower) && value.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(IdError::UpperCase {
            kind,
            value: value.to_owned(),
            lower: value.to_ascii_lowercase(),
        });
    }
    Ok(())
}

macro_rules! validated_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $case:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($kind, &value, $case)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::new(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_id!(
    /// A device's identity: the CN of its certificate and its MQTT client id.
    DeviceId,
    "device id",
    Case::Lower
);
validated_id!(
    /// The id of one remote command; it appears in the command and result topics
    /// and is what the agent records to run each command at most once.
    CommandId,
    "command id",
    Case::Any
);
validated_id!(
    /// A unit's serial number as the claim flow carries it: the provisioning
    /// client id and one level of its topics, so it has the id charset (no
    /// `/`, `+`, `#`), in any case.
    UnitSerial,
    "unit serial",
    Case::Any
);

/// The device id a unit gets from its serial number when nobody names one:
/// ASCII letters lowercased, every character other than a letter, digit,
/// `-`, `_` or `.` replaced by `-` (`ACME/2024:0001` becomes
/// `acme-2024-0001`); the result must then be a valid [`DeviceId`]. The
/// factory line's manifest and the claim flow (the id a unit asks for, and
/// the only one the fleet signs for its serial) both use it.
pub fn device_id_for_serial(serial: &str) -> Result<DeviceId, IdError> {
    let id: String = serial
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '-',
        })
        .collect();
    DeviceId::new(id)
}

impl UnitSerial {
    /// [`device_id_for_serial`] of this serial. A valid serial has the id
    /// charset already, so this only lowercases it and cannot fail.
    pub fn device_id(&self) -> DeviceId {
        device_id_for_serial(&self.0).expect("a unit serial lowercased is a device id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_names_its_device_by_one_rule() {
        assert_eq!(
            device_id_for_serial("ACME/2024:0001").unwrap().as_str(),
            "acme-2024-0001"
        );
        assert_eq!(
            UnitSerial::new("SN-01.a_B").unwrap().device_id().as_str(),
            "sn-01.a_b"
        );
        assert!(device_id_for_serial("/x").is_err());
    }

    #[test]
    fn accepts_plain_ids() {
        for id in ["dev-a", "rpi3-0001", "a.b_c-9", "x"] {
            assert_eq!(DeviceId::new(id).unwrap().as_str(), id);
        }
        assert!(DeviceId::new("a".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn rejects_topic_syntax_and_other_bytes() {
        for bad in [
            "a/b",
            "+",
            "#",
            "a/#",
            "dev+",
            "%u",
            "a b",
            "a\u{0}",
            "a\n",
            "ä",
            "operator:x",
            "",
        ] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(matches!(
            DeviceId::new(".hidden"),
            Err(IdError::BadStart { .. })
        ));
        assert!(matches!(
            DeviceId::new("a".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn device_ids_are_lowercase_command_ids_any_case() {
        let err = DeviceId::new("Rpi-1").unwrap_err();
        assert!(matches!(&err, IdError::UpperCase { lower, .. } if lower == "rpi-1"));
        assert!(err.to_string().contains("\"rpi-1\""), "{err}");
        assert!(DeviceId::new("RPI-1").is_err());
        assert!(CommandId::new("Op-1A").is_ok());
    }

    #[test]
    fn error_names_the_offending_character() {
        let err = DeviceId::new("a/#").unwrap_err().to_string();
        assert!(err.contains("'/'"), "{err}");
        assert!(err.contains("device id"), "{err}");
    }

    #[test]
    fn serde_refuses_invalid_ids() {
        assert!(serde_json::from_str::<DeviceId>("\"a/b\"").is_err());
        let ok: CommandId = serde_json::from_str("\"c-1\"").unwrap();
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"c-1\"");
    }
}
