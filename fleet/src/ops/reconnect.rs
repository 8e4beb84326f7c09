//! The fleet's reconnect hint (`edgebind_protocol::reconnect`), sized from
//! the registry: what a fleet service publishes, retained, so that every
//! agent spreads its reconnections over the time the broker needs for the
//! whole fleet.

use edgebind_protocol::reconnect::{ReconnectHint, window_for};

use crate::registry::{RegistryError, Store};

/// The hint for the devices in `store` behind a broker that accepts
/// `accept_per_s` mutual-TLS connections a second (measure it with
/// `edgebind sim`, and give a share of it: the broker has other work).
/// Every registered device counts, revoked ones too: a window a little long
/// costs seconds, one too short overloads the broker.
pub fn reconnect_hint(
    store: &dyn Store,
    accept_per_s: f64,
    by: &str,
) -> Result<ReconnectHint, RegistryError> {
    Ok(hint_for(store.stats()?.devices, accept_per_s, by))
}

/// The hint for `devices` registered devices (every one, revoked too).
pub fn hint_for(devices: u64, accept_per_s: f64, by: &str) -> ReconnectHint {
    ReconnectHint::new(window_for(devices, accept_per_s), by)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NewDevice;

    #[test]
    fn the_window_grows_with_the_registered_fleet() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = crate::registry::open_or_create(&tmp.path().join("r.db")).unwrap();
        assert_eq!(
            reconnect_hint(&store, 100.0, "service:fleet").unwrap(),
            ReconnectHint::new(1, "service:fleet"),
            "an empty fleet: the shortest window"
        );
        let new: Vec<NewDevice> = (0..250)
            .map(|i| NewDevice {
                id: format!("dev-{i}").parse().unwrap(),
                board: "raspberrypi3-64".parse().unwrap(),
                tags: Default::default(),
                cert: None,
            })
            .collect();
        store.add_devices(&new).unwrap();
        assert_eq!(reconnect_hint(&store, 100.0, "s").unwrap().window_s, 3);
        assert_eq!(reconnect_hint(&store, 10.0, "s").unwrap().window_s, 25);
    }
}
