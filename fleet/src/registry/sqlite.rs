//! SQLite backend of the registry: one file, WAL journal, versioned migrations.
//!
//! Several processes use the file at once (the fleet service writes what the
//! broker says, the CLI registers devices and queues commands), so the
//! connection runs in WAL mode (readers never block the writer) with a busy
//! timeout (writers wait for each other instead of failing).
//!
//! `synchronous = NORMAL`: in WAL mode a committed transaction survives a
//! crash or `kill -9` of any process; only an OS crash or power loss can lose
//! the last transactions. `FULL` would fsync every batch and cost most of the
//! ingest rate on slow disks.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgebind_protocol::messages::{
    Action, CommandStatus, Desired, Presence, UnixSeconds, now_unix,
};
use edgebind_protocol::{CommandId, DeviceId};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use serde_json::{Map, Value};

use super::*;

/// Schema migrations, applied in order. `PRAGMA user_version` records how many
/// have run. Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    r#"
    CREATE TABLE devices (
        id                    TEXT PRIMARY KEY,
        board                 TEXT NOT NULL,
        lifecycle             TEXT NOT NULL CHECK (lifecycle IN ('registered', 'provisioned', 'revoked')),
        registered_at         INTEGER NOT NULL,
        provisioned_at        INTEGER,
        revoked_at            INTEGER,
        cert_serial           TEXT,
        cert_fingerprint      TEXT,
        cert_not_after        INTEGER,
        online                INTEGER NOT NULL DEFAULT 0,
        last_seen             INTEGER,
        connected_at          INTEGER,
        agent_version         TEXT,
        boot_id               TEXT,
        addresses             TEXT NOT NULL DEFAULT '[]',
        desired               TEXT NOT NULL DEFAULT '{}',
        desired_rev           INTEGER NOT NULL DEFAULT 0,
        desired_published_rev INTEGER NOT NULL DEFAULT 0,
        reported              TEXT,
        reported_ignored      TEXT,
        reported_rev          INTEGER,
        reported_at           INTEGER,
        inventory             TEXT,
        inventory_at          INTEGER,
        telemetry             TEXT,
        telemetry_at          INTEGER,
        telemetry_count       INTEGER NOT NULL DEFAULT 0
    ) STRICT;

    CREATE TABLE device_tags (
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        tag       TEXT NOT NULL,
        PRIMARY KEY (device_id, tag)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX device_tags_by_tag ON device_tags(tag);

    CREATE TABLE telemetry (
        seq         INTEGER PRIMARY KEY,
        device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        ts          INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        payload     TEXT NOT NULL
    ) STRICT;
    CREATE INDEX telemetry_by_device ON telemetry(device_id, seq);

    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY,
        device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        ts          INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        message     TEXT NOT NULL
    ) STRICT;
    CREATE INDEX events_by_device ON events(device_id, seq);

    CREATE TABLE on_connect_rules (
        id         INTEGER PRIMARY KEY,
        device_id  TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        action     TEXT NOT NULL,
        args       TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX on_connect_by_device ON on_connect_rules(device_id);

    CREATE TABLE commands (
        seq          INTEGER PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        device_id    TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        action       TEXT,
        args         TEXT NOT NULL DEFAULT '{}',
        delivery     TEXT NOT NULL CHECK (delivery IN ('now', 'queued', 'on_connect', 'auto')),
        state        TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'accepted', 'succeeded', 'failed', 'rejected')),
        requested_by TEXT,
        rule_id      INTEGER,
        created_at   INTEGER NOT NULL,
        sent_at      INTEGER,
        accepted_at  INTEGER,
        finished_at  INTEGER,
        expires_at   INTEGER,
        reason       TEXT,
        output       TEXT
    ) STRICT;
    CREATE INDEX commands_by_device ON commands(device_id, seq);
    CREATE INDEX commands_queued ON commands(device_id) WHERE state = 'queued';
    "#,
];

const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a writer waits for another process's transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    retention: Retention,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Open `path` (created if missing), configure the connection and run the
    /// migrations this version knows but the file has not seen yet.
    pub fn open(path: &Path, retention: Retention) -> Result<Self> {
        let open_err = |source| RegistryError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| RegistryError::Open {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(SqliteStore {
            conn,
            path: path.to_owned(),
            retention,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    // IMMEDIATE: two processes opening a fresh file must not both migrate.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(RegistryError::SchemaTooNew {
            path: path.to_owned(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("JSON values always serialize")
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| RegistryError::Corrupt {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

fn parse_id<T: std::str::FromStr>(what: &str, text: String) -> Result<T> {
    text.parse().map_err(|_| RegistryError::Corrupt {
        what: what.to_owned(),
        detail: format!("{text:?}"),
    })
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

fn exists(conn: &Connection, id: &DeviceId) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")?
        .exists([id.as_str()])?)
}

fn require(conn: &Connection, id: &DeviceId) -> Result<()> {
    if exists(conn, id)? {
        Ok(())
    } else {
        Err(RegistryError::UnknownDevice(id.clone()))
    }
}

const DEVICE_COLUMNS: &str = "id, board, lifecycle, registered_at, provisioned_at, revoked_at, \
    cert_serial, cert_fingerprint, cert_not_after, online, last_seen, connected_at, agent_version, \
    boot_id, addresses, desired, desired_rev, desired_published_rev, reported, reported_ignored, \
    reported_rev, reported_at, inventory, inventory_at, telemetry, telemetry_at, telemetry_count";

/// Columns of a device row in the order of [`DEVICE_COLUMNS`], before tags are attached.
fn device_from_row(row: &Row<'_>) -> rusqlite::Result<RawDevice> {
    Ok(RawDevice {
        id: row.get(0)?,
        board: row.get(1)?,
        lifecycle: row.get(2)?,
        registered_at: row.get(3)?,
        provisioned_at: row.get(4)?,
        revoked_at: row.get(5)?,
        cert_serial: row.get(6)?,
        cert_fingerprint: row.get(7)?,
        cert_not_after: row.get(8)?,
        online: row.get(9)?,
        last_seen: row.get(10)?,
        connected_at: row.get(11)?,
        agent_version: row.get(12)?,
        boot_id: row.get(13)?,
        addresses: row.get(14)?,
        desired: row.get(15)?,
        desired_rev: row.get(16)?,
        desired_published_rev: row.get(17)?,
        reported: row.get(18)?,
        reported_ignored: row.get(19)?,
        reported_rev: row.get(20)?,
        reported_at: row.get(21)?,
        inventory: row.get(22)?,
        inventory_at: row.get(23)?,
        telemetry: row.get(24)?,
        telemetry_at: row.get(25)?,
        telemetry_count: row.get(26)?,
    })
}

/// A device row as stored, converted to [`Device`] outside rusqlite's row
/// callback so that corrupt JSON becomes a [`RegistryError::Corrupt`].
struct RawDevice {
    id: String,
    board: String,
    lifecycle: String,
    registered_at: i64,
    provisioned_at: Option<i64>,
    revoked_at: Option<i64>,
    cert_serial: Option<String>,
    cert_fingerprint: Option<String>,
    cert_not_after: Option<i64>,
    online: bool,
    last_seen: Option<i64>,
    connected_at: Option<i64>,
    agent_version: Option<String>,
    boot_id: Option<String>,
    addresses: String,
    desired: String,
    desired_rev: i64,
    desired_published_rev: i64,
    reported: Option<String>,
    reported_ignored: Option<String>,
    reported_rev: Option<i64>,
    reported_at: Option<i64>,
    inventory: Option<String>,
    inventory_at: Option<i64>,
    telemetry: Option<String>,
    telemetry_at: Option<i64>,
    telemetry_count: i64,
}

/// Every write starts as IMMEDIATE: a deferred transaction that reads and
/// then writes cannot wait for the lock (SQLite answers SQLITE_BUSY at once
/// to avoid a deadlock), so a CLI write racing the fleet service's batch
/// writer would fail with "database is locked" despite the busy timeout.
fn write_tx(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

impl RawDevice {
    fn into_device(self, tags: BTreeSet<Tag>) -> Result<Device> {
        let what = |field: &str| format!("{field} of device {}", self.id);
        let cert = match (self.cert_serial, self.cert_fingerprint, self.cert_not_after) {
            (Some(serial), Some(fingerprint_sha256), Some(not_after)) => Some(CertInfo {
                serial,
                fingerprint_sha256,
                not_after: not_after.max(0) as u64,
            }),
            _ => None,
        };
        let reported = match (self.reported, self.reported_rev) {
            (Some(applied), Some(rev)) => Some(ReportedState {
                revision: rev.max(0) as u64,
                applied: parse_json(&what("reported"), &applied)?,
                ignored: match &self.reported_ignored {
                    Some(t) => parse_json(&what("reported_ignored"), t)?,
                    None => Map::new(),
                },
                at: opt_u64(self.reported_at).unwrap_or(0),
            }),
            _ => None,
        };
        Ok(Device {
            board: parse_id(&what("board"), self.board)?,
            lifecycle: Lifecycle::parse(&self.lifecycle).ok_or_else(|| RegistryError::Corrupt {
                what: what("lifecycle"),
                detail: self.lifecycle.clone(),
            })?,
            tags,
            registered_at: self.registered_at.max(0) as u64,
            provisioned_at: opt_u64(self.provisioned_at),
            revoked_at: opt_u64(self.revoked_at),
            cert,
            online: self.online,
            last_seen: opt_u64(self.last_seen),
            connected_at: opt_u64(self.connected_at),
            agent_version: self.agent_version,
            boot_id: self.boot_id,
            addresses: parse_json(&what("addresses"), &self.addresses)?,
            desired: parse_json(&what("desired"), &self.desired)?,
            desired_revision: self.desired_rev.max(0) as u64,
            desired_published_revision: self.desired_published_rev.max(0) as u64,
            reported,
            inventory: self
                .inventory
                .as_deref()
                .map(|t| parse_json(&what("inventory"), t))
                .transpose()?,
            inventory_at: opt_u64(self.inventory_at),
            telemetry: self
                .telemetry
                .as_deref()
                .map(|t| parse_json(&what("telemetry"), t))
                .transpose()?,
            telemetry_at: opt_u64(self.telemetry_at),
            telemetry_count: self.telemetry_count.max(0) as u64,
            id: parse_id(&what("id"), self.id)?,
        })
    }
}

fn tags_of(conn: &Connection, id: &str) -> Result<BTreeSet<Tag>> {
    let mut stmt = conn.prepare_cached("SELECT tag FROM device_tags WHERE device_id = ?1")?;
    let rows = stmt.query_map([id], |r| r.get::<_, String>(0))?;
    rows.map(|t| parse_id(&format!("tag of device {id}"), t?))
        .collect()
}

fn load_device(conn: &Connection, id: &DeviceId) -> Result<Device> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
        ))?
        .query_row([id.as_str()], device_from_row)
        .optional()?
        .ok_or_else(|| RegistryError::UnknownDevice(id.clone()))?;
    let tags = tags_of(conn, id.as_str())?;
    raw.into_device(tags)
}

const COMMAND_COLUMNS: &str = "id, device_id, action, args, delivery, state, requested_by, rule_id, \
    created_at, sent_at, accepted_at, finished_at, expires_at, reason, output";

type RawCommand = (
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    i64,
    [Option<i64>; 4],
    Option<String>,
    Option<String>,
);

fn command_from_row(r: &Row<'_>) -> rusqlite::Result<RawCommand> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        [r.get(9)?, r.get(10)?, r.get(11)?, r.get(12)?],
        r.get(13)?,
        r.get(14)?,
    ))
}

fn into_command(raw: RawCommand) -> Result<CommandRecord> {
    let (
        id,
        device,
        action,
        args,
        delivery,
        state,
        requested_by,
        rule_id,
        created_at,
        times,
        reason,
        output,
    ) = raw;
    let what = |f: &str| format!("{f} of command {id}");
    Ok(CommandRecord {
        device: parse_id(&what("device"), device)?,
        action,
        args: parse_json(&what("args"), &args)?,
        delivery: Delivery::parse(&delivery).ok_or_else(|| RegistryError::Corrupt {
            what: what("delivery"),
            detail: delivery.clone(),
        })?,
        state: CommandState::parse(&state).ok_or_else(|| RegistryError::Corrupt {
            what: what("state"),
            detail: state.clone(),
        })?,
        requested_by,
        rule_id,
        created_at: created_at.max(0) as u64,
        sent_at: opt_u64(times[0]),
        accepted_at: opt_u64(times[1]),
        finished_at: opt_u64(times[2]),
        expires_at: opt_u64(times[3]),
        reason,
        output: output
            .as_deref()
            .map(|t| parse_json(&what("output"), t))
            .transpose()?,
        id: parse_id(&what("id"), id)?,
    })
}

fn query_commands(
    conn: &Connection,
    sql_tail: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<CommandRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands {sql_tail}"
    ))?;
    let raws = stmt
        .query_map(params, command_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    raws.into_iter().map(into_command).collect()
}

/// Keep only the newest `keep` rows of `table` for `device`.
fn prune(tx: &Transaction<'_>, table: &str, device: &str, keep: u32) -> Result<()> {
    // The cut-off is the seq of the newest row that falls outside the window;
    // the (device_id, seq) index makes both lookups cheap.
    let sql = format!(
        "DELETE FROM {table} WHERE device_id = ?1 AND seq <= \
         (SELECT seq FROM {table} WHERE device_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)"
    );
    tx.prepare_cached(&sql)?.execute(params![device, keep])?;
    Ok(())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

fn action_of(text: &str) -> Result<Action> {
    text.parse().map_err(|e: String| RegistryError::Corrupt {
        what: "action".into(),
        detail: e,
    })
}

/// Per-device work gathered while applying a batch, flushed once at the end.
#[derive(Default)]
struct Touched {
    last_seen: Option<i64>,
    latest_telemetry: Option<(i64, String)>,
    telemetry_added: i64,
    events_added: bool,
}

impl Store for SqliteStore {
    fn check_new_device(&self, id: &DeviceId) -> Result<()> {
        if exists(&self.conn, id)? {
            return Err(RegistryError::DuplicateDevice(id.clone()));
        }
        Ok(())
    }

    fn add_device(&mut self, new: &NewDevice) -> Result<Device> {
        let tx = write_tx(&mut self.conn)?;
        if exists(&tx, &new.id)? {
            return Err(RegistryError::DuplicateDevice(new.id.clone()));
        }
        let now = now_unix() as i64;
        tx.execute(
            "INSERT INTO devices (id, board, lifecycle, registered_at, cert_serial, cert_fingerprint, cert_not_after) \
             VALUES (?1, ?2, 'registered', ?3, ?4, ?5, ?6)",
            params![
                new.id.as_str(),
                new.board.as_str(),
                now,
                new.cert.as_ref().map(|c| c.serial.as_str()),
                new.cert.as_ref().map(|c| c.fingerprint_sha256.as_str()),
                new.cert.as_ref().map(|c| c.not_after as i64),
            ],
        )?;
        for tag in &new.tags {
            tx.execute(
                "INSERT INTO device_tags (device_id, tag) VALUES (?1, ?2)",
                params![new.id.as_str(), tag.as_str()],
            )?;
        }
        let device = load_device(&tx, &new.id)?;
        tx.commit()?;
        Ok(device)
    }

    fn set_certificate(&mut self, id: &DeviceId, cert: &CertInfo) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE devices SET cert_serial = ?2, cert_fingerprint = ?3, cert_not_after = ?4 WHERE id = ?1",
            params![
                id.as_str(),
                cert.serial,
                cert.fingerprint_sha256,
                cert.not_after as i64
            ],
        )?;
        if n == 0 {
            return Err(RegistryError::UnknownDevice(id.clone()));
        }
        Ok(())
    }

    fn device(&self, id: &DeviceId) -> Result<Device> {
        load_device(&self.conn, id)
    }

    fn devices(&self, selector: &Selector) -> Result<Vec<Device>> {
        let tx = self.conn.unchecked_transaction()?; // one consistent snapshot
        let ids: Vec<DeviceId> = match selector {
            Selector::All => {
                let mut stmt = tx.prepare_cached("SELECT id FROM devices ORDER BY id")?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                rows.map(|r| parse_id("device id", r?))
                    .collect::<Result<_>>()?
            }
            Selector::Tag(tag) => {
                let mut stmt = tx.prepare_cached(
                    "SELECT device_id FROM device_tags WHERE tag = ?1 ORDER BY device_id",
                )?;
                let rows = stmt.query_map([tag.as_str()], |r| r.get::<_, String>(0))?;
                rows.map(|r| parse_id("device id", r?))
                    .collect::<Result<_>>()?
            }
            Selector::Ids(ids) => {
                let mut sorted = ids.clone();
                sorted.sort();
                sorted.dedup();
                sorted
            }
        };
        let devices = ids
            .iter()
            .map(|id| load_device(&tx, id))
            .collect::<Result<Vec<_>>>()?;
        Ok(devices)
    }

    fn revoke(&mut self, id: &DeviceId) -> Result<Device> {
        let tx = write_tx(&mut self.conn)?;
        let device = load_device(&tx, id)?;
        if device.lifecycle == Lifecycle::Revoked {
            return Err(RegistryError::Revoked(id.clone()));
        }
        tx.execute(
            "UPDATE devices SET lifecycle = 'revoked', revoked_at = ?2, online = 0 WHERE id = ?1",
            params![id.as_str(), now_unix() as i64],
        )?;
        // Queued work for a revoked device can never be delivered.
        tx.execute(
            "UPDATE commands SET state = 'rejected', finished_at = ?2, reason = 'device revoked' \
             WHERE device_id = ?1 AND state = 'queued'",
            params![id.as_str(), now_unix() as i64],
        )?;
        tx.execute(
            "DELETE FROM on_connect_rules WHERE device_id = ?1",
            [id.as_str()],
        )?;
        let device = load_device(&tx, id)?;
        tx.commit()?;
        Ok(device)
    }

    fn set_desired(&mut self, id: &DeviceId, changes: &Map<String, Value>) -> Result<Desired> {
        for key in changes.keys() {
            validate_setting_key(key)?;
        }
        let tx = write_tx(&mut self.conn)?;
        let device = load_device(&tx, id)?;
        if device.lifecycle == Lifecycle::Revoked {
            return Err(RegistryError::Revoked(id.clone()));
        }
        let mut settings = device.desired;
        for (k, v) in changes {
            if v.is_null() {
                settings.remove(k);
            } else {
                settings.insert(k.clone(), v.clone());
            }
        }
        let revision = device.desired_revision + 1;
        tx.execute(
            "UPDATE devices SET desired = ?2, desired_rev = ?3 WHERE id = ?1",
            params![id.as_str(), json_text(&settings), revision as i64],
        )?;
        tx.commit()?;
        Ok(Desired { revision, settings })
    }

    fn unpublished_desired(&self) -> Result<Vec<(DeviceId, Desired)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, desired, desired_rev FROM devices \
             WHERE desired_rev > desired_published_rev AND lifecycle != 'revoked' ORDER BY id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, desired, rev)| {
                let settings = parse_json(&format!("desired of device {id}"), &desired)?;
                Ok((
                    parse_id("device id", id)?,
                    Desired {
                        revision: rev.max(0) as u64,
                        settings,
                    },
                ))
            })
            .collect()
    }

    fn mark_desired_published(&mut self, id: &DeviceId, revision: u64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE devices SET desired_published_rev = max(desired_published_rev, ?2) WHERE id = ?1",
            params![id.as_str(), revision as i64],
        )?;
        if n == 0 {
            return Err(RegistryError::UnknownDevice(id.clone()));
        }
        Ok(())
    }

    fn insert_commands(&mut self, commands: &[NewCommand]) -> Result<()> {
        let tx = write_tx(&mut self.conn)?;
        let now = now_unix() as i64;
        for c in commands {
            let device = load_device(&tx, &c.device)?;
            if device.lifecycle == Lifecycle::Revoked {
                return Err(RegistryError::Revoked(c.device.clone()));
            }
            let state = if c.delivery == Delivery::Queued {
                CommandState::Queued
            } else {
                CommandState::Sent
            };
            let sent_at = (state == CommandState::Sent).then_some(now);
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO commands (id, device_id, action, args, delivery, state, requested_by, \
                     rule_id, created_at, sent_at, expires_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?
                .execute(params![
                    c.id.as_str(),
                    c.device.as_str(),
                    c.action.as_str(),
                    json_text(&c.args),
                    c.delivery.as_str(),
                    state.as_str(),
                    c.requested_by,
                    c.rule_id,
                    now,
                    sent_at,
                    c.expires_at.map(|e| e as i64),
                ]);
            match inserted {
                Err(e) if is_unique_violation(&e) => {
                    return Err(RegistryError::DuplicateCommand(c.id.clone()));
                }
                other => {
                    other?;
                }
            }
        }
        let touched: BTreeSet<&str> = commands.iter().map(|c| c.device.as_str()).collect();
        for device in touched {
            prune(&tx, "commands", device, self.retention.commands_per_device)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn command(&self, id: &CommandId) -> Result<CommandRecord> {
        query_commands(&self.conn, "WHERE id = ?1", [id.as_str()])?
            .pop()
            .ok_or_else(|| RegistryError::UnknownCommand(id.clone()))
    }

    fn commands_for(&self, device: &DeviceId, limit: u32) -> Result<Vec<CommandRecord>> {
        require(&self.conn, device)?;
        query_commands(
            &self.conn,
            "WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
            params![device.as_str(), limit],
        )
    }

    fn deliverable_queued(&self) -> Result<Vec<CommandRecord>> {
        query_commands(
            &self.conn,
            "WHERE state = 'queued' AND device_id IN (SELECT id FROM devices WHERE online = 1) ORDER BY seq",
            [],
        )
    }

    fn queued_for(&self, device: &DeviceId) -> Result<Vec<CommandRecord>> {
        query_commands(
            &self.conn,
            "WHERE state = 'queued' AND device_id = ?1 ORDER BY seq",
            [device.as_str()],
        )
    }

    fn mark_sent(&mut self, ids: &[CommandId], at: UnixSeconds) -> Result<()> {
        let tx = write_tx(&mut self.conn)?;
        for id in ids {
            tx.prepare_cached(
                "UPDATE commands SET state = 'sent', sent_at = ?2 WHERE id = ?1 AND state = 'queued'",
            )?
            .execute(params![id.as_str(), at as i64])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn add_on_connect(
        &mut self,
        device: &DeviceId,
        action: Action,
        args: &Map<String, Value>,
    ) -> Result<OnConnectRule> {
        let tx = write_tx(&mut self.conn)?;
        let d = load_device(&tx, device)?;
        if d.lifecycle == Lifecycle::Revoked {
            return Err(RegistryError::Revoked(device.clone()));
        }
        let now = now_unix();
        tx.execute(
            "INSERT INTO on_connect_rules (device_id, action, args, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![device.as_str(), action.as_str(), json_text(args), now as i64],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(OnConnectRule {
            id,
            device: device.clone(),
            action,
            args: args.clone(),
            created_at: now,
        })
    }

    fn on_connect_rules(&self, device: &DeviceId) -> Result<Vec<OnConnectRule>> {
        require(&self.conn, device)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, action, args, created_at FROM on_connect_rules WHERE device_id = ?1 ORDER BY id",
        )?;
        let rows = stmt
            .query_map([device.as_str()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, action, args, created_at)| {
                Ok(OnConnectRule {
                    id,
                    device: device.clone(),
                    action: action_of(&action)?,
                    args: parse_json(&format!("args of on-connect rule {id}"), &args)?,
                    created_at: created_at.max(0) as u64,
                })
            })
            .collect()
    }

    fn remove_on_connect(&mut self, rule: i64) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM on_connect_rules WHERE id = ?1", [rule])?;
        if n == 0 {
            return Err(RegistryError::UnknownRule(rule));
        }
        Ok(())
    }

    fn apply(&mut self, batch: &[Update]) -> Result<BatchReport> {
        let retention = self.retention;
        let tx = write_tx(&mut self.conn)?;
        let mut report = BatchReport::default();
        let mut known: HashMap<DeviceId, bool> = HashMap::new();
        let mut touched: HashMap<DeviceId, Touched> = HashMap::new();

        for update in batch {
            let device = update.device();
            let is_known = match known.get(device) {
                Some(k) => *k,
                None => {
                    let k = exists(&tx, device)?;
                    known.insert(device.clone(), k);
                    k
                }
            };
            if !is_known {
                report.unknown_devices.insert(device.clone());
                continue;
            }
            let id = device.as_str();
            let t = touched.entry(device.clone()).or_default();
            match update {
                Update::Status {
                    status,
                    received_at,
                    ..
                } => {
                    let at = *received_at as i64;
                    match status.state {
                        Presence::Online => {
                            let (was_online, prev_connected): (bool, Option<i64>) = tx
                                .prepare_cached(
                                    "SELECT online, connected_at FROM devices WHERE id = ?1",
                                )?
                                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                            // A retained `online` replayed after a service restart
                            // carries the same ts: not a new connection.
                            let connected_at = status.ts.map(|t| t as i64).unwrap_or(at);
                            let new_connection = !was_online
                                || status.ts.is_none()
                                || prev_connected != Some(connected_at);
                            tx.prepare_cached(
                                "UPDATE devices SET online = 1, connected_at = ?2, \
                                 agent_version = coalesce(?3, agent_version), \
                                 boot_id = coalesce(?4, boot_id), addresses = ?5, \
                                 lifecycle = CASE lifecycle WHEN 'registered' THEN 'provisioned' ELSE lifecycle END, \
                                 provisioned_at = coalesce(provisioned_at, ?6) \
                                 WHERE id = ?1",
                            )?
                            .execute(params![
                                id,
                                connected_at,
                                status.agent_version,
                                status.boot_id,
                                json_text(&status.addresses),
                                at
                            ])?;
                            t.last_seen = Some(t.last_seen.map_or(at, |l| l.max(at)));
                            if new_connection {
                                report.connected.push(device.clone());
                            }
                        }
                        Presence::Offline => {
                            // An offline will says nothing about when the device
                            // was last heard from, so last_seen stays.
                            tx.prepare_cached("UPDATE devices SET online = 0 WHERE id = ?1")?
                                .execute([id])?;
                        }
                    }
                }
                Update::Telemetry {
                    ts,
                    payload,
                    received_at,
                    ..
                } => {
                    tx.prepare_cached(
                        "INSERT INTO telemetry (device_id, ts, received_at, payload) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![id, *ts as i64, *received_at as i64, payload])?;
                    t.latest_telemetry = Some((*ts as i64, payload.clone()));
                    t.telemetry_added += 1;
                    let at = *received_at as i64;
                    t.last_seen = Some(t.last_seen.map_or(at, |l| l.max(at)));
                }
                Update::Event {
                    event, received_at, ..
                } => {
                    tx.prepare_cached(
                        "INSERT INTO events (device_id, ts, received_at, kind, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![
                        id,
                        event.ts as i64,
                        *received_at as i64,
                        event.kind,
                        event.message
                    ])?;
                    t.events_added = true;
                    let at = *received_at as i64;
                    t.last_seen = Some(t.last_seen.map_or(at, |l| l.max(at)));
                }
                Update::Reported {
                    reported,
                    received_at,
                    ..
                } => {
                    tx.prepare_cached(
                        "UPDATE devices SET reported = ?2, reported_ignored = ?3, reported_rev = ?4, reported_at = ?5 \
                         WHERE id = ?1",
                    )?
                    .execute(params![
                        id,
                        json_text(&reported.applied),
                        json_text(&reported.ignored),
                        reported.revision as i64,
                        reported.ts as i64
                    ])?;
                    let at = *received_at as i64;
                    t.last_seen = Some(t.last_seen.map_or(at, |l| l.max(at)));
                }
                Update::CommandSeen {
                    command,
                    received_at,
                    ..
                } => {
                    // Commands published by someone who did not record them
                    // (another operator tool) still enter the log.
                    tx.prepare_cached(
                        "INSERT INTO commands (id, device_id, action, args, delivery, state, created_at, sent_at, expires_at) \
                         VALUES (?1, ?2, ?3, ?4, 'now', 'sent', ?5, ?5, ?6) \
                         ON CONFLICT (id) DO UPDATE SET action = coalesce(action, excluded.action), \
                         args = CASE WHEN action IS NULL THEN excluded.args ELSE args END",
                    )?
                    .execute(params![
                        command.id.as_str(),
                        id,
                        command.action.as_str(),
                        json_text(&command.args),
                        *received_at as i64,
                        command.expires_at.map(|e| e as i64)
                    ])?;
                }
                Update::CommandResult {
                    result,
                    received_at,
                    ..
                } => {
                    let at = *received_at as i64;
                    t.last_seen = Some(t.last_seen.map_or(at, |l| l.max(at)));
                    // A result for a command never seen (the service was down
                    // when it was sent) still gets a log entry.
                    tx.prepare_cached(
                        "INSERT INTO commands (id, device_id, delivery, state, created_at) \
                         VALUES (?1, ?2, 'now', 'sent', ?3) ON CONFLICT (id) DO NOTHING",
                    )?
                    .execute(params![result.id.as_str(), id, at])?;
                    let output = result.output.as_ref().map(json_text);
                    if result.status == CommandStatus::Accepted {
                        tx.prepare_cached(
                            "UPDATE commands SET state = 'accepted', accepted_at = ?3 \
                             WHERE id = ?1 AND device_id = ?2 AND state IN ('queued', 'sent')",
                        )?
                        .execute(params![result.id.as_str(), id, at])?;
                    } else {
                        // Never overwrite a final state (duplicate delivery).
                        tx.prepare_cached(
                            "UPDATE commands SET state = ?3, finished_at = ?4, reason = ?5, output = ?6 \
                             WHERE id = ?1 AND device_id = ?2 AND state IN ('queued', 'sent', 'accepted')",
                        )?
                        .execute(params![
                            result.id.as_str(),
                            id,
                            result.status.as_str(),
                            at,
                            result.reason,
                            output
                        ])?;
                        // The answer to `inventory` is the device's inventory.
                        if result.status == CommandStatus::Succeeded
                            && let Some(out) = &output
                        {
                            tx.prepare_cached(
                                "UPDATE devices SET inventory = ?2, inventory_at = ?3 WHERE id = ?1 \
                                 AND EXISTS (SELECT 1 FROM commands WHERE id = ?4 AND action = 'inventory')",
                            )?
                            .execute(params![id, out, at, result.id.as_str()])?;
                        }
                    }
                }
            }
            report.applied += 1;
        }

        for (device, t) in &touched {
            let id = device.as_str();
            if let Some(seen) = t.last_seen {
                tx.prepare_cached(
                    "UPDATE devices SET last_seen = max(coalesce(last_seen, 0), ?2) WHERE id = ?1",
                )?
                .execute(params![id, seen])?;
            }
            if let Some((ts, payload)) = &t.latest_telemetry {
                tx.prepare_cached(
                    "UPDATE devices SET telemetry = ?2, telemetry_at = ?3, \
                     telemetry_count = telemetry_count + ?4 WHERE id = ?1",
                )?
                .execute(params![id, payload, ts, t.telemetry_added])?;
                prune(&tx, "telemetry", id, retention.telemetry_per_device)?;
            }
            if t.events_added {
                prune(&tx, "events", id, retention.events_per_device)?;
            }
        }
        tx.commit()?;
        Ok(report)
    }

    fn telemetry_history(&self, device: &DeviceId, limit: u32) -> Result<Vec<TelemetryRow>> {
        require(&self.conn, device)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT ts, received_at, payload FROM telemetry WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![device.as_str(), limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(ts, received_at, payload)| {
                Ok(TelemetryRow {
                    ts: ts.max(0) as u64,
                    received_at: received_at.max(0) as u64,
                    payload: parse_json("telemetry payload", &payload)?,
                })
            })
            .collect()
    }

    fn events(&self, device: &DeviceId, limit: u32) -> Result<Vec<EventRow>> {
        require(&self.conn, device)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT ts, received_at, kind, message FROM events WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![device.as_str(), limit], |r| {
                Ok(EventRow {
                    ts: r.get::<_, i64>(0)?.max(0) as u64,
                    received_at: r.get::<_, i64>(1)?.max(0) as u64,
                    kind: r.get(2)?,
                    message: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn stats(&self) -> Result<Stats> {
        let count = |sql: &str| -> Result<u64> {
            Ok(self.conn.query_row(sql, [], |r| r.get::<_, i64>(0))?.max(0) as u64)
        };
        let page_count = count("PRAGMA page_count")?;
        let page_size = count("PRAGMA page_size")?;
        Ok(Stats {
            devices: count("SELECT count(*) FROM devices")?,
            telemetry_rows: count("SELECT count(*) FROM telemetry")?,
            telemetry_received: count("SELECT coalesce(sum(telemetry_count), 0) FROM devices")?,
            events: count("SELECT count(*) FROM events")?,
            commands: count("SELECT count(*) FROM commands")?,
            db_bytes: page_count * page_size,
        })
    }
}

#[cfg(test)]
mod tests;
