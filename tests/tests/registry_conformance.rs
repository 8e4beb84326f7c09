//! The registry conformance suite (`edgebind_fleet::registry::conformance`)
//! on each backend: SQLite in a temporary file, and a real PostgreSQL that
//! this test process starts (one cluster, a database per test).

use edgebind_fleet::registry::conformance::Fixture;
use edgebind_fleet::registry::{PostgresStore, Retention, SqliteStore, Store};

mod sqlite {
    use super::*;

    struct TempFile(tempfile::TempDir);

    impl Fixture for TempFile {
        fn open(&self, retention: Retention) -> Box<dyn Store> {
            let path = self.0.path().join("registry.db");
            Box::new(SqliteStore::create(&path, retention).expect("open the SQLite registry"))
        }
    }

    edgebind_fleet::conformance_tests!(|| TempFile(tempfile::tempdir().unwrap()));
}

mod postgres {
    use super::*;
    use edgebind_tests::PgCluster;

    struct Database(String);

    impl Database {
        fn new() -> Database {
            Database(
                PgCluster::shared()
                    .database()
                    .expect("create a test database"),
            )
        }
    }

    impl Fixture for Database {
        fn open(&self, retention: Retention) -> Box<dyn Store> {
            Box::new(PostgresStore::open(&self.0, retention).expect("open the PostgreSQL registry"))
        }
    }

    edgebind_fleet::conformance_tests!(Database::new);
}
