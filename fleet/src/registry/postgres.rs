//! PostgreSQL backend of the registry: `postgres://user@host:port/db`, a
//! connection pool (deadpool-postgres over tokio-postgres, no TLS: the
//! server is reached over loopback or a Unix socket), versioned migrations.
//!
//! The [`super::Store`] operations are synchronous (see the module doc of
//! [`super`]), so this store owns a current-thread tokio runtime and each
//! statement is a `block_on` on the calling thread, which then drives the
//! connection itself: a statement costs its round trip and no hand-off to
//! another thread (a separate worker thread made batches 4 times slower).
//! Between calls nothing runs, and nothing needs to: the connection only
//! answers our statements. A call made from inside another runtime (a task
//! of the fleet service) runs on a scoped helper thread instead, because
//! blocking a runtime's own thread is not allowed.
//!
//! Concurrency: several processes write at once (fleet service instances,
//! the CLI). Write transactions run at READ COMMITTED and lock, `FOR
//! UPDATE`, every device and command row they load before deciding on it,
//! so a decision is never made on a row another writer is changing; the
//! batch writer locks its devices in id order so two writers cannot
//! deadlock on them. Reads run in a READ ONLY REPEATABLE READ snapshot.
//!
//! Ids, tags and every other text column sort with the "C" collation, the
//! byte order SQLite and Rust use, so pages come out in the same order on
//! both backends whatever the server's locale.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use edgebind_protocol::messages::{Action, Desired, UnixSeconds};
use edgebind_protocol::{CommandId, DeviceId};
use serde_json::{Map, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::rows::{
    CERT_COLUMNS, CLAIM_SERIAL_COLUMNS, COMMAND_COLUMNS, DEVICE_COLUMNS, MANUFACTURING_COLUMNS,
    RawCert, RawClaimSerial, RawCommand, RawDevice, RawManufacturing, RawState, STATE_COLUMNS,
    action_of, history_table, parse_id, parse_json,
};
use super::storage::{LatestSample, NewEvent, NewSample, Storage, StorageTx};
use super::*;

/// Schema migrations, applied in order; `edgebind_schema.version` records
/// how many have run. Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the SQLite schema at its version 2, in PostgreSQL types.
    r#"
    CREATE TABLE devices (
        id                    TEXT COLLATE "C" PRIMARY KEY,
        board                 TEXT NOT NULL,
        lifecycle             TEXT NOT NULL CHECK (lifecycle IN ('registered', 'provisioned', 'revoked')),
        registered_at         BIGINT NOT NULL,
        provisioned_at        BIGINT,
        revoked_at            BIGINT,
        cert_serial           TEXT,
        cert_fingerprint      TEXT,
        cert_not_after        BIGINT,
        online                BOOLEAN NOT NULL DEFAULT false,
        last_seen             BIGINT,
        connected_at          BIGINT,
        agent_version         TEXT,
        boot_id               TEXT,
        addresses             TEXT NOT NULL DEFAULT '[]',
        desired               TEXT NOT NULL DEFAULT '{}',
        desired_rev           BIGINT NOT NULL DEFAULT 0,
        desired_published_rev BIGINT NOT NULL DEFAULT 0,
        reported              TEXT,
        reported_ignored      TEXT,
        reported_rev          BIGINT,
        reported_at           BIGINT,
        inventory             TEXT,
        inventory_at          BIGINT,
        telemetry             TEXT,
        telemetry_at          BIGINT,
        telemetry_count       BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX devices_by_lifecycle ON devices(lifecycle, id);
    CREATE INDEX devices_by_online ON devices(online, id);

    CREATE TABLE device_tags (
        device_id TEXT COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        tag       TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (device_id, tag)
    );
    CREATE INDEX device_tags_by_tag_device ON device_tags(tag, device_id);

    CREATE TABLE telemetry (
        seq         BIGSERIAL PRIMARY KEY,
        device_id   TEXT COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        ts          BIGINT NOT NULL,
        received_at BIGINT NOT NULL,
        payload     TEXT NOT NULL
    );
    CREATE INDEX telemetry_by_device ON telemetry(device_id, seq);

    CREATE TABLE events (
        seq         BIGSERIAL PRIMARY KEY,
        device_id   TEXT COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        ts          BIGINT NOT NULL,
        received_at BIGINT NOT NULL,
        kind        TEXT NOT NULL,
        message     TEXT NOT NULL
    );
    CREATE INDEX events_by_device ON events(device_id, seq);

    CREATE TABLE on_connect_rules (
        id         BIGSERIAL PRIMARY KEY,
        device_id  TEXT COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        action     TEXT NOT NULL,
        args       TEXT NOT NULL DEFAULT '{}',
        created_at BIGINT NOT NULL
    );
    CREATE INDEX on_connect_by_device ON on_connect_rules(device_id);

    CREATE TABLE commands (
        seq          BIGSERIAL PRIMARY KEY,
        id           TEXT COLLATE "C" NOT NULL UNIQUE,
        device_id    TEXT COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        action       TEXT,
        args         TEXT NOT NULL DEFAULT '{}',
        delivery     TEXT NOT NULL CHECK (delivery IN ('now', 'queued', 'on_connect', 'auto')),
        state        TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'accepted', 'succeeded', 'failed', 'rejected')),
        requested_by TEXT,
        rule_id      BIGINT,
        created_at   BIGINT NOT NULL,
        sent_at      BIGINT,
        accepted_at  BIGINT,
        finished_at  BIGINT,
        expires_at   BIGINT,
        reason       TEXT,
        output       TEXT
    );
    CREATE INDEX commands_by_device ON commands(device_id, seq);
    CREATE INDEX commands_queued ON commands(device_id) WHERE state = 'queued';
    "#,
    // 2: fleet services' broker connections (SQLite's version 3).
    r#"
    CREATE TABLE services (
        name      TEXT PRIMARY KEY,
        connected BOOLEAN NOT NULL,
        since     BIGINT NOT NULL,
        seen_at   BIGINT NOT NULL
    );
    "#,
    // 3: several service instances (SQLite's version 4): a message delivered
    // twice is stored once, and claims on what the outbox publishes.
    r#"
    ALTER TABLE telemetry ADD COLUMN digest BYTEA;
    CREATE UNIQUE INDEX telemetry_once ON telemetry(device_id, ts, digest);
    ALTER TABLE events ADD COLUMN digest BYTEA;
    CREATE UNIQUE INDEX events_once ON events(device_id, ts, digest);
    CREATE TABLE leases (
        key    TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until  BIGINT NOT NULL
    );
    "#,
    // 4: manufacturing records of the factory line (SQLite's version 5).
    r#"
    CREATE TABLE manufacturing (
        serial           TEXT COLLATE "C" PRIMARY KEY,
        device_id        TEXT COLLATE "C" NOT NULL UNIQUE REFERENCES devices(id),
        cert_serial      TEXT NOT NULL,
        cert_fingerprint TEXT NOT NULL,
        station          TEXT NOT NULL,
        operator         TEXT NOT NULL,
        made_at          BIGINT NOT NULL,
        image_sha256     TEXT
    );
    "#,
    // 5: allow-lists of claim-based first boot (SQLite's version 6).
    r#"
    CREATE TABLE claim_serials (
        serial         TEXT COLLATE "C" PRIMARY KEY,
        batch          TEXT COLLATE "C" NOT NULL,
        allowed_at     BIGINT NOT NULL,
        device_id      TEXT COLLATE "C" UNIQUE REFERENCES devices(id),
        key_sha256     TEXT,
        chain_pem      TEXT,
        provisioned_at BIGINT,
        CHECK ((device_id IS NULL) = (provisioned_at IS NULL))
    );
    CREATE INDEX claim_serials_batch ON claim_serials(batch, serial);
    "#,
    // 6: overload seen by each fleet service (SQLite's version 7).
    r#"
    ALTER TABLE services ADD COLUMN broker_dropped BIGINT;
    ALTER TABLE services ADD COLUMN lag BIGINT NOT NULL DEFAULT 0;
    "#,
    // 7: console login codes (SQLite's version 8).
    r#"
    CREATE TABLE console_login_codes (
        hash       TEXT COLLATE "C" PRIMARY KEY,
        operator   TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at    BIGINT
    );
    "#,
    // 8: the audit log (SQLite's version 9).
    r#"
    CREATE TABLE audit (
        seq    BIGSERIAL PRIMARY KEY,
        at     BIGINT NOT NULL,
        actor  TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    "#,
    // 9: device certificate history and renewal (SQLite's version 10).
    r#"
    CREATE TABLE device_certificates (
        seq           BIGSERIAL PRIMARY KEY,
        serial        TEXT COLLATE "C" NOT NULL UNIQUE,
        device_id     TEXT COLLATE "C" NOT NULL REFERENCES devices(id),
        fingerprint   TEXT NOT NULL,
        not_after     BIGINT NOT NULL,
        issued_at     BIGINT NOT NULL,
        origin        TEXT NOT NULL CHECK (origin IN ('registered', 'renewed', 'reissued')),
        state         TEXT NOT NULL CHECK (state IN ('pending', 'current', 'previous', 'retired', 'abandoned', 'replaced')),
        key_sha256    TEXT,
        chain_pem     TEXT,
        confirmed_at  BIGINT,
        superseded_at BIGINT,
        retired_at    BIGINT
    );
    CREATE INDEX device_certificates_by_device ON device_certificates(device_id, seq);
    CREATE INDEX device_certificates_by_state ON device_certificates(state, superseded_at);
    "#,
    // 10: presence history (SQLite's version 11).
    r#"
    CREATE TABLE presence_history (
        seq       BIGSERIAL PRIMARY KEY,
        device_id TEXT COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        at        BIGINT NOT NULL,
        online    BOOLEAN NOT NULL
    );
    CREATE INDEX presence_history_by_device ON presence_history(device_id, seq);
    "#,
    // 11: the detail of each fleet service's lag (SQLite's version 12).
    r#"
    ALTER TABLE services ADD COLUMN broker_waiting BIGINT;
    ALTER TABLE services ADD COLUMN oldest_uncommitted_s BIGINT;
    ALTER TABLE services ADD COLUMN push_back BOOLEAN NOT NULL DEFAULT FALSE;
    "#,
    // 12: a certificate's origin may be 'reprovisioned' (SQLite's version 13).
    r#"
    ALTER TABLE device_certificates DROP CONSTRAINT device_certificates_origin_check;
    ALTER TABLE device_certificates ADD CONSTRAINT device_certificates_origin_check
        CHECK (origin IN ('registered', 'renewed', 'reissued', 'reprovisioned'));
    "#,
];

/// The schema version this edgebind writes (one per migration).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Taken for the migration transaction, so that two processes starting
/// against a fresh database do not both create the schema.
const MIGRATION_LOCK: i64 = 0x6564_6765_6269_6e64; // "edgebind"

/// Rows per statement when registering a batch of devices.
const INSERT_CHUNK: usize = 5_000;

/// Connections one store keeps. A store serves one thread at a time, so two
/// are enough: the pool is there to replace a broken connection, not to
/// run statements in parallel.
const POOL_SIZE: usize = 2;

pub struct PostgresStore {
    /// Always `Some` until drop (see [`Drop`]).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    location: String,
    retention: Retention,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("location", &self.location)
            .finish()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; the fleet service
        // may drop a store from its async task (an open that failed).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn db(e: tokio_postgres::Error) -> RegistryError {
    RegistryError::backend(e)
}

/// The driver's own error when the pool only wraps it (a refused connection).
fn pool_err(e: deadpool_postgres::PoolError) -> RegistryError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        other => RegistryError::backend(other),
    }
}

/// Whether `url` is one the driver accepts; the reason if not.
pub(super) fn check_url(url: &str) -> std::result::Result<(), String> {
    tokio_postgres::Config::from_str(url)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `url` without its password (in the user info or a `password=` parameter).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl PostgresStore {
    /// Connect to `url` and run the migrations the database has not seen yet.
    pub fn open(url: &str, retention: Retention) -> Result<Self> {
        let location = redact(url);
        let invalid = |why: String| RegistryError::InvalidUrl {
            given: location.clone(),
            why,
        };
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| invalid(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("edgebind");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RegistryError::backend(e).located(&location))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(15)))
            .wait_timeout(Some(Duration::from_secs(60)))
            .build()
            .map_err(|e| RegistryError::backend(e).located(&location))?;
        let store = PostgresStore {
            runtime: Some(runtime),
            pool,
            location,
            retention,
        };
        store.migrate().map_err(|e| e.located(&store.location))?;
        Ok(store)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    /// Run `f` to completion on this store's runtime.
    fn block<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.runtime().block_on(f))
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        } else {
            self.runtime().block_on(f)
        }
    }

    fn connection(&self) -> Result<Object> {
        self.block(self.pool.get()).map_err(pool_err)
    }

    pub fn schema_version(&self) -> Result<i64> {
        let client = self.connection()?;
        self.block(async {
            let row = client
                .query_one("SELECT version FROM edgebind_schema", &[])
                .await
                .map_err(db)?;
            Ok(row.get::<_, i32>(0) as i64)
        })
        .map_err(|e: RegistryError| e.located(&self.location))
    }

    fn migrate(&self) -> Result<()> {
        let mut client = self.connection()?;
        let location = self.location.clone();
        self.block(async move {
            let tx = client.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(db)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS edgebind_schema (
                     one     BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
                     version INTEGER NOT NULL
                 );
                 INSERT INTO edgebind_schema (version) VALUES (0) ON CONFLICT DO NOTHING;",
            )
            .await
            .map_err(db)?;
            let found = tx
                .query_one("SELECT version FROM edgebind_schema", &[])
                .await
                .map_err(db)?
                .get::<_, i32>(0) as i64;
            if found > SCHEMA_VERSION {
                return Err(RegistryError::SchemaTooNew {
                    location,
                    found,
                    known: SCHEMA_VERSION,
                });
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                tx.batch_execute(sql).await.map_err(db)?;
                tx.execute(
                    "UPDATE edgebind_schema SET version = $1",
                    &[&((i + 1) as i32)],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
    }

    fn begin(&self, write: bool) -> Result<Box<dyn StorageTx + '_>> {
        let client = self.connection()?;
        let begin = if write {
            "BEGIN ISOLATION LEVEL READ COMMITTED"
        } else {
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        };
        self.block(client.batch_execute(begin)).map_err(db)?;
        Ok(Box::new(PgTx {
            store: self,
            client: Some(client),
            lock: if write { " FOR UPDATE" } else { "" },
        }))
    }
}

impl Storage for PostgresStore {
    fn location(&self) -> &str {
        &self.location
    }

    fn retention(&self) -> Retention {
        self.retention
    }

    fn read(&self) -> Result<Box<dyn StorageTx + '_>> {
        self.begin(false)
    }

    fn write(&mut self) -> Result<Box<dyn StorageTx + '_>> {
        self.begin(true)
    }
}

struct PgTx<'s> {
    store: &'s PostgresStore,
    /// `None` once committed.
    client: Option<Object>,
    /// `" FOR UPDATE"` in a write transaction: rows loaded stay ours until commit.
    lock: &'static str,
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if self.store.block(client.batch_execute("ROLLBACK")).is_err() {
            // A connection in an unknown transaction state must not go back
            // to the pool.
            drop(Object::take(client));
        }
    }
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|x| x as i64)
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("JSON values always serialize")
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// The id in a unique violation's detail, `Key (id)=(dev-1) already exists.`
fn violating_key(e: &tokio_postgres::Error) -> Option<String> {
    let detail = e.as_db_error()?.detail()?;
    let (_, rest) = detail.split_once(")=(")?;
    let (key, _) = rest.rsplit_once(") already exists")?;
    Some(key.to_owned())
}

fn raw_device(r: &Row) -> RawDevice {
    RawDevice {
        id: r.get(0),
        board: r.get(1),
        lifecycle: r.get(2),
        registered_at: r.get(3),
        provisioned_at: r.get(4),
        revoked_at: r.get(5),
        cert_serial: r.get(6),
        cert_fingerprint: r.get(7),
        cert_not_after: r.get(8),
        online: r.get(9),
        last_seen: r.get(10),
        connected_at: r.get(11),
        agent_version: r.get(12),
        boot_id: r.get(13),
        addresses: r.get(14),
        desired: r.get(15),
        desired_rev: r.get(16),
        desired_published_rev: r.get(17),
        reported: r.get(18),
        reported_ignored: r.get(19),
        reported_rev: r.get(20),
        reported_at: r.get(21),
        inventory: r.get(22),
        inventory_at: r.get(23),
        telemetry: r.get(24),
        telemetry_at: r.get(25),
        telemetry_count: r.get(26),
    }
}

fn raw_command(r: &Row) -> RawCommand {
    RawCommand {
        id: r.get(0),
        device: r.get(1),
        action: r.get(2),
        args: r.get(3),
        delivery: r.get(4),
        state: r.get(5),
        requested_by: r.get(6),
        rule_id: r.get(7),
        created_at: r.get(8),
        times: [r.get(9), r.get(10), r.get(11), r.get(12)],
        reason: r.get(13),
        output: r.get(14),
    }
}

impl PgTx<'_> {
    fn client(&self) -> &Object {
        self.client
            .as_ref()
            .expect("a transaction is used until commit")
    }

    fn query(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        let client = self.client();
        self.store.block(async move {
            let stmt = client.prepare_cached(sql).await?;
            client.query(&stmt, params).await
        })
    }

    fn rows(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>> {
        self.query(sql, params).map_err(db)
    }

    fn exec(&self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let client = self.client();
        self.store
            .block(async move {
                let stmt = client.prepare_cached(sql).await?;
                client.execute(&stmt, params).await
            })
            .map_err(db)
    }

    /// Devices from rows of [`DEVICE_COLUMNS`], with their tags in one more query.
    fn devices_of(&self, rows: Vec<Row>) -> Result<Vec<Device>> {
        let raws: Vec<RawDevice> = rows.iter().map(raw_device).collect();
        let ids: Vec<&str> = raws.iter().map(|r| r.id.as_str()).collect();
        let mut tags: HashMap<String, BTreeSet<Tag>> = HashMap::new();
        if !ids.is_empty() {
            let rows = self.rows(
                "SELECT device_id, tag FROM device_tags WHERE device_id = ANY($1)",
                &[&ids],
            )?;
            for r in rows {
                let device: String = r.get(0);
                let tag = parse_id(&format!("tag of device {device}"), r.get(1))?;
                tags.entry(device).or_default().insert(tag);
            }
        }
        raws.into_iter()
            .map(|raw| {
                let t = tags.remove(&raw.id).unwrap_or_default();
                raw.into_device(t)
            })
            .collect()
    }

    fn claim_serials_of_rows(
        &self,
        sql_tail: &str,
        params: &Params<'_>,
    ) -> Result<Vec<ClaimSerial>> {
        let rows = self.rows(
            &format!("SELECT {CLAIM_SERIAL_COLUMNS} FROM claim_serials {sql_tail}"),
            params,
        )?;
        rows.iter()
            .map(|r| {
                RawClaimSerial {
                    serial: r.get(0),
                    batch: r.get(1),
                    allowed_at: r.get(2),
                    device: r.get(3),
                    key_sha256: r.get(4),
                    chain_pem: r.get(5),
                    provisioned_at: r.get(6),
                }
                .into_entry()
            })
            .collect()
    }

    fn certs_of_rows(&self, sql_tail: &str, params: &Params<'_>) -> Result<Vec<CertRecord>> {
        let rows = self.rows(
            &format!("SELECT {CERT_COLUMNS} FROM device_certificates {sql_tail}"),
            params,
        )?;
        rows.iter()
            .map(|r| {
                RawCert {
                    serial: r.get(0),
                    device: r.get(1),
                    fingerprint: r.get(2),
                    not_after: r.get(3),
                    issued_at: r.get(4),
                    origin: r.get(5),
                    state: r.get(6),
                    key_sha256: r.get(7),
                    chain_pem: r.get(8),
                    confirmed_at: r.get(9),
                    superseded_at: r.get(10),
                    retired_at: r.get(11),
                }
                .into_record()
            })
            .collect()
    }

    fn manufacturing_of_rows(
        &self,
        sql_tail: &str,
        params: &Params<'_>,
    ) -> Result<Vec<ManufacturingRecord>> {
        let rows = self.rows(
            &format!("SELECT {MANUFACTURING_COLUMNS} FROM manufacturing {sql_tail}"),
            params,
        )?;
        rows.iter()
            .map(|r| {
                RawManufacturing {
                    serial: r.get(0),
                    device: r.get(1),
                    cert_serial: r.get(2),
                    cert_fingerprint: r.get(3),
                    station: r.get(4),
                    operator: r.get(5),
                    made_at: r.get(6),
                    image_sha256: r.get(7),
                }
                .into_record()
            })
            .collect()
    }

    fn commands_of(&self, sql_tail: &str, params: &Params<'_>) -> Result<Vec<CommandRecord>> {
        let rows = self.rows(
            &format!("SELECT {COMMAND_COLUMNS} FROM commands {sql_tail}"),
            params,
        )?;
        rows.iter().map(|r| raw_command(r).into_command()).collect()
    }
}

/// Fill `stored[offset..offset + len]`: all true when every row of the chunk
/// was new (the common case, no extra query), else ask which were.
fn mark_stored(
    stored: &mut [bool],
    offset: usize,
    len: usize,
    inserted: usize,
    which: impl FnOnce() -> Result<Vec<bool>>,
) -> Result<()> {
    let slots = &mut stored[offset..offset + len];
    if inserted == len {
        slots.iter_mut().for_each(|s| *s = true);
    } else if inserted > 0 {
        slots.copy_from_slice(&which()?);
    }
    Ok(())
}

impl PgTx<'_> {
    /// After a partly duplicated insert: which (device, ts, digest) of a
    /// chunk are stored by this transaction (a row of this transaction has
    /// `xmin` = the current transaction id). The first of two equal entries
    /// of one chunk counts as the stored one.
    fn stored_positions(
        &self,
        table: &str,
        devices: &[&str],
        ts: &[i64],
        digests: &[&[u8]],
    ) -> Result<Vec<bool>> {
        let sql = format!(
            "SELECT u.n, (t.xmin::text::bigint = txid_current() % 4294967296) FROM unnest($1::text[], $2::int8[], $3::bytea[]) \
             WITH ORDINALITY AS u(d, t, g, n) JOIN {table} t \
             ON t.device_id = u.d AND t.ts = u.t AND t.digest = u.g ORDER BY u.n"
        );
        let rows = self.query(&sql, &[&devices, &ts, &digests]).map_err(db)?;
        let mut out = vec![false; devices.len()];
        let mut seen = std::collections::HashSet::new();
        for row in rows {
            let n: i64 = row.get(0);
            let mine: bool = row.get(1);
            let i = (n - 1) as usize;
            if mine && seen.insert((devices[i], ts[i], digests[i])) {
                out[i] = true;
            }
        }
        Ok(out)
    }
}

impl StorageTx for PgTx<'_> {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let client = self.client.take().expect("committed once");
        let done = self.store.block(client.batch_execute("COMMIT"));
        if done.is_err() {
            drop(Object::take(client));
        }
        done.map_err(db)
    }

    fn device(&mut self, id: &DeviceId) -> Result<Option<Device>> {
        let rows = self.rows(
            &format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1{}",
                self.lock
            ),
            &[&id.as_str()],
        )?;
        Ok(self.devices_of(rows)?.pop())
    }

    fn existing(&mut self, ids: &[DeviceId]) -> Result<Vec<DeviceId>> {
        let ids: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
        let rows = self.rows(
            "SELECT id FROM devices WHERE id = ANY($1) ORDER BY id",
            &[&ids],
        )?;
        rows.into_iter()
            .map(|r| parse_id("device id", r.get(0)))
            .collect()
    }

    fn states(&mut self, ids: &[DeviceId]) -> Result<HashMap<DeviceId, DeviceState>> {
        let ids: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
        // In id order, so that two batch writers lock their devices in the same order.
        let rows = self.rows(
            &format!(
                "SELECT {STATE_COLUMNS} FROM devices WHERE id = ANY($1) ORDER BY id{}",
                self.lock
            ),
            &[&ids],
        )?;
        rows.into_iter()
            .map(|r| {
                let id: String = r.get(0);
                let raw = RawState {
                    lifecycle: r.get(1),
                    provisioned_at: r.get(2),
                    revoked_at: r.get(3),
                    online: r.get(4),
                    last_seen: r.get(5),
                    connected_at: r.get(6),
                    agent_version: r.get(7),
                    boot_id: r.get(8),
                    addresses: r.get(9),
                };
                let state = raw.into_state(&id)?;
                Ok((parse_id("device id", id)?, state))
            })
            .collect()
    }

    fn list(&mut self, query: &DeviceQuery, limit: Option<u32>) -> Result<Vec<Device>> {
        let (filter, values) = super::rows::list_filter(
            query,
            |n| format!("${n}"),
            |p| format!("strpos(id, {p}) > 0"),
        );
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = values
            .into_iter()
            .map(|v| -> Box<dyn ToSql + Sync + Send> {
                match v {
                    super::rows::FilterValue::Text(t) => Box::new(t),
                    super::rows::FilterValue::Bool(b) => Box::new(b),
                }
            })
            .collect();
        let mut bind = |v: Box<dyn ToSql + Sync + Send>| {
            params.push(v);
            format!("${}", params.len())
        };
        let limit_clause = match limit {
            Some(n) => format!("LIMIT {}", bind(Box::new(i64::from(n)))),
            None => String::new(),
        };
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = self.rows(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices {filter} ORDER BY id {limit_clause}"),
            &refs,
        )?;
        self.devices_of(rows)
    }

    fn insert_devices(&mut self, devices: &[NewDevice], at: UnixSeconds) -> Result<()> {
        let at = at as i64;
        for chunk in devices.chunks(INSERT_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|d| d.id.as_str()).collect();
            let boards: Vec<&str> = chunk.iter().map(|d| d.board.as_str()).collect();
            let serials: Vec<Option<&str>> = chunk
                .iter()
                .map(|d| d.cert.as_ref().map(|c| c.serial.as_str()))
                .collect();
            let fingerprints: Vec<Option<&str>> = chunk
                .iter()
                .map(|d| d.cert.as_ref().map(|c| c.fingerprint_sha256.as_str()))
                .collect();
            let not_after: Vec<Option<i64>> = chunk
                .iter()
                .map(|d| d.cert.as_ref().map(|c| c.not_after as i64))
                .collect();
            let inserted = self.query(
                "INSERT INTO devices (id, board, lifecycle, registered_at, cert_serial, cert_fingerprint, cert_not_after) \
                 SELECT id, board, 'registered', $3, serial, fingerprint, not_after \
                 FROM unnest($1::text[], $2::text[], $4::text[], $5::text[], $6::int8[]) \
                 AS n(id, board, serial, fingerprint, not_after)",
                &[&ids, &boards, &at, &serials, &fingerprints, &not_after],
            );
            if let Err(e) = inserted {
                if is_unique_violation(&e) {
                    let id = violating_key(&e)
                        .and_then(|k| DeviceId::new(k).ok())
                        .unwrap_or_else(|| chunk[0].id.clone());
                    return Err(RegistryError::DuplicateDevice(id));
                }
                return Err(db(e));
            }
            let (tag_devices, tags): (Vec<&str>, Vec<&str>) = chunk
                .iter()
                .flat_map(|d| d.tags.iter().map(|t| (d.id.as_str(), t.as_str())))
                .unzip();
            if !tags.is_empty() {
                self.exec(
                    "INSERT INTO device_tags (device_id, tag) SELECT * FROM unnest($1::text[], $2::text[])",
                    &[&tag_devices, &tags],
                )?;
            }
        }
        Ok(())
    }

    fn save_certificate(&mut self, id: &DeviceId, cert: &CertInfo) -> Result<bool> {
        let n = self.exec(
            "UPDATE devices SET cert_serial = $2, cert_fingerprint = $3, cert_not_after = $4 WHERE id = $1",
            &[
                &id.as_str(),
                &cert.serial,
                &cert.fingerprint_sha256,
                &(cert.not_after as i64),
            ],
        )?;
        Ok(n > 0)
    }

    fn save_state(&mut self, id: &DeviceId, s: &DeviceState) -> Result<()> {
        self.exec(
            "UPDATE devices SET lifecycle = $2, provisioned_at = $3, revoked_at = $4, online = $5, \
             last_seen = $6, connected_at = $7, agent_version = $8, boot_id = $9, addresses = $10 \
             WHERE id = $1",
            &[
                &id.as_str(),
                &s.lifecycle.as_str(),
                &opt_i64(s.provisioned_at),
                &opt_i64(s.revoked_at),
                &s.online,
                &opt_i64(s.last_seen),
                &opt_i64(s.connected_at),
                &s.agent_version,
                &s.boot_id,
                &json_text(&s.addresses),
            ],
        )?;
        Ok(())
    }

    fn save_desired(&mut self, id: &DeviceId, desired: &Desired) -> Result<()> {
        self.exec(
            "UPDATE devices SET desired = $2, desired_rev = $3 WHERE id = $1",
            &[
                &id.as_str(),
                &json_text(&desired.settings),
                &(desired.revision as i64),
            ],
        )?;
        Ok(())
    }

    fn save_desired_published(&mut self, id: &DeviceId, revision: u64) -> Result<()> {
        self.exec(
            "UPDATE devices SET desired_published_rev = $2 WHERE id = $1",
            &[&id.as_str(), &(revision as i64)],
        )?;
        Ok(())
    }

    fn unpublished_desired(&mut self) -> Result<Vec<(DeviceId, Desired)>> {
        let rows = self.rows(
            "SELECT id, desired, desired_rev FROM devices \
             WHERE desired_rev > desired_published_rev AND lifecycle != 'revoked' ORDER BY id",
            &[],
        )?;
        rows.into_iter()
            .map(|r| {
                let id: String = r.get(0);
                let desired: String = r.get(1);
                let rev: i64 = r.get(2);
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
            "UPDATE devices SET reported = $2, reported_ignored = $3, reported_rev = $4, reported_at = $5 \
             WHERE id = $1",
            &[
                &id.as_str(),
                &json_text(&r.applied),
                &json_text(&r.ignored),
                &(r.revision as i64),
                &(r.at as i64),
            ],
        )?;
        Ok(())
    }

    fn save_inventory(&mut self, id: &DeviceId, inventory: &Value, at: UnixSeconds) -> Result<()> {
        self.exec(
            "UPDATE devices SET inventory = $2, inventory_at = $3 WHERE id = $1",
            &[&id.as_str(), &json_text(inventory), &(at as i64)],
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
        let rows = self.rows(
            "UPDATE devices SET telemetry = $2, telemetry_at = $3, \
             telemetry_count = telemetry_count + $4 WHERE id = $1 RETURNING telemetry_count",
            &[&id.as_str(), &payload, &(ts as i64), &(added as i64)],
        )?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    fn insert_telemetry(&mut self, samples: &[NewSample<'_>]) -> Result<Vec<bool>> {
        let mut stored = vec![false; samples.len()];
        for (c, chunk) in samples.chunks(INSERT_CHUNK).enumerate() {
            let devices: Vec<&str> = chunk.iter().map(|s| s.device.as_str()).collect();
            let ts: Vec<i64> = chunk.iter().map(|s| s.ts as i64).collect();
            let received: Vec<i64> = chunk.iter().map(|s| s.received_at as i64).collect();
            let payloads: Vec<&str> = chunk.iter().map(|s| s.payload).collect();
            let digests: Vec<&[u8]> = chunk.iter().map(|s| &s.digest[..]).collect();
            // WITH ORDINALITY + ORDER BY: seq follows the order of arrival;
            // RETURNING n says which rows were new.
            let rows = self
                .query(
                    "INSERT INTO telemetry (device_id, ts, received_at, payload, digest) \
                     SELECT d, t, r, p, g FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::bytea[]) \
                     WITH ORDINALITY AS u(d, t, r, p, g, n) ORDER BY n \
                     ON CONFLICT DO NOTHING RETURNING seq",
                    &[&devices, &ts, &received, &payloads, &digests],
                )
                .map_err(db)?;
            mark_stored(
                &mut stored,
                c * INSERT_CHUNK,
                chunk.len(),
                rows.len(),
                || self.stored_positions("telemetry", &devices, &ts, &digests),
            )?;
        }
        Ok(stored)
    }

    fn insert_events(&mut self, events: &[NewEvent<'_>]) -> Result<Vec<bool>> {
        let mut stored = vec![false; events.len()];
        for (c, chunk) in events.chunks(INSERT_CHUNK).enumerate() {
            let devices: Vec<&str> = chunk.iter().map(|e| e.device.as_str()).collect();
            let ts: Vec<i64> = chunk.iter().map(|e| e.event.ts as i64).collect();
            let received: Vec<i64> = chunk.iter().map(|e| e.received_at as i64).collect();
            let kinds: Vec<&str> = chunk.iter().map(|e| e.event.kind.as_str()).collect();
            let messages: Vec<&str> = chunk.iter().map(|e| e.event.message.as_str()).collect();
            let digests: Vec<&[u8]> = chunk.iter().map(|e| &e.digest[..]).collect();
            let rows = self
                .query(
                    "INSERT INTO events (device_id, ts, received_at, kind, message, digest) \
                     SELECT d, t, r, k, m, g FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::bytea[]) \
                     WITH ORDINALITY AS u(d, t, r, k, m, g, n) ORDER BY n \
                     ON CONFLICT DO NOTHING RETURNING seq",
                    &[&devices, &ts, &received, &kinds, &messages, &digests],
                )
                .map_err(db)?;
            mark_stored(
                &mut stored,
                c * INSERT_CHUNK,
                chunk.len(),
                rows.len(),
                || self.stored_positions("events", &devices, &ts, &digests),
            )?;
        }
        Ok(stored)
    }

    fn save_states(&mut self, states: &[(&DeviceId, &DeviceState)]) -> Result<()> {
        for chunk in states.chunks(INSERT_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
            let lifecycles: Vec<&str> = chunk.iter().map(|(_, s)| s.lifecycle.as_str()).collect();
            let provisioned: Vec<Option<i64>> = chunk
                .iter()
                .map(|(_, s)| opt_i64(s.provisioned_at))
                .collect();
            let revoked: Vec<Option<i64>> =
                chunk.iter().map(|(_, s)| opt_i64(s.revoked_at)).collect();
            let online: Vec<bool> = chunk.iter().map(|(_, s)| s.online).collect();
            let last_seen: Vec<Option<i64>> =
                chunk.iter().map(|(_, s)| opt_i64(s.last_seen)).collect();
            let connected: Vec<Option<i64>> =
                chunk.iter().map(|(_, s)| opt_i64(s.connected_at)).collect();
            let versions: Vec<Option<&str>> = chunk
                .iter()
                .map(|(_, s)| s.agent_version.as_deref())
                .collect();
            let boots: Vec<Option<&str>> =
                chunk.iter().map(|(_, s)| s.boot_id.as_deref()).collect();
            let addresses: Vec<String> =
                chunk.iter().map(|(_, s)| json_text(&s.addresses)).collect();
            self.exec(
                "UPDATE devices AS d SET lifecycle = u.lifecycle, provisioned_at = u.provisioned_at, \
                 revoked_at = u.revoked_at, online = u.online, last_seen = u.last_seen, \
                 connected_at = u.connected_at, agent_version = u.agent_version, boot_id = u.boot_id, \
                 addresses = u.addresses \
                 FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::bool[], $6::int8[], \
                 $7::int8[], $8::text[], $9::text[], $10::text[]) \
                 AS u(id, lifecycle, provisioned_at, revoked_at, online, last_seen, connected_at, \
                 agent_version, boot_id, addresses) \
                 WHERE d.id = u.id",
                &[
                    &ids,
                    &lifecycles,
                    &provisioned,
                    &revoked,
                    &online,
                    &last_seen,
                    &connected,
                    &versions,
                    &boots,
                    &addresses,
                ],
            )?;
        }
        Ok(())
    }

    fn save_latest_telemetry_of(&mut self, latest: &[LatestSample<'_>]) -> Result<Vec<u64>> {
        let mut totals = Vec::with_capacity(latest.len());
        for chunk in latest.chunks(INSERT_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|l| l.device.as_str()).collect();
            let ts: Vec<i64> = chunk.iter().map(|l| l.ts as i64).collect();
            let payloads: Vec<&str> = chunk.iter().map(|l| l.payload).collect();
            let added: Vec<i64> = chunk.iter().map(|l| l.added as i64).collect();
            let rows = self.rows(
                "UPDATE devices AS d SET telemetry = u.payload, telemetry_at = u.ts, \
                 telemetry_count = d.telemetry_count + u.added \
                 FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[]) AS u(id, ts, payload, added) \
                 WHERE d.id = u.id RETURNING d.id, d.telemetry_count",
                &[&ids, &ts, &payloads, &added],
            )?;
            // RETURNING comes in no particular order.
            let by_id: HashMap<String, i64> = rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get(1)))
                .collect();
            totals.extend(
                ids.iter()
                    .map(|id| by_id.get(*id).map_or(0, |n| (*n).max(0) as u64)),
            );
        }
        Ok(totals)
    }

    fn prune_each(&mut self, history: History, ids: &[&DeviceId], keep: u32) -> Result<()> {
        let table = history_table(history);
        // Per device the cut-off is the seq of the newest row outside the
        // window (none: nothing to delete); the (device_id, seq) index
        // makes each lookup cheap.
        let sql = format!(
            "DELETE FROM {table} AS h USING \
             (SELECT c.id, (SELECT seq FROM {table} WHERE device_id = c.id \
                            ORDER BY seq DESC LIMIT 1 OFFSET $2) AS cut \
              FROM unnest($1::text[]) AS c(id)) AS k \
             WHERE h.device_id = k.id AND h.seq <= k.cut"
        );
        for chunk in ids.chunks(INSERT_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|id| id.as_str()).collect();
            self.exec(&sql, &[&ids, &i64::from(keep)])?;
        }
        Ok(())
    }

    fn prune(&mut self, history: History, id: &DeviceId, keep: u32) -> Result<()> {
        let table = history_table(history);
        let sql = format!(
            "DELETE FROM {table} WHERE device_id = $1 AND seq <= \
             (SELECT seq FROM {table} WHERE device_id = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2)"
        );
        self.exec(&sql, &[&id.as_str(), &i64::from(keep)])?;
        Ok(())
    }

    fn telemetry(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<TelemetryRow>> {
        let rows = self.rows(
            "SELECT ts, received_at, payload FROM telemetry WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
            &[&id.as_str(), &i64::from(limit)],
        )?;
        rows.into_iter()
            .map(|r| {
                let payload: String = r.get(2);
                Ok(TelemetryRow {
                    ts: r.get::<_, i64>(0).max(0) as u64,
                    received_at: r.get::<_, i64>(1).max(0) as u64,
                    payload: parse_json("telemetry payload", &payload)?,
                })
            })
            .collect()
    }

    fn insert_presence(&mut self, id: &DeviceId, change: &PresenceChange) -> Result<()> {
        self.exec(
            "INSERT INTO presence_history (device_id, at, online) VALUES ($1, $2, $3)",
            &[&id.as_str(), &(change.at as i64), &change.online],
        )?;
        Ok(())
    }

    fn presence_history(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<PresenceChange>> {
        let rows = self.rows(
            "SELECT at, online FROM presence_history WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
            &[&id.as_str(), &i64::from(limit)],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| PresenceChange {
                at: r.get::<_, i64>(0).max(0) as u64,
                online: r.get(1),
            })
            .collect())
    }

    fn events(&mut self, id: &DeviceId, limit: u32) -> Result<Vec<EventRow>> {
        let rows = self.rows(
            "SELECT ts, received_at, kind, message FROM events WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
            &[&id.as_str(), &i64::from(limit)],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| EventRow {
                ts: r.get::<_, i64>(0).max(0) as u64,
                received_at: r.get::<_, i64>(1).max(0) as u64,
                kind: r.get(2),
                message: r.get(3),
            })
            .collect())
    }

    fn command(&mut self, id: &CommandId) -> Result<Option<CommandRecord>> {
        let tail = format!("WHERE id = $1{}", self.lock);
        Ok(self.commands_of(&tail, &[&id.as_str()])?.pop())
    }

    fn commands(&mut self, query: CommandQuery<'_>) -> Result<Vec<CommandRecord>> {
        match query {
            CommandQuery::Device { device, limit } => self.commands_of(
                "WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
                &[&device.as_str(), &i64::from(limit)],
            ),
            CommandQuery::QueuedFor(device) => {
                let tail = format!(
                    "WHERE state = 'queued' AND device_id = $1 ORDER BY seq{}",
                    self.lock
                );
                self.commands_of(&tail, &[&device.as_str()])
            }
            CommandQuery::QueuedOnline => self.commands_of(
                "WHERE state = 'queued' AND device_id IN (SELECT id FROM devices WHERE online) ORDER BY seq",
                &[],
            ),
        }
    }

    fn insert_command(&mut self, c: &CommandRecord) -> Result<()> {
        let output = c.output.as_ref().map(json_text);
        let inserted = self.query(
            "INSERT INTO commands (id, device_id, action, args, delivery, state, requested_by, \
             rule_id, created_at, sent_at, accepted_at, finished_at, expires_at, reason, output) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            &[
                &c.id.as_str(),
                &c.device.as_str(),
                &c.action,
                &json_text(&c.args),
                &c.delivery.as_str(),
                &c.state.as_str(),
                &c.requested_by,
                &c.rule_id,
                &(c.created_at as i64),
                &opt_i64(c.sent_at),
                &opt_i64(c.accepted_at),
                &opt_i64(c.finished_at),
                &opt_i64(c.expires_at),
                &c.reason,
                &output,
            ],
        );
        match inserted {
            Err(e) if is_unique_violation(&e) => Err(RegistryError::DuplicateCommand(c.id.clone())),
            other => other.map(drop).map_err(db),
        }
    }

    fn save_command(&mut self, c: &CommandRecord) -> Result<()> {
        let output = c.output.as_ref().map(json_text);
        self.exec(
            "UPDATE commands SET action = $2, args = $3, state = $4, sent_at = $5, accepted_at = $6, \
             finished_at = $7, reason = $8, output = $9 WHERE id = $1",
            &[
                &c.id.as_str(),
                &c.action,
                &json_text(&c.args),
                &c.state.as_str(),
                &opt_i64(c.sent_at),
                &opt_i64(c.accepted_at),
                &opt_i64(c.finished_at),
                &c.reason,
                &output,
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
        let rows = self.rows(
            "INSERT INTO on_connect_rules (device_id, action, args, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&device.as_str(), &action.as_str(), &json_text(args), &(at as i64)],
        )?;
        Ok(rows[0].get(0))
    }

    fn rules(&mut self, device: &DeviceId) -> Result<Vec<OnConnectRule>> {
        let rows = self.rows(
            "SELECT id, action, args, created_at FROM on_connect_rules WHERE device_id = $1 ORDER BY id",
            &[&device.as_str()],
        )?;
        rows.into_iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let action: String = r.get(1);
                let args: String = r.get(2);
                Ok(OnConnectRule {
                    id,
                    device: device.clone(),
                    action: action_of(&action)?,
                    args: parse_json(&format!("args of on-connect rule {id}"), &args)?,
                    created_at: r.get::<_, i64>(3).max(0) as u64,
                })
            })
            .collect()
    }

    fn delete_rule(&mut self, rule: i64) -> Result<bool> {
        Ok(self.exec("DELETE FROM on_connect_rules WHERE id = $1", &[&rule])? > 0)
    }

    fn delete_rules_of(&mut self, device: &DeviceId) -> Result<()> {
        self.exec(
            "DELETE FROM on_connect_rules WHERE device_id = $1",
            &[&device.as_str()],
        )?;
        Ok(())
    }

    fn save_service(&mut self, p: &ServicePresence) -> Result<()> {
        self.exec(
            "INSERT INTO services (name, connected, since, seen_at, broker_dropped, lag, \
             broker_waiting, oldest_uncommitted_s, push_back) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (name) DO UPDATE SET connected = excluded.connected, \
             since = excluded.since, seen_at = excluded.seen_at, \
             broker_dropped = excluded.broker_dropped, lag = excluded.lag, \
             broker_waiting = excluded.broker_waiting, \
             oldest_uncommitted_s = excluded.oldest_uncommitted_s, push_back = excluded.push_back",
            &[
                &p.name,
                &p.connected,
                &(p.since as i64),
                &(p.seen_at as i64),
                &p.broker_dropped.map(|d| d as i64),
                &(p.lag as i64),
                &p.broker_waiting.map(|d| d as i64),
                &p.oldest_uncommitted_s.map(|d| d as i64),
                &p.push_back,
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
            "INSERT INTO leases (key, holder, until) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, until = excluded.until \
             WHERE leases.holder = excluded.holder OR leases.until < $4",
            &[&key, &holder, &(until as i64), &(now as i64)],
        )?;
        Ok(n == 1)
    }

    fn purge_leases(&mut self, before: UnixSeconds) -> Result<()> {
        self.exec("DELETE FROM leases WHERE until < $1", &[&(before as i64)])?;
        Ok(())
    }

    fn insert_login_code(&mut self, c: &LoginCode) -> Result<()> {
        self.exec(
            "INSERT INTO console_login_codes (hash, operator, created_at, expires_at, used_at) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &c.hash,
                &c.operator,
                &(c.created_at as i64),
                &(c.expires_at as i64),
                &c.used_at.map(|t| t as i64),
            ],
        )?;
        Ok(())
    }

    fn login_code(&mut self, hash: &str) -> Result<Option<LoginCode>> {
        let rows = self.rows(
            &format!(
                "SELECT hash, operator, created_at, expires_at, used_at \
                 FROM console_login_codes WHERE hash = $1{}",
                self.lock
            ),
            &[&hash],
        )?;
        Ok(rows.first().map(|r| LoginCode {
            hash: r.get(0),
            operator: r.get(1),
            created_at: r.get::<_, i64>(2).max(0) as u64,
            expires_at: r.get::<_, i64>(3).max(0) as u64,
            used_at: r.get::<_, Option<i64>>(4).map(|t| t.max(0) as u64),
        }))
    }

    fn save_login_code_used(&mut self, hash: &str, at: UnixSeconds) -> Result<()> {
        self.exec(
            "UPDATE console_login_codes SET used_at = $2 WHERE hash = $1",
            &[&hash, &(at as i64)],
        )?;
        Ok(())
    }

    fn insert_audit(&mut self, e: &AuditEntry) -> Result<i64> {
        let rows = self.rows(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5) \
             RETURNING seq",
            &[&(e.at as i64), &e.actor, &e.action, &e.target, &e.detail],
        )?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or_default())
    }

    fn audit(&mut self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        let rows = self.rows(
            "SELECT seq, at, actor, action, target, detail FROM audit \
             WHERE seq < $1 ORDER BY seq DESC LIMIT $2",
            &[&before.unwrap_or(i64::MAX), &i64::from(limit)],
        )?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                seq: r.get(0),
                at: r.get::<_, i64>(1).max(0) as u64,
                actor: r.get(2),
                action: r.get(3),
                target: r.get(4),
                detail: r.get(5),
            })
            .collect())
    }

    fn cert_records(&mut self, device: &DeviceId) -> Result<Vec<CertRecord>> {
        self.certs_of_rows(
            &format!("WHERE device_id = $1 ORDER BY seq{}", self.lock),
            &[&device.as_str()],
        )
    }

    fn save_cert_record(&mut self, r: &CertRecord) -> Result<()> {
        let opt = |t: Option<u64>| t.map(|t| t as i64);
        self.exec(
            "INSERT INTO device_certificates (serial, device_id, fingerprint, not_after, issued_at, \
             origin, state, key_sha256, chain_pem, confirmed_at, superseded_at, retired_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (serial) DO UPDATE SET state = excluded.state, origin = excluded.origin, \
             confirmed_at = excluded.confirmed_at, superseded_at = excluded.superseded_at, \
             retired_at = excluded.retired_at",
            &[
                &r.serial,
                &r.device.as_str(),
                &r.fingerprint_sha256,
                &(r.not_after as i64),
                &(r.issued_at as i64),
                &r.origin.as_str(),
                &r.state.as_str(),
                &r.key_sha256,
                &r.chain_pem,
                &opt(r.confirmed_at),
                &opt(r.superseded_at),
                &opt(r.retired_at),
            ],
        )?;
        Ok(())
    }

    fn cert_records_superseded(
        &mut self,
        state: CertState,
        before: UnixSeconds,
    ) -> Result<Vec<CertRecord>> {
        self.certs_of_rows(
            "WHERE state = $1 AND superseded_at < $2 ORDER BY seq",
            &[&state.as_str(), &(before as i64)],
        )
    }

    fn cert_record(&mut self, serial: &str) -> Result<Option<CertRecord>> {
        Ok(self
            .certs_of_rows(&format!("WHERE serial = $1{}", self.lock), &[&serial])?
            .pop())
    }

    fn presence_counts(&mut self) -> Result<Vec<(Lifecycle, bool, u64)>> {
        let rows = self.rows(
            "SELECT lifecycle, online, count(*) FROM devices GROUP BY 1, 2",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let l: String = r.get(0);
                let lifecycle = Lifecycle::parse(&l).ok_or_else(|| RegistryError::Corrupt {
                    what: "device lifecycle".into(),
                    detail: l.clone(),
                })?;
                Ok((lifecycle, r.get(1), r.get::<_, i64>(2).max(0) as u64))
            })
            .collect()
    }

    fn attention_counts(&mut self, before: UnixSeconds) -> Result<(u64, u64)> {
        let rows = self.rows(
            "SELECT \
             count(*) FILTER (WHERE cert_not_after < $1), \
             count(*) FILTER (WHERE desired_rev > coalesce(reported_rev, 0)) \
             FROM devices WHERE lifecycle <> 'revoked'",
            &[&(before as i64)],
        )?;
        let r = rows.first().ok_or_else(|| RegistryError::Corrupt {
            what: "device counts".into(),
            detail: "no row".into(),
        })?;
        Ok((
            r.get::<_, i64>(0).max(0) as u64,
            r.get::<_, i64>(1).max(0) as u64,
        ))
    }

    fn services(&mut self) -> Result<Vec<ServicePresence>> {
        let rows = self.rows(
            "SELECT name, connected, since, seen_at, broker_dropped, lag, broker_waiting, \
             oldest_uncommitted_s, push_back FROM services ORDER BY name",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| ServicePresence {
                name: r.get(0),
                connected: r.get(1),
                since: r.get::<_, i64>(2).max(0) as u64,
                seen_at: r.get::<_, i64>(3).max(0) as u64,
                broker_dropped: r.get::<_, Option<i64>>(4).map(|d| d.max(0) as u64),
                lag: r.get::<_, i64>(5).max(0) as u64,
                broker_waiting: r.get::<_, Option<i64>>(6).map(|d| d.max(0) as u64),
                oldest_uncommitted_s: r.get::<_, Option<i64>>(7).map(|d| d.max(0) as u64),
                push_back: r.get(8),
            })
            .collect())
    }

    fn manufacturing(&mut self, serial: &str) -> Result<Option<ManufacturingRecord>> {
        Ok(self
            .manufacturing_of_rows(&format!("WHERE serial = $1{}", self.lock), &[&serial])?
            .pop())
    }

    fn manufacturing_of(&mut self, device: &DeviceId) -> Result<Option<ManufacturingRecord>> {
        Ok(self
            .manufacturing_of_rows(
                &format!("WHERE device_id = $1{}", self.lock),
                &[&device.as_str()],
            )?
            .pop())
    }

    fn manufacturing_all(&mut self) -> Result<Vec<ManufacturingRecord>> {
        self.manufacturing_of_rows("ORDER BY serial", &[])
    }

    fn save_manufacturing(&mut self, r: &ManufacturingRecord) -> Result<()> {
        self.exec(
            "INSERT INTO manufacturing (serial, device_id, cert_serial, cert_fingerprint, station, \
             operator, made_at, image_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (serial) DO UPDATE SET device_id = excluded.device_id, \
             cert_serial = excluded.cert_serial, cert_fingerprint = excluded.cert_fingerprint, \
             station = excluded.station, operator = excluded.operator, \
             made_at = excluded.made_at, image_sha256 = excluded.image_sha256",
            &[
                &r.serial,
                &r.device.as_str(),
                &r.cert_serial,
                &r.cert_fingerprint_sha256,
                &r.station,
                &r.operator,
                &(r.made_at as i64),
                &r.image_sha256,
            ],
        )?;
        Ok(())
    }

    fn claim_serial(&mut self, serial: &UnitSerial) -> Result<Option<ClaimSerial>> {
        Ok(self
            .claim_serials_of_rows(
                &format!("WHERE serial = $1{}", self.lock),
                &[&serial.as_str()],
            )?
            .pop())
    }

    fn claim_serials(&mut self, batch: &DeviceId) -> Result<Vec<ClaimSerial>> {
        self.claim_serials_of_rows("WHERE batch = $1 ORDER BY serial", &[&batch.as_str()])
    }

    fn save_claim_serial(&mut self, e: &ClaimSerial) -> Result<()> {
        let p = e.provisioned.as_ref();
        self.exec(
            "INSERT INTO claim_serials (serial, batch, allowed_at, device_id, key_sha256, \
             chain_pem, provisioned_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (serial) DO UPDATE SET batch = excluded.batch, \
             allowed_at = excluded.allowed_at, device_id = excluded.device_id, \
             key_sha256 = excluded.key_sha256, chain_pem = excluded.chain_pem, \
             provisioned_at = excluded.provisioned_at",
            &[
                &e.serial.as_str(),
                &e.batch.as_str(),
                &(e.allowed_at as i64),
                &p.map(|p| p.device.as_str()),
                &p.map(|p| p.key_sha256.as_str()),
                &p.map(|p| p.chain_pem.as_str()),
                &p.map(|p| p.at as i64),
            ],
        )?;
        Ok(())
    }

    fn stats(&mut self) -> Result<Stats> {
        let rows = self.rows(
            "SELECT (SELECT count(*) FROM devices), (SELECT count(*) FROM telemetry), \
             (SELECT coalesce(sum(telemetry_count), 0)::bigint FROM devices), \
             (SELECT count(*) FROM events), (SELECT count(*) FROM commands), \
             pg_database_size(current_database())",
            &[],
        )?;
        let r = &rows[0];
        let n = |i: usize| r.get::<_, i64>(i).max(0) as u64;
        Ok(Stats {
            devices: n(0),
            telemetry_rows: n(1),
            telemetry_received: n(2),
            events: n(3),
            commands: n(4),
            db_bytes: n(5),
        })
    }
}
