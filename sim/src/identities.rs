//! The simulated devices' identities: registered through the fleet library
//! exactly as `device add` registers a device (certificate, bundle, broker
//! policy, registry row), in one batch ([`register_devices`]: one broker
//! policy refresh for the batch, not one per device), or found again in a
//! directory a `--keep` run left; and revoked in one batch afterwards.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use edgebind_certs::bundle::BundleForm;
use edgebind_fleet::ops::{
    AgentBroker, BatchRegistration, FleetHome, Policy, RevokedBatch, register_devices,
    revoke_devices,
};
use edgebind_fleet::registry::{Lifecycle, RegistryError, Store, Tag};
use edgebind_protocol::DeviceId;

use crate::SimError;

/// The tag every simulated device carries (`edgebind send --tag sim ping`).
pub const SIM_TAG: &str = "sim";
/// The board simulated devices are registered as.
pub const SIM_BOARD: &str = "qemux86-64";
/// Certificate lifetime of a simulated device.
pub const SIM_VALIDITY_DAYS: u32 = 30;

/// Devices to simulate and where their bundles are.
#[derive(Debug, Clone)]
pub struct Identities {
    pub ids: Vec<DeviceId>,
    /// `<bundles>/<id>/agent.toml` for each id.
    pub bundles: PathBuf,
    /// Registered by this run (and so revoked by its cleanup).
    pub created: bool,
}

impl Identities {
    pub fn bundle(&self, id: &DeviceId) -> PathBuf {
        self.bundles.join(id.as_str())
    }
}

/// `prefix-00001` ... : zero-padded to at least five digits, so ids sort
/// in creation order.
pub fn device_ids(prefix: &str, count: usize) -> Result<Vec<DeviceId>, SimError> {
    let width = count.to_string().len().max(5);
    (1..=count)
        .map(|i| DeviceId::new(format!("{prefix}-{i:0width$}")).map_err(SimError::from))
        .collect()
}

/// Register `count` new devices `prefix-NNNNN` with their bundles in `out`.
/// Every id must be new (checked for the whole batch before anything is
/// issued); `progress(n)` is called as certificates are issued.
pub fn create(
    home: &FleetHome,
    store: &mut dyn Store,
    prefix: &str,
    count: usize,
    broker: Option<AgentBroker>,
    out: &Path,
    progress: impl Fn(usize) + Sync,
) -> Result<Identities, SimError> {
    let ids = device_ids(prefix, count)?;
    let mut tags = BTreeSet::from([SIM_TAG.parse::<Tag>()?]);
    if let Ok(t) = prefix.parse::<Tag>() {
        tags.insert(t);
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let batch = BatchRegistration {
        ids,
        board: SIM_BOARD.parse()?,
        tags,
        validity_days: SIM_VALIDITY_DAYS,
        broker,
        out: out.to_owned(),
        form: BundleForm::DirectoryAndTar,
        threads,
    };
    let done = register_devices(home, store, &batch, progress)?;
    if let Some((id, why)) = done.failed.first() {
        // Each failed one is undone by the library; undo the rest too so a
        // failed start leaves nothing behind.
        let _ = revoke_devices(home, store, &done.registered, Policy::Refresh);
        return Err(SimError::Registration(format!(
            "{} of {count} registrations failed (first: {id}: {why}); the batch is undone",
            done.failed.len()
        )));
    }
    Ok(Identities {
        ids: done.registered,
        bundles: out.to_owned(),
        created: true,
    })
}

/// The kept identities in `dir` (one bundle directory per device, as
/// [`create`] writes them) that the registry knows and has not revoked, in
/// id order; at most `count` of them.
pub fn reuse(store: &dyn Store, dir: &Path, count: Option<usize>) -> Result<Identities, SimError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SimError::Io {
        path: dir.to_owned(),
        source: e,
    })?;
    let mut ids = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.join("agent.toml").is_file() {
            continue;
        }
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| DeviceId::new(n).ok())
        else {
            continue;
        };
        match store.device(&id) {
            Ok(d) if d.lifecycle != Lifecycle::Revoked => ids.push(id),
            Ok(_) | Err(RegistryError::UnknownDevice(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    ids.sort();
    if let Some(n) = count {
        if ids.len() < n {
            return Err(SimError::Registration(format!(
                "{} holds {} usable identities, {n} asked for",
                dir.display(),
                ids.len()
            )));
        }
        ids.truncate(n);
    }
    if ids.is_empty() {
        return Err(SimError::Registration(format!(
            "{} holds no usable identity (none kept, or all revoked)",
            dir.display()
        )));
    }
    Ok(Identities {
        ids,
        bundles: dir.to_owned(),
        created: false,
    })
}

/// Revoke what [`create`] registered (certificates, registry rows, one broker
/// policy refresh); identities that were reused are left alone.
pub fn remove(
    home: &FleetHome,
    store: &mut dyn Store,
    identities: &Identities,
) -> Result<Option<RevokedBatch>, SimError> {
    if !identities.created {
        return Ok(None);
    }
    Ok(Some(revoke_devices(
        home,
        store,
        &identities.ids,
        Policy::Refresh,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_padded_and_sort_in_creation_order() {
        let ids = device_ids("sim-a", 3).unwrap();
        assert_eq!(ids[0].as_str(), "sim-a-00001");
        assert_eq!(ids[2].as_str(), "sim-a-00003");
        let many = device_ids("s", 123_456).unwrap();
        assert_eq!(many[0].as_str(), "s-000001");
        assert!(many.windows(2).all(|w| w[0] < w[1]));
        assert!(device_ids("Bad", 1).is_err());
    }
}
