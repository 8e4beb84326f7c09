//! Where clients reach the broker: the one place that turns a `host:port`
//! flag or the home's broker settings into an address.

use edgebind_broker::BrokerSettings;
use serde::Serialize;

use super::{FleetHome, OpsError};
use crate::mqtt::BrokerEndpoint;

/// `addr` (`host:port`, IPv6 in brackets) if given, else the broker settings
/// of the home (`edgebind broker config`).
pub fn broker_endpoint(home: &FleetHome, addr: Option<&str>) -> Result<BrokerEndpoint, OpsError> {
    if let Some(addr) = addr {
        return parse_addr(addr);
    }
    let settings = BrokerSettings::load(&home.broker_dir())?;
    Ok(BrokerEndpoint {
        host: settings.client_host(),
        port: settings.port,
    })
}

fn parse_addr(addr: &str) -> Result<BrokerEndpoint, OpsError> {
    let bad = |why: &str| OpsError::BadBrokerAddress {
        addr: addr.to_owned(),
        why: why.to_owned(),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    let port = port.parse().map_err(|_| bad("bad port"))?;
    Ok(BrokerEndpoint {
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
    })
}

/// What a device's `agent.toml` dials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentBroker {
    pub host: String,
    pub port: u16,
    /// Written only when the broker certificate names differ from `host`.
    pub server_name: Option<String>,
}

/// The address for a bundle's `agent.toml`: each part given wins, the rest
/// comes from the broker settings (port 8883 without either). Fails when
/// neither names a host.
pub fn agent_broker(
    home: &FleetHome,
    host: Option<&str>,
    port: Option<u16>,
    server_name: Option<&str>,
) -> Result<AgentBroker, OpsError> {
    let settings = match BrokerSettings::load(&home.broker_dir()) {
        Ok(s) => Some(s),
        Err(e) if host.is_none() => return Err(e.into()),
        Err(_) => None,
    };
    let host = match (host, &settings) {
        (Some(h), _) => h.to_owned(),
        (None, Some(s)) => s.client_host(),
        (None, None) => unreachable!("no host and no settings returned above"),
    };
    let port = port
        .or(settings.as_ref().map(|s| s.port))
        .unwrap_or(edgebind_protocol::bundle::defaults::PORT);
    Ok(AgentBroker {
        host,
        port,
        server_name: server_name.map(str::to_owned),
    })
}

impl AgentBroker {
    /// From a `host:port` address (`device add --broker`).
    pub fn from_addr(addr: &str) -> Result<Self, OpsError> {
        let e = parse_addr(addr)?;
        Ok(AgentBroker {
            host: e.host,
            port: e.port,
            server_name: None,
        })
    }

    pub fn agent_toml(&self, id: &edgebind_protocol::DeviceId) -> String {
        edgebind_protocol::bundle::agent_toml(
            id,
            &self.host,
            self.port,
            self.server_name.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_ipv6_brackets_and_bad_ones_say_why() {
        let e = parse_addr("[::1]:8883").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 8883));
        let e = parse_addr("broker.lan:18883").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("broker.lan", 18883));
        assert!(
            parse_addr("broker")
                .unwrap_err()
                .to_string()
                .contains("host:port")
        );
        assert!(
            parse_addr("b:x")
                .unwrap_err()
                .to_string()
                .contains("bad port")
        );
    }

    #[test]
    fn agent_broker_needs_a_host_from_somewhere() {
        let tmp = tempfile::tempdir().unwrap();
        let home = FleetHome::new(tmp.path());
        assert!(agent_broker(&home, None, None, None).is_err());
        let b = agent_broker(&home, Some("b.example"), None, None).unwrap();
        assert_eq!((b.host.as_str(), b.port), ("b.example", 8883));
    }
}
