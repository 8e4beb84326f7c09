//! Desired settings: the keys the fleet may set on a device, their types and
//! ranges, in one place.
//!
//! The agent accepts or refuses a desired value with [`validate`]; the CLI's
//! `edgebind set` calls the same function before it publishes anything, so an
//! operator sees the device's own rule (and message) at their end instead of a
//! revision the device can only report as ignored.

use serde_json::Value;

/// `telemetry_interval_s`: seconds between two telemetry samples.
pub const TELEMETRY_INTERVAL_S: &str = "telemetry_interval_s";
/// `log_level`: the agent's log verbosity.
pub const LOG_LEVEL: &str = "log_level";

/// Every key an agent understands.
pub const KEYS: [&str; 2] = [TELEMETRY_INTERVAL_S, LOG_LEVEL];

/// Telemetry periods the fleet may set (the agent's config file uses the
/// same bounds).
pub const TELEMETRY_INTERVAL_RANGE_S: (u64, u64) = (1, 86_400);

/// Log levels, least verbose first.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// A desired setting that passed [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    TelemetryIntervalS(u64),
    /// One of [`LOG_LEVELS`].
    LogLevel(&'static str),
}

/// Why a desired setting is refused. The text is what the agent reports in
/// `reported.ignored` and what `edgebind set` prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("unknown setting (known: {})", KEYS.join(", "))]
    UnknownKey,
    #[error("must be an integer in {lo}..={hi}, got {got}")]
    OutOfRange { lo: u64, hi: u64, got: String },
    #[error("must be one of {}, got {got}", LOG_LEVELS.join(", "))]
    NotALogLevel { got: String },
}

/// Check one desired value against the contract.
pub fn validate(key: &str, value: &Value) -> Result<Setting, SettingError> {
    match key {
        TELEMETRY_INTERVAL_S => {
            let (lo, hi) = TELEMETRY_INTERVAL_RANGE_S;
            value
                .as_u64()
                .filter(|v| (lo..=hi).contains(v))
                .map(Setting::TelemetryIntervalS)
                .ok_or_else(|| SettingError::OutOfRange {
                    lo,
                    hi,
                    got: value.to_string(),
                })
        }
        LOG_LEVEL => value
            .as_str()
            .and_then(|s| LOG_LEVELS.into_iter().find(|l| *l == s))
            .map(Setting::LogLevel)
            .ok_or_else(|| SettingError::NotALogLevel {
                got: value.to_string(),
            }),
        _ => Err(SettingError::UnknownKey),
    }
}

/// Whether `key` is one an agent understands.
pub fn is_known(key: &str) -> bool {
    KEYS.contains(&key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_values_in_range() {
        assert_eq!(
            validate(TELEMETRY_INTERVAL_S, &json!(30)),
            Ok(Setting::TelemetryIntervalS(30))
        );
        assert_eq!(
            validate(LOG_LEVEL, &json!("debug")),
            Ok(Setting::LogLevel("debug"))
        );
    }

    #[test]
    fn refuses_with_the_rule_in_the_message() {
        for bad in [json!(-5), json!(0), json!(1.5), json!("abc"), json!(86_401)] {
            let e = validate(TELEMETRY_INTERVAL_S, &bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("integer in 1..=86400"), "{bad}: {e}");
            assert!(e.contains(&bad.to_string()), "{bad}: {e}");
        }
        let e = validate(LOG_LEVEL, &json!("verbose"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("error, warn, info, debug, trace"), "{e}");
        assert_eq!(
            validate("colour", &json!("red")),
            Err(SettingError::UnknownKey)
        );
    }
}
