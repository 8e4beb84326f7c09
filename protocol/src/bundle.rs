//! The identity bundle contract: what a factory line writes, what the image's
//! first-boot import installs and what the agent reads.
//!
//! It lives here, in the crate the agent already depends on, so the agent, the
//! PKI (`edgebind_certs::bundle` writes bundles), the CLI, the image tools and
//! the tests read one definition and the device build pulls in nothing more.
//!
//! | file         | content                                       | mode |
//! |--------------|-----------------------------------------------|------|
//! | `agent.toml` | ready agent configuration ([`agent_toml`])    | 0644 |
//! | `device.crt` | device certificate followed by the issuing CA | 0644 |
//! | `device.key` | the device's private key (PKCS#8 PEM)         | 0600 |
//! | `ca.crt`     | the fleet root CA                             | 0644 |
//!
//! The directory is 0700 and the tar of the same four files (top level, no
//! directory prefix) is 0600, because both hold the key. On a boot partition
//! the tar is [`IDENTITY_TAR_ON_BOOT`].

pub const AGENT_CONFIG: &str = "agent.toml";
pub const DEVICE_CERT: &str = "device.crt";
pub const DEVICE_KEY: &str = "device.key";
pub const CA_CERT: &str = "ca.crt";

pub const PUBLIC_MODE: u32 = 0o644;
pub const PRIVATE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;
pub const TAR_MODE: u32 = 0o600;

/// The bundle's files with their modes, in bundle (and tar) order.
pub const FILES: [(&str, u32); 4] = [
    (AGENT_CONFIG, PUBLIC_MODE),
    (DEVICE_CERT, PUBLIC_MODE),
    (DEVICE_KEY, PRIVATE_MODE),
    (CA_CERT, PUBLIC_MODE),
];

/// The file names alone, in the same order as [`FILES`].
pub const NAMES: [&str; 4] = [AGENT_CONFIG, DEVICE_CERT, DEVICE_KEY, CA_CERT];

/// Where the image's first-boot import looks on the FAT boot partition.
pub const IDENTITY_DIR_ON_BOOT: &str = "edgebind";
pub const IDENTITY_TAR_ON_BOOT: &str = "edgebind/identity.tar";

/// The mode a bundle file must have.
pub fn mode_of(name: &str) -> Option<u32> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}

/// The agent's defaults that `agent.toml` documents. The agent's config parser
/// uses these same constants, so the template's comments cannot drift from
/// what a missing key means.
pub mod defaults {
    pub const PORT: u16 = 8883;
    pub const KEEP_ALIVE_S: u64 = 30;
    /// One day: commands queued while the device is offline for less than this
    /// are delivered when it comes back.
    pub const SESSION_EXPIRY_S: u32 = 86_400;
    pub const RECONNECT_MIN_MS: u64 = 500;
    pub const RECONNECT_MAX_S: u64 = 60;
    pub const TELEMETRY_INTERVAL_S: u64 = 60;
    pub const STATE_DIR: &str = "/var/lib/edgebind/state";
    /// 30 days.
    pub const JOURNAL_MAX_AGE_S: u64 = 30 * 86_400;
    pub const JOURNAL_MAX_ENTRIES: usize = 1_000;
    /// About 5,000 telemetry samples (~420 bytes each): 1.4 h at 1 Hz, 3.5
    /// days at the default period.
    pub const OUTBOX_MAX_BYTES: u64 = 2 * 1024 * 1024;
    pub const REBOOT_REQUEST_PATH: &str = "/run/edgebind/reboot-request";
    pub const LOG_LEVEL: &str = "info";
}

/// The documented `agent.toml` of a bundle: every key is listed with its
/// default (optional ones commented out), paths are relative so the bundle
/// works wherever it is unpacked. `server_name` is written only when it
/// differs from `host`.
pub fn agent_toml(
    device_id: &crate::DeviceId,
    host: &str,
    port: u16,
    server_name: Option<&str>,
) -> String {
    use defaults::*;
    let server_name_line = match server_name {
        Some(name) if name != host => format!("server_name = {}", toml_str(name)),
        _ => format!("# server_name = {}", toml_str(host)),
    };
    format!(
        r#"# Edgebind device agent configuration (edgebind-agent --config PATH).
# Unknown keys are errors. Relative paths are resolved against this file's directory.

# Must equal the CN of device.crt (default: the CN itself).
device_id = {device_id}

[broker]
# Broker host name or IP address (required).
host = {host}
# MQTT over TLS port (default {default_port}).
port = {port}
# Name the broker certificate must carry (default: host).
{server_name_line}
# MQTT keep-alive in seconds, 5..=3600 (default {keep_alive}).
# keep_alive_s = {keep_alive}
# Seconds the broker keeps the session and queued commands while offline (default {session}).
# session_expiry_s = {session}
# First reconnect delay cap in ms; doubles per failure, random below the cap (default {rmin}).
# reconnect_min_ms = {rmin}
# Largest reconnect delay cap in seconds (default {rmax}).
# reconnect_max_s = {rmax}

[identity]
# Device certificate followed by the issuing CA (PEM).
cert = {cert}
# Private key of the device certificate (PEM, mode 0600).
key = {key}
# Fleet root CA: the only trust anchor.
ca = {ca}

[telemetry]
# Seconds between telemetry samples, 1..=86400 (default {interval}).
# interval_s = {interval}

[state]
# Persistent, writable directory for the command journal and settings (default {state}).
# dir = {state}
# Forget command ids older than this many seconds, at least 2 x session_expiry_s (default {jage}).
# journal_max_age_s = {jage}
# Keep at most this many command ids, never dropping redeliverable ones (default {jmax}).
# journal_max_entries = {jmax}
# Bound of the outbox (telemetry, events, results queued while offline), in bytes (default {obmax}).
# outbox_max_bytes = {obmax}

[actions.reboot]
# "request-file" (default): create `path`, a root systemd path unit reboots the device.
# "command": run `command` (argv, no shell), e.g. a harmless one for demos.
# method = "request-file"
# path = {reboot_path}
# command = ["/bin/true"]

[log]
# error, warn, info, debug or trace (default {log_level}).
# level = {log_level}
"#,
        device_id = toml_str(device_id.as_str()),
        host = toml_str(host),
        default_port = PORT,
        keep_alive = KEEP_ALIVE_S,
        session = SESSION_EXPIRY_S,
        rmin = RECONNECT_MIN_MS,
        rmax = RECONNECT_MAX_S,
        cert = toml_str(DEVICE_CERT),
        key = toml_str(DEVICE_KEY),
        ca = toml_str(CA_CERT),
        interval = TELEMETRY_INTERVAL_S,
        state = toml_str(STATE_DIR),
        jage = JOURNAL_MAX_AGE_S,
        jmax = JOURNAL_MAX_ENTRIES,
        obmax = OUTBOX_MAX_BYTES,
        reboot_path = toml_str(REBOOT_REQUEST_PATH),
        log_level = toml_str(LOG_LEVEL),
    )
}

/// A TOML basic string. Written by hand because this crate stays free of a
/// TOML dependency (the agent's parser test proves the output loads back).
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_has_one_mode_and_only_the_key_is_private() {
        assert_eq!(mode_of(DEVICE_KEY), Some(PRIVATE_MODE));
        for name in [AGENT_CONFIG, DEVICE_CERT, CA_CERT] {
            assert_eq!(mode_of(name), Some(PUBLIC_MODE), "{name}");
        }
        assert_eq!(mode_of("other"), None);
        assert_eq!(NAMES, FILES.map(|(n, _)| n));
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c\u{7f}"), "\"a\\\"b\\\\c\\u007F\"");
    }

    #[test]
    fn server_name_is_written_only_when_it_differs() {
        let id = crate::DeviceId::new("dev-a").unwrap();
        let t = agent_toml(&id, "10.0.0.1", 8883, Some("broker.lan"));
        assert!(t.contains("\nserver_name = \"broker.lan\"\n"), "{t}");
        let t = agent_toml(&id, "broker.lan", 8883, Some("broker.lan"));
        assert!(t.contains("\n# server_name = \"broker.lan\"\n"), "{t}");
    }
}
