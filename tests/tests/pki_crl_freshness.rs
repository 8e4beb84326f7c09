//! CRL freshness: Mosquitto refuses EVERY client once the CRL passes its
//! nextUpdate, so the tooling warns inside the window and `edgebind pki crl`
//! / `edgebind broker reload` re-issue it. Uses the real `edgebind` binary
//! against a real broker.

use std::process::{Command, Output};

use edgebind_certs::files::write_public;
use edgebind_tests::{DEADLINE, TestClient, TestFleet, bin_path, wait_until};
use time::{Duration, OffsetDateTime};

fn edgebind(fleet: &TestFleet, args: &[&str]) -> Output {
    Command::new(bin_path("edgebind"))
        .arg("--home")
        .arg(fleet.pki.home())
        .args(args)
        .output()
        .expect("run edgebind")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Put a CRL valid for `validity` into the broker and SIGHUP it.
fn install_short_crl(fleet: &mut TestFleet, validity: Duration) -> OffsetDateTime {
    let crl = fleet.pki.pki().refresh_crl_valid_for(validity).unwrap();
    let path = fleet.broker.dir().join(edgebind_broker::layout::CRL);
    write_public(&path, crl.as_bytes()).unwrap();
    fleet.broker.hup().unwrap();
    edgebind_certs::pki::crl_status(&path).unwrap().next_update
}

#[test]
fn crl_inside_the_warning_window_is_flagged_and_refreshed_by_the_cli() {
    let mut fleet = TestFleet::start();
    let dev = fleet.pki.device("dev-a");
    let gone = fleet.pki.device("dev-gone");
    fleet.pki.revoke("dev-gone");
    // Two days left: inside the default 3-day warning window of a 7-day CRL.
    install_short_crl(&mut fleet, Duration::days(2));
    let a = TestClient::connect(&dev, &fleet.broker).unwrap();

    let check = edgebind(&fleet, &["pki", "crl", "--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("lapses within 3 days"),
        "{}",
        text(&check)
    );

    let refresh = edgebind(&fleet, &["pki", "crl"]);
    assert!(refresh.status.success(), "{}", text(&refresh));
    assert!(
        String::from_utf8_lossy(&refresh.stdout).contains("reloaded"),
        "{}",
        text(&refresh)
    );
    let status =
        edgebind_certs::pki::crl_status(&fleet.broker.dir().join(edgebind_broker::layout::CRL))
            .unwrap();
    let left = status.next_update - OffsetDateTime::now_utc();
    assert!(left > Duration::days(6), "refreshed CRL valid for {left}");
    assert_eq!(status.revoked, 1, "the revocation survives the refresh");

    let check = edgebind(&fleet, &["pki", "crl", "--check"]);
    assert!(check.status.success(), "{}", text(&check));

    // Nobody was disconnected; the revoked device is still refused.
    assert!(a.is_connected() && a.connack_count() == 1);
    let err = TestClient::connect(&gone, &fleet.broker)
        .err()
        .expect("still revoked");
    assert!(err.to_string().contains("CertificateRevoked"), "{err}");
}

#[test]
fn lapsed_crl_locks_everyone_out_until_pki_crl_runs() {
    let mut fleet = TestFleet::start();
    let dev = fleet.pki.device("dev-a");
    TestClient::connect(&dev, &fleet.broker)
        .unwrap()
        .disconnect();

    let next = install_short_crl(&mut fleet, Duration::seconds(2));
    assert!(wait_until(DEADLINE, || OffsetDateTime::now_utc()
        > next + Duration::seconds(1)));
    let err = TestClient::connect(&dev, &fleet.broker)
        .err()
        .expect("a lapsed CRL refuses valid clients");
    assert!(err.to_string().contains("CertificateExpired"), "{err}");

    let check = edgebind(&fleet, &["pki", "crl", "--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    let refresh = edgebind(&fleet, &["pki", "crl"]);
    assert!(refresh.status.success(), "{}", text(&refresh));
    // The CLI's SIGHUP is applied asynchronously (a loaded CI run once
    // connected before Mosquitto had reloaded): wait for a logged reload.
    fleet.broker.hup().unwrap();
    TestClient::connect(&dev, &fleet.broker).expect("valid device connects after the refresh");
}
