//! The agent's decisions, without sockets, files or clocks.
//!
//! Every input (a delivered message, the end of an action, a connect) goes
//! in with the current time; a list of [`Effect`]s comes out, to be carried
//! out **in order** by the runtime. Order is the contract: a
//! [`Effect::Record`] must be durable before any later effect of the same
//! batch runs, which is what makes each command id run at most once.
//!
//! Telemetry, events and command results do not go to the connection
//! directly: they enter the outbox ([`crate::outbox::Queue`], owned here), are
//! stored ([`Effect::Store`]), and the runtime sends what
//! [`Core::take_sendable`] hands out while connected; a record leaves the
//! outbox when [`Core::on_delivered`] reports its PUBACK.

use std::collections::HashSet;

use edgebind_protocol::messages::{
    Command, CommandResult, CommandStatus, Desired, Event, Inventory, MAX_COMMAND_BYTES, Presence,
    Reported, Status, Telemetry, UnixSeconds, events,
};
use edgebind_protocol::settings::{self, Setting};
use edgebind_protocol::topics::{Kind, Topic};
use edgebind_protocol::{CommandId, DeviceId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::actions::{ActionSet, Facts, Job, JobOutcome, Plan};
use crate::config::LogLevel;
use crate::journal::{JournalEntry, Ledger};
use crate::outbox::{self, Class, Queue, Record};

/// MQTT delivery guarantee of an outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
    /// Goes through the outbox (and which drop class it has), or straight to
    /// the connection (`None`: retained state that is re-sent on every
    /// connect anyway).
    pub class: Option<Class>,
}

/// Actions the runtime carries out (they touch the world).
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Publish(Outgoing),
    /// Append to the journal durably (fsync) before the next effect runs:
    /// for commands with a side effect (reboot, restart-agent, programs).
    Record(JournalEntry),
    /// Append to the journal without waiting for stable storage: for
    /// outcomes with no side effect (ping, inventory, rejections). A crash of
    /// the agent keeps it (page cache); only a power cut can lose it, and
    /// answering such a command again after that is harmless. Saves an fsync
    /// per ping on flash.
    Note(JournalEntry),
    /// Rewrite the journal file with exactly these entries.
    Compact(Vec<JournalEntry>),
    /// Start the side-effecting part of an action; report back with
    /// [`Core::on_action_done`].
    Run {
        id: CommandId,
        job: Job,
    },
    /// New settings in force (telemetry period, log level).
    Apply(Settings),
    /// Persist the applied desired state so a restart starts with it.
    SaveSettings(SavedSettings),
    /// Leave the process after flushing: `restart-agent`.
    Restart,
    /// A record entered the outbox: append `frames` to the outbox file (the
    /// record, then "gone" frames of any records dropped to make room).
    Store {
        queued: Outgoing,
        frames: Vec<u8>,
    },
    /// Append frames to the outbox file ("gone" frames after PUBACKs).
    StoreFrames(Vec<u8>),
    /// Rewrite the outbox file with exactly these bytes (live records).
    CompactOutbox(Vec<u8>),
}

/// Run-time settings the fleet can change through `desired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub telemetry_interval_s: u64,
    pub log_level: LogLevel,
}

/// The desired state last applied, as saved under the state directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedSettings {
    pub revision: u64,
    pub settings: Map<String, Value>,
}

/// Telemetry periods the fleet may set (same bounds as the config file).
pub use edgebind_protocol::settings::TELEMETRY_INTERVAL_RANGE_S;

/// Facts fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub device: DeviceId,
    pub agent_version: String,
    pub boot_id: String,
    /// Settings from the configuration file; `desired` overrides them.
    pub defaults: Settings,
    /// Collected once at start (it only changes with an update and reboot);
    /// the action list is filled in from `actions`.
    pub inventory: Inventory,
    /// Every action this agent offers.
    pub actions: ActionSet,
}

/// The agent's state machine.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    ledger: Ledger,
    settings: Settings,
    applied_revision: Option<u64>,
    /// Lines in the journal file; compaction once it doubles the ledger.
    journal_lines: usize,
    /// When pruning was last tried (see `maybe_compact`).
    last_prune: UnixSeconds,
    /// Publications awaiting the broker's PUBACK, in order.
    outbox: Queue,
    /// Bytes in the outbox file since it was last compacted.
    outbox_file_bytes: u64,
    connected: bool,
    /// Connections made so far by this process (names each in its `online` status).
    connections: u64,
    /// Commands whose side effect is under way right now.
    running: Vec<CommandId>,
    status_topic: String,
    facts: Facts,
}

impl Core {
    /// Start from the journal, saved settings and outbox found on disk.
    /// Returns the effects of reconciling them with the present boot (to run
    /// before connecting; what they publish waits in the outbox).
    pub fn new(
        cfg: CoreConfig,
        mut ledger: Ledger,
        journal_lines: usize,
        saved: Option<SavedSettings>,
        start: Start,
        now: UnixSeconds,
    ) -> (Core, Vec<Effect>) {
        let status_topic = Topic::Status(cfg.device.clone()).render();
        let mut inventory = cfg.inventory.clone();
        inventory.actions = cfg.actions.specs();
        let facts = Facts {
            agent_version: cfg.agent_version.clone(),
            boot_id: cfg.boot_id.clone(),
            inventory,
        };
        let start_records = start.outbox.records.len();
        let mut effects = Vec::new();
        ledger.prune(now);
        let mut core = Core {
            settings: cfg.defaults,
            cfg,
            ledger,
            applied_revision: None,
            journal_lines,
            last_prune: now,
            outbox: Queue::new(
                start.outbox_max_bytes,
                start.outbox.records,
                start.outbox.next_seq,
            ),
            outbox_file_bytes: start.outbox_file_bytes,
            connected: false,
            connections: 0,
            running: Vec::new(),
            status_topic,
            facts,
        };
        if let Some(saved) = saved {
            let (settings, _) = core.resolve_settings(&saved.settings);
            core.settings = settings;
            core.applied_revision = Some(saved.revision);
        }
        effects.push(Effect::Apply(core.settings));

        // Loading may have dropped records to fit a smaller bound: the file
        // must not bring them back.
        if core.outbox.len() < start_records {
            effects.push(core.compact_outbox());
        }

        // Final results journaled but never acknowledged (the agent stopped
        // before the PUBACK, the outbox file was damaged): again. The
        // registry ignores a repeat of a final state.
        let queued: HashSet<(CommandId, &str)> = core
            .outbox
            .records()
            .filter(|r| r.class == Class::Result)
            .filter_map(|r| serde_json::from_slice::<CommandResult>(&r.payload).ok())
            .map(|r| (r.id, r.status.as_str()))
            .collect();
        let mut unacked: Vec<JournalEntry> = core
            .ledger
            .entries()
            .filter(|e| e.undelivered && e.status.is_final())
            .filter(|e| !queued.contains(&(e.id.clone(), e.status.as_str())))
            .cloned()
            .collect();
        unacked.sort_by(|a, b| (a.ts, a.id.as_str()).cmp(&(b.ts, b.id.as_str())));
        for e in unacked {
            effects.push(Effect::Publish(core.result_message(&e.result())));
        }

        if !start.recovered.is_empty() {
            let msg = start.recovered.join("; ");
            effects.push(Effect::Publish(core.event(
                events::STATE_RECOVERED,
                msg,
                now,
            )));
        }

        // Accepted and never finished: an action that completes with a
        // reboot (it carries the boot id) has happened once the boot id
        // changed; any other was running when the agent stopped (crash,
        // power cut, kill) and is reported as interrupted, never run again
        // for this id.
        let open: Vec<JournalEntry> = core
            .ledger
            .entries()
            .filter(|e| e.status == CommandStatus::Accepted)
            .filter(|e| e.boot_id.as_deref() != Some(core.cfg.boot_id.as_str()))
            .cloned()
            .collect();
        for e in open {
            let rec = if e.boot_id.is_some() {
                let output = json!({
                    "previous_boot_id": e.boot_id,
                    "boot_id": core.cfg.boot_id,
                });
                core.final_entry(&e, CommandStatus::Succeeded, None, Some(output), now)
            } else {
                let idempotent = e
                    .action
                    .as_ref()
                    .and_then(|a| core.cfg.actions.get(a))
                    .is_some_and(|s| s.idempotent);
                let reason = if idempotent {
                    "interrupted: the agent stopped while the action ran; not run again \
                     (it is idempotent: send it again to re-run it)"
                } else {
                    "interrupted: the agent stopped while the action ran; not run again \
                     (it is not idempotent)"
                };
                core.final_entry(&e, CommandStatus::Failed, Some(reason.into()), None, now)
            };
            effects.push(Effect::Record(rec.clone()));
            effects.push(Effect::Publish(core.result_message(&rec.result())));
            core.ledger.insert(rec);
        }
        core.journal_lines += effects
            .iter()
            .filter(|e| matches!(e, Effect::Record(_)))
            .count();
        effects.extend(core.maybe_compact(now));
        let effects = core.route(effects, now);
        (core, effects)
    }

    pub fn device(&self) -> &DeviceId {
        &self.cfg.device
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The only filters the agent subscribes to: its own commands and its
    /// own desired state.
    pub fn subscriptions(&self) -> [String; 2] {
        [
            Kind::Cmd.filter_for(&self.cfg.device),
            Kind::Desired.filter_for(&self.cfg.device),
        ]
    }

    /// The retained `offline` status, used as the last will and on shutdown.
    pub fn offline_status(&self, now: Option<UnixSeconds>) -> Outgoing {
        let mut s = Status::offline();
        s.ts = now;
        if now.is_some() {
            s.boot_id = Some(self.cfg.boot_id.clone());
        }
        self.status_message(&s)
    }

    /// A connection was established (every CONNACK, also after reconnects).
    pub fn on_connected(
        &mut self,
        uptime_s: u64,
        addresses: Vec<String>,
        now: UnixSeconds,
    ) -> Vec<Effect> {
        let online = Status {
            state: Presence::Online,
            agent_version: Some(self.cfg.agent_version.clone()),
            boot_id: Some(self.cfg.boot_id.clone()),
            uptime_s: Some(uptime_s),
            addresses,
            ts: Some(now),
            // The process id tells this agent process from the one before
            // it (a restart within the same second), the count tells its
            // connections apart.
            session: Some(format!("{}-{}", std::process::id(), self.connections)),
        };
        self.connections += 1;
        self.connected = true;
        let mut effects = vec![Effect::Publish(self.status_message(&online))];
        effects.extend(self.report_drops(now));
        self.route(effects, now)
    }

    /// The connection is gone (records on the wire stay with the MQTT
    /// client, which sends them again on reconnect).
    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// Outbox records to hand to the connection now, oldest first, keeping
    /// at most `window` unacknowledged. Call only while connected.
    pub fn take_sendable(&mut self, window: usize) -> Vec<(u64, Outgoing)> {
        self.outbox
            .take_sendable(window)
            .into_iter()
            .map(|r| {
                let seq = r.seq;
                (seq, outgoing_of(r))
            })
            .collect()
    }

    pub fn outbox(&self) -> &Queue {
        &self.outbox
    }

    /// The broker acknowledged outbox record `seq` (PUBACK).
    pub fn on_delivered(&mut self, seq: u64, now: UnixSeconds) -> Vec<Effect> {
        let Some(r) = self.outbox.remove(seq) else {
            return Vec::new();
        };
        let frames = outbox::encode_done(seq);
        self.outbox_file_bytes += frames.len() as u64;
        let mut effects = vec![Effect::StoreFrames(frames)];
        if r.class == Class::Result
            && let Ok(result) = serde_json::from_slice::<CommandResult>(&r.payload)
            && let Some(entry) = self.ledger.get(&result.id)
            && entry.undelivered
            && entry.status == result.status
        {
            // No fsync: losing this only means publishing the result once
            // more after a power cut.
            let delivered = JournalEntry {
                undelivered: false,
                ..entry.clone()
            };
            self.note(&mut effects, delivered);
            effects.extend(self.maybe_compact(now));
        }
        if self.outbox_file_bytes > 2 * self.outbox.bytes() + OUTBOX_SLACK_BYTES {
            effects.push(self.compact_outbox());
        }
        effects.extend(self.report_drops(now));
        self.route(effects, now)
    }

    fn compact_outbox(&mut self) -> Effect {
        let bytes = outbox::encode_all(self.outbox.records());
        self.outbox_file_bytes = bytes.len() as u64;
        Effect::CompactOutbox(bytes)
    }

    /// An event about records the outbox had to drop, once connected.
    fn report_drops(&mut self, now: UnixSeconds) -> Option<Effect> {
        if !self.connected {
            return None;
        }
        let d = self.outbox.take_dropped();
        if d.is_empty() {
            return None;
        }
        let msg = format!(
            "outbox full: dropped {} telemetry samples, {} events and {} command results \
             produced between {} and {} (oldest telemetry first)",
            d.telemetry, d.events, d.results, d.first_ts, d.last_ts
        );
        Some(Effect::Publish(self.event(
            events::OUTBOX_DROPPED,
            msg,
            now,
        )))
    }

    /// Publications of the outbox's classes become outbox records.
    fn route(&mut self, effects: Vec<Effect>, now: UnixSeconds) -> Vec<Effect> {
        let mut out = Vec::with_capacity(effects.len());
        for fx in effects {
            match fx {
                Effect::Publish(o) if o.class.is_some() => out.push(self.enqueue(o, now)),
                other => out.push(other),
            }
        }
        out
    }

    fn enqueue(&mut self, o: Outgoing, now: UnixSeconds) -> Effect {
        let class = o.class.unwrap_or(Class::Event);
        let (r, dropped) = self
            .outbox
            .push(class, now, o.topic.clone(), o.payload.clone());
        let mut frames = outbox::encode_data(&r);
        for d in &dropped {
            frames.extend(outbox::encode_done(d.seq));
        }
        self.outbox_file_bytes += frames.len() as u64;
        Effect::Store { queued: o, frames }
    }

    /// A message arrived on `topic`. Whatever the bytes, this never panics;
    /// messages for other devices or other kinds are ignored.
    pub fn on_message(&mut self, topic: &str, payload: &[u8], now: UnixSeconds) -> Vec<Effect> {
        let fx = match Topic::parse(topic) {
            Some(Topic::Cmd(device, id)) if device == self.cfg.device => {
                self.on_command(id, payload, now)
            }
            Some(Topic::Desired(device)) if device == self.cfg.device => {
                self.on_desired(payload, now)
            }
            _ => Vec::new(),
        };
        self.route(fx, now)
    }

    fn on_command(&mut self, id: CommandId, payload: &[u8], now: UnixSeconds) -> Vec<Effect> {
        // An empty message clears a retained command: nothing to run.
        if payload.is_empty() {
            return Vec::new();
        }
        if let Some(known) = self.ledger.get(&id) {
            // Seen before (QoS 1 redelivery, or the id reused): never run
            // again, repeat what we said.
            if self.running.contains(&id) {
                return Vec::new();
            }
            return vec![Effect::Publish(self.result_message(&known.result()))];
        }
        let mut effects = Vec::new();
        let command = match Command::decode(&id, payload, now) {
            Ok(c) => c,
            Err(rejection) => {
                let rec = self.new_entry(&id, None, CommandStatus::Rejected, now);
                let rec = JournalEntry {
                    reason: Some(rejection.to_string()),
                    ..rec
                };
                self.note(&mut effects, rec.clone());
                effects.push(Effect::Publish(self.result_message(&rec.result())));
                effects.extend(self.maybe_compact(now));
                return effects;
            }
        };
        let plan = match self
            .cfg
            .actions
            .plan(&command.action, &command.args, &self.facts)
        {
            Ok((_, plan)) => plan,
            Err(refusal) => {
                let rec = self.new_entry(&id, Some(command.action), CommandStatus::Rejected, now);
                let rec = JournalEntry {
                    reason: Some(refusal.0),
                    ..rec
                };
                self.note(&mut effects, rec.clone());
                effects.push(Effect::Publish(self.result_message(&rec.result())));
                effects.extend(self.maybe_compact(now));
                return effects;
            }
        };
        let mut accepted = self.new_entry(&id, Some(command.action), CommandStatus::Accepted, now);
        if matches!(plan, Plan::RunUntilReboot(_)) {
            // Recorded with the boot id: `succeeded` is published once the
            // device is back with a different one.
            accepted.boot_id = Some(self.cfg.boot_id.clone());
        }
        let accepted_msg = self.result_message(&accepted.result());
        match plan {
            Plan::Answer { output, facts } => {
                // Read-only and instantaneous: record the final result once,
                // then say accepted and succeeded.
                let done = JournalEntry {
                    facts,
                    ..self.final_entry(&accepted, CommandStatus::Succeeded, None, Some(output), now)
                };
                self.note(&mut effects, done.clone());
                effects.push(Effect::Publish(accepted_msg));
                effects.push(Effect::Publish(self.result_message(&done.result())));
            }
            Plan::Restart => {
                let done = self.final_entry(
                    &accepted,
                    CommandStatus::Succeeded,
                    Some("agent is restarting".into()),
                    None,
                    now,
                );
                self.record(&mut effects, done.clone());
                effects.push(Effect::Publish(accepted_msg));
                effects.push(Effect::Publish(self.result_message(&done.result())));
                effects.push(Effect::Restart);
            }
            Plan::Run(job) | Plan::RunUntilReboot(job) => {
                // Durable before it runs: a redelivery, in this process or
                // after a restart, finds the id and never runs it again.
                self.record(&mut effects, accepted.clone());
                effects.push(Effect::Publish(accepted_msg));
                self.running.push(id.clone());
                effects.push(Effect::Run { id, job });
            }
        }
        effects.extend(self.maybe_compact(now));
        effects
    }

    /// The side effect started by [`Effect::Run`] finished. Success of an
    /// action that completes with a reboot means "requested": it is reported
    /// after the boot id changes.
    pub fn on_action_done(
        &mut self,
        id: &CommandId,
        outcome: JobOutcome,
        now: UnixSeconds,
    ) -> Vec<Effect> {
        self.running.retain(|r| r != id);
        let Some(entry) = self.ledger.get(id).cloned() else {
            return Vec::new();
        };
        if entry.status != CommandStatus::Accepted
            || (outcome.status == CommandStatus::Succeeded && entry.boot_id.is_some())
        {
            return Vec::new();
        }
        let mut effects = Vec::new();
        let rec = self.final_entry(&entry, outcome.status, outcome.reason, outcome.output, now);
        self.record(&mut effects, rec.clone());
        effects.push(Effect::Publish(self.result_message(&rec.result())));
        self.route(effects, now)
    }

    /// Writing a record failed: the command must not run. Marks it failed in
    /// memory (a redelivery in this process repeats the failure) and says so.
    pub fn on_record_failed(
        &mut self,
        id: &CommandId,
        error: &str,
        now: UnixSeconds,
    ) -> Vec<Effect> {
        self.running.retain(|r| r != id);
        let base = self
            .ledger
            .get(id)
            .cloned()
            .unwrap_or_else(|| self.new_entry(id, None, CommandStatus::Failed, now));
        let rec = self.final_entry(
            &base,
            CommandStatus::Failed,
            Some(format!(
                "not run: the command id could not be recorded durably ({error})"
            )),
            None,
            now,
        );
        let rec = JournalEntry {
            // Not in the journal: nothing to republish at start.
            undelivered: false,
            ..rec
        };
        self.ledger.insert(rec.clone());
        let fx = vec![Effect::Publish(self.result_message(&rec.result()))];
        self.route(fx, now)
    }

    fn on_desired(&mut self, payload: &[u8], now: UnixSeconds) -> Vec<Effect> {
        if payload.is_empty() {
            return Vec::new();
        }
        let desired: Desired = match (payload.len() <= MAX_COMMAND_BYTES)
            .then(|| serde_json::from_slice::<Desired>(payload))
        {
            Some(Ok(d)) => d,
            other => {
                let why = match other {
                    Some(Err(e)) => format!("malformed desired state: {e}"),
                    _ => format!(
                        "desired state of {} bytes exceeds {MAX_COMMAND_BYTES}",
                        payload.len()
                    ),
                };
                return vec![Effect::Publish(self.event(
                    events::DESIRED_REJECTED,
                    why,
                    now,
                ))];
            }
        };
        if self.applied_revision == Some(desired.revision) {
            return Vec::new();
        }
        let (settings, ignored) = self.resolve_settings(&desired.settings);
        self.settings = settings;
        self.applied_revision = Some(desired.revision);
        let reported = Reported {
            revision: desired.revision,
            applied: settings_map(settings),
            ignored,
            ts: now,
        };
        vec![
            Effect::Apply(settings),
            Effect::SaveSettings(SavedSettings {
                revision: desired.revision,
                settings: desired.settings,
            }),
            Effect::Publish(Outgoing {
                topic: Topic::Reported(self.cfg.device.clone()).render(),
                payload: to_json(&reported),
                qos: Qos::AtLeastOnce,
                retain: true,
                class: None,
            }),
        ]
    }

    /// Settings from a desired map: unknown keys and bad values are ignored
    /// (with why), absent keys fall back to the configuration file.
    fn resolve_settings(&self, desired: &Map<String, Value>) -> (Settings, Map<String, Value>) {
        let mut s = self.cfg.defaults;
        let mut ignored = Map::new();
        for (key, value) in desired {
            match settings::validate(key, value) {
                Ok(Setting::TelemetryIntervalS(v)) => s.telemetry_interval_s = v,
                Ok(Setting::LogLevel(name)) => match LogLevel::parse(name) {
                    Some(level) => s.log_level = level,
                    None => {
                        ignored.insert(key.clone(), "log level unknown to this agent".into());
                    }
                },
                Err(e) => {
                    ignored.insert(key.clone(), e.to_string().into());
                }
            }
        }
        (s, ignored)
    }

    /// A telemetry sample was taken (connected or not): into the outbox, at
    /// full rate (the size bound and its drop policy decide what an outage
    /// too long to hold costs, not a thinning rule).
    pub fn telemetry(&mut self, sample: &Telemetry, now: UnixSeconds) -> Vec<Effect> {
        let o = Outgoing {
            topic: Topic::Telemetry(self.cfg.device.clone()).render(),
            payload: to_json(sample),
            qos: Qos::AtLeastOnce,
            retain: false,
            class: Some(Class::Telemetry),
        };
        self.route(vec![Effect::Publish(o)], now)
    }

    pub fn event(&self, kind: &str, message: String, now: UnixSeconds) -> Outgoing {
        Outgoing {
            topic: Topic::Events(self.cfg.device.clone()).render(),
            payload: to_json(&Event {
                ts: now,
                kind: kind.to_owned(),
                message,
            }),
            qos: Qos::AtLeastOnce,
            retain: false,
            class: Some(Class::Event),
        }
    }

    fn status_message(&self, s: &Status) -> Outgoing {
        Outgoing {
            topic: self.status_topic.clone(),
            payload: to_json(s),
            qos: Qos::AtLeastOnce,
            retain: true,
            class: None,
        }
    }

    fn result_message(&self, r: &CommandResult) -> Outgoing {
        Outgoing {
            topic: Topic::CmdResult(self.cfg.device.clone(), r.id.clone()).render(),
            payload: to_json(r),
            qos: Qos::AtLeastOnce,
            retain: false,
            class: Some(Class::Result),
        }
    }

    fn new_entry(
        &self,
        id: &CommandId,
        action: Option<edgebind_protocol::actions::Action>,
        status: CommandStatus,
        now: UnixSeconds,
    ) -> JournalEntry {
        JournalEntry {
            id: id.clone(),
            action,
            status,
            reason: None,
            output: None,
            first_seen: now,
            ts: now,
            // Only an action completed by a reboot keeps the boot it was
            // accepted in (set by on_command).
            boot_id: None,
            undelivered: status.is_final(),
            facts: false,
        }
    }

    fn final_entry(
        &self,
        base: &JournalEntry,
        status: CommandStatus,
        reason: Option<String>,
        output: Option<Value>,
        now: UnixSeconds,
    ) -> JournalEntry {
        JournalEntry {
            status,
            reason,
            output: output.as_ref().and_then(JournalEntry::compact_output),
            ts: now,
            undelivered: status.is_final(),
            ..base.clone()
        }
    }

    fn record(&mut self, effects: &mut Vec<Effect>, entry: JournalEntry) {
        self.ledger.insert(entry.clone());
        self.journal_lines += 1;
        effects.push(Effect::Record(entry));
    }

    fn note(&mut self, effects: &mut Vec<Effect>, entry: JournalEntry) {
        self.ledger.insert(entry.clone());
        self.journal_lines += 1;
        effects.push(Effect::Note(entry));
    }

    /// Prune and rewrite the journal when the file holds twice as many lines
    /// as live ids (superseded records), or when there are more ids than the
    /// retention keeps. Count-pruning is tried at most once a minute: when
    /// every id is still protected (young enough to be redelivered) there is
    /// nothing to gain from trying on every command.
    fn maybe_compact(&mut self, now: UnixSeconds) -> Option<Effect> {
        let bloated = self.journal_lines >= 64 && self.journal_lines >= 2 * self.ledger.len();
        let crowded = self.ledger.over_ceiling()
            || (self.ledger.over_capacity() && now >= self.last_prune + PRUNE_EVERY_S);
        if !bloated && !crowded {
            return None;
        }
        self.last_prune = now;
        let dropped = self.ledger.prune(now);
        if dropped == 0 && !bloated {
            return None;
        }
        let snapshot = self.ledger.snapshot();
        self.journal_lines = snapshot.len();
        Some(Effect::Compact(snapshot))
    }
}

/// Least interval between count-pruning attempts.
const PRUNE_EVERY_S: u64 = 60;
/// The outbox file is compacted once it holds more than twice the live
/// records plus this (acknowledged records' frames are dead weight).
const OUTBOX_SLACK_BYTES: u64 = 64 * 1024;

/// What the runtime found on disk besides the journal and settings.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// The outbox file's live records.
    pub outbox: outbox::Decoded,
    pub outbox_file_bytes: u64,
    pub outbox_max_bytes: u64,
    /// One line per state file that had to be repaired (file, what was
    /// lost): reported to the fleet as a `state_recovered` event.
    pub recovered: Vec<String>,
}

fn outgoing_of(r: Record) -> Outgoing {
    Outgoing {
        topic: r.topic,
        payload: r.payload,
        qos: Qos::AtLeastOnce,
        retain: false,
        class: Some(r.class),
    }
}

fn settings_map(s: Settings) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        settings::TELEMETRY_INTERVAL_S.into(),
        s.telemetry_interval_s.into(),
    );
    m.insert(settings::LOG_LEVEL.into(), s.log_level.as_str().into());
    m
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own message types always serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Retention;
    use edgebind_protocol::messages::MAX_COMMAND_BYTES;

    const NOW: u64 = 1_000_000;
    const RET: Retention = Retention {
        max_age_s: 1_000_000,
        max_entries: 1000,
        protect_s: 1000,
    };

    fn cfg(boot: &str) -> CoreConfig {
        CoreConfig {
            device: DeviceId::new("dev-a").unwrap(),
            agent_version: "0.1.0".into(),
            boot_id: boot.into(),
            defaults: Settings {
                telemetry_interval_s: 60,
                log_level: LogLevel::Info,
            },
            inventory: Inventory {
                agent_version: "0.1.0".into(),
                os_release: Some("Test OS".into()),
                kernel: Some("6.1".into()),
                board_model: None,
                serial: None,
                boot_id: Some(boot.into()),
                actions: vec![],
            },
            actions: ActionSet::from_config(&crate::config::AgentConfig::new(
                crate::config::BrokerConfig::new("h", 1),
            )),
        }
    }

    fn core_with(boot: &str, records: Vec<JournalEntry>) -> (Core, Vec<Effect>) {
        Core::new(cfg(boot), Ledger::new(RET, records), 0, None, start(), NOW)
    }

    fn core() -> Core {
        core_with("boot-1", vec![]).0
    }

    fn start() -> Start {
        Start {
            outbox_max_bytes: 1 << 20,
            ..Start::default()
        }
    }

    /// What the effects send, directly or through the outbox.
    fn sent(effects: &[Effect]) -> Vec<&Outgoing> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Publish(o) | Effect::Store { queued: o, .. } => Some(o),
                _ => None,
            })
            .collect()
    }

    fn journaled(effects: &[Effect]) -> Vec<JournalEntry> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Record(r) | Effect::Note(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn dev() -> DeviceId {
        DeviceId::new("dev-a").unwrap()
    }

    fn events_topic() -> String {
        Topic::Events(dev()).render()
    }

    fn result_topic(id: &str) -> String {
        Topic::CmdResult(dev(), CommandId::new(id).unwrap()).render()
    }

    fn cmd_topic(id: &str) -> String {
        format!("edgebind/v2/cmd/dev-a/{id}")
    }

    /// Results published by `effects`, as (status, reason).
    fn results(effects: &[Effect]) -> Vec<(CommandStatus, Option<String>)> {
        sent(effects)
            .into_iter()
            .filter(|o| matches!(Topic::parse(&o.topic), Some(Topic::CmdResult(..))))
            .map(|o| {
                let r: CommandResult = serde_json::from_slice(&o.payload).unwrap();
                (r.status, r.reason)
            })
            .collect()
    }

    fn statuses(effects: &[Effect]) -> Vec<CommandStatus> {
        results(effects).into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn subscribes_only_to_its_own_topics() {
        assert_eq!(
            core().subscriptions(),
            [
                "edgebind/v2/cmd/dev-a/+".to_string(),
                "edgebind/v2/desired/dev-a".to_string()
            ]
        );
    }

    #[test]
    fn ping_records_before_publishing_accepted_then_succeeded() {
        let mut c = core();
        let fx = c.on_message(&cmd_topic("c1"), br#"{"id":"c1","action":"ping"}"#, NOW);
        assert!(matches!(fx[0], Effect::Note(ref r) if r.status == CommandStatus::Succeeded));
        assert_eq!(
            statuses(&fx),
            [CommandStatus::Accepted, CommandStatus::Succeeded]
        );
    }

    #[test]
    fn inventory_answers_with_the_collected_facts() {
        let mut c = core();
        let fx = c.on_message(
            &cmd_topic("i1"),
            br#"{"id":"i1","action":"inventory"}"#,
            NOW,
        );
        let last = *sent(&fx).last().unwrap();
        let r: CommandResult = serde_json::from_slice(&last.payload).unwrap();
        let inv: Inventory = serde_json::from_value(r.output.unwrap()).unwrap();
        assert_eq!(inv.os_release.as_deref(), Some("Test OS"));
    }

    #[test]
    fn redelivery_repeats_the_result_without_running_again() {
        let mut c = core();
        let payload = br#"{"id":"r1","action":"reboot"}"#;
        let first = c.on_message(&cmd_topic("r1"), payload, NOW);
        assert!(matches!(first[0], Effect::Record(_)));
        assert!(first.iter().any(|e| matches!(e, Effect::Run { .. })));
        // Redelivered while the reboot request is still running: silence.
        assert!(c.on_message(&cmd_topic("r1"), payload, NOW).is_empty());
        c.on_action_done(
            &CommandId::new("r1").unwrap(),
            JobOutcome::succeeded(None),
            NOW,
        );
        let again = c.on_message(&cmd_topic("r1"), payload, NOW + 5);
        assert!(
            !again
                .iter()
                .any(|e| matches!(e, Effect::Run { .. } | Effect::Record(_)))
        );
        assert_eq!(statuses(&again), [CommandStatus::Accepted]);
    }

    #[test]
    fn redelivery_after_restart_in_same_boot_does_not_reboot_again() {
        let mut c = core();
        let payload = br#"{"id":"r1","action":"reboot"}"#;
        let fx = c.on_message(&cmd_topic("r1"), payload, NOW);
        let records: Vec<_> = fx
            .into_iter()
            .filter_map(|e| match e {
                Effect::Record(r) => Some(r),
                _ => None,
            })
            .collect();
        let (mut restarted, start_fx) = core_with("boot-1", records);
        assert!(!start_fx.iter().any(|e| matches!(e, Effect::Record(_))));
        let again = restarted.on_message(&cmd_topic("r1"), payload, NOW + 10);
        assert!(!again.iter().any(|e| matches!(e, Effect::Run { .. })));
    }

    #[test]
    fn reboot_succeeds_once_the_boot_id_changed() {
        let mut c = core();
        let fx = c.on_message(&cmd_topic("r1"), br#"{"id":"r1","action":"reboot"}"#, NOW);
        let records: Vec<_> = fx
            .into_iter()
            .filter_map(|e| match e {
                Effect::Record(r) => Some(r),
                _ => None,
            })
            .collect();
        let (mut after, start_fx) = core_with("boot-2", records);
        // Recorded before anything is queued ...
        assert!(matches!(&start_fx[1], Effect::Record(r) if r.status == CommandStatus::Succeeded));
        assert_eq!(statuses(&start_fx), [CommandStatus::Succeeded]);
        // ... and sent once connected, after the online status.
        let connected = after.on_connected(5, vec![], NOW + 60);
        assert!(
            matches!(&connected[..], [Effect::Publish(o)] if o.retain && o.topic == Topic::Status(dev()).render())
        );
        let out = after.take_sendable(16);
        assert_eq!(out.len(), 1);
        assert!(out[0].1.topic == result_topic("r1"));
        // A redelivery of the reboot after it happened repeats `succeeded`.
        let again = after.on_message(
            &cmd_topic("r1"),
            br#"{"id":"r1","action":"reboot"}"#,
            NOW + 61,
        );
        assert_eq!(statuses(&again), [CommandStatus::Succeeded]);
    }

    #[test]
    fn failed_reboot_request_is_reported_as_failed() {
        let mut c = core();
        c.on_message(&cmd_topic("r1"), br#"{"id":"r1","action":"reboot"}"#, NOW);
        let fx = c.on_action_done(
            &CommandId::new("r1").unwrap(),
            JobOutcome::failed("cannot create /run/edgebind/reboot-request: permission denied"),
            NOW,
        );
        let r = results(&fx);
        assert_eq!(r[0].0, CommandStatus::Failed);
        assert!(r[0].1.as_deref().unwrap().contains("permission denied"));
    }

    #[test]
    fn restart_agent_reports_success_before_leaving() {
        let mut c = core();
        let fx = c.on_message(
            &cmd_topic("x"),
            br#"{"id":"x","action":"restart-agent"}"#,
            NOW,
        );
        assert_eq!(
            statuses(&fx),
            [CommandStatus::Accepted, CommandStatus::Succeeded]
        );
        assert!(matches!(fx.last(), Some(Effect::Restart)));
        assert!(matches!(fx[0], Effect::Record(_)));
    }

    #[test]
    fn bad_commands_are_rejected_with_reasons_and_recorded() {
        let big = {
            let mut v = br#"{"id":"c5","action":"ping","args":{"x":""#.to_vec();
            v.resize(MAX_COMMAND_BYTES + 10, b'a');
            v
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("c1", b"{not json".to_vec(), "malformed"),
            (
                "c2",
                br#"{"id":"c2","action":"format-disk"}"#.to_vec(),
                "unknown action \"format-disk\"",
            ),
            (
                "c7",
                br#"{"id":"c7","action":"ping","args":{"x":1}}"#.to_vec(),
                "\"x\" is not declared",
            ),
            (
                "c3",
                br#"{"id":"c3","action":"ping","expires_at":5}"#.to_vec(),
                "expired",
            ),
            (
                "c4",
                br#"{"id":"other","action":"ping"}"#.to_vec(),
                "differs",
            ),
            ("c5", big, "limited to"),
            ("c6", vec![0xff, 0x00, 0x13], "malformed"),
        ];
        let mut c = core();
        for (id, payload, needle) in cases {
            let fx = c.on_message(&cmd_topic(id), &payload, NOW);
            assert!(matches!(fx[0], Effect::Note(_)), "{id}");
            let r = results(&fx);
            assert_eq!(r.len(), 1, "{id}");
            assert_eq!(r[0].0, CommandStatus::Rejected, "{id}");
            let reason = r[0].1.clone().unwrap();
            assert!(reason.contains(needle), "{id}: {reason}");
        }
        // Still serving.
        let fx = c.on_message(&cmd_topic("ok"), br#"{"id":"ok","action":"ping"}"#, NOW);
        assert_eq!(statuses(&fx).last(), Some(&CommandStatus::Succeeded));
    }

    #[test]
    fn foreign_or_odd_topics_are_ignored() {
        let mut c = core();
        for t in [
            "edgebind/v2/cmd/dev-b/c1",
            "edgebind/v2/telemetry/dev-a",
            "edgebind/v2/cmd/dev-a",
            "something/else",
            "",
        ] {
            assert!(
                c.on_message(t, br#"{"id":"c1","action":"ping"}"#, NOW)
                    .is_empty(),
                "{t}"
            );
        }
        // Clearing a retained command (empty payload) runs nothing.
        assert!(c.on_message(&cmd_topic("c1"), b"", NOW).is_empty());
    }

    #[test]
    fn desired_settings_are_applied_saved_and_reported_once_per_revision() {
        let mut c = core();
        let desired = br#"{"revision":3,"settings":{"telemetry_interval_s":5,"log_level":"debug","colour":"red"}}"#;
        let fx = c.on_message("edgebind/v2/desired/dev-a", desired, NOW);
        assert!(fx.contains(&Effect::Apply(Settings {
            telemetry_interval_s: 5,
            log_level: LogLevel::Debug
        })));
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::SaveSettings(s) if s.revision == 3))
        );
        let reported = fx
            .iter()
            .find_map(|e| match e {
                Effect::Publish(o) if o.topic.starts_with("edgebind/v2/reported/") => Some(o),
                _ => None,
            })
            .unwrap();
        assert!(reported.retain);
        let r: Reported = serde_json::from_slice(&reported.payload).unwrap();
        assert_eq!(r.revision, 3);
        assert!(r.ignored.contains_key("colour"));
        assert_eq!(r.applied["telemetry_interval_s"], 5);
        // Same revision again (retained redelivery on reconnect): nothing.
        assert!(
            c.on_message("edgebind/v2/desired/dev-a", desired, NOW)
                .is_empty()
        );
        // A bad value is ignored and the default stays.
        let fx = c.on_message(
            "edgebind/v2/desired/dev-a",
            br#"{"revision":4,"settings":{"telemetry_interval_s":0}}"#,
            NOW,
        );
        assert!(fx.contains(&Effect::Apply(Settings {
            telemetry_interval_s: 60,
            log_level: LogLevel::Info
        })));
        // Garbage becomes an event, not a crash.
        let fx = c.on_message("edgebind/v2/desired/dev-a", b"[1,2", NOW);
        assert!(matches!(&fx[..], [Effect::Store { queued: o, .. }] if o.topic == events_topic()));
    }

    #[test]
    fn saved_settings_apply_at_start() {
        let saved = SavedSettings {
            revision: 7,
            settings: serde_json::from_str(r#"{"telemetry_interval_s":9}"#).unwrap(),
        };
        let (c, fx) = Core::new(
            cfg("b"),
            Ledger::new(RET, vec![]),
            0,
            Some(saved),
            start(),
            NOW,
        );
        assert_eq!(c.settings().telemetry_interval_s, 9);
        assert!(matches!(fx[0], Effect::Apply(_)));
    }

    #[test]
    fn journal_is_compacted_as_it_grows() {
        let mut c = core();
        let mut compactions = 0;
        for i in 0..200 {
            let id = format!("p{i}");
            let payload = format!(r#"{{"id":"{id}","action":"ping"}}"#);
            let fx = c.on_message(&cmd_topic(&id), payload.as_bytes(), NOW);
            compactions += fx
                .iter()
                .filter(|e| matches!(e, Effect::Compact(_)))
                .count();
        }
        assert_eq!(c.ledger().len(), 200);
        // Every id is recorded once, so the file only doubles for redeliveries
        // and multi-record commands; the compaction threshold keeps it bounded.
        assert!(compactions <= 3, "{compactions}");
    }

    #[test]
    fn journal_stays_bounded_under_a_stream_of_unique_ids() {
        let small = Retention {
            max_age_s: 1_000_000,
            max_entries: 100,
            protect_s: 10,
        };
        let (mut c, _) = Core::new(cfg("b"), Ledger::new(small, vec![]), 0, None, start(), NOW);
        let mut lines = 0usize;
        for i in 0..3000u64 {
            // One command per second: ids older than 10 s may go.
            let now = NOW + i;
            let id = format!("p{i}");
            let payload = format!(r#"{{"id":"{id}","action":"ping"}}"#);
            for fx in c.on_message(&cmd_topic(&id), payload.as_bytes(), now) {
                match fx {
                    Effect::Note(_) | Effect::Record(_) => lines += 1,
                    Effect::Compact(all) => lines = all.len(),
                    _ => {}
                }
            }
            assert!(
                c.ledger().len() <= 100 + 25 + 60,
                "ledger {} at {i}",
                c.ledger().len()
            );
            assert!(lines <= 2 * 185, "file lines {lines} at {i}");
        }
    }

    #[test]
    fn protected_ids_are_kept_even_beyond_the_count() {
        let small = Retention {
            max_age_s: 1_000_000,
            max_entries: 16,
            protect_s: 100_000,
        };
        let (mut c, _) = Core::new(cfg("b"), Ledger::new(small, vec![]), 0, None, start(), NOW);
        for i in 0..200u64 {
            let id = format!("p{i}");
            let payload = format!(r#"{{"id":"{id}","action":"ping"}}"#);
            c.on_message(&cmd_topic(&id), payload.as_bytes(), NOW + i);
        }
        // All young enough to be redelivered: kept up to the hard ceiling.
        let ceiling = 16 * crate::journal::HARD_CEILING_FACTOR;
        assert!(
            c.ledger().len() >= ceiling - ceiling / 10,
            "{}",
            c.ledger().len()
        );
        assert!(c.ledger().len() <= ceiling, "{}", c.ledger().len());
    }

    fn sample(ts: u64) -> Telemetry {
        Telemetry {
            ts,
            cpu_pct: 1.0,
            load_avg: [0.0; 3],
            mem_total_bytes: 1,
            mem_used_bytes: 1,
            disk_total_bytes: 1,
            disk_used_bytes: 1,
            uptime_s: ts,
            soc_temp_c: None,
            net: vec![],
        }
    }

    #[test]
    fn telemetry_is_queued_offline_sent_in_order_and_leaves_only_on_puback() {
        let mut c = core();
        for ts in 0..5 {
            let fx = c.telemetry(&sample(ts), NOW + ts);
            assert!(
                matches!(&fx[..], [Effect::Store { queued, .. }] if queued.qos == Qos::AtLeastOnce)
            );
        }
        assert_eq!(c.outbox().len(), 5);
        c.on_connected(1, vec![], NOW + 5);
        let out = c.take_sendable(3);
        let ts: Vec<u64> = out
            .iter()
            .map(|(_, o)| serde_json::from_slice::<Telemetry>(&o.payload).unwrap().ts)
            .collect();
        assert_eq!(ts, [0, 1, 2]);
        assert!(c.take_sendable(3).is_empty(), "window of 3 is full");
        // The connection drops: the records on the wire stay queued (the
        // client resends them), nothing is handed out twice.
        c.on_disconnected();
        assert_eq!(c.outbox().len(), 5);
        let fx = c.on_delivered(out[0].0, NOW + 6);
        assert!(matches!(&fx[..], [Effect::StoreFrames(_)]));
        assert_eq!(c.outbox().len(), 4);
        assert_eq!(c.take_sendable(3).len(), 1);
        // A second ack of the same record changes nothing.
        assert!(c.on_delivered(out[0].0, NOW + 6).is_empty());
    }

    #[test]
    fn a_final_result_is_marked_delivered_after_its_puback() {
        let mut c = core();
        let fx = c.on_message(&cmd_topic("c1"), br#"{"id":"c1","action":"ping"}"#, NOW);
        assert!(journaled(&fx)[0].undelivered);
        c.on_connected(1, vec![], NOW);
        let out = c.take_sendable(16);
        assert_eq!(out.len(), 2, "accepted, succeeded");
        assert!(journaled(&c.on_delivered(out[0].0, NOW)).is_empty());
        let fx = c.on_delivered(out[1].0, NOW);
        let j = journaled(&fx);
        assert_eq!(j.len(), 1);
        assert!(!j[0].undelivered);
        assert_eq!(j[0].status, CommandStatus::Succeeded);
    }

    #[test]
    fn unacknowledged_final_results_are_published_again_at_start() {
        let mut c = core();
        let fx = c.on_message(&cmd_topic("c1"), br#"{"id":"c1","action":"ping"}"#, NOW);
        let fx2 = c.on_message(
            &cmd_topic("c2"),
            br#"{"id":"c2","action":"format-disk"}"#,
            NOW + 1,
        );
        let mut records = journaled(&fx);
        records.extend(journaled(&fx2));
        // The outbox file was lost: both come back from the journal, in order.
        let (_, start_fx) = core_with("boot-1", records.clone());
        assert_eq!(
            statuses(&start_fx),
            [CommandStatus::Succeeded, CommandStatus::Rejected]
        );
        // Still in the outbox: not queued twice.
        let mut st = start();
        st.outbox.records = c.outbox().records().cloned().collect();
        let (restarted, start_fx) =
            Core::new(cfg("boot-1"), Ledger::new(RET, records), 0, None, st, NOW);
        assert!(statuses(&start_fx).is_empty());
        assert_eq!(restarted.outbox().len(), 3);
    }

    #[test]
    fn repaired_state_files_are_reported_to_the_fleet() {
        let mut st = start();
        st.recovered = vec!["commands.jsonl: 2 unreadable lines skipped".into()];
        let (_, fx) = Core::new(cfg("b"), Ledger::new(RET, vec![]), 0, None, st, NOW);
        let ev = sent(&fx)
            .into_iter()
            .find(|o| o.topic == events_topic())
            .unwrap();
        let ev: Event = serde_json::from_slice(&ev.payload).unwrap();
        assert_eq!(ev.kind, events::STATE_RECOVERED);
        assert!(ev.message.contains("commands.jsonl: 2"), "{}", ev.message);
    }

    #[test]
    fn a_full_outbox_drops_oldest_telemetry_and_says_so_once_connected() {
        let mut st = start();
        st.outbox_max_bytes = 4096;
        let (mut c, _) = Core::new(cfg("b"), Ledger::new(RET, vec![]), 0, None, st, NOW);
        c.on_message(&cmd_topic("c1"), br#"{"id":"c1","action":"ping"}"#, NOW);
        for ts in 0..100 {
            c.telemetry(&sample(ts), NOW + ts);
        }
        assert!(c.outbox().bytes() <= 4096);
        let fx = c.on_connected(1, vec![], NOW + 100);
        let ev = sent(&fx)
            .into_iter()
            .find(|o| o.topic == events_topic())
            .unwrap();
        let ev: Event = serde_json::from_slice(&ev.payload).unwrap();
        assert_eq!(ev.kind, events::OUTBOX_DROPPED);
        assert!(ev.message.contains("0 command results"), "{}", ev.message);
        // The results survived; the newest telemetry is kept.
        let out = c.take_sendable(1000);
        assert!(out[0].1.topic == result_topic("c1"));
        let last: Telemetry = serde_json::from_slice(&out[out.len() - 2].1.payload).unwrap();
        assert_eq!(last.ts, 99);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut c = core();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|j| (seed >> (j % 8 * 8)) as u8).collect();
            c.on_message(&cmd_topic(&format!("f{i}")), &bytes, NOW);
            c.on_message("edgebind/v2/desired/dev-a", &bytes, NOW);
        }
    }

    /// A program action for the core's tests (what a declared action plans).
    #[derive(Debug)]
    struct Prog {
        idempotent: bool,
    }

    impl crate::actions::Builtin for Prog {
        fn spec(&self) -> edgebind_protocol::actions::ActionSpec {
            edgebind_protocol::actions::ActionSpec {
                name: edgebind_protocol::actions::Action::new(if self.idempotent {
                    "check"
                } else {
                    "flash"
                })
                .unwrap(),
                origin: edgebind_protocol::actions::Origin::Declared,
                description: None,
                args: serde_json::from_value(
                    json!({"level": {"type": "string", "allowed": ["quick"]}}),
                )
                .unwrap(),
                idempotent: self.idempotent,
                timeout_s: 5,
                result: None,
            }
        }

        fn plan(&self, _: &Facts, _: &Map<String, Value>) -> Result<Plan, String> {
            Ok(Plan::Run(Job::Program(crate::runner::ProgramSpec {
                action: "flash".into(),
                argv: vec!["/bin/true".into()],
                run_as: crate::runner::RunAs::Agent,
                timeout: std::time::Duration::from_secs(5),
                output_limit: 100,
                writable: vec![],
                sandbox: crate::runner::Sandbox::Fallback,
                require_landlock: false,
            })))
        }
    }

    fn cfg_with_programs(boot: &str) -> CoreConfig {
        let mut c = cfg(boot);
        c.actions
            .add(std::sync::Arc::new(Prog { idempotent: false }));
        c.actions
            .add(std::sync::Arc::new(Prog { idempotent: true }));
        c
    }

    #[test]
    fn a_program_action_is_recorded_before_it_runs_and_its_outcome_is_final() {
        let (mut c, _) = Core::new(
            cfg_with_programs("b"),
            Ledger::new(RET, vec![]),
            0,
            None,
            start(),
            NOW,
        );
        let fx = c.on_message(
            &cmd_topic("f1"),
            br#"{"id":"f1","action":"flash","args":{"level":"quick"}}"#,
            NOW,
        );
        assert!(matches!(fx[0], Effect::Record(ref r) if r.status == CommandStatus::Accepted));
        assert!(fx.iter().any(|e| matches!(
            e,
            Effect::Run {
                job: Job::Program(_),
                ..
            }
        )));
        assert_eq!(statuses(&fx), [CommandStatus::Accepted]);
        let fx = c.on_action_done(
            &CommandId::new("f1").unwrap(),
            JobOutcome {
                status: CommandStatus::TimedOut,
                reason: Some("timed out after 5 s".into()),
                output: Some(json!({"stdout": "half"})),
            },
            NOW + 5,
        );
        assert!(matches!(fx[0], Effect::Record(ref r) if r.status == CommandStatus::TimedOut));
        let r = results(&fx);
        assert_eq!(r[0].0, CommandStatus::TimedOut);
        // An argument outside the schema is rejected without running.
        let fx = c.on_message(
            &cmd_topic("f2"),
            br#"{"id":"f2","action":"flash","args":{"level":"slow"}}"#,
            NOW,
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::Run { .. })));
        let r = results(&fx);
        assert_eq!(r[0].0, CommandStatus::Rejected);
        assert!(
            r[0].1.as_deref().unwrap().contains("not one of: quick"),
            "{r:?}"
        );
    }

    #[test]
    fn a_run_interrupted_by_an_agent_restart_is_failed_and_never_run_again() {
        let (mut c, _) = Core::new(
            cfg_with_programs("b"),
            Ledger::new(RET, vec![]),
            0,
            None,
            start(),
            NOW,
        );
        let mut records =
            journaled(&c.on_message(&cmd_topic("f1"), br#"{"id":"f1","action":"flash"}"#, NOW));
        records.extend(journaled(&c.on_message(
            &cmd_topic("k1"),
            br#"{"id":"k1","action":"check"}"#,
            NOW,
        )));
        // The agent dies mid-run; the same boot, a new process.
        let (mut again, start_fx) = Core::new(
            cfg_with_programs("b"),
            Ledger::new(RET, records),
            0,
            None,
            start(),
            NOW + 1,
        );
        let r = results(&start_fx);
        assert_eq!(r.len(), 2);
        for (status, reason) in &r {
            assert_eq!(*status, CommandStatus::Failed);
            assert!(
                reason.as_deref().unwrap().starts_with("interrupted"),
                "{reason:?}"
            );
        }
        assert!(
            r.iter()
                .any(|(_, why)| why.as_deref().unwrap().contains("not idempotent"))
        );
        assert!(
            start_fx
                .iter()
                .filter(|e| matches!(e, Effect::Record(_)))
                .count()
                == 2
        );
        // The broker redelivers: the final answer again, nothing runs.
        let fx = again.on_message(
            &cmd_topic("f1"),
            br#"{"id":"f1","action":"flash"}"#,
            NOW + 2,
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::Run { .. })));
        assert_eq!(statuses(&fx), [CommandStatus::Failed]);
        // A late outcome of the old run cannot overwrite the final state.
        assert!(
            again
                .on_action_done(
                    &CommandId::new("f1").unwrap(),
                    JobOutcome::succeeded(None),
                    NOW + 3
                )
                .is_empty()
        );
    }

    #[test]
    fn the_inventory_lists_every_action_and_is_marked_as_facts() {
        let (mut c, _) = Core::new(
            cfg_with_programs("b"),
            Ledger::new(RET, vec![]),
            0,
            None,
            start(),
            NOW,
        );
        let fx = c.on_message(
            &cmd_topic("i1"),
            br#"{"id":"i1","action":"inventory"}"#,
            NOW,
        );
        let last = *sent(&fx).last().unwrap();
        let r: CommandResult = serde_json::from_slice(&last.payload).unwrap();
        assert!(r.facts);
        let inv: Inventory = serde_json::from_value(r.output.unwrap()).unwrap();
        let names: Vec<&str> = inv.actions.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "check",
                "flash",
                "inventory",
                "ping",
                "reboot",
                "renew",
                "restart-agent"
            ]
        );
        assert!(
            inv.action(&edgebind_protocol::actions::Action::new("flash").unwrap())
                .unwrap()
                .args
                .contains_key("level")
        );
    }

    /// The fuzz set for what the broker delivers to the agent: a command or a
    /// desired state of any bytes gets an answer (a result, a report, an
    /// event saying why not), never a panic and never silence.
    mod fuzz {
        use super::*;
        use crate::fuzz_support::{apply, byte_edits};
        use proptest::prelude::*;

        fn topic_of(fx: &[Effect], kind: edgebind_protocol::topics::Kind) -> usize {
            sent(fx)
                .into_iter()
                .filter(|o| Topic::parse(&o.topic).is_some_and(|t| t.kind() == kind))
                .count()
        }

        fn valid_command() -> impl Strategy<Value = Vec<u8>> {
            (
                prop_oneof![
                    Just("ping"),
                    Just("inventory"),
                    Just("reboot"),
                    Just("nope")
                ],
                prop::option::of(any::<u64>()),
            )
                .prop_map(|(action, expires_at)| {
                    let mut v = serde_json::json!({"id": "c1", "action": action});
                    if let Some(e) = expires_at {
                        v["expires_at"] = e.into();
                    }
                    serde_json::to_vec(&v).unwrap()
                })
        }

        fn answers_the_command(bytes: &[u8]) -> Result<(), TestCaseError> {
            let mut c = core();
            let fx = c.on_message(&cmd_topic("c1"), bytes, NOW);
            let r = results(&fx);
            if bytes.is_empty() {
                prop_assert!(r.is_empty());
            } else {
                prop_assert!(
                    !r.is_empty(),
                    "no result for {:?}",
                    String::from_utf8_lossy(bytes)
                );
                if let Some((CommandStatus::Rejected, reason)) = r.first() {
                    prop_assert!(reason.as_deref().is_some_and(|w| !w.is_empty()));
                }
            }
            Ok(())
        }

        fn answers_the_desired_state(bytes: &[u8]) -> Result<(), TestCaseError> {
            let mut c = core();
            let fx = c.on_message(&Topic::Desired(dev()).render(), bytes, NOW);
            let reports = topic_of(&fx, edgebind_protocol::topics::Kind::Reported);
            let events = topic_of(&fx, edgebind_protocol::topics::Kind::Events);
            if bytes.is_empty() {
                prop_assert_eq!((reports, events), (0, 0));
            } else {
                prop_assert_eq!(reports + events, 1);
            }
            // Whatever was asked, the settings in force obey the contract.
            let s = c.settings();
            let (lo, hi) = edgebind_protocol::settings::TELEMETRY_INTERVAL_RANGE_S;
            prop_assert!((lo..=hi).contains(&s.telemetry_interval_s));
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_command_bytes_get_a_result(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                answers_the_command(&bytes)?;
            }

            #[test]
            fn a_damaged_command_gets_a_result(cmd in valid_command(), edits in byte_edits()) {
                answers_the_command(&apply(cmd, &edits))?;
            }

            #[test]
            fn any_desired_bytes_are_reported_or_refused(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                answers_the_desired_state(&bytes)?;
            }

            #[test]
            fn a_damaged_desired_state_is_reported_or_refused(
                interval in any::<i64>(),
                level in prop_oneof![Just("debug"), Just("loud"), Just("")],
                edits in byte_edits(),
            ) {
                let valid = serde_json::to_vec(&serde_json::json!({
                    "revision": 3,
                    "settings": {"telemetry_interval_s": interval, "log_level": level},
                }))
                .unwrap();
                answers_the_desired_state(&valid)?;
                answers_the_desired_state(&apply(valid, &edits))?;
            }
        }
    }
}
