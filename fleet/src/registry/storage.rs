//! What a registry backend implements: transactions that store and load
//! plain values. Nothing here decides anything; the operations in
//! `operations.rs` load what a rule needs, ask [`super::rules`], and store
//! the answer, the same way on every backend.

use std::collections::HashMap;

use edgebind_protocol::messages::{Action, Desired, Event, UnixSeconds};
use edgebind_protocol::{CommandId, DeviceId};
use serde_json::{Map, Value};

use edgebind_protocol::UnitSerial;

use super::Lifecycle;
use super::{
    AuditEntry, CertInfo, ClaimSerial, CommandQuery, CommandRecord, Device, DeviceQuery,
    DeviceState, EventRow, History, LoginCode, ManufacturingRecord, NewDevice, OnConnectRule,
    PresenceChange, ReportedState, Result, Retention, Stats, TelemetryRow,
};

/// One telemetry sample to append; `payload` is the JSON text as received.
#[derive(Debug, Clone, Copy)]
pub struct NewSample<'a> {
    pub device: &'a DeviceId,
    pub ts: UnixSeconds,
    pub received_at: UnixSeconds,
    pub payload: &'a str,
    /// [`super::rules::content_digest`] of the payload.
    pub digest: [u8; 16],
}

/// A device's newest sample of a batch, and how many the batch held.
#[derive(Debug, Clone, Copy)]
pub struct LatestSample<'a> {
    pub device: &'a DeviceId,
    pub ts: UnixSeconds,
    pub payload: &'a str,
    pub added: u64,
}

/// One device event to append.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub device: &'a DeviceId,
    pub event: &'a Event,
    pub received_at: UnixSeconds,
    /// [`super::rules::content_digest`] of kind and message.
    pub digest: [u8; 16],
}

/// A registry backend: a database the operations run transactions on.
pub trait Storage: Send {
    /// Where the registry lives (a file, or a URL without its password), for errors.
    fn location(&self) -> &str;
    fn retention(&self) -> Retention;
    /// A consistent snapshot for reading.
    fn read(&self) -> Result<Box<dyn StorageTx + '_>>;
    /// A transaction that writes. While it is open, rows it loaded stay as
    /// it saw them: no other writer changes them before it commits (SQLite
    /// admits one writer at a time, PostgreSQL locks the rows it loads).
    fn write(&mut self) -> Result<Box<dyn StorageTx + '_>>;
}

/// One transaction. Dropping it without [`StorageTx::commit`] rolls back.
pub trait StorageTx {
    fn commit(self: Box<Self>) -> Result<()>;

    fn device(&mut self, id: &DeviceId) -> Result<Option<Device>>;
    /// Those of `ids` that are registered.
    fn existing(&mut self, ids: &[DeviceId]) -> Result<Vec<DeviceId>>;
    /// Lifecycle and presence of the registered ones of `ids`.
    fn states(&mut self, ids: &[DeviceId]) -> Result<HashMap<DeviceId, DeviceState>>;
    /// Devices matching `query` (its `limit` ignored), sorted by id, at most `limit`.
    fn list(&mut self, query: &DeviceQuery, limit: Option<u32>) -> Result<Vec<Device>>;
    fn insert_devices(&mut self, devices: &[NewDevice], at: UnixSeconds) -> Result<()>;
    /// False when the device is not registered.
    fn save_certificate(&mut self, id: &DeviceId, cert: &CertInfo) -> Result<bool>;
    fn save_state(&mut self, id: &DeviceId, state: &DeviceState) -> Result<()>;
    fn save_desired(&mut self, id: &DeviceId, desired: &Desired) -> Result<()>;
    fn save_desired_published(&mut self, id: &DeviceId, revision: u64) -> Result<()>;
    /// Devices whose desired revision is newer than the published one, by id.
    fn unpublished_desired(&mut self) -> Result<Vec<(DeviceId, Desired)>>;
    fn save_reported(&mut self, id: &DeviceId, reported: &ReportedState) -> Result<()>;
    fn save_inventory(&mut self, id: &DeviceId, inventory: &Value, at: UnixSeconds) -> Result<()>;
    /// The latest sample as the device's current telemetry, and `added` more
    /// samples counted; returns the count received after the update (0 for
    /// an unknown id).
    fn save_latest_telemetry(
        &mut self,
        id: &DeviceId,
        ts: UnixSeconds,
        payload: &str,
        added: u64,
    ) -> Result<u64>;
    /// Append samples in the order given (one statement on a server: a batch
    /// is thousands of samples), skipping any whose (device, ts, digest) is
    /// already stored. Says for each sample whether it was stored.
    fn insert_telemetry(&mut self, samples: &[NewSample<'_>]) -> Result<Vec<bool>>;
    /// Like [`StorageTx::insert_telemetry`].
    fn insert_events(&mut self, events: &[NewEvent<'_>]) -> Result<Vec<bool>>;
    /// Append one connection change of a device.
    fn insert_presence(&mut self, id: &DeviceId, change: &PresenceChange) -> Result<()>;
    /// Keep only the newest `keep` entries of one device's `history`.
    fn prune(&mut self, history: History, id: &DeviceId, keep: u32) -> Result<()>;

    // What a batch stores for every device it touched. One call each per
    // batch, so that a server backend can make each one statement.

    fn save_states(&mut self, states: &[(&DeviceId, &DeviceState)]) -> Result<()> {
        states.iter().try_for_each(|(id, s)| self.save_state(id, s))
    }
    /// Returns, in the order of `latest`, each device's count of samples
    /// received after the update (registered devices only: an unknown id
    /// gets 0).
    fn save_latest_telemetry_of(&mut self, latest: &[LatestSample<'_>]) -> Result<Vec<u64>> {
        latest
            .iter()
            .map(|l| self.save_latest_telemetry(l.device, l.ts, l.payload, l.added))
            .collect()
    }
    fn prune_each(&mut self, history: History, ids: &[&DeviceId], keep: u32) -> Result<()> {
        ids.iter().try_for_each(|id| self.prune(history, id, keep))
    }
    fn telemetry(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<TelemetryRow>>;
    fn events(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<EventRow>>;
    /// Latest first.
    fn presence_history(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<PresenceChange>>;

    fn command(&mut self, id: &CommandId) -> Result<Option<CommandRecord>>;
    fn commands(&mut self, query: CommandQuery<'_>) -> Result<Vec<CommandRecord>>;
    /// Fails with [`super::RegistryError::DuplicateCommand`] if the id is taken.
    fn insert_command(&mut self, command: &CommandRecord) -> Result<()>;
    /// Store every mutable field of an existing command.
    fn save_command(&mut self, command: &CommandRecord) -> Result<()>;

    fn insert_rule(
        &mut self,
        device: &DeviceId,
        action: Action,
        args: &Map<String, Value>,
        at: UnixSeconds,
    ) -> Result<i64>;
    fn rules(&mut self, device: &DeviceId) -> Result<Vec<OnConnectRule>>;
    /// False when there was no such rule.
    fn delete_rule(&mut self, rule: i64) -> Result<bool>;
    fn delete_rules_of(&mut self, device: &DeviceId) -> Result<()>;

    fn stats(&mut self) -> Result<Stats>;

    fn save_service(&mut self, presence: &super::ServicePresence) -> Result<()>;

    /// Take the lease `key` for `holder` until `until` if it is free, expired
    /// (its `until` is before `now`) or already `holder`'s. True when taken.
    fn take_lease(
        &mut self,
        key: &str,
        holder: &str,
        now: UnixSeconds,
        until: UnixSeconds,
    ) -> Result<bool>;
    /// Forget leases that expired before `before`.
    fn purge_leases(&mut self, before: UnixSeconds) -> Result<()>;
    fn services(&mut self) -> Result<Vec<super::ServicePresence>>;

    /// The record of a unit serial.
    fn manufacturing(&mut self, serial: &str) -> Result<Option<ManufacturingRecord>>;
    /// The record naming `device`.
    fn manufacturing_of(&mut self, device: &DeviceId) -> Result<Option<ManufacturingRecord>>;
    /// Every record, by unit serial.
    fn manufacturing_all(&mut self) -> Result<Vec<ManufacturingRecord>>;
    /// Insert the record of its serial, or replace it.
    fn save_manufacturing(&mut self, record: &ManufacturingRecord) -> Result<()>;

    /// A serial's allow-list entry (locked for the transaction when writing).
    fn claim_serial(&mut self, serial: &UnitSerial) -> Result<Option<ClaimSerial>>;
    /// A batch's allow-list, by serial.
    fn claim_serials(&mut self, batch: &DeviceId) -> Result<Vec<ClaimSerial>>;
    /// Insert an allow-list entry or replace it.
    fn save_claim_serial(&mut self, entry: &ClaimSerial) -> Result<()>;

    fn insert_login_code(&mut self, code: &LoginCode) -> Result<()>;
    /// The code with this hash (locked for the rest of a write transaction).
    fn login_code(&mut self, hash: &str) -> Result<Option<LoginCode>>;
    fn save_login_code_used(&mut self, hash: &str, at: UnixSeconds) -> Result<()>;

    fn insert_audit(&mut self, entry: &AuditEntry) -> Result<i64>;
    fn audit(&mut self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>>;
    /// The certificate records of a device, oldest first (locked for the
    /// rest of a write transaction).
    fn cert_records(&mut self, device: &DeviceId) -> Result<Vec<super::CertRecord>>;
    /// Insert a certificate record or replace the one with its serial.
    fn save_cert_record(&mut self, record: &super::CertRecord) -> Result<()>;
    /// Records in `state` superseded before `before`, oldest first.
    fn cert_records_superseded(
        &mut self,
        state: super::CertState,
        before: UnixSeconds,
    ) -> Result<Vec<super::CertRecord>>;
    /// The record with this serial.
    fn cert_record(&mut self, serial: &str) -> Result<Option<super::CertRecord>>;

    /// (lifecycle, online, count) of every device.
    fn presence_counts(&mut self) -> Result<Vec<(Lifecycle, bool, u64)>>;
    /// Non-revoked devices whose certificate expires before `before`, and
    /// those whose desired revision is newer than the reported one.
    fn attention_counts(&mut self, before: UnixSeconds) -> Result<(u64, u64)>;
}
