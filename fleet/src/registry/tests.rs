use super::*;

#[test]
fn registry_urls_choose_the_backend_and_plain_paths_stay_sqlite() {
    let url = |s: &str| s.parse::<RegistryUrl>().unwrap();
    assert_eq!(
        url("sqlite:/srv/r.db"),
        RegistryUrl::Sqlite("/srv/r.db".into())
    );
    assert_eq!(
        url("sqlite:///srv/r.db"),
        RegistryUrl::Sqlite("/srv/r.db".into())
    );
    assert_eq!(
        url("home/registry.db"),
        RegistryUrl::Sqlite("home/registry.db".into())
    );
    assert!(matches!(
        url("postgres://edgebind@127.0.0.1:5432/fleet"),
        RegistryUrl::Postgres(_)
    ));
    assert!(matches!(
        url("postgresql://u@h/db"),
        RegistryUrl::Postgres(_)
    ));
}

#[test]
fn bad_registry_urls_are_refused_without_creating_anything() {
    for bad in ["", "sqlite:", "mysql://h/db", "postgres://u@h:notaport/db"] {
        let err = bad.parse::<RegistryUrl>().unwrap_err();
        assert!(
            matches!(err, RegistryError::InvalidUrl { .. }),
            "{bad}: {err}"
        );
    }
}

#[test]
fn passwords_never_reach_messages() {
    let u: RegistryUrl =
        "postgres://fleet:s3cret@db.local:5432/fleet?password=other&sslmode=disable"
            .parse()
            .unwrap();
    let shown = u.to_string();
    assert!(
        !shown.contains("s3cret") && !shown.contains("other"),
        "{shown}"
    );
    assert!(shown.contains("fleet:***@db.local:5432/fleet"), "{shown}");
    assert!(shown.contains("sslmode=disable"), "{shown}");
    let err = "postgres://u:s3cret@h:x/db"
        .parse::<RegistryUrl>()
        .unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[test]
fn backend_errors_name_the_registry_once() {
    let e = RegistryError::backend(std::io::Error::other("disk full")).located("/srv/r.db");
    assert_eq!(e.to_string(), "registry /srv/r.db: disk full");
    // A location already given is kept.
    assert_eq!(
        e.located("elsewhere").to_string(),
        "registry /srv/r.db: disk full"
    );
}
