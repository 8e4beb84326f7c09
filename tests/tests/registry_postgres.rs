//! What only the PostgreSQL backend does: its schema version table, its
//! URL, a server that is not there. The behaviour both backends share is
//! the conformance suite (`registry_conformance.rs`).

use edgebind_fleet::registry::postgres::SCHEMA_VERSION;
use edgebind_fleet::registry::{PostgresStore, RegistryError, RegistryUrl, Retention, open_store};
use edgebind_tests::PgCluster;

#[test]
fn migrations_run_once_and_a_newer_schema_is_refused_with_the_url_named() {
    let cluster = PgCluster::shared();
    let url = cluster.database().unwrap();
    let store = PostgresStore::open(&url, Retention::default()).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    drop(store);
    let again = PostgresStore::open(&url, Retention::default()).unwrap();
    assert_eq!(
        again.schema_version().unwrap(),
        SCHEMA_VERSION,
        "nothing ran twice"
    );
    drop(again);

    cluster
        .psql(&url, "UPDATE edgebind_schema SET version = 99")
        .unwrap();
    let err = PostgresStore::open(&url, Retention::default()).unwrap_err();
    assert!(
        matches!(err, RegistryError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&url), "{err}");
    assert_eq!(
        cluster.psql(&url, "SELECT count(*) FROM devices").unwrap(),
        "0",
        "a refused open changes nothing"
    );
}

#[test]
fn two_processes_migrating_a_fresh_database_at_once_both_succeed() {
    let url = PgCluster::shared().database().unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PostgresStore::open(&url, Retention::default()).map(drop))
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
}

#[test]
fn an_unreachable_server_is_a_clear_error_without_the_password() {
    let port = edgebind_tests::cli::free_port().unwrap();
    let url: RegistryUrl = format!("postgres://edgebind:s3cret@127.0.0.1:{port}/fleet")
        .parse()
        .unwrap();
    let Err(err) = open_store(&url, Retention::default()) else {
        panic!("opened a registry on a port nobody listens on");
    };
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Backend { .. }), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}/fleet")), "{text}");
    assert!(text.contains("refused"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

#[test]
fn a_missing_database_is_named() {
    let cluster = PgCluster::shared();
    let url = cluster.url("no_such_db");
    let err = PostgresStore::open(&url, Retention::default()).unwrap_err();
    assert!(err.to_string().contains("no_such_db"), "{err}");
}

#[test]
fn a_unix_socket_url_reaches_the_server() {
    let cluster = PgCluster::shared();
    let tcp = cluster.database().unwrap();
    let database = tcp.rsplit('/').next().unwrap();
    let dir = cluster
        .socket_dir()
        .display()
        .to_string()
        .replace('/', "%2F");
    let url = format!(
        "postgres://{}@{dir}:{}/{database}",
        edgebind_tests::postgres::DB_USER,
        cluster.port()
    );
    let store = PostgresStore::open(&url, Retention::default()).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
}
