//! What only the SQLite backend does (one WAL file, `user_version`). The
//! behaviour every backend shares is in `registry/conformance.rs`.

use serde_json::json;

use super::*;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn temp_store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::create(&dir.path().join("registry.db"), Retention::default()).unwrap();
    (dir, store)
}

fn new_device(s: &str) -> NewDevice {
    NewDevice {
        id: id(s),
        board: "raspberrypi3-64".parse().unwrap(),
        tags: BTreeSet::new(),
        cert: None,
    }
}

fn telemetry(device: &str, ts: u64) -> Update {
    Update::Telemetry {
        device: id(device),
        ts,
        payload: json!({"ts": ts}).to_string(),
        received_at: ts,
    }
}

#[test]
fn open_creates_wal_file_and_records_schema_version() {
    let (dir, store) = temp_store();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let mode: String = store
        .conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(store);
    // Re-opening runs no migration twice.
    let again = SqliteStore::open(&dir.path().join("registry.db"), Retention::default()).unwrap();
    assert_eq!(again.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn a_newer_schema_is_refused_with_the_file_named() {
    let (dir, store) = temp_store();
    store
        .conn
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(store);
    let path = dir.path().join("registry.db");
    let err = SqliteStore::open(&path, Retention::default()).unwrap_err();
    assert!(matches!(err, RegistryError::SchemaTooNew { .. }), "{err}");
    assert!(err.to_string().contains("registry.db"), "{err}");
}

#[test]
fn two_connections_share_the_file() {
    let (dir, mut writer) = temp_store();
    let reader = SqliteStore::open(&dir.path().join("registry.db"), Retention::default()).unwrap();
    writer.add_device(&new_device("a")).unwrap();
    writer.apply(&[telemetry("a", 1)]).unwrap();
    assert_eq!(reader.device(&id("a")).unwrap().telemetry_count, 1);
}

/// The shared suite on SQLite, here too, so `cargo test -p edgebind-fleet`
/// covers the default backend without a PostgreSQL.
mod conformance {
    struct TempRegistry(tempfile::TempDir);

    impl crate::registry::conformance::Fixture for TempRegistry {
        fn open(&self, retention: super::Retention) -> Box<dyn super::Store> {
            Box::new(
                super::SqliteStore::create(&self.0.path().join("registry.db"), retention).unwrap(),
            )
        }
    }

    crate::conformance_tests!(|| TempRegistry(tempfile::tempdir().unwrap()));
}

#[test]
fn a_database_failure_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be: SQLite cannot open it.
    let path = dir.path().join("registry.db");
    std::fs::create_dir(&path).unwrap();
    let err = SqliteStore::open(&path, Retention::default()).unwrap_err();
    assert!(matches!(err, RegistryError::Backend { .. }), "{err}");
    assert!(err.to_string().contains("registry.db"), "{err}");
}

#[test]
fn the_certificate_history_survives_the_migration_that_allows_reprovisioned() {
    // A registry at the schema before 'reprovisioned', with history in it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let before = MIGRATIONS
        .iter()
        .position(|m| m.contains("device_certificates_new"))
        .expect("the migration exists");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..before] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", before as i64)
            .unwrap();
        conn.execute_batch(
            "INSERT INTO devices (id, board, lifecycle, registered_at) VALUES ('a', 'qemux86-64', 'registered', 1);
             INSERT INTO device_certificates (serial, device_id, fingerprint, not_after, issued_at, origin, state)
                 VALUES ('a0', 'a', 'f0', 10, 1, 'registered', 'current');",
        )
        .unwrap();
        assert!(
            conn.execute(
                "INSERT INTO device_certificates (serial, device_id, fingerprint, not_after, issued_at, origin, state) \
                 VALUES ('a1', 'a', 'f1', 10, 1, 'reprovisioned', 'pending')",
                [],
            )
            .is_err(),
            "the old schema already took the new origin"
        );
    }
    let store = SqliteStore::open(&path, Retention::default()).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let history = store.cert_history(&id("a")).unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].serial, "a0");
    store
        .conn
        .execute(
            "INSERT INTO device_certificates (serial, device_id, fingerprint, not_after, issued_at, origin, state) \
             VALUES ('a1', 'a', 'f1', 10, 1, 'reprovisioned', 'current')",
            [],
        )
        .unwrap();
}
