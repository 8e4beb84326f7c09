//! Desired settings: what the fleet service publishes (retained) to a device.

use edgebind_protocol::messages::Desired;
use edgebind_protocol::{DeviceId, settings};
use serde::Serialize;
use serde_json::{Map, Value};

use super::OpsError;
use crate::registry::{RegistryError, Store};

#[derive(Debug, Clone, Serialize)]
pub struct SettingsChanged {
    pub device: DeviceId,
    pub desired: Desired,
    /// Keys no known agent understands: the device will report them ignored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_keys: Vec<String>,
}

/// Merge `changes` into the desired settings of `id` (a `null` removes the
/// key) as one new revision. One registry transaction: a bad key or an
/// unknown or revoked device changes nothing. A value of a key agents know
/// is checked with the agent's own rule (`protocol::settings`), so what the
/// device would only report as ignored is refused here, with its message;
/// unknown keys pass (a newer agent may know them) and are listed.
pub fn set(
    store: &mut dyn Store,
    id: &DeviceId,
    changes: &Map<String, Value>,
) -> Result<SettingsChanged, OpsError> {
    check(changes)?;
    let desired = store.set_desired(id, changes)?;
    Ok(SettingsChanged {
        device: id.clone(),
        desired,
        unknown_keys: changes
            .keys()
            .filter(|k| !settings::is_known(k))
            .cloned()
            .collect(),
    })
}

/// The check [`set`] makes before it changes anything, for callers that
/// must know before they start (the console's "add devices" checks the
/// initial settings before it registers any device).
pub fn check(changes: &Map<String, Value>) -> Result<(), OpsError> {
    for (key, value) in changes {
        if settings::is_known(key) && !value.is_null() {
            settings::validate(key, value).map_err(|e| {
                OpsError::from(RegistryError::InvalidSetting {
                    key: key.clone(),
                    why: format!("{key} {e}; nothing was changed"),
                })
            })?;
        }
    }
    Ok(())
}
