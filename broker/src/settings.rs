//! `<broker>/settings.toml`: how the broker is reached and run.
//!
//! Written by `edgebind broker config`, read by `broker run/reload` and by
//! the fleet service and CLI to know where to connect ([`BrokerSettings::load`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::layout;

fn default_port() -> u16 {
    8883
}
fn default_bind() -> String {
    "0.0.0.0".into()
}
fn default_crl_days() -> u32 {
    edgebind_certs::pki::DEFAULT_CRL_DAYS
}
fn default_crl_warn_days() -> u32 {
    3
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// DNS names clients use to reach the broker (server certificate SANs).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// IP addresses clients use (server certificate SANs).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// TLS listener port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Address the listeners bind to.
    #[serde(default = "default_bind")]
    pub bind: String,
    /// Port of the provisioning listener, where claim identities connect and
    /// no device pattern applies. None = no provisioning listener.
    #[serde(default)]
    pub provisioning_port: Option<u16>,
    /// Lifetime of each CRL the broker loads; `pki crl` / `broker reload` renew it.
    #[serde(default = "default_crl_days")]
    pub crl_days: u32,
    /// Warn when the broker's CRL lapses within this many days.
    #[serde(default = "default_crl_warn_days")]
    pub crl_warn_days: u32,
    /// Keep retained messages and sessions across restarts (`persistence true`).
    #[serde(default = "default_true")]
    pub persistence: bool,
    /// User Mosquitto drops to when started as root (`user` option); the
    /// generated files are made readable by it. None = Mosquitto's default.
    #[serde(default)]
    pub run_as: Option<String>,
    /// The burst budget the queue limits follow from (see [`crate::budget`]).
    #[serde(default)]
    pub budget: crate::Budget,
}

impl BrokerSettings {
    pub fn new(hosts: Vec<String>, ips: Vec<IpAddr>) -> Self {
        BrokerSettings {
            hosts,
            ips,
            port: default_port(),
            bind: default_bind(),
            provisioning_port: None,
            crl_days: default_crl_days(),
            crl_warn_days: default_crl_warn_days(),
            persistence: true,
            run_as: None,
            budget: crate::Budget::default(),
        }
    }

    pub fn path(broker_dir: &Path) -> PathBuf {
        broker_dir.join(layout::SETTINGS)
    }

    /// Read `<broker_dir>/settings.toml`.
    pub fn load(broker_dir: &Path) -> Result<Self, Error> {
        let path = Self::path(broker_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotConfigured { path });
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let settings: BrokerSettings = toml::from_str(&text).map_err(|e| Error::Settings {
            path: path.clone(),
            message: e.to_string(),
        })?;
        settings
            .validate()
            .map_err(|message| Error::Settings { path, message })?;
        Ok(settings)
    }

    pub fn save(&self, broker_dir: &Path) -> Result<(), Error> {
        let text = format!(
            "# Written by `edgebind broker config`; re-run it to change these.\n{}",
            toml::to_string(self).map_err(|e| Error::Invalid(e.to_string()))?
        );
        edgebind_certs::files::write_public(&Self::path(broker_dir), text.as_bytes())?;
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.hosts.is_empty() && self.ips.is_empty() {
            return Err("at least one host name or IP address is needed".into());
        }
        if self.port == 0 || self.provisioning_port == Some(0) {
            return Err("port 0 is not a usable listener port".into());
        }
        if self.provisioning_port == Some(self.port) {
            return Err(format!(
                "provisioning_port must differ from port ({}): the two listeners have different policies",
                self.port
            ));
        }
        if self.crl_warn_days >= self.crl_days {
            return Err(format!(
                "crl_warn_days ({}) must be smaller than crl_days ({})",
                self.crl_warn_days, self.crl_days
            ));
        }
        self.budget.validate()
    }

    /// The name clients should dial (and verify the certificate against).
    pub fn client_host(&self) -> String {
        self.hosts
            .first()
            .cloned()
            .unwrap_or_else(|| self.ips[0].to_string())
    }

    /// Path of the CA bundle clients should trust (`<broker_dir>/ca.crt`).
    pub fn ca_path(broker_dir: &Path) -> PathBuf {
        broker_dir.join(layout::CA)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_typos() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = BrokerSettings::new(
            vec!["broker.example.net".into()],
            vec!["10.0.0.5".parse().unwrap()],
        );
        s.port = 18883;
        s.save(dir.path()).unwrap();
        assert_eq!(BrokerSettings::load(dir.path()).unwrap(), s);
        assert_eq!(s.client_host(), "broker.example.net");

        std::fs::write(
            BrokerSettings::path(dir.path()),
            "hosts = [\"a\"]\nprot = 1\n",
        )
        .unwrap();
        let err = BrokerSettings::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("settings.toml") && err.contains("prot"),
            "{err}"
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let mut s = BrokerSettings::new(vec![], vec![]);
        assert!(s.validate().unwrap_err().contains("host"));
        s.hosts.push("h".into());
        s.provisioning_port = Some(s.port);
        assert!(s.validate().unwrap_err().contains("provisioning_port"));
        s.provisioning_port = None;
        s.crl_warn_days = s.crl_days;
        assert!(s.validate().unwrap_err().contains("crl_warn_days"));
        let missing = BrokerSettings::load(std::path::Path::new("/nonexistent")).unwrap_err();
        assert!(
            missing.to_string().contains("edgebind broker config"),
            "{missing}"
        );
    }
}
