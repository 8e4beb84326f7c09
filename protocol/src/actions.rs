//! Action names and argument schemas: what a device says it can do, and the
//! one check of a command's arguments that the agent (before running) and the
//! CLI (before sending) both apply.
//!
//! The protocol does not enumerate actions: each device lists its own in its
//! `inventory` answer ([`crate::messages::Inventory::actions`]), the agent's
//! built-ins and whatever the image declared, each with an [`ActionSpec`].
//! A few names are well known because the fleet side relies on them
//! ([`INVENTORY`] is asked for on connect).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Longest action or argument name.
pub const MAX_NAME_LEN: usize = 64;

/// The name of an action: lowercase ASCII letters, digits and `-`, starting
/// with a letter, at most [`MAX_NAME_LEN`] bytes (it ends up in file names,
/// unit names and logs).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Action(Cow<'static, str>);

/// `reboot`: restart the device; succeeded once it is back with a new boot id.
pub const REBOOT: Action = Action(Cow::Borrowed("reboot"));
/// `ping`: answer at once (liveness).
pub const PING: Action = Action(Cow::Borrowed("ping"));
/// `inventory`: the device's facts and the actions it offers.
pub const INVENTORY: Action = Action(Cow::Borrowed("inventory"));
/// `renew`: renew the device certificate now (see [`crate::renewal`]).
pub const RENEW: Action = Action(Cow::Borrowed("renew"));
/// `restart-agent`: the agent leaves and systemd starts it again.
pub const RESTART_AGENT: Action = Action(Cow::Borrowed("restart-agent"));

impl Action {
    pub fn new(name: impl Into<String>) -> Result<Action, String> {
        let name = name.into();
        check_name("action name", &name)?;
        Ok(Action(Cow::Owned(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Names of actions and arguments share one rule.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{kind} {name:?} must be 1 to {MAX_NAME_LEN} bytes long"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!(
            "{kind} {name:?} must start with a lowercase ASCII letter"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{kind} {name:?} contains {c:?}; only lowercase ASCII letters, digits, '-' and '_' are allowed"
        ));
    }
    Ok(())
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Action::new(s)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Action::new(s).map_err(serde::de::Error::custom)
    }
}

/// The type of one argument, with its bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ArgType {
    /// A string; when `allowed` is not empty, exactly one of those values
    /// (an enum, no patterns). `max_len` bounds the length in bytes.
    String {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allowed: Vec<String>,
        #[serde(default = "default_max_len")]
        max_len: usize,
    },
    /// A whole number within `min..=max`.
    Integer {
        min: i64,
        max: i64,
    },
    Bool,
}

fn default_max_len() -> usize {
    256
}

/// One declared argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgSpec {
    #[serde(flatten)]
    pub ty: ArgType,
    /// A command without it is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Where an action comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Part of the agent.
    Builtin,
    /// Declared by the image (a definition file in the agent's actions directory).
    Declared,
}

/// What a device says about one action it offers (in its inventory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionSpec {
    pub name: Action,
    pub origin: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The arguments it takes, by name; no others are accepted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, ArgSpec>,
    /// Running it twice has the effect of running it once: the agent may run
    /// it again after an interruption.
    pub idempotent: bool,
    /// Longest run before the agent kills it and reports `timed_out`.
    pub timeout_s: u64,
    /// What the `output` of a success holds, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// Check `args` against `spec`: every argument declared and of its type and
/// range, every required one present. The message names the argument.
pub fn validate_args(
    spec: &BTreeMap<String, ArgSpec>,
    args: &Map<String, Value>,
) -> Result<(), String> {
    for (name, value) in args {
        let Some(arg) = spec.get(name) else {
            let known: Vec<&str> = spec.keys().map(String::as_str).collect();
            return Err(if known.is_empty() {
                format!("argument {name:?} is not declared (this action takes no arguments)")
            } else {
                format!(
                    "argument {name:?} is not declared (declared: {})",
                    known.join(", ")
                )
            });
        };
        check_value(name, &arg.ty, value)?;
    }
    if let Some((name, _)) = spec
        .iter()
        .find(|(name, a)| a.required && !args.contains_key(*name))
    {
        return Err(format!("argument {name:?} is required"));
    }
    Ok(())
}

fn check_value(name: &str, ty: &ArgType, value: &Value) -> Result<(), String> {
    match ty {
        ArgType::String { allowed, max_len } => {
            let Some(s) = value.as_str() else {
                return Err(format!("argument {name:?} must be a string, not {value}"));
            };
            if s.len() > *max_len {
                return Err(format!(
                    "argument {name:?} is {} bytes long; at most {max_len} are allowed",
                    s.len()
                ));
            }
            if s.contains('\0') {
                return Err(format!("argument {name:?} contains a NUL byte"));
            }
            if !allowed.is_empty() && !allowed.iter().any(|a| a == s) {
                return Err(format!(
                    "argument {name:?} = {s:?} is not one of: {}",
                    allowed.join(", ")
                ));
            }
        }
        ArgType::Integer { min, max } => {
            let Some(n) = value.as_i64() else {
                return Err(format!(
                    "argument {name:?} must be a whole number, not {value}"
                ));
            };
            if !(*min..=*max).contains(&n) {
                return Err(format!("argument {name:?} = {n} is outside {min}..={max}"));
            }
        }
        ArgType::Bool => {
            if !value.is_boolean() {
                return Err(format!(
                    "argument {name:?} must be true or false, not {value}"
                ));
            }
        }
    }
    Ok(())
}

/// Turn `key=value` text (what an operator types) into the JSON value the
/// schema wants: integers and booleans parsed, strings kept as they are.
pub fn parse_arg(spec: &ArgSpec, text: &str) -> Value {
    match spec.ty {
        ArgType::Integer { .. } => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        ArgType::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        ArgType::String { .. } => Value::String(text.to_owned()),
    }
}

/// The value as a command-line word (`--name=value` or positional).
pub fn render_arg(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> BTreeMap<String, ArgSpec> {
        serde_json::from_value(json!({
            "level": {"type": "string", "allowed": ["quick", "full"], "required": true},
            "count": {"type": "integer", "min": 1, "max": 5},
            "verbose": {"type": "bool"},
        }))
        .unwrap()
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn arguments_inside_the_schema_pass_and_each_violation_names_the_argument() {
        let s = spec();
        validate_args(
            &s,
            &args(json!({"level": "quick", "count": 5, "verbose": true})),
        )
        .unwrap();
        for (bad, needle) in [
            (json!({"level": "slow"}), "not one of: quick, full"),
            (json!({"level": "quick", "count": 6}), "outside 1..=5"),
            (json!({"level": "quick", "count": "2"}), "whole number"),
            (json!({"level": "quick", "verbose": "yes"}), "true or false"),
            (
                json!({"level": "quick", "colour": "red"}),
                "\"colour\" is not declared",
            ),
            (json!({"count": 1}), "\"level\" is required"),
            (json!({"level": 3}), "must be a string"),
        ] {
            let err = validate_args(&s, &args(bad.clone())).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn names_are_checked_and_well_known_ones_are_valid() {
        for ok in [&REBOOT, &PING, &INVENTORY, &RESTART_AGENT] {
            assert_eq!(Action::new(ok.as_str()).unwrap(), *ok);
        }
        for bad in ["", "Reboot", "a b", "-x", "a/b", "x".repeat(65).as_str()] {
            assert!(Action::new(bad).is_err(), "{bad:?}");
        }
        let a: Action = serde_json::from_str("\"selftest\"").unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"selftest\"");
        assert!(serde_json::from_str::<Action>("\"../x\"").is_err());
    }

    #[test]
    fn typed_text_becomes_the_schema_type() {
        let s = spec();
        assert_eq!(parse_arg(&s["count"], "3"), json!(3));
        assert_eq!(parse_arg(&s["verbose"], "true"), json!(true));
        assert_eq!(parse_arg(&s["level"], "7"), json!("7"));
        assert_eq!(render_arg(&json!(3)), "3");
        assert_eq!(render_arg(&json!("a b")), "a b");
    }
}
