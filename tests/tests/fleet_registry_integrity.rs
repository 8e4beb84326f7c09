//! The registry refuses to lie: a damaged, emptied or deleted SQLite
//! registry is a clear error from every command and a non-zero exit from
//! `fleet serve`, never a silent new empty fleet; `fleet backup` makes a copy
//! that restores it; a service whose registry writes keep failing exits
//! non-zero after a bounded number of retries, and SIGTERM stops it within
//! seconds even then. Real CLI, real Mosquitto, a real agent.

mod fleet_support;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use edgebind_tests::cli::{broker_home, free_port, run, show};
use fleet_support::{AgentTweaks, Fleet};

/// A CLI-made home with a broker configuration and `n` registered devices.
fn home_with_devices(n: usize) -> tempfile::TempDir {
    let tmp = broker_home("edgebind-integrity-");
    let home = tmp.path();
    let port = free_port().unwrap().to_string();
    for args in [
        vec!["pki", "init", "--fleet", "acme"],
        vec![
            "broker",
            "config",
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--port",
            &port,
        ],
    ] {
        let out = run(home, &args);
        assert!(out.status.success(), "{}", show(&out));
    }
    for i in 0..n {
        let id = format!("dev-{i:02}");
        let out = run(
            home,
            &[
                "device",
                "add",
                &id,
                "--board",
                "qemux86-64",
                "--tag",
                "lab",
            ],
        );
        assert!(out.status.success(), "{}", show(&out));
    }
    tmp
}

/// Every registry-reading or -writing command refuses, naming the file and `why`.
fn assert_everything_refuses(home: &Path, why: &str) {
    let db = home.join("registry.db");
    for args in [
        &["devices"][..],
        &["device", "show", "dev-01"],
        &["device", "add", "dev-99", "--board", "qemux86-64"],
        &["fleet", "stats"],
        &["fleet", "serve", "--broker", "127.0.0.1:9"],
    ] {
        let out = run(home, args);
        let text = show(&out);
        assert!(!out.status.success(), "{args:?} must fail: {text}");
        assert!(text.contains(why), "{args:?}: {text}");
        assert!(text.contains(&db.display().to_string()), "{args:?}: {text}");
    }
    let check = run(home, &["fleet", "check"]);
    assert!(!check.status.success(), "{}", show(&check));
}

#[test]
fn a_damaged_emptied_or_deleted_registry_is_refused_and_a_backup_restores_it() {
    let tmp = home_with_devices(12);
    let home = tmp.path();
    let db = home.join("registry.db");
    let ok = run(home, &["fleet", "check"]);
    assert!(ok.status.success(), "{}", show(&ok));
    let backup = home.join("backup.db");
    let out = run(home, &["fleet", "backup", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", show(&out));
    let again = run(home, &["fleet", "backup", backup.to_str().unwrap()]);
    assert!(
        !again.status.success(),
        "a backup must not overwrite a file"
    );

    // 16 KiB of garbage in the middle of the file.
    let len = std::fs::metadata(&db).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
    let garbage: Vec<u8> = (0..16 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all(&garbage).unwrap();
    drop(f);
    assert_everything_refuses(home, "damaged");

    std::fs::write(&db, b"").unwrap();
    assert_everything_refuses(home, "empty (0 bytes)");

    std::fs::remove_file(&db).unwrap();
    assert_everything_refuses(home, "does not exist");
    assert!(!db.exists(), "nothing may create a new empty registry");

    // Restored from the backup: every device is back.
    std::fs::copy(&backup, &db).unwrap();
    let out = run(home, &["devices", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 12);

    // `fleet init` is the explicit way to start empty, and it never replaces one.
    std::fs::remove_file(&db).unwrap();
    let init = run(home, &["fleet", "init"]);
    assert!(init.status.success(), "{}", show(&init));
    let out = run(home, &["devices", "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

/// Make every write that touches a device fail from now on, as a registry
/// that went bad under a running service would.
fn break_writes(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER test_broken BEFORE UPDATE ON devices \
         BEGIN SELECT RAISE(ABORT, 'test: the registry cannot be written'); END;",
    )
    .unwrap();
}

fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn fleet_serve_gives_up_on_failing_writes_and_stops_on_sigterm_while_retrying() {
    let mut fleet = Fleet::start();
    let bundle = fleet.add_device("dev-a", &[]);
    let config = fleet.agent_config(&bundle, &AgentTweaks::default());
    let _agent = fleet.spawn_agent(&config);
    fleet.start_service();
    fleet.wait_device(
        "dev-a",
        Duration::from_secs(60),
        "online with telemetry",
        |d| d.online && d.telemetry.is_some(),
    );

    break_writes(&fleet.registry_path());
    let mut service = fleet.take_service().unwrap();
    let status = wait_exit(&mut service, Duration::from_secs(90))
        .unwrap_or_else(|| panic!("the service kept retrying; log:\n{}", fleet.service_log()));
    assert!(!status.success(), "it must exit non-zero: {status}");
    let log = fleet.service_log();
    assert!(log.contains("giving up"), "{log}");
    assert!(log.contains("the registry cannot be written"), "{log}");

    // Started again on the still-broken registry, it retries the first
    // telemetry batch; SIGTERM then stops it within seconds.
    fleet.start_service();
    let mut service = fleet.take_service().unwrap();
    let retrying = Instant::now() + Duration::from_secs(60);
    while !fleet.service_log().contains("retrying in") {
        assert!(
            Instant::now() < retrying,
            "no retry seen; log:\n{}",
            fleet.service_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(service.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = wait_exit(&mut service, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "SIGTERM ignored while retrying; log:\n{}",
            fleet.service_log()
        )
    });
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?}",
        asked.elapsed()
    );
    assert!(
        !status.success(),
        "an uncommitted batch is a failed stop: {status}"
    );
}
