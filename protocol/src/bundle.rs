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
//!
//! # Claim bundles
//!
//! A golden image for claim-based first boot carries a *claim bundle*
//! instead, at the same place and with the same modes: the production
//! batch's claim identity, never a device key ([`CLAIM_FILES`]):
//!
//! | file         | content                                              | mode |
//! |--------------|------------------------------------------------------|------|
//! | `agent.toml` | agent configuration with a `[claim]` section ([`claim_agent_toml`]) | 0644 |
//! | `claim.crt`  | the batch's claim certificate (CN `claim:BATCH`) and the issuing CA | 0644 |
//! | `claim.key`  | its private key, shared by the batch's units (PKCS#8 PEM) | 0600 |
//! | `ca.crt`     | the fleet root CA                                    | 0644 |
//!
//! What says which kind a bundle is: the `[claim]` section of its
//! `agent.toml` ([`Kind::of_agent_toml`]), and which certificate it holds.
//! The agent with a claim bundle makes its own key on first boot and writes
//! its device identity to `identity.cert`/`identity.key` (the
//! [`DEVICE_CERT`]/[`DEVICE_KEY`] names beside `agent.toml`), then runs as a
//! device bundle would.

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

pub const CLAIM_CERT: &str = "claim.crt";
pub const CLAIM_KEY: &str = "claim.key";

/// A claim bundle's files with their modes, in bundle (and tar) order.
pub const CLAIM_FILES: [(&str, u32); 4] = [
    (AGENT_CONFIG, PUBLIC_MODE),
    (CLAIM_CERT, PUBLIC_MODE),
    (CLAIM_KEY, PRIVATE_MODE),
    (CA_CERT, PUBLIC_MODE),
];

/// Which identity a bundle carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A device's own certificate and key ([`FILES`]).
    Device,
    /// A production batch's claim identity ([`CLAIM_FILES`]): the device
    /// makes its own key on first boot.
    Claim,
}

impl Kind {
    /// The bundle's files with their modes.
    pub fn files(self) -> &'static [(&'static str, u32); 4] {
        match self {
            Kind::Device => &FILES,
            Kind::Claim => &CLAIM_FILES,
        }
    }

    /// The kind an `agent.toml` describes: a claim bundle's has a `[claim]`
    /// table. (A line-level look so that this crate needs no TOML parser;
    /// the agent's parser is what enforces the rest.)
    pub fn of_agent_toml(text: &str) -> Kind {
        if text.lines().any(|l| l.trim() == CLAIM_TABLE) {
            Kind::Claim
        } else {
            Kind::Device
        }
    }
}

/// The header of the `agent.toml` table that makes a bundle a claim bundle.
pub const CLAIM_TABLE: &str = "[claim]";

/// Where the image's first-boot import looks on the FAT boot partition.
pub const IDENTITY_DIR_ON_BOOT: &str = "edgebind";
pub const IDENTITY_TAR_ON_BOOT: &str = "edgebind/identity.tar";

/// The mode a file of either kind of bundle must have.
pub fn mode_of(name: &str) -> Option<u32> {
    FILES
        .iter()
        .chain(CLAIM_FILES.iter())
        .find(|(n, _)| *n == name)
        .map(|(_, m)| *m)
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
    /// Seconds a claiming unit waits for the fleet's answer before it asks again.
    pub const CLAIM_RESPONSE_TIMEOUT_S: u64 = 30;
    /// Where a unit reads its serial number by default (device tree boards,
    /// e.g. the Raspberry Pi; x86 boards have /sys/class/dmi/id/product_serial).
    pub const CLAIM_SERIAL_FILE: &str = "/sys/firmware/devicetree/base/serial-number";
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
    render_agent_toml(
        &format!("device_id = {}", toml_str(device_id.as_str())),
        host,
        port,
        server_name,
        "",
    )
}

/// Where a claiming unit finds its serial number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSource {
    /// Read from this file (first line; NULs and white space trimmed).
    File(String),
    /// This serial itself (tests, or an image made per unit anyway).
    Literal(crate::UnitSerial),
}

/// The documented `agent.toml` of a claim bundle: [`agent_toml`]'s keys
/// without a device id (the certificate's CN, once the unit has one) and
/// with the `[claim]` table naming the claim identity, the provisioning
/// listener's port and where the serial is read.
pub fn claim_agent_toml(
    host: &str,
    port: u16,
    server_name: Option<&str>,
    provisioning_port: u16,
    serial: &SerialSource,
) -> String {
    let serial_lines = match serial {
        SerialSource::File(path) => {
            format!("serial_file = {}\n# serial = \"SN-0001\"", toml_str(path))
        }
        SerialSource::Literal(s) => format!(
            "# serial_file = {}\nserial = {}",
            toml_str(defaults::CLAIM_SERIAL_FILE),
            toml_str(s.as_str())
        ),
    };
    let claim = format!(
        r#"
{CLAIM_TABLE}
# This is a claim bundle: it holds the production batch's claim identity, not a
# device key. On first boot the agent makes its own key pair (kept under
# state.dir, mode 0600), sends a certificate request with the unit's serial over
# the provisioning listener, verifies the answer and writes its own identity to
# identity.cert and identity.key; from then on it runs as that device.
# The batch's claim certificate followed by the issuing CA (PEM).
cert = {cert}
# Its private key (mode 0600); deleted once the device has its own identity.
key = {key}
# Port of the broker's provisioning listener (required).
port = {provisioning_port}
# The unit's serial number: the first line of serial_file (NULs and white space
# trimmed), or serial itself. The device id asked for is derived from it
# (letters lowercased, other characters than letters, digits, '-', '_', '.' as '-').
{serial_lines}
# Seconds to wait for the fleet's answer before asking again (default {timeout}).
# response_timeout_s = {timeout}
"#,
        cert = toml_str(CLAIM_CERT),
        key = toml_str(CLAIM_KEY),
        timeout = defaults::CLAIM_RESPONSE_TIMEOUT_S,
    );
    render_agent_toml(
        "# device_id: the CN of the certificate the claim flow obtains.",
        host,
        port,
        server_name,
        &claim,
    )
}

fn render_agent_toml(
    device_id_line: &str,
    host: &str,
    port: u16,
    server_name: Option<&str>,
    claim: &str,
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
{device_id_line}

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
{claim}"#,
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
    fn a_claim_bundle_says_so_in_its_agent_toml() {
        let id = crate::DeviceId::new("dev-a").unwrap();
        assert_eq!(
            Kind::of_agent_toml(&agent_toml(&id, "h", 8883, None)),
            Kind::Device
        );
        let serial = SerialSource::Literal(crate::UnitSerial::new("SN-1").unwrap());
        let t = claim_agent_toml("h", 8883, None, 8884, &serial);
        assert_eq!(Kind::of_agent_toml(&t), Kind::Claim);
        assert!(
            t.contains("\nport = 8884\n") && t.contains("\nserial = \"SN-1\"\n"),
            "{t}"
        );
        assert!(!t.contains("\ndevice_id ="), "{t}");
        assert_eq!(Kind::Claim.files()[2], (CLAIM_KEY, PRIVATE_MODE));
        assert_eq!(mode_of(CLAIM_KEY), Some(PRIVATE_MODE));
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
