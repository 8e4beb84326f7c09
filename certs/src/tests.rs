//! Unit tests of the PKI: profiles, files, inventory, CRL.

use std::net::{IpAddr, Ipv4Addr};

use edgebind_protocol::{DeviceId, Principal};
use x509_parser::prelude::*;

use crate::files::mode_of;
use crate::layout::*;
use crate::{Error, InitOptions, Pki, Validity};

fn new_pki() -> (tempfile::TempDir, Pki) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &InitOptions::new("unit")).unwrap();
    (dir, pki)
}

fn parse(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    p.contents
}

fn eku(cert: &X509Certificate<'_>) -> (bool, bool) {
    let e = cert.extended_key_usage().unwrap().unwrap().value;
    (e.client_auth, e.server_auth)
}

#[test]
fn device_certificate_is_client_auth_only_with_cn_and_chain() {
    let (_d, pki) = new_pki();
    let id = DeviceId::new("dev-a").unwrap();
    let issued = pki.issue_device(&id, Validity::days(10)).unwrap();
    let der = parse(&issued.cert_pem);
    let (_, cert) = parse_x509_certificate(&der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "dev-a");
    assert_eq!(eku(&cert), (true, false));
    assert!(!cert.is_ca());
    // Chain = leaf + issuing CA, issued by the issuing CA.
    assert!(issued.chain_pem.starts_with(&issued.cert_pem));
    assert!(issued.chain_pem.ends_with(pki.issuing_pem()));
    let issuing = parse(pki.issuing_pem());
    let (_, issuing) = parse_x509_certificate(&issuing).unwrap();
    assert_eq!(cert.issuer(), issuing.subject());
    // Fingerprint = SHA-256 of the DER; serial matches the certificate.
    let fp = ring::digest::digest(&ring::digest::SHA256, &der);
    let hex: String = fp.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(issued.fingerprint_sha256, hex);
    assert_eq!(cert.raw_serial_as_string().replace(':', ""), issued.serial);
    assert_eq!(issued.serial.len(), 32);
}

#[test]
fn roles_get_prefixed_cns_and_broker_gets_server_auth_with_sans() {
    let (_d, pki) = new_pki();
    for cn in ["operator:alice", "service:fleet", "claim:line-1"] {
        let issued = pki
            .issue(&Principal::from_cn(cn).unwrap(), Validity::days(1))
            .unwrap();
        let der = parse(&issued.cert_pem);
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        let got = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(got, cn);
        assert_eq!(eku(&cert), (true, false));
    }
    let server = pki
        .issue_server(
            &["broker.example.net".into()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Validity::days(1),
        )
        .unwrap();
    let der = parse(&server.cert_pem);
    let (_, cert) = parse_x509_certificate(&der).unwrap();
    assert_eq!(eku(&cert), (false, true));
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(sans.contains(&GeneralName::DNSName("broker.example.net")));
    assert!(sans.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
    assert!(
        pki.inventory()
            .unwrap()
            .entries
            .iter()
            .any(|e| e.role == "broker")
    );
}

#[test]
fn cas_are_constrained_and_keys_private() {
    let (d, pki) = new_pki();
    let dir = d.path().join("pki");
    for (name, pathlen) in [(ROOT_CERT, 1), (ISSUING_CERT, 0)] {
        let pem = std::fs::read_to_string(dir.join(name)).unwrap();
        let der = parse(&pem);
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(pathlen));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    }
    assert_eq!(mode_of(&dir.join(ROOT_KEY)).unwrap(), 0o600);
    assert_eq!(mode_of(&dir.join(ISSUING_KEY)).unwrap(), 0o600);
    assert_eq!(mode_of(&dir).unwrap(), 0o700);
    let issued = pki
        .issue_device(&DeviceId::new("x").unwrap(), Validity::days(1))
        .unwrap();
    let out = d.path().join("id");
    issued
        .write_identity(&out, "device", pki.root_pem())
        .unwrap();
    assert_eq!(mode_of(&out.join("device.key")).unwrap(), 0o600);
    assert_eq!(mode_of(&out.join("device.crt")).unwrap(), 0o644);
}

#[test]
fn init_never_overwrites_without_force() {
    let (d, _pki) = new_pki();
    let dir = d.path().join("pki");
    let before = std::fs::read(dir.join(ROOT_KEY)).unwrap();
    let err = Pki::init(&dir, &InitOptions::new("again")).err().unwrap();
    assert!(matches!(err, Error::Exists { .. }), "{err}");
    assert!(err.to_string().contains("--force"));
    assert_eq!(std::fs::read(dir.join(ROOT_KEY)).unwrap(), before);
    let mut force = InitOptions::new("again");
    force.force = true;
    Pki::init(&dir, &force).unwrap();
    assert_ne!(std::fs::read(dir.join(ROOT_KEY)).unwrap(), before);
}

#[test]
fn issuing_works_with_the_root_key_offline() {
    let (d, _pki) = new_pki();
    let dir = d.path().join("pki");
    std::fs::rename(dir.join(ROOT_KEY), d.path().join("offline-root.key")).unwrap();
    let pki = Pki::open(&dir).unwrap();
    let id = DeviceId::new("dev-z").unwrap();
    pki.issue_device(&id, Validity::days(1)).unwrap();
    pki.revoke(&Principal::Device(id)).unwrap();
    assert_eq!(pki.crl_status().unwrap().revoked, 1);
}

#[test]
fn renewal_keeps_the_id_and_revocation_covers_every_certificate() {
    let (_d, pki) = new_pki();
    let id = DeviceId::new("dev-r").unwrap();
    let first = pki.issue_device(&id, Validity::days(5)).unwrap();
    let second = pki.issue_device(&id, Validity::days(5)).unwrap();
    assert_ne!(first.serial, second.serial);
    let inv = pki.inventory().unwrap();
    assert_eq!(inv.by_cn("dev-r").count(), 2);
    let now = ::time::OffsetDateTime::now_utc();
    assert!(
        inv.by_cn("dev-r").all(|e| e.is_active(now)),
        "old cert stays valid"
    );

    pki.revoke_serial(&first.serial).unwrap();
    let inv = pki.inventory().unwrap();
    assert!(
        inv.active_principals(now)
            .contains(&Principal::Device(id.clone()))
    );
    assert!(
        inv.revoked_principals(now).is_empty(),
        "still has a valid certificate"
    );

    let revoked = pki.revoke(&Principal::Device(id.clone())).unwrap();
    assert_eq!(revoked.len(), 1, "only the not-yet-revoked one");
    let inv = pki.inventory().unwrap();
    assert_eq!(inv.revoked_principals(now), vec![Principal::Device(id)]);
    let crl = pki.crl_status().unwrap();
    assert_eq!(crl.revoked, 2);
    assert!(crl.crl_number.unwrap() >= 3, "CRL numbers increase");
}

#[test]
fn unknown_principal_and_bad_ids_are_clear_errors() {
    let (_d, pki) = new_pki();
    let err = pki
        .revoke(&Principal::from_cn("nobody").unwrap())
        .err()
        .unwrap();
    assert!(err.to_string().contains("\"nobody\""), "{err}");
    let err = DeviceId::new("a/#").err().unwrap().to_string();
    assert!(err.contains("device id") && err.contains("'/'"), "{err}");
    assert!(Principal::from_cn("operator:a+b").is_err());
}

#[test]
fn batch_issues_in_parallel_and_records_once() {
    let (_d, pki) = new_pki();
    let ids: Vec<DeviceId> = (0..50)
        .map(|i| DeviceId::new(format!("b-{i:03}")).unwrap())
        .collect();
    let seen = std::sync::Mutex::new(Vec::new());
    let issued = pki
        .issue_devices(
            &ids,
            Validity::days(1),
            4,
            |c| {
                seen.lock().unwrap().push(c.cn.clone());
                Ok(())
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(issued.len(), 50);
    assert_eq!(seen.lock().unwrap().len(), 50);
    assert!(issued.iter().zip(&ids).all(|(c, id)| c.cn == id.as_str()));
    assert_eq!(pki.inventory().unwrap().entries.len(), 50);
    let dup = vec![ids[0].clone(), ids[0].clone()];
    assert!(
        pki.issue_devices(&dup, Validity::days(1), 2, |_| Ok(()), |_| {})
            .is_err()
    );
}

#[test]
fn crl_lifetime_follows_the_request() {
    let (_d, pki) = new_pki();
    pki.refresh_crl_valid_for(::time::Duration::days(2))
        .unwrap();
    let s = pki.crl_status().unwrap();
    let now = ::time::OffsetDateTime::now_utc();
    assert!(s.expires_within(now, 3));
    assert!(!s.expires_within(now, 1));
    assert!(!s.is_lapsed(now));
}
