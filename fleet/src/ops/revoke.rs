//! Revoking: the one path every revocation takes, so the PKI (CRL), the
//! registry (lifecycle, queued commands) and the broker policy (ACL) always
//! agree afterwards.
//!
//! A certificate cannot be unrevoked, so revocation does not roll back: it
//! rolls forward. The PKI goes first (the step that locks the device out),
//! then the registry, then the broker policy. If a later step fails, the
//! error says what is done, and running the same revocation again completes
//! it: a device whose certificates are already revoked but whose registry
//! row is not is revoked in the registry then, not refused.

use edgebind_certs::{InventoryEntry, Pki};
use edgebind_protocol::{DeviceId, Principal};
use serde::Serialize;

use super::{FleetHome, OpsError, PolicyRefresh, refresh_broker_policy};
use crate::registry::{Device, Lifecycle, RegistryError, Store};

/// What a revocation changed.
#[derive(Debug, Clone, Serialize)]
pub struct Revoked {
    /// Certificates revoked by this call (already revoked ones are not listed).
    pub certificates: Vec<InventoryEntry>,
    /// The device in the registry after the call, for device principals that
    /// are registered.
    pub device: Option<Device>,
    /// Queued commands that can now never be delivered, rejected.
    pub dropped_commands: usize,
    /// `None` when the caller asked not to touch the broker.
    pub policy: Option<PolicyRefresh>,
}

/// Whether to re-render and reload the broker policy afterwards
/// (`pki revoke --no-reload` leaves it to a later `broker reload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Refresh,
    Leave,
}

/// Revoke a registered device: every certificate, the registry lifecycle
/// (its queued commands rejected, its on-connect rules removed) and the
/// broker policy. Refused for an unknown device and for one that is already
/// revoked everywhere.
pub fn revoke(
    home: &FleetHome,
    store: &mut dyn Store,
    id: &DeviceId,
    policy: Policy,
) -> Result<Revoked, OpsError> {
    let device = store.device(id)?;
    let pki = home.open_pki()?;
    let usable = usable_certificates(&pki, id.as_str())?;
    if device.lifecycle == Lifecycle::Revoked && usable == 0 {
        return Err(OpsError::AlreadyRevoked(id.clone()));
    }
    revoke_device_everywhere(home, &pki, store, id, policy)
}

/// Revoke a principal by CN. A device goes through [`revoke`]'s steps when
/// it is registered; a device the registry never heard of (issued before
/// every issuance registered) and any other principal are revoked in the
/// PKI and the broker policy only.
pub fn revoke_principal(
    home: &FleetHome,
    store: &mut dyn Store,
    principal: &Principal,
    policy: Policy,
) -> Result<Revoked, OpsError> {
    let pki = home.open_pki()?;
    if let Principal::Device(id) = principal {
        match store.device(id) {
            Ok(_) => return revoke_device_everywhere(home, &pki, store, id, policy),
            Err(RegistryError::UnknownDevice(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let certificates = pki.revoke(principal)?;
    Ok(Revoked {
        certificates,
        device: None,
        dropped_commands: 0,
        policy: refresh(home, &pki, policy)?,
    })
}

/// Revoke one certificate by serial (a lost key while a renewed certificate
/// stays in service). If that leaves a registered device with no usable
/// certificate, the device is revoked in the registry too: a device that
/// cannot connect must not look active, nor keep commands queued forever.
pub fn revoke_serial(
    home: &FleetHome,
    store: &mut dyn Store,
    serial: &str,
    policy: Policy,
) -> Result<Revoked, OpsError> {
    let pki = home.open_pki()?;
    let entry = pki.revoke_serial(serial)?;
    let mut revoked = Revoked {
        certificates: vec![entry.clone()],
        device: None,
        dropped_commands: 0,
        policy: None,
    };
    if let Some(Principal::Device(id)) = entry.principal()
        && usable_certificates(&pki, &entry.cn)? == 0
    {
        match store.device(&id) {
            Ok(d) if d.lifecycle != Lifecycle::Revoked => {
                let (device, dropped) = revoke_in_registry(store, &id)?;
                revoked.device = Some(device);
                revoked.dropped_commands = dropped;
            }
            Ok(d) => revoked.device = Some(d),
            Err(RegistryError::UnknownDevice(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    revoked.policy = refresh(home, &pki, policy)?;
    Ok(revoked)
}

/// What [`revoke_devices`] changed.
#[derive(Debug, Clone, Serialize)]
pub struct RevokedBatch {
    /// Certificates revoked by this call.
    pub certificates: usize,
    /// Devices revoked in the registry by this call.
    pub devices: usize,
    /// Queued commands rejected with them.
    pub dropped_commands: usize,
    pub policy: Option<PolicyRefresh>,
}

/// [`revoke`] for many registered devices at once (the fleet simulator's
/// cleanup, a decommissioned batch): the same steps in the same order, PKI
/// first (every usable certificate of every device, in one CRL update), then
/// each registry row, then one broker policy refresh for all of them instead
/// of one per device. It rolls forward like [`revoke`]: after an error,
/// running it again completes it (devices already revoked everywhere are
/// skipped, not refused).
pub fn revoke_devices(
    home: &FleetHome,
    store: &mut dyn Store,
    ids: &[DeviceId],
    policy: Policy,
) -> Result<RevokedBatch, OpsError> {
    let pki = home.open_pki()?;
    let now = time::OffsetDateTime::now_utc();
    let wanted: std::collections::BTreeSet<&str> = ids.iter().map(DeviceId::as_str).collect();
    let serials: Vec<String> = pki
        .inventory()?
        .entries
        .iter()
        .filter(|e| e.role == "device" && e.is_active(now) && wanted.contains(e.cn.as_str()))
        .map(|e| e.serial.clone())
        .collect();
    let certificates = if serials.is_empty() {
        0
    } else {
        pki.revoke_serials(&serials)?.len()
    };
    let mut devices = 0;
    let mut dropped_commands = 0;
    for id in ids {
        let current = match store.device(id) {
            Ok(d) => d,
            Err(RegistryError::UnknownDevice(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        if current.lifecycle != Lifecycle::Revoked {
            let (_, dropped) = revoke_in_registry(store, id)?;
            devices += 1;
            dropped_commands += dropped;
        }
    }
    Ok(RevokedBatch {
        certificates,
        devices,
        dropped_commands,
        policy: refresh(home, &pki, policy)?,
    })
}

fn revoke_device_everywhere(
    home: &FleetHome,
    pki: &Pki,
    store: &mut dyn Store,
    id: &DeviceId,
    policy: Policy,
) -> Result<Revoked, OpsError> {
    let certificates = match pki.revoke(&Principal::Device(id.clone())) {
        Ok(c) => c,
        // Registered without a certificate in this PKI (an imported registry):
        // still revoke it in the registry.
        Err(edgebind_certs::Error::UnknownPrincipal { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let step = |what: &'static str| {
        move |e: OpsError| OpsError::RevocationIncomplete {
            id: id.clone(),
            done: what,
            cause: Box::new(e),
        }
    };
    let current = store
        .device(id)
        .map_err(|e| step("its certificates are revoked")(e.into()))?;
    let (device, dropped_commands) = if current.lifecycle == Lifecycle::Revoked {
        (current, 0)
    } else {
        revoke_in_registry(store, id).map_err(|e| step("its certificates are revoked")(e.into()))?
    };
    let policy = refresh(home, pki, policy)
        .map_err(step("its certificates and its registry entry are revoked"))?;
    Ok(Revoked {
        certificates,
        device: Some(device),
        dropped_commands,
        policy,
    })
}

fn revoke_in_registry(
    store: &mut dyn Store,
    id: &DeviceId,
) -> Result<(Device, usize), RegistryError> {
    let queued = store.queued_for(id)?.len();
    let device = store.revoke(id)?;
    Ok((device, queued))
}

fn refresh(home: &FleetHome, pki: &Pki, policy: Policy) -> Result<Option<PolicyRefresh>, OpsError> {
    match policy {
        Policy::Refresh => refresh_broker_policy(home, pki).map(Some),
        Policy::Leave => Ok(None),
    }
}

/// Certificates of `cn` that are neither revoked nor expired.
fn usable_certificates(pki: &Pki, cn: &str) -> Result<usize, OpsError> {
    let now = time::OffsetDateTime::now_utc();
    Ok(pki
        .inventory()?
        .by_cn(cn)
        .filter(|e| e.role == "device" && e.is_active(now))
        .count())
}
