//! Desired settings: what the fleet service publishes (retained) to a device.

use edgebind_protocol::DeviceId;
use edgebind_protocol::messages::Desired;
use serde::Serialize;
use serde_json::{Map, Value};

use super::OpsError;
use crate::registry::{Store, known_setting};

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
/// unknown or revoked device changes nothing.
pub fn set(
    store: &mut dyn Store,
    id: &DeviceId,
    changes: &Map<String, Value>,
) -> Result<SettingsChanged, OpsError> {
    let desired = store.set_desired(id, changes)?;
    Ok(SettingsChanged {
        device: id.clone(),
        desired,
        unknown_keys: changes
            .keys()
            .filter(|k| !known_setting(k))
            .cloned()
            .collect(),
    })
}
