//! The agent's configuration file (TOML).
//!
//! One file, usually `/var/lib/edgebind/identity/agent.toml`, unpacked from the
//! identity bundle next to the certificate and key. Unknown keys are errors (a
//! typo must not silently fall back to a default), and every error names the
//! file and the key at fault so a field engineer can act on one journal line.
//!
//! Relative paths inside the file are resolved against the directory holding
//! the file, so a bundle works wherever it is unpacked.
//!
//! The file that goes into identity bundles is rendered by
//! [`edgebind_protocol::bundle::agent_toml`], the one bundle contract; a unit
//! test here proves this parser accepts exactly what that template writes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgebind_protocol::DeviceId;
use serde::Deserialize;

/// Where the agent looks for its configuration when neither `--config` nor
/// `EDGEBIND_AGENT_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/var/lib/edgebind/identity/agent.toml";
/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "EDGEBIND_AGENT_CONFIG";

// The defaults are part of the bundle contract: the template documents them.
pub use edgebind_protocol::bundle::defaults::{
    JOURNAL_MAX_AGE_S as DEFAULT_JOURNAL_MAX_AGE_S,
    JOURNAL_MAX_ENTRIES as DEFAULT_JOURNAL_MAX_ENTRIES, KEEP_ALIVE_S as DEFAULT_KEEP_ALIVE_S,
    LOG_LEVEL as DEFAULT_LOG_LEVEL, OUTBOX_MAX_BYTES as DEFAULT_OUTBOX_MAX_BYTES,
    PORT as DEFAULT_PORT, REBOOT_REQUEST_PATH as DEFAULT_REBOOT_REQUEST_PATH,
    RECONNECT_MAX_S as DEFAULT_RECONNECT_MAX_S, RECONNECT_MIN_MS as DEFAULT_RECONNECT_MIN_MS,
    SESSION_EXPIRY_S as DEFAULT_SESSION_EXPIRY_S, STATE_DIR as DEFAULT_STATE_DIR,
    TELEMETRY_INTERVAL_S as DEFAULT_TELEMETRY_INTERVAL_S,
};
pub use edgebind_protocol::bundle::{
    CA_CERT as DEFAULT_CA, DEVICE_CERT as DEFAULT_CERT, DEVICE_KEY as DEFAULT_KEY,
};

// Bounds that keep a typo from turning into a busy loop or a silent agent;
// the telemetry period's are the desired-settings contract's.
use edgebind_protocol::settings::TELEMETRY_INTERVAL_RANGE_S;
const KEEP_ALIVE_RANGE_S: (u64, u64) = (5, 3_600);
/// Room for a few records of the largest packet size at least; at most what a
/// small device can hold in RAM.
const OUTBOX_MAX_BYTES_RANGE: (u64, u64) = (1024 * 1024, 256 * 1024 * 1024);

/// The whole configuration file, with relative paths already resolved.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `device_id` (optional, default: the certificate's CN). When set it must
    /// equal the CN; a mismatch means the wrong bundle was installed.
    #[serde(default)]
    pub device_id: Option<DeviceId>,
    /// `[broker]`: where to connect (required: `host`).
    pub broker: BrokerConfig,
    /// `[identity]`: certificate chain, key and fleet CA.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// `[telemetry]`: periodic health samples.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `[state]`: durable agent state (command journal, applied settings).
    #[serde(default)]
    pub state: StateConfig,
    /// `[actions]`: how remote actions are carried out.
    #[serde(default)]
    pub actions: ActionsConfig,
    /// `[log]`: logging.
    #[serde(default)]
    pub log: LogConfig,
    /// `[renewal]`: renewing the device certificate before it expires
    /// (see [`crate::renewal::RenewalConfig`]).
    #[serde(default)]
    pub renewal: crate::renewal::RenewalConfig,
    /// `[claim]` (optional): a claim bundle. When `identity.cert` does not
    /// exist yet, the agent first obtains its device identity with the
    /// batch's claim identity ([`crate::claim`]).
    #[serde(default)]
    pub claim: Option<ClaimConfig>,
}

/// `[claim]`: claim-based first boot (see [`edgebind_protocol::bundle`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimConfig {
    /// `cert` (default "claim.crt"): the batch's claim certificate (CN
    /// `claim:BATCH`) followed by the issuing CA.
    #[serde(default = "default_claim_cert")]
    pub cert: PathBuf,
    /// `key` (default "claim.key"): its private key; kept after first boot,
    /// to re-provision the device if its certificate expires while offline.
    #[serde(default = "default_claim_key")]
    pub key: PathBuf,
    /// `port` (required): the broker's provisioning listener.
    pub port: u16,
    /// `serial_file` (default "/sys/firmware/devicetree/base/serial-number"
    /// unless `serial` is given): the unit's serial number is its first line,
    /// NULs and white space trimmed.
    #[serde(default)]
    pub serial_file: Option<PathBuf>,
    /// `serial`: the serial number itself, instead of `serial_file`.
    #[serde(default)]
    pub serial: Option<edgebind_protocol::UnitSerial>,
    /// `response_timeout_s` (default 30, 1..=3600): how long to wait for the
    /// fleet's answer before asking again.
    #[serde(default = "default_claim_timeout")]
    pub response_timeout_s: u64,
}

impl ClaimConfig {
    /// A claim section reading the serial `serial`, every other key at its default.
    pub fn new(port: u16, serial: edgebind_protocol::UnitSerial) -> Self {
        ClaimConfig {
            cert: default_claim_cert(),
            key: default_claim_key(),
            port,
            serial_file: None,
            serial: Some(serial),
            response_timeout_s: default_claim_timeout(),
        }
    }

    pub fn response_timeout(&self) -> Duration {
        Duration::from_secs(self.response_timeout_s)
    }
}

fn default_claim_cert() -> PathBuf {
    edgebind_protocol::bundle::CLAIM_CERT.into()
}
fn default_claim_key() -> PathBuf {
    edgebind_protocol::bundle::CLAIM_KEY.into()
}
fn default_claim_timeout() -> u64 {
    edgebind_protocol::bundle::defaults::CLAIM_RESPONSE_TIMEOUT_S
}

/// `[broker]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `host` (required): broker host name or IP address to connect to.
    pub host: String,
    /// `port` (default 8883): MQTT over TLS port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// `server_name` (default: `host`): the name the broker's certificate must
    /// carry (DNS SAN or IP SAN). Set it when connecting through an address
    /// that is not in the certificate.
    #[serde(default)]
    pub server_name: Option<String>,
    /// `keep_alive_s` (default 30, 5..=3600): MQTT keep-alive; a dead link is
    /// noticed after about 1.5 times this.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// `session_expiry_s` (default 86400): how long the broker keeps the
    /// session (subscriptions and queued QoS 1 commands) while the device is
    /// offline.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_s: u32,
    /// `reconnect_min_ms` (default 500): first reconnect delay cap; each
    /// failure doubles the cap, the actual delay is uniformly random below it
    /// (full jitter) so a fleet does not reconnect in lockstep.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    /// `reconnect_max_s` (default 60): the largest reconnect delay cap.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_s: u64,
}

/// `[identity]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// `cert` (default "device.crt"): PEM chain, the device certificate first,
    /// then the issuing CA certificate(s).
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    /// `key` (default "device.key"): PEM private key of the device certificate
    /// (PKCS#8, SEC1 or PKCS#1). Never logged.
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// `ca` (default "ca.crt"): the fleet root CA. It is the only trust
    /// anchor, for the broker and for the device's own chain; system roots are
    /// never used.
    #[serde(default = "default_ca")]
    pub ca: PathBuf,
}

/// `[telemetry]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `interval_s` (default 60, 1..=86400): seconds between samples. The
    /// fleet may override it at run time through the `desired` settings.
    #[serde(default = "default_telemetry_interval")]
    pub interval_s: u64,
}

/// `[state]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `dir` (default "/var/lib/edgebind/state"): writable, persistent
    /// directory for the command journal and applied settings; its
    /// filesystem is the one reported as disk use.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// `journal_max_age_s` (default 2592000 = 30 days): command ids older
    /// than this are forgotten. Never shorter than twice the broker session
    /// expiry (a redelivery can only come from a live session).
    #[serde(default = "default_journal_max_age")]
    pub journal_max_age_s: u64,
    /// `journal_max_entries` (default 1000): beyond this many ids the oldest
    /// are pruned, but not one young enough to be redelivered, unless there
    /// are ten times as many (a flood must not exhaust memory).
    #[serde(default = "default_journal_max_entries")]
    pub journal_max_entries: usize,
    /// `outbox_max_bytes` (default 2097152 = 2 MiB): bound of the outbox, the
    /// on-disk queue of telemetry, events and command results awaiting the
    /// broker's acknowledgement. Past it the oldest telemetry goes first.
    /// The queue is also held in memory, so this bounds RAM use too.
    #[serde(default = "default_outbox_max_bytes")]
    pub outbox_max_bytes: u64,
}

/// `[actions]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionsConfig {
    /// `dir` (default "/etc/edgebind/actions.d"): directory of action
    /// definitions (`NAME.toml`) the image declares. A file that does not
    /// parse is logged and skipped; a missing directory means none.
    #[serde(default = "default_actions_dir")]
    pub dir: PathBuf,
    /// `sandbox` (default "auto"): how programs of actions run.
    /// "systemd-run": as a transient systemd unit (needs systemd as PID 1 and
    /// an agent allowed to start units, i.e. root); "fallback": the agent's
    /// own sandbox (new session, no new privileges, another user if root,
    /// Landlock write restrictions where the kernel has them, rlimits);
    /// "auto": systemd-run when both hold, else fallback.
    #[serde(default)]
    pub sandbox: SandboxMode,
    /// `allow_unconfined` (default false): where neither a transient unit
    /// nor Landlock can hold a declared action's writes to its
    /// `writable_paths`, run it anyway, limited by file permissions only.
    /// Without it such a device rejects declared actions (fail closed).
    #[serde(default)]
    pub allow_unconfined: bool,
    /// `allowed_units` (default empty): systemd units `restart-service` and
    /// `collect-logs` may touch; with none, neither action is offered.
    #[serde(default)]
    pub allowed_units: Vec<String>,
    /// `systemctl` (default "systemctl"): program `restart-service` runs.
    #[serde(default = "default_systemctl")]
    pub systemctl: String,
    /// `journalctl` (default "journalctl"): program `collect-logs` runs.
    #[serde(default = "default_journalctl")]
    pub journalctl: String,
    /// `[actions.reboot]`
    #[serde(default)]
    pub reboot: RebootConfig,
}

/// `actions.sandbox`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxMode {
    #[default]
    Auto,
    SystemdRun,
    Fallback,
}

impl Default for ActionsConfig {
    fn default() -> Self {
        ActionsConfig {
            dir: default_actions_dir(),
            sandbox: SandboxMode::default(),
            allow_unconfined: false,
            allowed_units: Vec::new(),
            systemctl: default_systemctl(),
            journalctl: default_journalctl(),
            reboot: RebootConfig::default(),
        }
    }
}

/// Where the image installs action definitions.
pub const DEFAULT_ACTIONS_DIR: &str = "/etc/edgebind/actions.d";

fn default_actions_dir() -> PathBuf {
    DEFAULT_ACTIONS_DIR.into()
}
fn default_systemctl() -> String {
    "systemctl".into()
}
fn default_journalctl() -> String {
    "journalctl".into()
}

/// How `reboot` is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootMethod {
    /// Create `path`; a root-owned systemd path unit watching it runs
    /// `systemctl reboot`, so the agent itself needs no privileges.
    #[default]
    RequestFile,
    /// Run `command` (argv, no shell). For tests and demos: make it harmless.
    Command,
}

/// `[actions.reboot]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootConfig {
    /// `method` (default "request-file"): "request-file" or "command".
    #[serde(default)]
    pub method: RebootMethod,
    /// `path` (default "/run/edgebind/reboot-request"): file created by the
    /// "request-file" method.
    #[serde(default = "default_reboot_path")]
    pub path: PathBuf,
    /// `command` (no default; required with method = "command"): argv run by
    /// the "command" method, e.g. ["/bin/sh", "-c", "echo reboot >> /tmp/x"].
    #[serde(default)]
    pub command: Vec<String>,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `level` (default "info"): one of error, warn, info, debug, trace. The
    /// fleet may override it through the `desired` settings; the environment
    /// variable `EDGEBIND_LOG` (a tracing filter) overrides both.
    #[serde(default = "default_log_level")]
    pub level: LogLevel,
}

/// A validated log level name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub const ALL: [LogLevel; 5] = [
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    pub fn parse(s: &str) -> Option<LogLevel> {
        LogLevel::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_keep_alive() -> u64 {
    DEFAULT_KEEP_ALIVE_S
}
fn default_session_expiry() -> u32 {
    DEFAULT_SESSION_EXPIRY_S
}
fn default_reconnect_min() -> u64 {
    DEFAULT_RECONNECT_MIN_MS
}
fn default_reconnect_max() -> u64 {
    DEFAULT_RECONNECT_MAX_S
}
fn default_cert() -> PathBuf {
    DEFAULT_CERT.into()
}
fn default_key() -> PathBuf {
    DEFAULT_KEY.into()
}
fn default_ca() -> PathBuf {
    DEFAULT_CA.into()
}
fn default_telemetry_interval() -> u64 {
    DEFAULT_TELEMETRY_INTERVAL_S
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_journal_max_age() -> u64 {
    DEFAULT_JOURNAL_MAX_AGE_S
}
fn default_journal_max_entries() -> usize {
    DEFAULT_JOURNAL_MAX_ENTRIES
}
fn default_outbox_max_bytes() -> u64 {
    DEFAULT_OUTBOX_MAX_BYTES
}
fn default_reboot_path() -> PathBuf {
    DEFAULT_REBOOT_REQUEST_PATH.into()
}
fn default_log_level() -> LogLevel {
    LogLevel::Info
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            cert: default_cert(),
            key: default_key(),
            ca: default_ca(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval_s: default_telemetry_interval(),
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: default_state_dir(),
            journal_max_age_s: default_journal_max_age(),
            journal_max_entries: default_journal_max_entries(),
            outbox_max_bytes: default_outbox_max_bytes(),
        }
    }
}

impl Default for RebootConfig {
    fn default() -> Self {
        RebootConfig {
            method: RebootMethod::default(),
            path: default_reboot_path(),
            command: Vec::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
        }
    }
}

impl BrokerConfig {
    /// A broker section with every optional key at its default.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        BrokerConfig {
            host: host.into(),
            port,
            server_name: None,
            keep_alive_s: DEFAULT_KEEP_ALIVE_S,
            session_expiry_s: DEFAULT_SESSION_EXPIRY_S,
            reconnect_min_ms: DEFAULT_RECONNECT_MIN_MS,
            reconnect_max_s: DEFAULT_RECONNECT_MAX_S,
        }
    }

    /// The name the broker certificate is checked against.
    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(&self.host)
    }

    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_s)
    }
}

/// A configuration file that cannot be used. Every variant names the file;
/// those about a value also name the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {}{}: {message}", path.display(), key_suffix(key))]
    Parse {
        path: PathBuf,
        /// Dotted key (e.g. `broker.port`) when it can be told from the error.
        key: Option<String>,
        message: String,
    },
    #[error("configuration file {}: key `{key}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

fn key_suffix(key: &Option<String>) -> String {
    key.as_ref()
        .map(|k| format!(": key `{k}`"))
        .unwrap_or_default()
}

impl AgentConfig {
    /// A configuration with every optional key at its default; paths are used
    /// as given. Meant for in-process agents (tests, fleet simulations).
    pub fn new(broker: BrokerConfig) -> Self {
        AgentConfig {
            device_id: None,
            broker,
            identity: IdentityConfig::default(),
            telemetry: TelemetryConfig::default(),
            state: StateConfig::default(),
            actions: ActionsConfig::default(),
            log: LogConfig::default(),
            renewal: crate::renewal::RenewalConfig::default(),
            claim: None,
        }
    }

    /// Read, parse and validate `path`; relative paths inside are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, path, base)
    }

    /// Parse and validate `text` as if read from `origin` (used in messages),
    /// resolving relative paths against `base_dir`.
    pub fn from_toml(
        text: &str,
        origin: &Path,
        base_dir: &Path,
    ) -> Result<AgentConfig, ConfigError> {
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            key: e.span().and_then(|span| key_at(text, span.start)),
            message: e.message().trim().to_owned(),
        })?;
        config.resolve_paths(base_dir);
        config.validate(origin)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.identity.cert,
            &mut self.identity.key,
            &mut self.identity.ca,
            &mut self.state.dir,
            &mut self.actions.reboot.path,
            &mut self.actions.dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(claim) = &mut self.claim {
            for p in [&mut claim.cert, &mut claim.key]
                .into_iter()
                .chain(claim.serial_file.as_mut())
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            if claim.serial.is_none() && claim.serial_file.is_none() {
                claim.serial_file =
                    Some(edgebind_protocol::bundle::defaults::CLAIM_SERIAL_FILE.into());
            }
        }
    }

    /// Checks serde cannot express. Public so that configurations built in
    /// code get the same scrutiny.
    pub fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        if let Err(message) = self.renewal.check() {
            let key = message.split(' ').next().unwrap_or("renewal").to_owned();
            return Err(invalid(&key, message));
        }
        let b = &self.broker;
        if b.host.trim().is_empty() {
            return Err(invalid("broker.host", "must not be empty".into()));
        }
        if b.port == 0 {
            return Err(invalid("broker.port", "must be 1..=65535".into()));
        }
        if rustls::pki_types::ServerName::try_from(b.server_name()).is_err() {
            let key = if b.server_name.is_some() {
                "broker.server_name"
            } else {
                "broker.host"
            };
            return Err(invalid(
                key,
                format!(
                    "{:?} is neither a DNS name nor an IP address",
                    b.server_name()
                ),
            ));
        }
        let (lo, hi) = KEEP_ALIVE_RANGE_S;
        if !(lo..=hi).contains(&b.keep_alive_s) {
            return Err(invalid(
                "broker.keep_alive_s",
                format!("{} is outside {lo}..={hi}", b.keep_alive_s),
            ));
        }
        if b.reconnect_min_ms == 0 {
            return Err(invalid(
                "broker.reconnect_min_ms",
                "must be at least 1".into(),
            ));
        }
        if b.reconnect_max_s.saturating_mul(1000) < b.reconnect_min_ms {
            return Err(invalid(
                "broker.reconnect_max_s",
                format!(
                    "{} s is less than broker.reconnect_min_ms ({} ms)",
                    b.reconnect_max_s, b.reconnect_min_ms
                ),
            ));
        }
        let (lo, hi) = TELEMETRY_INTERVAL_RANGE_S;
        if !(lo..=hi).contains(&self.telemetry.interval_s) {
            return Err(invalid(
                "telemetry.interval_s",
                format!("{} is outside {lo}..={hi}", self.telemetry.interval_s),
            ));
        }
        let min_age = 2 * u64::from(b.session_expiry_s);
        if self.state.journal_max_age_s < min_age {
            return Err(invalid(
                "state.journal_max_age_s",
                format!(
                    "{} is shorter than twice broker.session_expiry_s ({min_age}); \
                     a redelivered command could run twice",
                    self.state.journal_max_age_s
                ),
            ));
        }
        if self.state.journal_max_entries < 16 {
            return Err(invalid(
                "state.journal_max_entries",
                format!(
                    "{} is below the minimum of 16",
                    self.state.journal_max_entries
                ),
            ));
        }
        let (lo, hi) = OUTBOX_MAX_BYTES_RANGE;
        if !(lo..=hi).contains(&self.state.outbox_max_bytes) {
            return Err(invalid(
                "state.outbox_max_bytes",
                format!("{} is outside {lo}..={hi}", self.state.outbox_max_bytes),
            ));
        }
        for (i, unit) in self.actions.allowed_units.iter().enumerate() {
            let ok = !unit.is_empty()
                && unit.len() <= 256
                && !unit.starts_with('-')
                && unit
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@:\\".contains(c));
            if !ok {
                return Err(invalid(
                    &format!("actions.allowed_units[{i}]"),
                    format!("{unit:?} is not a systemd unit name"),
                ));
            }
        }
        let reboot = &self.actions.reboot;
        match reboot.method {
            RebootMethod::Command if reboot.command.is_empty() => {
                return Err(invalid(
                    "actions.reboot.command",
                    "method = \"command\" needs a non-empty argv list".into(),
                ));
            }
            RebootMethod::RequestFile if !reboot.command.is_empty() => {
                return Err(invalid(
                    "actions.reboot.command",
                    "is only used with method = \"command\"".into(),
                ));
            }
            _ => {}
        }
        if let Some(claim) = &self.claim {
            if claim.port == 0 || claim.port == b.port {
                return Err(invalid(
                    "claim.port",
                    format!(
                        "must be the provisioning listener's port (1..=65535, not broker.port {})",
                        b.port
                    ),
                ));
            }
            if claim.serial.is_some() && claim.serial_file.is_some() {
                return Err(invalid(
                    "claim.serial",
                    "give either serial or serial_file, not both".into(),
                ));
            }
            if !(1..=3600).contains(&claim.response_timeout_s) {
                return Err(invalid(
                    "claim.response_timeout_s",
                    format!("{} is outside 1..=3600", claim.response_timeout_s),
                ));
            }
        }
        Ok(())
    }
}

/// The dotted key whose line contains byte `offset` of `text`: the nearest
/// `[table]` header above plus the `key =` on that line, if any. Best effort,
/// only used to make parse errors name the key.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    if line.starts_with('[') {
        return Some(
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned(),
        );
    }
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))?;
    if key.is_empty() || key.starts_with('#') {
        return table;
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use edgebind_protocol::bundle::agent_toml;

    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml(
            text,
            Path::new("/etc/edgebind/agent.toml"),
            Path::new("/bundle"),
        )
    }

    #[test]
    fn the_claim_bundle_template_loads_back() {
        use edgebind_protocol::bundle::{SerialSource, claim_agent_toml};
        let t = claim_agent_toml(
            "broker.lan",
            8883,
            None,
            8884,
            &SerialSource::File("/sys/class/dmi/id/product_serial".into()),
        );
        let c = parse(&t).unwrap();
        assert_eq!(c.device_id, None);
        let claim = c.claim.unwrap();
        assert_eq!(claim.port, 8884);
        assert_eq!(claim.cert, Path::new("/bundle/claim.crt"));
        assert_eq!(claim.key, Path::new("/bundle/claim.key"));
        assert_eq!(
            claim.serial_file.as_deref(),
            Some(Path::new("/sys/class/dmi/id/product_serial"))
        );
        assert_eq!(claim.response_timeout_s, 30);
        let serial = edgebind_protocol::UnitSerial::new("SN-1").unwrap();
        let t = claim_agent_toml(
            "h",
            8883,
            None,
            8884,
            &SerialSource::Literal(serial.clone()),
        );
        assert_eq!(parse(&t).unwrap().claim.unwrap().serial, Some(serial));
        for (bad, key) in [
            ("[claim]\nport = 8883\n", "claim.port"),
            (
                "[claim]\nport = 8884\nserial = \"a\"\nserial_file = \"/x\"\n",
                "claim.serial",
            ),
            (
                "[claim]\nport = 8884\nresponse_timeout_s = 0\n",
                "claim.response_timeout_s",
            ),
        ] {
            let err = parse(&format!("[broker]\nhost = \"h\"\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn minimal_file_gets_documented_defaults_and_resolved_paths() {
        let c = parse("[broker]\nhost = \"broker.example\"\n").unwrap();
        assert_eq!(c.device_id, None);
        assert_eq!(c.broker.port, 8883);
        assert_eq!(c.broker.server_name(), "broker.example");
        assert_eq!(c.broker.keep_alive_s, 30);
        assert_eq!(c.identity.cert, Path::new("/bundle/device.crt"));
        assert_eq!(c.identity.key, Path::new("/bundle/device.key"));
        assert_eq!(c.identity.ca, Path::new("/bundle/ca.crt"));
        assert_eq!(c.telemetry.interval_s, 60);
        assert_eq!(c.state.dir, Path::new("/var/lib/edgebind/state"));
        assert_eq!(c.actions.reboot.method, RebootMethod::RequestFile);
        assert_eq!(c.actions.dir, Path::new("/etc/edgebind/actions.d"));
        assert_eq!(c.actions.sandbox, SandboxMode::Auto);
        assert!(c.actions.allowed_units.is_empty());
        assert_eq!(
            c.actions.reboot.path,
            Path::new("/run/edgebind/reboot-request")
        );
        assert_eq!(c.log.level, LogLevel::Info);
    }

    #[test]
    fn the_shared_bundle_template_loads_back_with_its_values() {
        let id = DeviceId::new("dev-a").unwrap();
        let text = agent_toml(&id, "127.0.0.1", 18883, Some("localhost"));
        let c = parse(&text).unwrap();
        assert_eq!(c.device_id, Some(id.clone()));
        assert_eq!(c.broker.host, "127.0.0.1");
        assert_eq!(c.broker.port, 18883);
        assert_eq!(c.broker.server_name(), "localhost");
        assert_eq!(c.identity.cert, Path::new("/bundle/device.crt"));
        // Uncommenting every optional line must still give a valid file
        // holding exactly the defaults (the comments tell the truth).
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with("command") => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let full = parse(&uncommented).unwrap();
        let mut expected = c.clone();
        expected.broker.server_name = Some("localhost".into());
        assert_eq!(full, expected);
        let plain = agent_toml(&id, "broker.lan", 8883, None);
        assert_eq!(parse(&plain).unwrap().broker.server_name, None);
    }

    #[test]
    fn the_shared_template_escapes_what_the_parser_unescapes() {
        let id = DeviceId::new("dev-a").unwrap();
        let odd = "odd \"name\" \\ with\ttab";
        // Not a valid name (the agent refuses it later), but the TOML must hold it verbatim.
        let raw: toml::Table = toml::from_str(&agent_toml(&id, "h", 1, Some(odd))).unwrap();
        assert_eq!(raw["broker"]["server_name"].as_str(), Some(odd));
    }

    #[test]
    fn typo_is_an_error_naming_file_and_key() {
        let err = parse("[broker]\nhost = \"h\"\nprot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/edgebind/agent.toml"), "{err}");
        assert!(err.contains("broker.prot"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = parse("[broker]\nhost = \"h\"\nport = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.port"), "{err}");
        let err = parse("[broker]\nhost = \"h\"\n[telemetry]\ninterval_s = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.interval_s"), "{err}");
        let err = parse("[broker]\nhost = \"h\"\n[log]\nlevel = \"loud\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.level"), "{err}");
        let err = parse("device_id = \"a/b\"\n[broker]\nhost = \"h\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("device_id"), "{err}");
        let err = parse("[broker]\nhost = \"h\"\n[actions.reboot]\nmethod = \"command\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("actions.reboot.command"), "{err}");
        let err = parse("[broker]\nhost = \"bad name!\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.host"), "{err}");
        let err = parse(
            "[broker]\nhost = \"h\"\nsession_expiry_s = 100\n[state]\njournal_max_age_s = 150\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("state.journal_max_age_s"), "{err}");
    }

    #[test]
    fn missing_broker_section_is_reported() {
        let err = parse("").unwrap_err().to_string();
        assert!(err.contains("broker"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = AgentConfig::load(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/agent.toml"), "{err}");
    }

    #[test]
    fn actions_directory_and_allowed_units_parse_and_bad_units_name_the_key() {
        let c = parse(
            "[broker]\nhost = \"h\"\n[actions]\ndir = \"actions.d\"\nsandbox = \"fallback\"\nallowed_units = [\"nginx.service\"]\n",
        )
        .unwrap();
        assert_eq!(c.actions.dir, Path::new("/bundle/actions.d"));
        assert_eq!(c.actions.sandbox, SandboxMode::Fallback);
        assert!(
            !c.actions.allow_unconfined,
            "declared actions fail closed by default"
        );
        let c = parse("[broker]\nhost = \"h\"\n[actions]\nallow_unconfined = true\n").unwrap();
        assert!(c.actions.allow_unconfined);
        let err = parse("[broker]\nhost = \"h\"\n[actions]\nallowed_units = [\"a b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("actions.allowed_units[0]"), "{err}");
    }

    #[test]
    fn command_reboot_method_parses() {
        let c = parse(
            "[broker]\nhost = \"h\"\n[actions.reboot]\nmethod = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \"true\"]\n",
        )
        .unwrap();
        assert_eq!(c.actions.reboot.method, RebootMethod::Command);
        assert_eq!(c.actions.reboot.command.len(), 3);
    }

    /// The fuzz set for the configuration file: whatever a bundle or a hand
    /// edit puts in it, the agent gets a config or an error naming the file,
    /// and the shared template holds any host it is given.
    mod fuzz {
        use super::*;
        use crate::fuzz_support::{apply_text, byte_edits};
        use proptest::prelude::*;

        fn template() -> String {
            agent_toml(&DeviceId::new("dev-a").unwrap(), "broker.lan", 8883, None)
        }

        fn names_the_file(e: &ConfigError) -> bool {
            e.to_string()
                .starts_with("configuration file /etc/edgebind/agent.toml")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_text_is_a_config_or_an_error_naming_the_file(text in "(?s).{0,400}") {
                if let Err(e) = parse(&text) {
                    prop_assert!(names_the_file(&e), "{}", e);
                }
            }

            #[test]
            fn any_toml_shaped_text_is_a_config_or_an_error_naming_the_file(
                lines in prop::collection::vec(
                    prop_oneof![
                        "\\[[a-z._\\[\\]\" ]{0,16}\\]",
                        "[a-z_\". ]{0,16} ?= ?[0-9a-z\"\\[\\]{},.:+-]{0,16}",
                        "[#a-z =\"\\\\]{0,20}",
                    ],
                    0..12,
                ),
            ) {
                let text = format!("[broker]\nhost = \"h\"\n{}\n", lines.join("\n"));
                if let Err(e) = parse(&text) {
                    prop_assert!(names_the_file(&e), "{}", e);
                }
            }

            #[test]
            fn a_damaged_template_is_a_config_or_an_error_naming_the_file(edits in byte_edits()) {
                if let Err(e) = parse(&apply_text(&template(), &edits)) {
                    prop_assert!(names_the_file(&e), "{}", e);
                }
            }

            /// The template's own TOML escaping holds any text: the parser
            /// reads back exactly the host it was given (or refuses it by
            /// name for not being a host name), never a TOML syntax error.
            #[test]
            fn the_template_carries_any_host_verbatim(host in "(?s).{0,40}", port in 1u16..) {
                let id = DeviceId::new("dev-a").unwrap();
                match parse(&agent_toml(&id, &host, port, None)) {
                    Ok(c) => {
                        prop_assert_eq!(&c.broker.host, &host);
                        prop_assert_eq!(c.broker.port, port);
                    }
                    Err(ConfigError::Invalid { key, .. }) => prop_assert_eq!(key, "broker.host"),
                    Err(e) => prop_assert!(false, "the template of host {:?} does not parse: {}", host, e),
                }
            }
        }
    }
}
