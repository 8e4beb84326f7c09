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

use edgebind_protocol::messages::{Action, Desired, UnixSeconds};
use edgebind_protocol::{CommandId, DeviceId};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, Transaction, params};
use serde_json::{Map, Value};

use super::rows::{
    CERT_COLUMNS, CLAIM_SERIAL_COLUMNS, COMMAND_COLUMNS, DEVICE_COLUMNS, MANUFACTURING_COLUMNS,
    RawCert, RawClaimSerial, RawCommand, RawDevice, RawManufacturing, RawState, STATE_COLUMNS,
    action_of, history_table, parse_id, parse_json,
};
use super::storage::{NewEvent, NewSample, Storage, StorageTx};
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
    // 2: listing filtered in the database (issue 10): tag, lifecycle and
    // presence filters walk an index in id order, so the first page stays
    // cheap at any fleet size.
    r#"
    CREATE INDEX device_tags_by_tag_device ON device_tags(tag, device_id);
    DROP INDEX device_tags_by_tag;
    CREATE INDEX devices_by_lifecycle ON devices(lifecycle, id);
    CREATE INDEX devices_by_online ON devices(online, id);
    "#,
    // 3: fleet services' broker connections, so presence can say when it is stale.
    r#"
    CREATE TABLE services (
        name      TEXT PRIMARY KEY,
        connected INTEGER NOT NULL,
        since     INTEGER NOT NULL,
        seen_at   INTEGER NOT NULL
    );
    "#,
    // 4: several service instances (issue 10): a message delivered twice is
    // stored once (samples and events written before this have no digest
    // and are never matched), and claims on what the outbox publishes.
    r#"
    ALTER TABLE telemetry ADD COLUMN digest BLOB;
    CREATE UNIQUE INDEX telemetry_once ON telemetry(device_id, ts, digest);
    ALTER TABLE events ADD COLUMN digest BLOB;
    CREATE UNIQUE INDEX events_once ON events(device_id, ts, digest);
    CREATE TABLE leases (
        key    TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until  INTEGER NOT NULL
    ) STRICT;
    "#,
    // 5: manufacturing records of the factory line (issue 13): one per unit
    // serial; a device belongs to at most one unit.
    r#"
    CREATE TABLE manufacturing (
        serial           TEXT PRIMARY KEY,
        device_id        TEXT NOT NULL UNIQUE REFERENCES devices(id),
        cert_serial      TEXT NOT NULL,
        cert_fingerprint TEXT NOT NULL,
        station          TEXT NOT NULL,
        operator         TEXT NOT NULL,
        made_at          INTEGER NOT NULL,
        image_sha256     TEXT
    ) STRICT;
    "#,
    // 6: allow-lists of claim-based first boot (issue 13): one entry per unit
    // serial, on one batch's list; a device is provisioned for at most one.
    r#"
    CREATE TABLE claim_serials (
        serial         TEXT PRIMARY KEY,
        batch          TEXT NOT NULL,
        allowed_at     INTEGER NOT NULL,
        device_id      TEXT UNIQUE REFERENCES devices(id),
        key_sha256     TEXT,
        chain_pem      TEXT,
        provisioned_at INTEGER,
        CHECK ((device_id IS NULL) = (provisioned_at IS NULL))
    ) STRICT;
    CREATE INDEX claim_serials_batch ON claim_serials(batch, serial);
    "#,
    // 7: what each fleet service saw of overload (issue 17): the broker's
    // dropped-messages counter and its own lag.
    r#"
    ALTER TABLE services ADD COLUMN broker_dropped INTEGER;
    ALTER TABLE services ADD COLUMN lag INTEGER NOT NULL DEFAULT 0;
    "#,
    // 8: console login codes (issue 15): only the SHA-256 of each code,
    // single use, with an expiry.
    r#"
    CREATE TABLE console_login_codes (
        hash       TEXT PRIMARY KEY,
        operator   TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at    INTEGER
    ) STRICT;
    "#,
    // 9: the audit log (issue 15): who changed what, when.
    r#"
    CREATE TABLE audit (
        seq    INTEGER PRIMARY KEY AUTOINCREMENT,
        at     INTEGER NOT NULL,
        actor  TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    ) STRICT;
    "#,
    // 10: device certificate history and renewal (issue 14): every
    // certificate signed by renewal and the ones it replaced, with its state.
    r#"
    CREATE TABLE device_certificates (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        serial        TEXT NOT NULL UNIQUE,
        device_id     TEXT NOT NULL REFERENCES devices(id),
        fingerprint   TEXT NOT NULL,
        not_after     INTEGER NOT NULL,
        issued_at     INTEGER NOT NULL,
        origin        TEXT NOT NULL CHECK (origin IN ('registered', 'renewed', 'reissued')),
        state         TEXT NOT NULL CHECK (state IN ('pending', 'current', 'previous', 'retired', 'abandoned', 'replaced')),
        key_sha256    TEXT,
        chain_pem     TEXT,
        confirmed_at  INTEGER,
        superseded_at INTEGER,
        retired_at    INTEGER
    ) STRICT;
    CREATE INDEX device_certificates_by_device ON device_certificates(device_id, seq);
    CREATE INDEX device_certificates_by_state ON device_certificates(state, superseded_at);
    "#,
    // 11: presence history (issue 15): each connect and disconnect the
    // fleet service saw, the newest PRESENCE_PER_DEVICE per device.
    r#"
    CREATE TABLE presence_history (
        seq       INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        at        INTEGER NOT NULL,
        online    INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX presence_history_by_device ON presence_history(device_id, seq);
    "#,
    // 12: the detail of each fleet service's lag (issue 17): what waits at the
    // broker, the age of its oldest uncommitted message, whether it throttles.
    r#"
    ALTER TABLE services ADD COLUMN broker_waiting INTEGER;
    ALTER TABLE services ADD COLUMN oldest_uncommitted_s INTEGER;
    ALTER TABLE services ADD COLUMN push_back INTEGER NOT NULL DEFAULT 0;
    "#,
    // 13: a certificate's origin may be 'reprovisioned' (issue 14: an expired
    // device re-provisioned through its claim identity). SQLite cannot change
    // a CHECK constraint, so the table is rebuilt with its rows and indexes.
    r#"
    CREATE TABLE device_certificates_new (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        serial        TEXT NOT NULL UNIQUE,
        device_id     TEXT NOT NULL REFERENCES devices(id),
        fingerprint   TEXT NOT NULL,
        not_after     INTEGER NOT NULL,
        issued_at     INTEGER NOT NULL,
        origin        TEXT NOT NULL CHECK (origin IN ('registered', 'renewed', 'reissued', 'reprovisioned')),
        state         TEXT NOT NULL CHECK (state IN ('pending', 'current', 'previous', 'retired', 'abandoned', 'replaced')),
        key_sha256    TEXT,
        chain_pem     TEXT,
        confirmed_at  INTEGER,
        superseded_at INTEGER,
        retired_at    INTEGER
    ) STRICT;
    INSERT INTO device_certificates_new SELECT seq, serial, device_id, fingerprint, not_after,
        issued_at, origin, state, key_sha256, chain_pem, confirmed_at, superseded_at, retired_at
        FROM device_certificates;
    DROP TABLE device_certificates;
    ALTER TABLE device_certificates_new RENAME TO device_certificates;
    CREATE INDEX device_certificates_by_device ON device_certificates(device_id, seq);
    CREATE INDEX device_certificates_by_state ON device_certificates(state, superseded_at);
    "#,
];

const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a writer waits for another process's transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    location: String,
    retention: Retention,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn db(e: rusqlite::Error) -> RegistryError {
    RegistryError::backend(e)
}

/// A file that is not a database at all (or is torn) is damage, not a
/// passing backend error: say so.
fn damaged_or(e: rusqlite::Error, location: &str) -> RegistryError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
            RegistryError::Damaged {
                location: location.to_owned(),
                detail: e.to_string(),
            }
        }
        _ => db(e),
    }
}

impl SqliteStore {
    /// Open the registry at `path`, which must exist and pass SQLite's
    /// `quick_check`: a missing, empty (0-byte) or damaged file is an error
    /// naming the file and what to do, never a new empty registry. Runs the
    /// migrations this version knows but the file has not seen yet.
    pub fn open(path: &Path, retention: Retention) -> Result<Self> {
        let location = path.display().to_string();
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RegistryError::Missing { location });
            }
            Err(e) => return Err(RegistryError::backend(e).located(&location)),
            Ok(m) if m.len() == 0 => {
                return Err(RegistryError::Damaged {
                    location,
                    detail: "the file is empty (0 bytes)".into(),
                });
            }
            Ok(_) => {}
        }
        Self::connect(path, location, retention, OpenFlags::SQLITE_OPEN_READ_WRITE)
    }

    /// Like [`SqliteStore::open`], but an absent file becomes a new, empty
    /// registry (a new fleet home: `edgebind pki init`, `edgebind fleet init`).
    pub fn create(path: &Path, retention: Retention) -> Result<Self> {
        let location = path.display().to_string();
        if path.exists() {
            return Self::open(path, retention);
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| RegistryError::backend(e).located(&location))?;
        }
        Self::connect(
            path,
            location,
            retention,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
    }

    /// SQLite's full `integrity_check` (reads every page; `fleet check`).
    /// Returns the problems found, empty when the file is sound.
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(|e| db(e).located(&self.location))?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| db(e).located(&self.location))?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    /// A consistent copy of the live registry at `dest` (`VACUUM INTO`:
    /// one read transaction, so the service may keep writing meanwhile).
    /// `dest` must not exist.
    pub fn backup_to(&self, dest: &Path) -> Result<()> {
        if dest.exists() {
            return Err(RegistryError::backend(format!(
                "{} already exists; name a new file",
                dest.display()
            ))
            .located(&self.location));
        }
        self.conn
            .execute("VACUUM INTO ?1", [dest.to_string_lossy()])
            .map_err(|e| db(e).located(&self.location))?;
        Ok(())
    }

    fn connect(
        path: &Path,
        location: String,
        retention: Retention,
        flags: OpenFlags,
    ) -> Result<Self> {
        let opened = (|| {
            let mut conn = Connection::open_with_flags(
                path,
                flags | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(|e| damaged_or(e, &location))?;
            conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
            // Cheap enough on every open (it skips the index cross-checks of
            // integrity_check) and it catches garbage in the middle of a file
            // before anything is read from it as if it were data.
            let problems: Vec<String> = conn
                .prepare("PRAGMA quick_check")
                .and_then(|mut stmt| {
                    stmt.query_map([], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(|e| damaged_or(e, &location))?;
            if problems.first().map(String::as_str) != Some("ok") {
                return Err(RegistryError::Damaged {
                    location: location.clone(),
                    detail: format!("quick_check: {}", problems.join("; ")),
                });
            }
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(db)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(db)?;
            conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
            migrate(&mut conn, &location)?;
            conn.set_prepared_statement_cache_capacity(64);
            Ok(conn)
        })();
        Ok(SqliteStore {
            conn: opened.map_err(|e: RegistryError| e.located(&location))?,
            path: path.to_owned(),
            location,
            retention,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn schema_version(&self) -> Result<i64> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| db(e).located(&self.location))
    }
}

fn migrate(conn: &mut Connection, location: &str) -> Result<()> {
    // IMMEDIATE: two processes opening a fresh file must not both migrate.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(db)?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db)?;
    if found > SCHEMA_VERSION {
        return Err(RegistryError::SchemaTooNew {
            location: location.to_owned(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(db)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(db)?;
    }
    tx.commit().map_err(db)
}

impl Storage for SqliteStore {
    fn location(&self) -> &str {
        &self.location
    }

    fn retention(&self) -> Retention {
        self.retention
    }

    fn read(&self) -> Result<Box<dyn StorageTx + '_>> {
        // Deferred: a reader takes no lock and sees one snapshot (WAL).
        let tx = self.conn.unchecked_transaction().map_err(db)?;
        Ok(Box::new(SqliteTx { tx }))
    }

    /// IMMEDIATE: a deferred transaction that reads and then writes cannot
    /// wait for the lock (SQLite answers SQLITE_BUSY at once to avoid a
    /// deadlock), so a CLI write racing the fleet service's batch writer
    /// would fail with "database is locked" despite the busy timeout.
    fn write(&mut self) -> Result<Box<dyn StorageTx + '_>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        Ok(Box::new(SqliteTx { tx }))
    }
}

struct SqliteTx<'c> {
    tx: Transaction<'c>,
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("JSON values always serialize")
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|x| x as i64)
}

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

fn command_from_row(r: &Row<'_>) -> rusqlite::Result<RawCommand> {
    Ok(RawCommand {
        id: r.get(0)?,
        device: r.get(1)?,
        action: r.get(2)?,
        args: r.get(3)?,
        delivery: r.get(4)?,
        state: r.get(5)?,
        requested_by: r.get(6)?,
        rule_id: r.get(7)?,
        created_at: r.get(8)?,
        times: [r.get(9)?, r.get(10)?, r.get(11)?, r.get(12)?],
        reason: r.get(13)?,
        output: r.get(14)?,
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

/// The WHERE clause and parameters of a device listing; `?1`.. are bound in order.
fn list_filter(query: &DeviceQuery) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let (filter, values) = super::rows::list_filter(
        query,
        |n| format!("?{n}"),
        |p| format!("instr(id, {p}) > 0"),
    );
    let params = values
        .into_iter()
        .map(|v| match v {
            super::rows::FilterValue::Text(t) => V::Text(t),
            super::rows::FilterValue::Bool(b) => V::Integer(b as i64),
        })
        .collect();
    (filter, params)
}

impl SqliteTx<'_> {
    fn tags_of(&self, id: &str) -> Result<BTreeSet<Tag>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT tag FROM device_tags WHERE device_id = ?1")
            .map_err(db)?;
        let tags = stmt
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        tags.into_iter()
            .map(|t| parse_id(&format!("tag of device {id}"), t))
            .collect()
    }

    fn query_devices(&self, sql_tail: &str, params: impl rusqlite::Params) -> Result<Vec<Device>> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices {sql_tail}"))
            .map_err(db)?;
        let raws = stmt
            .query_map(params, device_from_row)
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        raws.into_iter()
            .map(|raw| {
                let tags = self.tags_of(&raw.id)?;
                raw.into_device(tags)
            })
            .collect()
    }

    fn query_commands(
        &self,
        sql_tail: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<CommandRecord>> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands {sql_tail}"
            ))
            .map_err(db)?;
        let raws = stmt
            .query_map(params, command_from_row)
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        raws.into_iter().map(RawCommand::into_command).collect()
    }

    fn query_claim_serials(
        &self,
        sql_tail: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<ClaimSerial>> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {CLAIM_SERIAL_COLUMNS} FROM claim_serials {sql_tail}"
            ))
            .map_err(db)?;
        let raws = stmt
            .query_map(params, |r| {
                Ok(RawClaimSerial {
                    serial: r.get(0)?,
                    batch: r.get(1)?,
                    allowed_at: r.get(2)?,
                    device: r.get(3)?,
                    key_sha256: r.get(4)?,
                    chain_pem: r.get(5)?,
                    provisioned_at: r.get(6)?,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db)?;
        raws.into_iter().map(RawClaimSerial::into_entry).collect()
    }

    fn query_certs(
        &self,
        sql_tail: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<CertRecord>> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {CERT_COLUMNS} FROM device_certificates {sql_tail}"
            ))
            .map_err(db)?;
        let raws = stmt
            .query_map(params, |r| {
                Ok(RawCert {
                    serial: r.get(0)?,
                    device: r.get(1)?,
                    fingerprint: r.get(2)?,
                    not_after: r.get(3)?,
                    issued_at: r.get(4)?,
                    origin: r.get(5)?,
                    state: r.get(6)?,
                    key_sha256: r.get(7)?,
                    chain_pem: r.get(8)?,
                    confirmed_at: r.get(9)?,
                    superseded_at: r.get(10)?,
                    retired_at: r.get(11)?,
                })
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        raws.into_iter().map(RawCert::into_record).collect()
    }

    fn query_manufacturing(
        &self,
        sql_tail: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<ManufacturingRecord>> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {MANUFACTURING_COLUMNS} FROM manufacturing {sql_tail}"
            ))
            .map_err(db)?;
        let raws = stmt
            .query_map(params, |r| {
                Ok(RawManufacturing {
                    serial: r.get(0)?,
                    device: r.get(1)?,
                    cert_serial: r.get(2)?,
                    cert_fingerprint: r.get(3)?,
                    station: r.get(4)?,
                    operator: r.get(5)?,
                    made_at: r.get(6)?,
                    image_sha256: r.get(7)?,
                })
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        raws.into_iter()
            .map(RawManufacturing::into_record)
            .collect()
    }

    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
        self.tx
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map_err(db)
    }
}

impl StorageTx for SqliteTx<'_> {
    fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit().map_err(db)
    }

    fn device(&mut self, id: &DeviceId) -> Result<Option<Device>> {
        Ok(self.query_devices("WHERE id = ?1", [id.as_str()])?.pop())
    }

    fn existing(&mut self, ids: &[DeviceId]) -> Result<Vec<DeviceId>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")
            .map_err(db)?;
        let mut found = Vec::new();
        for id in ids {
            if stmt.exists([id.as_str()]).map_err(db)? {
                found.push(id.clone());
            }
        }
        Ok(found)
    }

    fn states(&mut self, ids: &[DeviceId]) -> Result<HashMap<DeviceId, DeviceState>> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {STATE_COLUMNS} FROM devices WHERE id = ?1"
            ))
            .map_err(db)?;
        let mut states = HashMap::new();
        for id in ids {
            let raw = stmt
                .query_row([id.as_str()], |r| {
                    Ok(RawState {
                        lifecycle: r.get(1)?,
                        provisioned_at: r.get(2)?,
                        revoked_at: r.get(3)?,
                        online: r.get(4)?,
                        last_seen: r.get(5)?,
                        connected_at: r.get(6)?,
                        agent_version: r.get(7)?,
                        boot_id: r.get(8)?,
                        addresses: r.get(9)?,
                    })
                })
                .optional()
                .map_err(db)?;
            if let Some(raw) = raw {
                states.insert(id.clone(), raw.into_state(id.as_str())?);
            }
        }
        Ok(states)
    }

    fn list(&mut self, query: &DeviceQuery, limit: Option<u32>) -> Result<Vec<Device>> {
        let (filter, mut params) = list_filter(query);
        let limit_clause = match limit {
            Some(n) => {
                params.push(rusqlite::types::Value::Integer(n.into()));
                format!("LIMIT ?{}", params.len())
            }
            None => String::new(),
        };
        self.query_devices(
            &format!("{filter} ORDER BY id {limit_clause}"),
            rusqlite::params_from_iter(params),
        )
    }

    fn insert_devices(&mut self, devices: &[NewDevice], at: UnixSeconds) -> Result<()> {
        let mut insert = self
            .tx
            .prepare_cached(
                "INSERT INTO devices (id, board, lifecycle, registered_at, cert_serial, cert_fingerprint, cert_not_after) \
                 VALUES (?1, ?2, 'registered', ?3, ?4, ?5, ?6)",
            )
            .map_err(db)?;
        let mut tag = self
            .tx
            .prepare_cached("INSERT INTO device_tags (device_id, tag) VALUES (?1, ?2)")
            .map_err(db)?;
        for new in devices {
            insert
                .execute(params![
                    new.id.as_str(),
                    new.board.as_str(),
                    at as i64,
                    new.cert.as_ref().map(|c| c.serial.as_str()),
                    new.cert.as_ref().map(|c| c.fingerprint_sha256.as_str()),
                    new.cert.as_ref().map(|c| c.not_after as i64),
                ])
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        RegistryError::DuplicateDevice(new.id.clone())
                    } else {
                        db(e)
                    }
                })?;
            for t in &new.tags {
                tag.execute(params![new.id.as_str(), t.as_str()])
                    .map_err(db)?;
            }
        }
        Ok(())
    }

    fn save_certificate(&mut self, id: &DeviceId, cert: &CertInfo) -> Result<bool> {
        let n = self.exec(
            "UPDATE devices SET cert_serial = ?2, cert_fingerprint = ?3, cert_not_after = ?4 WHERE id = ?1",
            params![
                id.as_str(),
                cert.serial,
                cert.fingerprint_sha256,
                cert.not_after as i64
            ],
        )?;
        Ok(n > 0)
    }

    fn save_state(&mut self, id: &DeviceId, s: &DeviceState) -> Result<()> {
        self.exec(
            "UPDATE devices SET lifecycle = ?2, provisioned_at = ?3, revoked_at = ?4, online = ?5, \
             last_seen = ?6, connected_at = ?7, agent_version = ?8, boot_id = ?9, addresses = ?10 \
             WHERE id = ?1",
            params![
                id.as_str(),
                s.lifecycle.as_str(),
                opt_i64(s.provisioned_at),
                opt_i64(s.revoked_at),
                s.online,
                opt_i64(s.last_seen),
                opt_i64(s.connected_at),
                s.agent_version,
                s.boot_id,
                json_text(&s.addresses),
            ],
        )?;
        Ok(())
    }

    fn save_desired(&mut self, id: &DeviceId, desired: &Desired) -> Result<()> {
        self.exec(
            "UPDATE devices SET desired = ?2, desired_rev = ?3 WHERE id = ?1",
            params![
                id.as_str(),
                json_text(&desired.settings),
                desired.revision as i64
            ],
        )?;
        Ok(())
    }

    fn save_desired_published(&mut self, id: &DeviceId, revision: u64) -> Result<()> {
        self.exec(
            "UPDATE devices SET desired_published_rev = ?2 WHERE id = ?1",
            params![id.as_str(), revision as i64],
        )?;
        Ok(())
    }

    fn unpublished_desired(&mut self) -> Result<Vec<(DeviceId, Desired)>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT id, desired, desired_rev FROM devices \
                 WHERE desired_rev > desired_published_rev AND lifecycle != 'revoked' ORDER BY id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
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

    fn save_reported(&mut self, id: &DeviceId, r: &ReportedState) -> Result<()> {
        self.exec(
            "UPDATE devices SET reported = ?2, reported_ignored = ?3, reported_rev = ?4, reported_at = ?5 \
             WHERE id = ?1",
            params![
                id.as_str(),
                json_text(&r.applied),
                json_text(&r.ignored),
                r.revision as i64,
                r.at as i64
            ],
        )?;
        Ok(())
    }

    fn save_inventory(&mut self, id: &DeviceId, inventory: &Value, at: UnixSeconds) -> Result<()> {
        self.exec(
            "UPDATE devices SET inventory = ?2, inventory_at = ?3 WHERE id = ?1",
            params![id.as_str(), json_text(inventory), at as i64],
        )?;
        Ok(())
    }

    fn save_latest_telemetry(
        &mut self,
        id: &DeviceId,
        ts: UnixSeconds,
        payload: &str,
        added: u64,
    ) -> Result<u64> {
        let total = self
            .tx
            .prepare_cached(
                "UPDATE devices SET telemetry = ?2, telemetry_at = ?3, \
                 telemetry_count = telemetry_count + ?4 WHERE id = ?1 RETURNING telemetry_count",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![id.as_str(), payload, ts as i64, added as i64],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
            })
            .map_err(db)?;
        Ok(total.unwrap_or(0).max(0) as u64)
    }

    fn insert_telemetry(&mut self, samples: &[NewSample<'_>]) -> Result<Vec<bool>> {
        let mut insert = self
            .tx
            .prepare_cached(
                "INSERT INTO telemetry (device_id, ts, received_at, payload, digest) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )
            .map_err(db)?;
        samples
            .iter()
            .map(|s| {
                insert
                    .execute(params![
                        s.device.as_str(),
                        s.ts as i64,
                        s.received_at as i64,
                        s.payload,
                        &s.digest[..]
                    ])
                    .map(|n| n == 1)
                    .map_err(db)
            })
            .collect()
    }

    fn insert_events(&mut self, events: &[NewEvent<'_>]) -> Result<Vec<bool>> {
        let mut insert = self
            .tx
            .prepare_cached(
                "INSERT INTO events (device_id, ts, received_at, kind, message, digest) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            )
            .map_err(db)?;
        events
            .iter()
            .map(|e| {
                insert
                    .execute(params![
                        e.device.as_str(),
                        e.event.ts as i64,
                        e.received_at as i64,
                        e.event.kind,
                        e.event.message,
                        &e.digest[..]
                    ])
                    .map(|n| n == 1)
                    .map_err(db)
            })
            .collect()
    }

    fn insert_presence(&mut self, id: &DeviceId, change: &PresenceChange) -> Result<()> {
        self.exec(
            "INSERT INTO presence_history (device_id, at, online) VALUES (?1, ?2, ?3)",
            params![id.as_str(), change.at as i64, change.online],
        )?;
        Ok(())
    }

    fn presence_history(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<PresenceChange>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT at, online FROM presence_history WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![id.as_str(), limit], |r| {
                Ok(PresenceChange {
                    at: r.get::<_, i64>(0)?.max(0) as u64,
                    online: r.get(1)?,
                })
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        Ok(rows)
    }

    fn prune(&mut self, history: History, id: &DeviceId, keep: u32) -> Result<()> {
        let table = history_table(history);
        // The cut-off is the seq of the newest row that falls outside the window;
        // the (device_id, seq) index makes both lookups cheap.
        let sql = format!(
            "DELETE FROM {table} WHERE device_id = ?1 AND seq <= \
             (SELECT seq FROM {table} WHERE device_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)"
        );
        self.exec(&sql, params![id.as_str(), keep])?;
        Ok(())
    }

    fn telemetry(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<TelemetryRow>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT ts, received_at, payload FROM telemetry WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![id.as_str(), limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
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

    fn events(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<EventRow>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT ts, received_at, kind, message FROM events WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![id.as_str(), limit], |r| {
                Ok(EventRow {
                    ts: r.get::<_, i64>(0)?.max(0) as u64,
                    received_at: r.get::<_, i64>(1)?.max(0) as u64,
                    kind: r.get(2)?,
                    message: r.get(3)?,
                })
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
        Ok(rows)
    }

    fn command(&mut self, id: &CommandId) -> Result<Option<CommandRecord>> {
        Ok(self.query_commands("WHERE id = ?1", [id.as_str()])?.pop())
    }

    fn commands(&mut self, query: CommandQuery<'_>) -> Result<Vec<CommandRecord>> {
        match query {
            CommandQuery::Device { device, limit } => self.query_commands(
                "WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
                params![device.as_str(), limit],
            ),
            CommandQuery::QueuedFor(device) => self.query_commands(
                "WHERE state = 'queued' AND device_id = ?1 ORDER BY seq",
                [device.as_str()],
            ),
            CommandQuery::QueuedOnline => self.query_commands(
                "WHERE state = 'queued' AND device_id IN (SELECT id FROM devices WHERE online = 1) ORDER BY seq",
                [],
            ),
        }
    }

    fn insert_command(&mut self, c: &CommandRecord) -> Result<()> {
        let inserted = self.exec(
            "INSERT INTO commands (id, device_id, action, args, delivery, state, requested_by, \
             rule_id, created_at, sent_at, accepted_at, finished_at, expires_at, reason, output) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                c.id.as_str(),
                c.device.as_str(),
                c.action,
                json_text(&c.args),
                c.delivery.as_str(),
                c.state.as_str(),
                c.requested_by,
                c.rule_id,
                c.created_at as i64,
                opt_i64(c.sent_at),
                opt_i64(c.accepted_at),
                opt_i64(c.finished_at),
                opt_i64(c.expires_at),
                c.reason,
                c.output.as_ref().map(json_text),
            ],
        );
        match inserted {
            Err(RegistryError::Backend { error, .. })
                if error
                    .downcast_ref::<rusqlite::Error>()
                    .is_some_and(is_unique_violation) =>
            {
                Err(RegistryError::DuplicateCommand(c.id.clone()))
            }
            other => other.map(drop),
        }
    }

    fn save_command(&mut self, c: &CommandRecord) -> Result<()> {
        self.exec(
            "UPDATE commands SET action = ?2, args = ?3, state = ?4, sent_at = ?5, accepted_at = ?6, \
             finished_at = ?7, reason = ?8, output = ?9 WHERE id = ?1",
            params![
                c.id.as_str(),
                c.action,
                json_text(&c.args),
                c.state.as_str(),
                opt_i64(c.sent_at),
                opt_i64(c.accepted_at),
                opt_i64(c.finished_at),
                c.reason,
                c.output.as_ref().map(json_text),
            ],
        )?;
        Ok(())
    }

    fn insert_rule(
        &mut self,
        device: &DeviceId,
        action: Action,
        args: &Map<String, Value>,
        at: UnixSeconds,
    ) -> Result<i64> {
        self.exec(
            "INSERT INTO on_connect_rules (device_id, action, args, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![device.as_str(), action.as_str(), json_text(args), at as i64],
        )?;
        Ok(self.tx.last_insert_rowid())
    }

    fn rules(&mut self, device: &DeviceId) -> Result<Vec<OnConnectRule>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT id, action, args, created_at FROM on_connect_rules WHERE device_id = ?1 ORDER BY id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([device.as_str()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)?;
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

    fn delete_rule(&mut self, rule: i64) -> Result<bool> {
        Ok(self.exec("DELETE FROM on_connect_rules WHERE id = ?1", [rule])? > 0)
    }

    fn delete_rules_of(&mut self, device: &DeviceId) -> Result<()> {
        self.exec(
            "DELETE FROM on_connect_rules WHERE device_id = ?1",
            [device.as_str()],
        )?;
        Ok(())
    }

    fn save_service(&mut self, p: &ServicePresence) -> Result<()> {
        self.exec(
            "INSERT INTO services (name, connected, since, seen_at, broker_dropped, lag, \
             broker_waiting, oldest_uncommitted_s, push_back) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (name) DO UPDATE SET connected = excluded.connected, \
             since = excluded.since, seen_at = excluded.seen_at, \
             broker_dropped = excluded.broker_dropped, lag = excluded.lag, \
             broker_waiting = excluded.broker_waiting, \
             oldest_uncommitted_s = excluded.oldest_uncommitted_s, push_back = excluded.push_back",
            params![
                p.name,
                p.connected,
                p.since as i64,
                p.seen_at as i64,
                p.broker_dropped.map(|d| d as i64),
                p.lag as i64,
                p.broker_waiting.map(|d| d as i64),
                p.oldest_uncommitted_s.map(|d| d as i64),
                p.push_back,
            ],
        )?;
        Ok(())
    }

    fn take_lease(
        &mut self,
        key: &str,
        holder: &str,
        now: UnixSeconds,
        until: UnixSeconds,
    ) -> Result<bool> {
        let n = self.exec(
            "INSERT INTO leases (key, holder, until) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, until = excluded.until \
             WHERE leases.holder = excluded.holder OR leases.until < ?4",
            params![key, holder, until as i64, now as i64],
        )?;
        Ok(n == 1)
    }

    fn purge_leases(&mut self, before: UnixSeconds) -> Result<()> {
        self.exec("DELETE FROM leases WHERE until < ?1", [before as i64])?;
        Ok(())
    }

    fn services(&mut self) -> Result<Vec<ServicePresence>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT name, connected, since, seen_at, broker_dropped, lag, broker_waiting, \
                 oldest_uncommitted_s, push_back FROM services ORDER BY name",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ServicePresence {
                    name: r.get(0)?,
                    connected: r.get(1)?,
                    since: r.get::<_, i64>(2)?.max(0) as u64,
                    seen_at: r.get::<_, i64>(3)?.max(0) as u64,
                    broker_dropped: r.get::<_, Option<i64>>(4)?.map(|d| d.max(0) as u64),
                    lag: r.get::<_, i64>(5)?.max(0) as u64,
                    broker_waiting: r.get::<_, Option<i64>>(6)?.map(|d| d.max(0) as u64),
                    oldest_uncommitted_s: r.get::<_, Option<i64>>(7)?.map(|d| d.max(0) as u64),
                    push_back: r.get(8)?,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db)?;
        Ok(rows)
    }

    fn manufacturing(&mut self, serial: &str) -> Result<Option<ManufacturingRecord>> {
        Ok(self
            .query_manufacturing("WHERE serial = ?1", [serial])?
            .pop())
    }

    fn manufacturing_of(&mut self, device: &DeviceId) -> Result<Option<ManufacturingRecord>> {
        Ok(self
            .query_manufacturing("WHERE device_id = ?1", [device.as_str()])?
            .pop())
    }

    fn manufacturing_all(&mut self) -> Result<Vec<ManufacturingRecord>> {
        self.query_manufacturing("ORDER BY serial", [])
    }

    fn save_manufacturing(&mut self, r: &ManufacturingRecord) -> Result<()> {
        self.exec(
            "INSERT INTO manufacturing (serial, device_id, cert_serial, cert_fingerprint, station, \
             operator, made_at, image_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
             ON CONFLICT (serial) DO UPDATE SET device_id = excluded.device_id, \
             cert_serial = excluded.cert_serial, cert_fingerprint = excluded.cert_fingerprint, \
             station = excluded.station, operator = excluded.operator, \
             made_at = excluded.made_at, image_sha256 = excluded.image_sha256",
            params![
                r.serial,
                r.device.as_str(),
                r.cert_serial,
                r.cert_fingerprint_sha256,
                r.station,
                r.operator,
                r.made_at as i64,
                r.image_sha256
            ],
        )?;
        Ok(())
    }

    fn claim_serial(&mut self, serial: &UnitSerial) -> Result<Option<ClaimSerial>> {
        Ok(self
            .query_claim_serials("WHERE serial = ?1", [serial.as_str()])?
            .pop())
    }

    fn claim_serials(&mut self, batch: &DeviceId) -> Result<Vec<ClaimSerial>> {
        self.query_claim_serials("WHERE batch = ?1 ORDER BY serial", [batch.as_str()])
    }

    fn save_claim_serial(&mut self, e: &ClaimSerial) -> Result<()> {
        let p = e.provisioned.as_ref();
        self.exec(
            "INSERT INTO claim_serials (serial, batch, allowed_at, device_id, key_sha256, \
             chain_pem, provisioned_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (serial) DO UPDATE SET batch = excluded.batch, \
             allowed_at = excluded.allowed_at, device_id = excluded.device_id, \
             key_sha256 = excluded.key_sha256, chain_pem = excluded.chain_pem, \
             provisioned_at = excluded.provisioned_at",
            params![
                e.serial.as_str(),
                e.batch.as_str(),
                e.allowed_at as i64,
                p.map(|p| p.device.as_str()),
                p.map(|p| p.key_sha256.as_str()),
                p.map(|p| p.chain_pem.as_str()),
                p.map(|p| p.at as i64),
            ],
        )?;
        Ok(())
    }

    fn insert_login_code(&mut self, c: &LoginCode) -> Result<()> {
        self.exec(
            "INSERT INTO console_login_codes (hash, operator, created_at, expires_at, used_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                c.hash,
                c.operator,
                c.created_at as i64,
                c.expires_at as i64,
                opt_i64(c.used_at)
            ],
        )?;
        Ok(())
    }

    fn login_code(&mut self, hash: &str) -> Result<Option<LoginCode>> {
        self.tx
            .query_row(
                "SELECT hash, operator, created_at, expires_at, used_at \
                 FROM console_login_codes WHERE hash = ?1",
                [hash],
                |r| {
                    Ok(LoginCode {
                        hash: r.get(0)?,
                        operator: r.get(1)?,
                        created_at: r.get::<_, i64>(2)?.max(0) as u64,
                        expires_at: r.get::<_, i64>(3)?.max(0) as u64,
                        used_at: r.get::<_, Option<i64>>(4)?.map(|t| t.max(0) as u64),
                    })
                },
            )
            .optional()
            .map_err(db)
    }

    fn save_login_code_used(&mut self, hash: &str, at: UnixSeconds) -> Result<()> {
        self.exec(
            "UPDATE console_login_codes SET used_at = ?2 WHERE hash = ?1",
            params![hash, at as i64],
        )?;
        Ok(())
    }

    fn insert_audit(&mut self, e: &AuditEntry) -> Result<i64> {
        self.exec(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![e.at as i64, e.actor, e.action, e.target, e.detail],
        )?;
        Ok(self.tx.last_insert_rowid())
    }

    fn audit(&mut self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT seq, at, actor, action, target, detail FROM audit \
                 WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![before.unwrap_or(i64::MAX), limit], |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    at: r.get::<_, i64>(1)?.max(0) as u64,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    detail: r.get(5)?,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db)?;
        Ok(rows)
    }

    fn cert_records(&mut self, device: &DeviceId) -> Result<Vec<CertRecord>> {
        self.query_certs("WHERE device_id = ?1 ORDER BY seq", [device.as_str()])
    }

    fn save_cert_record(&mut self, r: &CertRecord) -> Result<()> {
        self.exec(
            "INSERT INTO device_certificates (serial, device_id, fingerprint, not_after, issued_at, \
             origin, state, key_sha256, chain_pem, confirmed_at, superseded_at, retired_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT (serial) DO UPDATE SET state = excluded.state, origin = excluded.origin, \
             confirmed_at = excluded.confirmed_at, superseded_at = excluded.superseded_at, \
             retired_at = excluded.retired_at",
            params![
                r.serial,
                r.device.as_str(),
                r.fingerprint_sha256,
                r.not_after as i64,
                r.issued_at as i64,
                r.origin.as_str(),
                r.state.as_str(),
                r.key_sha256,
                r.chain_pem,
                r.confirmed_at.map(|t| t as i64),
                r.superseded_at.map(|t| t as i64),
                r.retired_at.map(|t| t as i64),
            ],
        )?;
        Ok(())
    }

    fn cert_records_superseded(
        &mut self,
        state: CertState,
        before: UnixSeconds,
    ) -> Result<Vec<CertRecord>> {
        self.query_certs(
            "WHERE state = ?1 AND superseded_at < ?2 ORDER BY seq",
            params![state.as_str(), before as i64],
        )
    }

    fn cert_record(&mut self, serial: &str) -> Result<Option<CertRecord>> {
        Ok(self.query_certs("WHERE serial = ?1", [serial])?.pop())
    }

    fn presence_counts(&mut self) -> Result<Vec<(Lifecycle, bool, u64)>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT lifecycle, online, count(*) FROM devices GROUP BY 1, 2")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db)?;
        rows.into_iter()
            .map(|(l, online, n)| {
                let lifecycle = Lifecycle::parse(&l).ok_or_else(|| RegistryError::Corrupt {
                    what: "device lifecycle".into(),
                    detail: l.clone(),
                })?;
                Ok((lifecycle, online, n.max(0) as u64))
            })
            .collect()
    }

    fn attention_counts(&mut self, before: UnixSeconds) -> Result<(u64, u64)> {
        self.tx
            .query_row(
                "SELECT \
             count(*) FILTER (WHERE cert_not_after < ?1), \
             count(*) FILTER (WHERE desired_rev > coalesce(reported_rev, 0)) \
             FROM devices WHERE lifecycle <> 'revoked'",
                [before as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?.max(0) as u64,
                        r.get::<_, i64>(1)?.max(0) as u64,
                    ))
                },
            )
            .map_err(db)
    }

    fn stats(&mut self) -> Result<Stats> {
        let count = |sql: &str| -> Result<u64> {
            Ok(self
                .tx
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map_err(db)?
                .max(0) as u64)
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
