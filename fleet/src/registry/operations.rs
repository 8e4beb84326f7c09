//! The [`Store`] operations, written once for every backend: each one opens
//! a transaction, loads what the rule needs, lets [`rules`] decide, stores
//! the outcome and commits. An error anywhere drops the transaction, so a
//! failed call changes nothing.

use std::collections::{BTreeSet, HashMap};

use edgebind_protocol::messages::{Action, Desired, UnixSeconds, now_unix};
use edgebind_protocol::{CommandId, DeviceId, UnitSerial};
use serde_json::{Map, Value};

use super::storage::{LatestSample, NewEvent, NewSample, Storage, StorageTx};
use super::*;

fn located<T>(storage: &impl Storage, r: Result<T>) -> Result<T> {
    r.map_err(|e| e.located(storage.location()))
}

fn read<S: Storage, T>(s: &S, f: impl FnOnce(&mut dyn StorageTx) -> Result<T>) -> Result<T> {
    let r = s.read().and_then(|mut tx| {
        let out = f(tx.as_mut())?;
        // A read snapshot has nothing to keep; ending it cleanly frees it at once.
        tx.commit()?;
        Ok(out)
    });
    located(s, r)
}

fn write<S: Storage, T>(s: &mut S, f: impl FnOnce(&mut dyn StorageTx) -> Result<T>) -> Result<T> {
    let r = s.write().and_then(|mut tx| {
        let out = f(tx.as_mut())?;
        tx.commit()?;
        Ok(out)
    });
    located(s, r)
}

/// A device's certificate history; a device whose certificate predates
/// the history (or was replaced outside it) gets a current record made
/// from its row, so the history always ends at what the row says.
fn history_of(tx: &mut dyn StorageTx, device: &Device) -> Result<Vec<CertRecord>> {
    let mut history = tx.cert_records(&device.id)?;
    if let Some(cert) = &device.cert
        && !history.iter().any(|r| r.serial == cert.serial)
    {
        let mut record = CertRecord::from_device(
            &device.id,
            cert,
            device.provisioned_at.unwrap_or(device.registered_at),
        );
        if let Some(last) = history.iter().map(|r| r.issued_at).max() {
            // Replaced by hand (`device reissue`, `pki bundle`) since.
            record.origin = CertOrigin::Reissued;
            record.issued_at = record.issued_at.max(last);
        }
        for r in history.iter_mut().filter(|r| r.state == CertState::Current) {
            r.state = CertState::Replaced;
        }
        history.push(record);
    }
    Ok(history)
}

fn load(tx: &mut dyn StorageTx, id: &DeviceId) -> Result<Device> {
    tx.device(id)?
        .ok_or_else(|| RegistryError::UnknownDevice(id.clone()))
}

fn require(tx: &mut dyn StorageTx, id: &DeviceId) -> Result<()> {
    if tx.existing(std::slice::from_ref(id))?.is_empty() {
        return Err(RegistryError::UnknownDevice(id.clone()));
    }
    Ok(())
}

/// Per-device outcome of a batch, stored once at its end.
struct Touched {
    state: DeviceState,
    changed: bool,
    latest_telemetry: Option<(UnixSeconds, String)>,
    telemetry_added: u64,
    events_added: bool,
}

impl<S: Storage> Store for S {
    fn location(&self) -> String {
        Storage::location(self).to_owned()
    }

    fn check_new_device(&self, id: &DeviceId) -> Result<()> {
        read(self, |tx| {
            rules::check_new_devices(&[], &tx.existing(std::slice::from_ref(id))?)
        })
    }

    fn add_device(&mut self, new: &NewDevice) -> Result<Device> {
        let now = now_unix();
        write(self, |tx| {
            let batch = std::slice::from_ref(new);
            rules::check_new_devices(batch, &tx.existing(std::slice::from_ref(&new.id))?)?;
            tx.insert_devices(batch, now)?;
            load(tx, &new.id)
        })
    }

    fn add_devices(&mut self, new: &[NewDevice]) -> Result<()> {
        let now = now_unix();
        write(self, |tx| {
            let ids: Vec<DeviceId> = new.iter().map(|d| d.id.clone()).collect();
            rules::check_new_devices(new, &tx.existing(&ids)?)?;
            tx.insert_devices(new, now)
        })
    }

    fn set_certificate(&mut self, id: &DeviceId, cert: &CertInfo) -> Result<()> {
        write(self, |tx| {
            if !tx.save_certificate(id, cert)? {
                return Err(RegistryError::UnknownDevice(id.clone()));
            }
            Ok(())
        })
    }

    fn device(&self, id: &DeviceId) -> Result<Device> {
        read(self, |tx| load(tx, id))
    }

    fn devices(&self, selector: &Selector) -> Result<Vec<Device>> {
        read(self, |tx| match selector {
            Selector::All => tx.list(&DeviceQuery::default(), None),
            Selector::Tag(tag) => tx.list(
                &DeviceQuery {
                    tag: Some(tag.clone()),
                    ..DeviceQuery::default()
                },
                None,
            ),
            Selector::Ids(ids) => {
                let sorted: BTreeSet<&DeviceId> = ids.iter().collect();
                sorted.into_iter().map(|id| load(tx, id)).collect()
            }
        })
    }

    fn list_devices(&self, query: &DeviceQuery) -> Result<DevicePage> {
        if query.limit == 0 || query.limit > MAX_PAGE {
            return Err(RegistryError::InvalidQuery(format!(
                "a page holds 1 to {MAX_PAGE} devices, not {}",
                query.limit
            )));
        }
        read(self, |tx| {
            // One more than asked tells whether another page follows.
            let mut devices = tx.list(query, Some(query.limit + 1))?;
            let next_after = if devices.len() > query.limit as usize {
                devices.truncate(query.limit as usize);
                devices.last().map(|d| d.id.clone())
            } else {
                None
            };
            Ok(DevicePage {
                devices,
                next_after,
            })
        })
    }

    fn revoke(&mut self, id: &DeviceId) -> Result<Device> {
        let now = now_unix();
        write(self, |tx| {
            let device = load(tx, id)?;
            tx.save_state(id, &rules::revoke(&device, now)?)?;
            for queued in tx.commands(CommandQuery::QueuedFor(id))? {
                if let Some(rejected) = rules::reject_for_revocation(&queued, now) {
                    tx.save_command(&rejected)?;
                }
            }
            tx.delete_rules_of(id)?;
            load(tx, id)
        })
    }

    fn set_desired(&mut self, id: &DeviceId, changes: &Map<String, Value>) -> Result<Desired> {
        for key in changes.keys() {
            validate_setting_key(key)?;
        }
        write(self, |tx| {
            let desired = rules::merge_desired(&load(tx, id)?, changes)?;
            tx.save_desired(id, &desired)?;
            Ok(desired)
        })
    }

    fn unpublished_desired(&self) -> Result<Vec<(DeviceId, Desired)>> {
        read(self, |tx| tx.unpublished_desired())
    }

    fn mark_desired_published(&mut self, id: &DeviceId, revision: u64) -> Result<()> {
        write(self, |tx| {
            let device = load(tx, id)?;
            tx.save_desired_published(id, rules::published_revision(&device, revision))
        })
    }

    fn insert_commands(&mut self, commands: &[NewCommand]) -> Result<()> {
        let now = now_unix();
        let keep = self.retention().commands_per_device;
        write(self, |tx| {
            let mut checked: BTreeSet<&DeviceId> = BTreeSet::new();
            for c in commands {
                if checked.insert(&c.device) {
                    rules::ensure_active(&load(tx, &c.device)?)?;
                }
                if tx.command(&c.id)?.is_some() {
                    return Err(RegistryError::DuplicateCommand(c.id.clone()));
                }
                tx.insert_command(&rules::new_command(c, now))?;
            }
            for device in checked {
                tx.prune(History::Commands, device, keep)?;
            }
            Ok(())
        })
    }

    fn command(&self, id: &CommandId) -> Result<CommandRecord> {
        read(self, |tx| {
            tx.command(id)?
                .ok_or_else(|| RegistryError::UnknownCommand(id.clone()))
        })
    }

    fn commands_for(&self, device: &DeviceId, limit: u32) -> Result<Vec<CommandRecord>> {
        read(self, |tx| {
            require(tx, device)?;
            tx.commands(CommandQuery::Device { device, limit })
        })
    }

    fn deliverable_queued(&self) -> Result<Vec<CommandRecord>> {
        read(self, |tx| tx.commands(CommandQuery::QueuedOnline))
    }

    fn queued_for(&self, device: &DeviceId) -> Result<Vec<CommandRecord>> {
        read(self, |tx| tx.commands(CommandQuery::QueuedFor(device)))
    }

    fn mark_sent(&mut self, ids: &[CommandId], at: UnixSeconds) -> Result<()> {
        write(self, |tx| {
            for id in ids {
                if let Some(sent) = tx.command(id)?.and_then(|c| rules::mark_sent(&c, at)) {
                    tx.save_command(&sent)?;
                }
            }
            Ok(())
        })
    }

    fn add_on_connect(
        &mut self,
        device: &DeviceId,
        action: Action,
        args: &Map<String, Value>,
    ) -> Result<OnConnectRule> {
        let now = now_unix();
        write(self, |tx| {
            rules::ensure_active(&load(tx, device)?)?;
            let id = tx.insert_rule(device, action.clone(), args, now)?;
            Ok(OnConnectRule {
                id,
                device: device.clone(),
                action: action.clone(),
                args: args.clone(),
                created_at: now,
            })
        })
    }

    fn on_connect_rules(&self, device: &DeviceId) -> Result<Vec<OnConnectRule>> {
        read(self, |tx| {
            require(tx, device)?;
            tx.rules(device)
        })
    }

    fn remove_on_connect(&mut self, rule: i64) -> Result<()> {
        write(self, |tx| {
            if !tx.delete_rule(rule)? {
                return Err(RegistryError::UnknownRule(rule));
            }
            Ok(())
        })
    }

    fn apply_with(&mut self, batch: &[Update], policy: &ConnectPolicy) -> Result<BatchReport> {
        let retention = self.retention();
        write(self, |tx| {
            let ids: Vec<DeviceId> = batch
                .iter()
                .map(|u| u.device().clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut touched: HashMap<DeviceId, Touched> = tx
                .states(&ids)?
                .into_iter()
                .map(|(id, state)| {
                    let t = Touched {
                        state,
                        changed: false,
                        latest_telemetry: None,
                        telemetry_added: 0,
                        events_added: false,
                    };
                    (id, t)
                })
                .collect();
            let mut report = BatchReport::default();
            let mut pruned_commands: BTreeSet<DeviceId> = BTreeSet::new();
            let mut presence_changed: BTreeSet<DeviceId> = BTreeSet::new();
            let mut samples = Vec::new();
            let mut events = Vec::new();
            for update in batch {
                let device = update.device();
                let Some(t) = touched.get_mut(device) else {
                    report.unknown_devices.insert(device.clone());
                    continue;
                };
                let before = t.state.clone();
                match update {
                    Update::Status {
                        status,
                        received_at,
                        ..
                    } => {
                        let (next, new_connection) =
                            rules::on_status(&t.state, status, *received_at);
                        if let Some(change) =
                            rules::presence_change(&t.state, &next, new_connection, *received_at)
                        {
                            tx.insert_presence(device, &change)?;
                            presence_changed.insert(device.clone());
                        }
                        if new_connection && next.lifecycle != Lifecycle::Revoked {
                            let connected_at = next.connected_at.unwrap_or(*received_at);
                            let queued = rules::on_connect_commands(
                                device,
                                connected_at,
                                &rules::connection_name(status, connected_at),
                                &tx.rules(device)?,
                                policy,
                            );
                            for c in &queued {
                                // Already there: this connection was applied before.
                                if tx.command(&c.id)?.is_none() {
                                    tx.insert_command(&rules::new_command(c, *received_at))?;
                                    report.queued_on_connect += 1;
                                }
                            }
                            if !queued.is_empty() {
                                pruned_commands.insert(device.clone());
                            }
                        }
                        t.state = next;
                        if new_connection {
                            report.connected.push(device.clone());
                        }
                    }
                    Update::Telemetry {
                        ts,
                        payload,
                        received_at,
                        ..
                    } => {
                        samples.push(NewSample {
                            device,
                            ts: *ts,
                            received_at: *received_at,
                            payload,
                            digest: rules::content_digest(&[payload.as_bytes()]),
                        });
                        t.state = rules::heard_from(&t.state, *received_at);
                    }
                    Update::Event {
                        event, received_at, ..
                    } => {
                        events.push(NewEvent {
                            device,
                            event,
                            received_at: *received_at,
                            digest: rules::content_digest(&[
                                event.kind.as_bytes(),
                                event.message.as_bytes(),
                            ]),
                        });
                        t.state = rules::heard_from(&t.state, *received_at);
                    }
                    Update::Reported {
                        reported,
                        received_at,
                        ..
                    } => {
                        let stored = ReportedState {
                            revision: reported.revision,
                            applied: reported.applied.clone(),
                            ignored: reported.ignored.clone(),
                            at: reported.ts,
                        };
                        tx.save_reported(device, &stored)?;
                        t.state = rules::heard_from(&t.state, *received_at);
                    }
                    Update::CommandSeen {
                        command,
                        received_at,
                        ..
                    } => {
                        let existing = tx.command(&command.id)?;
                        let seen =
                            rules::command_seen(existing.as_ref(), device, command, *received_at);
                        match (seen, existing) {
                            (Some(c), None) => tx.insert_command(&c)?,
                            (Some(c), Some(_)) => tx.save_command(&c)?,
                            (None, _) => {}
                        }
                    }
                    Update::CommandResult {
                        result,
                        received_at,
                        ..
                    } => {
                        t.state = rules::heard_from(&t.state, *received_at);
                        let existing = tx.command(&result.id)?;
                        let effect =
                            rules::command_result(existing.as_ref(), device, result, *received_at);
                        match (&effect.command, effect.new_entry) {
                            (Some(c), true) => tx.insert_command(c)?,
                            (Some(c), false) => tx.save_command(c)?,
                            (None, _) => {}
                        }
                        if let Some(inventory) = &effect.inventory {
                            tx.save_inventory(device, inventory, *received_at)?;
                        }
                    }
                }
                t.changed |= t.state != before;
                report.applied += 1;
            }
            // Appended before pruning, so the cap counts this batch too.
            // Only what was not stored before counts (and becomes current).
            if !samples.is_empty() {
                let stored = tx.insert_telemetry(&samples)?;
                for (sample, stored) in samples.iter().zip(stored) {
                    if !stored {
                        report.duplicates += 1;
                        report.duplicate_telemetry += 1;
                        continue;
                    }
                    if let Some(t) = touched.get_mut(sample.device) {
                        t.latest_telemetry = Some((sample.ts, sample.payload.to_owned()));
                        t.telemetry_added += 1;
                    }
                }
            }
            if !events.is_empty() {
                let stored = tx.insert_events(&events)?;
                for (event, stored) in events.iter().zip(stored) {
                    if !stored {
                        report.duplicates += 1;
                        report.duplicate_events += 1;
                    } else if let Some(t) = touched.get_mut(event.device) {
                        t.events_added = true;
                    }
                }
            }
            for device in &pruned_commands {
                tx.prune(History::Commands, device, retention.commands_per_device)?;
            }
            for device in &presence_changed {
                tx.prune(History::Presence, device, PRESENCE_PER_DEVICE)?;
            }
            // In id order: the same order the rows were locked in.
            let mut touched: Vec<(&DeviceId, &Touched)> = touched.iter().collect();
            touched.sort_by_key(|(id, _)| *id);
            let states: Vec<(&DeviceId, &DeviceState)> = touched
                .iter()
                .filter(|(_, t)| t.changed)
                .map(|(id, t)| (*id, &t.state))
                .collect();
            let latest: Vec<LatestSample<'_>> = touched
                .iter()
                .filter_map(|(id, t)| {
                    let (ts, payload) = t.latest_telemetry.as_ref()?;
                    Some(LatestSample {
                        device: id,
                        ts: *ts,
                        payload,
                        added: t.telemetry_added,
                    })
                })
                .collect();
            let with_events: Vec<&DeviceId> = touched
                .iter()
                .filter(|(_, t)| t.events_added)
                .map(|(id, _)| *id)
                .collect();
            if !states.is_empty() {
                tx.save_states(&states)?;
            }
            if !latest.is_empty() {
                let totals = tx.save_latest_telemetry_of(&latest)?;
                let keep = retention.telemetry_per_device;
                let ids: Vec<&DeviceId> = latest
                    .iter()
                    .zip(totals)
                    .filter(|(l, total)| rules::telemetry_trim_due(*total, l.added, keep))
                    .map(|(l, _)| l.device)
                    .collect();
                if !ids.is_empty() {
                    tx.prune_each(History::Telemetry, &ids, keep)?;
                }
            }
            if !with_events.is_empty() {
                tx.prune_each(History::Events, &with_events, retention.events_per_device)?;
            }
            Ok(report)
        })
    }

    fn telemetry_history(&self, device: &DeviceId, limit: u32) -> Result<Vec<TelemetryRow>> {
        read(self, |tx| {
            require(tx, device)?;
            tx.telemetry(device, limit)
        })
    }

    fn events(&self, device: &DeviceId, limit: u32) -> Result<Vec<EventRow>> {
        read(self, |tx| {
            require(tx, device)?;
            tx.events(device, limit)
        })
    }

    fn presence_history(&self, device: &DeviceId, limit: u32) -> Result<Vec<PresenceChange>> {
        read(self, |tx| {
            require(tx, device)?;
            tx.presence_history(device, limit)
        })
    }

    fn stats(&self) -> Result<Stats> {
        read(self, |tx| tx.stats())
    }

    fn record_service(&mut self, presence: &ServicePresence) -> Result<()> {
        let mut tx = self.write()?;
        tx.save_service(presence)?;
        tx.commit()
    }

    fn services(&self) -> Result<Vec<ServicePresence>> {
        read(self, |tx| tx.services())
    }

    fn claim(&mut self, key: &str, holder: &str, ttl_s: u64) -> Result<bool> {
        let now = now_unix();
        write(self, |tx| {
            let taken = tx.take_lease(key, holder, now, now + ttl_s.max(1))?;
            // Expired claims are only history: drop them now and then.
            if taken && rand::random::<u8>() == 0 {
                tx.purge_leases(now.saturating_sub(3600))?;
            }
            Ok(taken)
        })
    }

    fn manufacturing_record(&self, serial: &str) -> Result<Option<ManufacturingRecord>> {
        read(self, |tx| tx.manufacturing(serial))
    }

    fn manufacturing_records(&self) -> Result<Vec<ManufacturingRecord>> {
        read(self, |tx| tx.manufacturing_all())
    }

    fn add_manufactured(
        &mut self,
        device: &NewDevice,
        record: &ManufacturingRecord,
    ) -> Result<Device> {
        let now = now_unix();
        write(self, |tx| {
            let existing_record = tx.manufacturing(&record.serial)?;
            let existing_device = tx.device(&device.id)?;
            rules::check_new_unit(record, existing_record.as_ref(), existing_device.as_ref())?;
            tx.insert_devices(std::slice::from_ref(device), now)?;
            tx.save_manufacturing(record)?;
            load(tx, &device.id)
        })
    }

    fn record_reissue(&mut self, record: &ManufacturingRecord, cert: &CertInfo) -> Result<()> {
        write(self, |tx| {
            let existing = tx.manufacturing(&record.serial)?;
            let device = load(tx, &record.device)?;
            rules::check_reissue(record, existing.as_ref(), &device)?;
            tx.save_certificate(&record.device, cert)?;
            tx.save_manufacturing(record)
        })
    }

    fn import_manufactured(
        &mut self,
        units: &[(NewDevice, ManufacturingRecord)],
    ) -> Result<ImportReport> {
        let now = now_unix();
        write(self, |tx| {
            let mut report = ImportReport::default();
            let mut serials = BTreeSet::new();
            let mut devices = BTreeSet::new();
            for (new, record) in units {
                // Within the import too, a serial and a device appear once.
                if !serials.insert(record.serial.as_str()) || !devices.insert(&new.id) {
                    return Err(RegistryError::ManufacturingConflict {
                        serial: record.serial.clone(),
                        why: format!(
                            "the import lists this unit serial or device {} twice",
                            new.id
                        ),
                    });
                }
                let existing_record = tx.manufacturing(&record.serial)?;
                let existing_device = tx.device(&new.id)?;
                let of_device = tx.manufacturing_of(&new.id)?;
                match rules::import_step(
                    new,
                    record,
                    existing_record.as_ref(),
                    existing_device.as_ref(),
                    of_device.as_ref(),
                )? {
                    rules::ImportStep::DeviceAndRecord => {
                        tx.insert_devices(std::slice::from_ref(new), now)?;
                        tx.save_manufacturing(record)?;
                        report.added.push(record.serial.clone());
                    }
                    rules::ImportStep::RecordOnly => {
                        tx.save_manufacturing(record)?;
                        report.recorded.push(record.serial.clone());
                    }
                    rules::ImportStep::Nothing => report.unchanged.push(record.serial.clone()),
                }
            }
            Ok(report)
        })
    }

    fn allow_serials(&mut self, batch: &DeviceId, serials: &[UnitSerial]) -> Result<AllowReport> {
        let now = now_unix();
        write(self, |tx| {
            let mut report = AllowReport::default();
            let mut seen = BTreeSet::new();
            for serial in serials {
                if !seen.insert(serial) {
                    continue;
                }
                match tx.claim_serial(serial)? {
                    Some(entry) if &entry.batch == batch => report.already.push(serial.clone()),
                    Some(entry) => {
                        return Err(RegistryError::OtherBatch {
                            batch: batch.clone(),
                            serial: serial.clone(),
                            other: entry.batch,
                        });
                    }
                    None => {
                        tx.save_claim_serial(&ClaimSerial {
                            serial: serial.clone(),
                            batch: batch.clone(),
                            allowed_at: now,
                            provisioned: None,
                        })?;
                        report.added.push(serial.clone());
                    }
                }
            }
            Ok(report)
        })
    }

    fn claim_serial(&self, serial: &UnitSerial) -> Result<Option<ClaimSerial>> {
        read(self, |tx| tx.claim_serial(serial))
    }

    fn claim_serials(&self, batch: &DeviceId) -> Result<Vec<ClaimSerial>> {
        read(self, |tx| tx.claim_serials(batch))
    }

    fn add_provisioned(
        &mut self,
        device: &NewDevice,
        batch: &DeviceId,
        serial: &UnitSerial,
        unit: &ProvisionedUnit,
    ) -> Result<Device> {
        let now = now_unix();
        write(self, |tx| {
            let entry = tx.claim_serial(serial)?;
            let existing_device = tx.device(&device.id)?;
            rules::check_provision(batch, serial, entry.as_ref(), existing_device.as_ref())?;
            let mut entry = entry.expect("check_provision refuses a missing entry");
            entry.provisioned = Some(unit.clone());
            tx.insert_devices(std::slice::from_ref(device), now)?;
            tx.save_claim_serial(&entry)?;
            load(tx, &device.id)
        })
    }

    fn reprovision(
        &mut self,
        batch: &DeviceId,
        serial: &UnitSerial,
        unit: &ProvisionedUnit,
        record: &CertRecord,
        now: UnixSeconds,
    ) -> Result<Vec<String>> {
        write(self, |tx| {
            let entry = tx.claim_serial(serial)?;
            let device = tx.device(&unit.device)?;
            rules::check_reprovision(
                batch,
                serial,
                entry.as_ref(),
                device.as_ref(),
                &unit.device,
                now,
            )?;
            let mut entry = entry.expect("check_reprovision refuses a missing entry");
            let device = device.expect("check_reprovision refuses a missing device");
            let mut superseded = Vec::new();
            for old in history_of(tx, &device)? {
                // The expired certificate and any renewal never confirmed
                // are done with: the caller revokes them (CRL).
                let old = match old.state {
                    CertState::Current => CertRecord {
                        state: CertState::Retired,
                        superseded_at: Some(now),
                        retired_at: Some(now),
                        ..old
                    },
                    CertState::Pending => CertRecord {
                        state: CertState::Abandoned,
                        ..old
                    },
                    _ => {
                        tx.save_cert_record(&old)?;
                        continue;
                    }
                };
                superseded.push(old.serial.clone());
                tx.save_cert_record(&old)?;
            }
            tx.save_cert_record(&CertRecord {
                state: CertState::Current,
                origin: CertOrigin::Reprovisioned,
                ..record.clone()
            })?;
            tx.save_certificate(&device.id, &record.info())?;
            entry.provisioned = Some(unit.clone());
            tx.save_claim_serial(&entry)?;
            Ok(superseded)
        })
    }

    fn add_login_code(&mut self, code: &LoginCode) -> Result<()> {
        write(self, |tx| tx.insert_login_code(code))
    }

    fn redeem_login_code(&mut self, hash: &str, now: UnixSeconds) -> Result<String> {
        write(self, |tx| {
            let code = tx.login_code(hash)?;
            let operator = rules::check_login_code(code.as_ref(), now)?;
            tx.save_login_code_used(hash, now)?;
            Ok(operator)
        })
    }

    fn record_audit(&mut self, entry: &AuditEntry) -> Result<i64> {
        write(self, |tx| tx.insert_audit(entry))
    }

    fn audit_log(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        read(self, |tx| tx.audit(limit.clamp(1, MAX_PAGE), before))
    }

    fn cert_history(&self, id: &DeviceId) -> Result<Vec<CertRecord>> {
        read(self, |tx| {
            let device = load(tx, id)?;
            history_of(tx, &device)
        })
    }

    fn record_renewal(&mut self, record: &CertRecord) -> Result<Vec<String>> {
        write(self, |tx| {
            let device = load(tx, &record.device)?;
            if device.lifecycle == Lifecycle::Revoked {
                return Err(RegistryError::Revoked(device.id));
            }
            let history = history_of(tx, &device)?;
            let mut abandoned = Vec::new();
            for old in history {
                // The row made from the device (no history before) is stored
                // now, so the history starts with the certificate renewed.
                if old.state == CertState::Pending {
                    abandoned.push(old.serial.clone());
                    tx.save_cert_record(&CertRecord {
                        state: CertState::Abandoned,
                        ..old
                    })?;
                } else {
                    tx.save_cert_record(&old)?;
                }
            }
            tx.save_cert_record(&CertRecord {
                state: CertState::Pending,
                ..record.clone()
            })?;
            Ok(abandoned)
        })
    }

    fn confirm_certificate(
        &mut self,
        id: &DeviceId,
        serial: &str,
        now: UnixSeconds,
    ) -> Result<Vec<CertRecord>> {
        write(self, |tx| {
            let device = load(tx, id)?;
            if device.lifecycle == Lifecycle::Revoked {
                return Err(RegistryError::Revoked(device.id));
            }
            let history = history_of(tx, &device)?;
            let changed = cert_history::confirm_step(id, &history, serial, now)?;
            for r in &changed {
                tx.save_cert_record(r)?;
                if r.state == CertState::Current {
                    tx.save_certificate(id, &r.info())?;
                }
            }
            Ok(changed)
        })
    }

    fn due_retirements(&self, superseded_before: UnixSeconds) -> Result<Vec<CertRecord>> {
        read(self, |tx| {
            tx.cert_records_superseded(CertState::Previous, superseded_before)
        })
    }

    fn mark_retired(&mut self, serials: &[String], at: UnixSeconds) -> Result<()> {
        write(self, |tx| {
            for serial in serials {
                if let Some(r) = tx.cert_record(serial)?
                    && r.state == CertState::Previous
                {
                    tx.save_cert_record(&CertRecord {
                        state: CertState::Retired,
                        retired_at: Some(at),
                        ..r
                    })?;
                }
            }
            Ok(())
        })
    }

    fn overview(&self, expiring_before: UnixSeconds) -> Result<Overview> {
        read(self, |tx| {
            let mut o = Overview::default();
            for (lifecycle, online, n) in tx.presence_counts()? {
                o.add(lifecycle, online, n);
            }
            (o.cert_expiring, o.settings_pending) = tx.attention_counts(expiring_before)?;
            Ok(o)
        })
    }
}
