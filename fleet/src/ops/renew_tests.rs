//! Renewal against a real PKI and a real SQLite registry in a temporary
//! home; the device's side is played with rcgen (a key and CSR made here).

use std::collections::BTreeSet;

use edgebind_certs::{InitOptions, Pki, Validity};
use edgebind_protocol::DeviceId;
use edgebind_protocol::renewal::Response;
use rcgen::{CertificateParams, DnType, KeyPair};

use super::*;
use crate::registry::{CertInfo, CertState, NewDevice, SqliteStore};

struct Fleet {
    _tmp: tempfile::TempDir,
    home: FleetHome,
    pki: Pki,
    store: SqliteStore,
}

const POLICY: RenewalPolicy = RenewalPolicy {
    validity_s: 3600,
    min_interval_s: 0,
    grace_s: 0,
};

impl Fleet {
    fn new() -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let home = FleetHome::new(tmp.path());
        let pki = Pki::init(&home.pki_dir(), &InitOptions::new("renew-test")).unwrap();
        let store = crate::registry::open_or_create(&home.registry_db()).unwrap();
        Fleet {
            _tmp: tmp,
            home,
            pki,
            store,
        }
    }

    /// A registered device and the serial of its first certificate.
    fn device(&mut self, id: &str) -> (DeviceId, String) {
        let id = DeviceId::new(id).unwrap();
        let issued = self.pki.issue_device(&id, Validity::seconds(600)).unwrap();
        self.store
            .add_device(&NewDevice {
                id: id.clone(),
                board: "qemux86-64".parse().unwrap(),
                tags: BTreeSet::new(),
                cert: Some(CertInfo {
                    serial: issued.serial.clone(),
                    fingerprint_sha256: issued.fingerprint_sha256.clone(),
                    not_after: issued.not_after.unix_timestamp() as u64,
                }),
            })
            .unwrap();
        (id, issued.serial)
    }

    fn renew(
        &mut self,
        id: &DeviceId,
        csr: &str,
        current: &str,
        policy: &RenewalPolicy,
    ) -> Response {
        sign_renewal(
            &self.pki,
            &mut self.store,
            id,
            csr,
            current,
            policy,
            "service:test",
        )
        .unwrap()
    }

    fn usable(&self, serial: &str) -> bool {
        self.pki
            .inventory()
            .unwrap()
            .by_serial(serial)
            .is_some_and(|e| e.is_active(time::OffsetDateTime::now_utc()))
    }
}

fn csr(cn: &str, key: &KeyPair) -> String {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn issued(r: &Response) -> (String, String) {
    match r {
        Response::Issued {
            serial, chain_pem, ..
        } => (serial.clone(), chain_pem.clone()),
        other => panic!("not issued: {other:?}"),
    }
}

fn refused(r: &Response) -> (&str, Option<u64>) {
    match r {
        Response::Refused {
            reason,
            retry_after_s,
        } => (reason, *retry_after_s),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn several_renewals_in_a_row_keep_the_history_and_retire_the_previous() {
    let mut f = Fleet::new();
    let (id, first) = f.device("dev-a");
    let mut current = first.clone();
    let mut serials = vec![first.clone()];
    for round in 0..3 {
        let key = KeyPair::generate().unwrap();
        let (serial, chain) = issued(&f.renew(&id, &csr("dev-a", &key), &current, &POLICY));
        assert!(chain.contains("BEGIN CERTIFICATE"));
        assert_eq!(
            edgebind_certs::csr::cert_key_sha256(&chain).unwrap(),
            edgebind_certs::DeviceCsr::parse(&csr("dev-a", &key))
                .unwrap()
                .key_sha256(),
            "round {round}: the certificate is for the device's new key"
        );
        // Not current until the device connected with it.
        assert_eq!(f.store.device(&id).unwrap().cert.unwrap().serial, current);
        let changed = confirm_renewal(&mut f.store, &id, &serial).unwrap();
        assert_eq!(changed.len(), 2);
        assert_eq!(f.store.device(&id).unwrap().cert.unwrap().serial, serial);
        // Grace 0: the previous one is revoked at the next retirement.
        let retired = retire_due(
            &f.home,
            &f.pki,
            &mut f.store,
            0,
            now_unix() + 1,
            "service:test",
        )
        .unwrap();
        assert_eq!(retired.serials, [current.clone()]);
        assert!(
            !f.usable(&current),
            "round {round}: previous certificate revoked"
        );
        assert!(f.usable(&serial));
        current = serial.clone();
        serials.push(serial);
    }
    let history = f.store.cert_history(&id).unwrap();
    let got: Vec<(&str, CertState)> = history
        .iter()
        .map(|r| (r.serial.as_str(), r.state))
        .collect();
    assert_eq!(
        got,
        [
            (serials[0].as_str(), CertState::Retired),
            (serials[1].as_str(), CertState::Retired),
            (serials[2].as_str(), CertState::Retired),
            (serials[3].as_str(), CertState::Current),
        ]
    );
}

#[test]
fn only_the_device_itself_with_its_current_certificate_renews() {
    let mut f = Fleet::new();
    let (a, a0) = f.device("dev-a");
    let (_b, b0) = f.device("dev-b");
    let key = KeyPair::generate().unwrap();
    let before = f.pki.inventory().unwrap().entries.len();
    // A CSR for another id, over dev-a's connection.
    let r = f.renew(&a, &csr("dev-b", &key), &a0, &POLICY);
    let (why, retry) = refused(&r);
    assert!(why.contains("asks for dev-b"), "{why}");
    assert_eq!(retry, None);
    // dev-b's serial presented by dev-a.
    let r = f.renew(&a, &csr("dev-a", &key), &b0, &POLICY);
    assert!(
        refused(&r).0.contains("not the current certificate"),
        "{r:?}"
    );
    // A tampered or garbage CSR.
    let mut bad = csr("dev-a", &key);
    bad.insert_str(40, "AAAA");
    assert!(
        refused(&f.renew(&a, &bad, &a0, &POLICY))
            .0
            .contains("certificate signing request")
    );
    // An unknown device.
    let ghost = DeviceId::new("ghost").unwrap();
    assert!(
        refused(&f.renew(&ghost, &csr("ghost", &key), &a0, &POLICY))
            .0
            .contains("not registered")
    );
    assert_eq!(
        f.pki.inventory().unwrap().entries.len(),
        before,
        "nothing signed"
    );
    // A certificate revoked by serial renews nothing, even if the registry still names it.
    f.pki.revoke_serial(&a0).unwrap();
    assert!(
        refused(&f.renew(&a, &csr("dev-a", &key), &a0, &POLICY))
            .0
            .contains("revoked")
    );
}

#[test]
fn a_revoked_device_is_refused() {
    let mut f = Fleet::new();
    let (a, a0) = f.device("dev-a");
    f.store.revoke(&a).unwrap();
    let key = KeyPair::generate().unwrap();
    let r = f.renew(&a, &csr("dev-a", &key), &a0, &POLICY);
    assert!(refused(&r).0.contains("revoked"), "{r:?}");
    assert_eq!(f.store.cert_history(&a).unwrap().len(), 1);
}

#[test]
fn the_same_key_gets_its_certificate_again_and_a_new_key_waits_for_the_interval() {
    let mut f = Fleet::new();
    let (a, a0) = f.device("dev-a");
    let policy = RenewalPolicy {
        min_interval_s: 600,
        ..POLICY
    };
    let key = KeyPair::generate().unwrap();
    let first = issued(&f.renew(&a, &csr("dev-a", &key), &a0, &policy));
    let entries = f.pki.inventory().unwrap().entries.len();
    // The response was lost: the same key asks again.
    assert_eq!(
        issued(&f.renew(&a, &csr("dev-a", &key), &a0, &policy)),
        first
    );
    assert_eq!(
        f.pki.inventory().unwrap().entries.len(),
        entries,
        "nothing signed twice"
    );
    // Another key within the interval: told when to come back.
    let other = KeyPair::generate().unwrap();
    let r = f.renew(&a, &csr("dev-a", &other), &a0, &policy);
    let (_, retry) = refused(&r);
    assert!(retry.is_some_and(|s| s > 0 && s <= 600), "{r:?}");
    // After it (interval 0 here): signed, and the unconfirmed one is abandoned and revoked.
    let second = issued(&f.renew(&a, &csr("dev-a", &other), &a0, &POLICY));
    assert!(!f.usable(&first.0), "the abandoned renewal is revoked");
    assert!(f.usable(&second.0) && f.usable(&a0));
}

#[test]
fn a_renewal_the_registry_cannot_record_is_revoked() {
    let mut f = Fleet::new();
    let (a, a0) = f.device("dev-a");
    rusqlite::Connection::open(f.home.registry_db())
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER fail BEFORE INSERT ON device_certificates \
             WHEN NEW.state = 'pending' BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
        )
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let err = sign_renewal(
        &f.pki,
        &mut f.store,
        &a,
        &csr("dev-a", &key),
        &a0,
        &POLICY,
        "t",
    )
    .unwrap_err();
    assert!(matches!(err, OpsError::RenewalUndone { .. }), "{err}");
    let OpsError::RenewalUndone { serial, .. } = err else {
        unreachable!()
    };
    assert!(!f.usable(&serial), "no usable certificate left behind");
    assert!(f.usable(&a0));
    assert_eq!(f.store.device(&a).unwrap().cert.unwrap().serial, a0);
}
