//! The operations against a real PKI and a real SQLite registry in a
//! temporary home, with each failure injected for real (a SQLite trigger
//! that aborts the write, a file where a directory must go), so every undo
//! path runs the code a user's failure would.

use std::collections::BTreeSet;
use std::path::Path;

use edgebind_certs::{InitOptions, Pki};
use edgebind_protocol::{DeviceId, Principal};
use serde_json::Map;

use super::*;
use crate::registry::{
    CommandState, Delivery, Lifecycle, NewCommand, RegistryError, SqliteStore, Store,
};

struct Home {
    _tmp: tempfile::TempDir,
    home: FleetHome,
    store: SqliteStore,
}

impl Home {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let home = FleetHome::new(tmp.path());
        Pki::init(&home.pki_dir(), &InitOptions::new("ops-test")).unwrap();
        let store = crate::registry::open_or_create(&home.registry_db()).unwrap();
        Home {
            _tmp: tmp,
            home,
            store,
        }
    }

    fn pki(&self) -> Pki {
        self.home.open_pki().unwrap()
    }

    /// A trigger that aborts matching writes, as a failing database would.
    fn inject(&self, sql: &str) {
        rusqlite::Connection::open(self.home.registry_db())
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    fn registration(&self, id: &str) -> Registration {
        let id = DeviceId::new(id).unwrap();
        Registration {
            output: IdentityOutput::Bundle {
                dir: self.home.bundle_dir(&id),
            },
            id,
            board: "qemux86-64".parse().unwrap(),
            tags: BTreeSet::from(["lab".parse().unwrap()]),
            validity_days: 30,
            broker: Some(AgentBroker::from_addr("broker.test:8883").unwrap()),
            unit: None,
        }
    }

    fn register(&mut self, id: &str) -> Result<Registered, OpsError> {
        let req = self.registration(id);
        register_device(&self.home, &mut self.store, &req)
    }

    /// (active, revoked) certificates of `cn` in the PKI inventory.
    fn certificates(&self, cn: &str) -> (usize, usize) {
        let inv = self.pki().inventory().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let all: Vec<_> = inv.by_cn(cn).collect();
        (
            all.iter().filter(|e| e.is_active(now)).count(),
            all.iter().filter(|e| e.is_revoked()).count(),
        )
    }

    fn assert_nothing_left(&self, id: &str) {
        let dev = DeviceId::new(id).unwrap();
        let dir = self.home.bundle_dir(&dev);
        assert!(!dir.exists(), "bundle directory left: {}", dir.display());
        let tar = edgebind_certs::bundle::tar_path_for(&dir);
        assert!(!tar.exists(), "bundle tar left: {}", tar.display());
        assert_eq!(
            self.certificates(id),
            (0, 1),
            "the one certificate issued is revoked"
        );
        assert!(matches!(
            self.store.device(&dev),
            Err(RegistryError::UnknownDevice(_))
        ));
    }

    /// Configure a broker in the home whose ACL cannot be written.
    fn broken_broker_policy(&self) {
        let dir = self.home.broker_dir();
        std::fs::create_dir_all(dir.join(edgebind_broker::layout::ACL)).unwrap();
        edgebind_broker::BrokerSettings::new(vec!["broker.test".into()], vec![])
            .save(&dir)
            .unwrap();
    }
}

#[test]
fn registering_writes_the_bundle_records_the_certificate_and_the_row() {
    let mut h = Home::new();
    let req = h.registration("dev-a");
    let done = register_device(&h.home, &mut h.store, &req).unwrap();
    assert_eq!(done.device.id.as_str(), "dev-a");
    assert_eq!(done.device.cert.as_ref().unwrap().serial, done.serial);
    let dir = h.home.bundle_dir(&done.device.id);
    for (f, _) in edgebind_protocol::bundle::FILES {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert!(edgebind_certs::bundle::tar_path_for(&dir).is_file());
    assert_eq!(h.certificates("dev-a"), (1, 0));
    assert!(done.policy.applied.is_none(), "no broker configured here");
    // Registering the same id again is refused before anything is issued.
    let err = register_device(&h.home, &mut h.store, &req).unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err}");
    assert_eq!(h.certificates("dev-a"), (1, 0));
}

#[test]
fn a_failed_registry_insert_after_issuance_leaves_no_bundle_no_usable_certificate_and_no_row() {
    let mut h = Home::new();
    // Another registration winning the race between the check and the insert.
    h.inject(
        "CREATE TRIGGER lose_the_race BEFORE INSERT ON devices \
         BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: devices.id'); END;",
    );
    let err = h.register("dev-a").unwrap_err();
    assert!(err.to_string().contains("UNIQUE"), "{err}");
    h.assert_nothing_left("dev-a");
}

#[test]
fn a_failed_broker_policy_refresh_undoes_the_registration() {
    let mut h = Home::new();
    h.broken_broker_policy();
    let err = h.register("dev-a").unwrap_err();
    assert!(matches!(err, OpsError::Policy(_)), "{err}");
    h.assert_nothing_left("dev-a");
}

#[test]
fn a_bundle_that_cannot_be_written_is_undone() {
    let mut h = Home::new();
    std::fs::write(h.home.bundles_dir(), "a file where the bundles go").unwrap();
    let err = h.register("dev-a").unwrap_err();
    assert!(matches!(err, OpsError::Pki(_)), "{err}");
    assert_eq!(h.certificates("dev-a"), (0, 1));
    assert!(h.store.device(&DeviceId::new("dev-a").unwrap()).is_err());
}

#[test]
fn a_batch_undoes_only_the_device_whose_insert_failed() {
    let mut h = Home::new();
    h.inject(
        "CREATE TRIGGER fail_b2 BEFORE INSERT ON devices WHEN NEW.id = 'b-2' \
         BEGIN SELECT RAISE(ABORT, 'injected insert failure'); END;",
    );
    let ids: Vec<DeviceId> = ["b-1", "b-2", "b-3"]
        .map(|i| DeviceId::new(i).unwrap())
        .to_vec();
    let batch = BatchRegistration {
        ids,
        board: "qemux86-64".parse().unwrap(),
        tags: BTreeSet::new(),
        validity_days: 30,
        broker: Some(AgentBroker::from_addr("broker.test:8883").unwrap()),
        out: h.home.bundles_dir(),
        form: edgebind_certs::bundle::BundleForm::DirectoryAndTar,
        threads: 2,
    };
    let done = register_devices(&h.home, &mut h.store, &batch, |_| {}).unwrap();
    let names: Vec<&str> = done.registered.iter().map(DeviceId::as_str).collect();
    assert_eq!(names, ["b-1", "b-3"]);
    assert_eq!(done.failed.len(), 1);
    assert_eq!(done.failed[0].0.as_str(), "b-2");
    h.assert_nothing_left("b-2");
    for id in ["b-1", "b-3"] {
        assert_eq!(h.certificates(id), (1, 0), "{id}");
        assert!(h.home.bundles_dir().join(id).join("device.key").is_file());
    }
}

#[test]
fn a_batch_whose_broker_policy_fails_leaves_nothing() {
    let mut h = Home::new();
    h.broken_broker_policy();
    let batch = BatchRegistration {
        ids: vec![DeviceId::new("c-1").unwrap(), DeviceId::new("c-2").unwrap()],
        board: "qemux86-64".parse().unwrap(),
        tags: BTreeSet::new(),
        validity_days: 30,
        broker: None,
        out: h.home.bundles_dir(),
        form: edgebind_certs::bundle::BundleForm::DirectoryAndTar,
        threads: 1,
    };
    let err = register_devices(&h.home, &mut h.store, &batch, |_| {}).unwrap_err();
    assert!(matches!(err, OpsError::Policy(_)), "{err}");
    h.assert_nothing_left("c-1");
    h.assert_nothing_left("c-2");
}

fn queue_ping(store: &mut dyn Store, id: &DeviceId) -> edgebind_protocol::CommandId {
    let cmd = crate::service::new_command_id("q");
    store
        .insert_commands(&[NewCommand {
            id: cmd.clone(),
            device: id.clone(),
            action: edgebind_protocol::actions::PING,
            args: Map::new(),
            delivery: Delivery::Queued,
            requested_by: None,
            expires_at: None,
            rule_id: None,
        }])
        .unwrap();
    cmd
}

#[test]
fn a_revocation_interrupted_after_the_pki_is_completed_by_running_it_again() {
    let mut h = Home::new();
    let id = h.register("dev-r").unwrap().device.id;
    let cmd = queue_ping(&mut h.store, &id);
    h.inject(
        "CREATE TRIGGER no_revoke BEFORE UPDATE ON devices WHEN NEW.lifecycle = 'revoked' \
         BEGIN SELECT RAISE(ABORT, 'injected update failure'); END;",
    );
    let err = revoke(&h.home, &mut h.store, &id, Policy::Refresh).unwrap_err();
    assert!(
        matches!(err, OpsError::RevocationIncomplete { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("run the revocation again"),
        "{err}"
    );
    assert_eq!(h.certificates("dev-r"), (0, 1), "locked out first");

    h.inject("DROP TRIGGER no_revoke;");
    let done = revoke(&h.home, &mut h.store, &id, Policy::Refresh).unwrap();
    assert!(done.certificates.is_empty(), "already revoked in the PKI");
    assert_eq!(done.device.unwrap().lifecycle, Lifecycle::Revoked);
    assert_eq!(done.dropped_commands, 1);
    assert_eq!(h.store.command(&cmd).unwrap().state, CommandState::Rejected);
    let again = revoke(&h.home, &mut h.store, &id, Policy::Refresh).unwrap_err();
    assert!(again.to_string().contains("already revoked"), "{again}");
}

#[test]
fn revoking_a_device_principal_revokes_it_in_the_registry_too() {
    let mut h = Home::new();
    let id = h.register("dev-p").unwrap().device.id;
    let cmd = queue_ping(&mut h.store, &id);
    let done = revoke_principal(
        &h.home,
        &mut h.store,
        &Principal::Device(id.clone()),
        Policy::Leave,
    )
    .unwrap();
    assert_eq!(done.certificates.len(), 1);
    assert_eq!(done.dropped_commands, 1);
    assert_eq!(h.store.device(&id).unwrap().lifecycle, Lifecycle::Revoked);
    assert_eq!(h.store.command(&cmd).unwrap().state, CommandState::Rejected);
}

#[test]
fn revoking_the_last_usable_serial_revokes_the_device_but_an_old_one_does_not() {
    let mut h = Home::new();
    let first = h.register("dev-s").unwrap();
    let id = first.device.id.clone();
    let renewed = renew_device(
        &h.home,
        &mut h.store,
        &id,
        30,
        None,
        &IdentityOutput::CertificateFiles {
            dir: h.home.root().join("renewed"),
        },
    )
    .unwrap();
    assert_eq!(renewed.device.cert.unwrap().serial, renewed.serial);

    let old = revoke_serial(&h.home, &mut h.store, &first.serial, Policy::Leave).unwrap();
    assert!(
        old.device.is_none(),
        "the renewed certificate is still usable"
    );
    assert_eq!(
        h.store.device(&id).unwrap().lifecycle,
        Lifecycle::Registered
    );

    let last = revoke_serial(&h.home, &mut h.store, &renewed.serial, Policy::Leave).unwrap();
    assert_eq!(last.device.unwrap().lifecycle, Lifecycle::Revoked);
}

#[test]
fn a_renewal_the_registry_cannot_record_is_undone() {
    let mut h = Home::new();
    let first = h.register("dev-n").unwrap();
    h.inject(
        "CREATE TRIGGER no_cert BEFORE UPDATE ON devices \
         BEGIN SELECT RAISE(ABORT, 'injected update failure'); END;",
    );
    let dir = h.home.root().join("renewal");
    let err = renew_device(
        &h.home,
        &mut h.store,
        &first.device.id,
        30,
        None,
        &IdentityOutput::CertificateFiles { dir },
    )
    .unwrap_err();
    assert!(matches!(err, OpsError::RenewalUndone { .. }), "{err}");
    assert_eq!(
        h.certificates("dev-n"),
        (1, 1),
        "the first stays, the new one is revoked"
    );
    let kept = h.store.device(&first.device.id).unwrap().cert.unwrap();
    assert_eq!(kept.serial, first.serial);
}

#[test]
fn settings_report_keys_no_agent_understands() {
    let mut h = Home::new();
    let id = h.register("dev-t").unwrap().device.id;
    let mut changes = Map::new();
    changes.insert("log_level".into(), "debug".into());
    changes.insert("colour".into(), "blue".into());
    let done = set(&mut h.store, &id, &changes).unwrap();
    assert_eq!(done.desired.revision, 1);
    assert_eq!(done.unknown_keys, ["colour"]);
}

#[test]
fn sends_resolve_only_non_revoked_targets() {
    let mut h = Home::new();
    for id in ["s-1", "s-2"] {
        h.register(id).unwrap();
    }
    let s2 = DeviceId::new("s-2").unwrap();
    revoke(&h.home, &mut h.store, &s2, Policy::Leave).unwrap();
    let all = send::resolve_targets(&h.store, &Targets::All).unwrap();
    assert_eq!(all, [DeviceId::new("s-1").unwrap()]);
    let err = send::resolve_targets(&h.store, &Targets::Device(s2)).unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    let req = SendRequest {
        targets: Targets::Tag("lab".parse().unwrap()),
        action: edgebind_protocol::actions::PING,
        args: Map::new(),
        mode: Mode::Queue,
        timeout: std::time::Duration::from_secs(1),
        expires_in: None,
        identity_dir: Path::new("/nonexistent").to_owned(),
        identity_explicit: false,
        broker: None,
        rate: None,
    };
    let Sent::Queued(q) = send(&h.home, &mut h.store, &req, |_| {}).unwrap() else {
        panic!("queued")
    };
    assert_eq!(q.len(), 1);
    assert_eq!(h.store.queued_for(&q[0].device).unwrap().len(), 1);
}

#[test]
fn a_batch_whose_bundle_fails_mid_way_removes_every_bundle_and_records_nothing() {
    let mut h = Home::new();
    let out = h.home.bundles_dir();
    std::fs::create_dir_all(&out).unwrap();
    // Looks free (a dangling link), but nothing can be written through it.
    std::os::unix::fs::symlink("/nonexistent/edgebind", out.join("d-2")).unwrap();
    let batch = BatchRegistration {
        ids: ["d-1", "d-2", "d-3"]
            .map(|i| DeviceId::new(i).unwrap())
            .to_vec(),
        board: "qemux86-64".parse().unwrap(),
        tags: BTreeSet::new(),
        validity_days: 30,
        broker: Some(AgentBroker::from_addr("broker.test:8883").unwrap()),
        out: out.clone(),
        form: edgebind_certs::bundle::BundleForm::DirectoryAndTar,
        threads: 1,
    };
    register_devices(&h.home, &mut h.store, &batch, |_| {}).unwrap_err();
    for id in ["d-1", "d-2", "d-3"] {
        assert!(
            std::fs::symlink_metadata(out.join(id)).is_err(),
            "{id} left"
        );
        assert!(!out.join(format!("{id}.tar")).exists(), "{id}.tar left");
        assert_eq!(h.certificates(id), (0, 0), "{id}: nothing recorded");
        assert!(h.store.device(&DeviceId::new(id).unwrap()).is_err());
    }
}

#[test]
fn an_identity_the_broker_policy_cannot_take_is_revoked_and_removed() {
    let h = Home::new();
    h.broken_broker_policy();
    let dir = h.home.operator_dir();
    let op = Principal::from_cn("operator:alice").unwrap();
    let err = identity::ensure_identity(&h.home, &dir, &op, 30).unwrap_err();
    assert!(matches!(err, OpsError::Policy(_)), "{err}");
    assert!(!dir.join("client.crt").exists() && !dir.join("client.key").exists());
    assert_eq!(h.certificates("operator:alice").1, 1, "revoked");
}

#[test]
fn a_renewal_whose_files_cannot_be_written_is_undone() {
    let mut h = Home::new();
    let first = h.register("dev-w").unwrap();
    let blocked = h.home.root().join("blocked");
    std::fs::write(&blocked, "a file where the identity directory goes").unwrap();
    let err = renew_device(
        &h.home,
        &mut h.store,
        &first.device.id,
        30,
        None,
        &IdentityOutput::CertificateFiles { dir: blocked },
    )
    .unwrap_err();
    assert!(matches!(err, OpsError::RenewalUndone { .. }), "{err}");
    assert_eq!(h.certificates("dev-w"), (1, 1));
    let kept = h.store.device(&first.device.id).unwrap().cert.unwrap();
    assert_eq!(kept.serial, first.serial);
}

mod claim {
    use super::*;
    use edgebind_certs::Validity;
    use edgebind_protocol::UnitSerial;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn csr(cn: &str, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn request(serial: &str, pem: String) -> ClaimRequest {
        ClaimRequest {
            batch: DeviceId::new("line-1").unwrap(),
            serial: UnitSerial::new(serial).unwrap(),
            csr_pem: pem,
            board: "qemux86-64".parse().unwrap(),
            validity_days: 30,
        }
    }

    fn batch(h: &mut Home) -> Pki {
        let pki = h.pki();
        pki.issue(
            &Principal::Claim(DeviceId::new("line-1").unwrap()),
            Validity::days(1),
        )
        .unwrap();
        h.store
            .allow_serials(
                &DeviceId::new("line-1").unwrap(),
                &[
                    UnitSerial::new("SN-1").unwrap(),
                    UnitSerial::new("SN-2").unwrap(),
                ],
            )
            .unwrap();
        pki
    }

    #[test]
    fn an_allowed_unit_is_signed_registered_once_and_resumes_with_its_key() {
        let mut h = Home::new();
        let pki = batch(&mut h);
        let key = KeyPair::generate().unwrap();
        let got =
            provision_device(&pki, &mut h.store, &request("SN-1", csr("sn-1", &key))).unwrap();
        assert!(got.issued_now);
        assert_eq!(got.device.as_str(), "sn-1");
        assert!(got.chain_pem.ends_with(pki.issuing_pem()));
        let device = h.store.device(&got.device).unwrap();
        let serial = device.cert.as_ref().unwrap().serial.clone();
        // The certificate is for the device's own key.
        assert_eq!(
            edgebind_certs::csr::cert_key_sha256(&got.chain_pem).unwrap(),
            edgebind_certs::DeviceCsr::parse(&csr("sn-1", &key))
                .unwrap()
                .key_sha256()
        );
        // The same key again (a restart before the certificate was stored):
        // the same chain, nothing issued.
        let again =
            provision_device(&pki, &mut h.store, &request("SN-1", csr("sn-1", &key))).unwrap();
        assert!(!again.issued_now);
        assert_eq!(again.chain_pem, got.chain_pem);
        assert_eq!(
            h.store.device(&got.device).unwrap().cert.unwrap().serial,
            serial
        );
        // A replay with another key while the certificate is valid, or for
        // another id: refused.
        let other = KeyPair::generate().unwrap();
        for (pem, why) in [
            (csr("sn-1", &other), "renews over its own connection"),
            (csr("sn-1x", &key), "for good"),
        ] {
            let err = provision_device(&pki, &mut h.store, &request("SN-1", pem)).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
        assert_eq!(
            pki.inventory().unwrap().by_cn("sn-1").count(),
            1,
            "one certificate for the serial"
        );
    }

    #[test]
    fn an_expired_unit_reprovisions_its_own_id_and_the_old_certificate_is_revoked() {
        use crate::registry::{CertOrigin, CertState};
        let mut h = Home::new();
        let pki = batch(&mut h);
        let first = KeyPair::generate().unwrap();
        let got =
            provision_device(&pki, &mut h.store, &request("SN-1", csr("sn-1", &first))).unwrap();
        let id = got.device.clone();
        let mut old = h.store.device(&id).unwrap().cert.unwrap();
        // The registry's view of a certificate that expired (the PKI signs
        // for a day at least; the rule reads the registry).
        old.not_after = edgebind_protocol::messages::now_unix() - 10;
        h.store.set_certificate(&id, &old).unwrap();

        let key = KeyPair::generate().unwrap();
        let again =
            provision_device(&pki, &mut h.store, &request("SN-1", csr("sn-1", &key))).unwrap();
        assert!(again.issued_now);
        assert_eq!(again.device, id);
        assert_ne!(again.chain_pem, got.chain_pem);
        assert_eq!(
            edgebind_certs::csr::cert_key_sha256(&again.chain_pem).unwrap(),
            edgebind_certs::DeviceCsr::parse(&csr("sn-1", &key))
                .unwrap()
                .key_sha256()
        );
        let history = h.store.cert_history(&id).unwrap();
        let last = history.last().unwrap();
        assert_eq!(
            (last.origin, last.state),
            (CertOrigin::Reprovisioned, CertState::Current)
        );
        assert_eq!(
            h.store.device(&id).unwrap().cert.unwrap().serial,
            last.serial
        );
        assert!(
            history
                .iter()
                .any(|r| r.serial == old.serial && r.state == CertState::Retired),
            "{history:?}"
        );
        // The expired certificate is in the CRL now.
        let inventory = pki.inventory().unwrap();
        let now = time::OffsetDateTime::now_utc();
        assert!(!inventory.by_serial(&old.serial).unwrap().is_active(now));
        assert!(inventory.by_serial(&last.serial).unwrap().is_active(now));
        // Audited, under the batch's claim identity.
        let audit = h.store.audit_log(10, None).unwrap();
        assert!(
            audit.iter().any(|e| e.action == "device.reprovision"
                && e.target == "sn-1"
                && e.actor == "claim:line-1"
                && e.detail.contains(&old.serial)),
            "{audit:?}"
        );
        // The new key asking again gets the same chain; a third key is
        // refused (the new certificate is valid).
        let repeat =
            provision_device(&pki, &mut h.store, &request("SN-1", csr("sn-1", &key))).unwrap();
        assert!(!repeat.issued_now);
        assert_eq!(repeat.chain_pem, again.chain_pem);
        let err = provision_device(
            &pki,
            &mut h.store,
            &request("SN-1", csr("sn-1", &KeyPair::generate().unwrap())),
        )
        .unwrap_err();
        assert!(err.to_string().contains("renews over its own"), "{err}");
        // Revoked: refused even when expired, and nothing is signed.
        let mut cert = h.store.device(&id).unwrap().cert.unwrap();
        cert.not_after = 1;
        h.store.set_certificate(&id, &cert).unwrap();
        h.store.revoke(&id).unwrap();
        let signed = pki.inventory().unwrap().entries.len();
        let err = provision_device(
            &pki,
            &mut h.store,
            &request("SN-1", csr("sn-1", &KeyPair::generate().unwrap())),
        )
        .unwrap_err();
        assert!(err.to_string().contains("revoked"), "{err}");
        assert_eq!(pki.inventory().unwrap().entries.len(), signed);
    }

    #[test]
    fn refusals_sign_nothing() {
        let mut h = Home::new();
        let pki = batch(&mut h);
        let key = KeyPair::generate().unwrap();
        let issued_before = pki.inventory().unwrap().entries.len();
        let cases = [
            (request("SN-9", csr("sn-9", &key)), "not on the allow-list"),
            (request("SN-1", csr("SN-1", &key)), "requested id"),
            (request("SN-1", csr("a/b", &key)), "requested id"),
            (request("SN-1", csr("sn-2", &key)), "its serial names sn-1"),
            (
                request("SN-1", "junk".into()),
                "certificate signing request",
            ),
        ];
        for (req, want) in cases {
            let err = provision_device(&pki, &mut h.store, &req).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
        assert_eq!(pki.inventory().unwrap().entries.len(), issued_before);
        // A revoked batch claim provisions nothing, provisioned devices stay.
        provision_device(&pki, &mut h.store, &request("SN-1", csr("sn-1", &key))).unwrap();
        pki.revoke(&Principal::Claim(DeviceId::new("line-1").unwrap()))
            .unwrap();
        let err = provision_device(
            &pki,
            &mut h.store,
            &request("SN-2", csr("sn-2", &KeyPair::generate().unwrap())),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("claim:line-1 has no usable"),
            "{err}"
        );
        assert_eq!(
            h.store
                .device(&DeviceId::new("sn-1").unwrap())
                .unwrap()
                .lifecycle,
            Lifecycle::Registered
        );
    }
}
