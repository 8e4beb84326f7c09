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

/// Every CRL in a PEM text: (issuer CN, revoked serials); each must be
/// named after one of the CA certificates `cas`. (Their signatures are
/// checked by a real broker in the rollover integration test.)
fn crls(pem: &str, cas: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.unwrap();
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&block.contents)
                .unwrap();
        let issuer_cn = crl
            .issuer()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            cas.iter().any(|p| {
                let der = parse(p);
                let (_, c) = parse_x509_certificate(&der).unwrap();
                c.subject()
                    .iter_common_name()
                    .next()
                    .unwrap()
                    .as_str()
                    .unwrap()
                    == issuer_cn
            }),
            "a CA certificate for the CRL of {issuer_cn}"
        );
        let serials = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial_as_string().replace(':', ""))
            .collect();
        out.push((issuer_cn, serials));
    }
    out
}

#[test]
fn a_rollover_signs_with_a_new_issuing_ca_and_keeps_the_old_ones_crl_until_retired() {
    let (dir, pki) = new_pki();
    let pki_dir = dir.path().join("pki");
    let a = DeviceId::new("dev-a").unwrap();
    let b = DeviceId::new("dev-b").unwrap();
    let old_a = pki.issue_device(&a, Validity::days(10)).unwrap();
    let old_b = pki.issue_device(&b, Validity::days(10)).unwrap();
    let old_issuing = pki.issuing_pem().to_owned();
    let old_id = pki.issuer_id().to_owned();

    let r = pki.rollover(365).unwrap();
    assert_eq!(r.previous_issuer, old_id);
    let pki = Pki::open(&pki_dir).unwrap();
    assert_eq!(pki.issuer_id(), r.new_issuer);
    assert_ne!(pki.issuing_pem(), old_issuing);
    assert_eq!(pki.previous_issuers(), std::slice::from_ref(&old_id));
    // New certificates chain to the new issuing CA, under the same root.
    let new_a = pki.issue_device(&a, Validity::days(10)).unwrap();
    assert!(new_a.chain_pem.ends_with(pki.issuing_pem()));
    let (leaf_der, issuing_der, root_der) = (
        parse(&new_a.cert_pem),
        parse(pki.issuing_pem()),
        parse(pki.root_pem()),
    );
    let (_, leaf) = parse_x509_certificate(&leaf_der).unwrap();
    let (_, issuing) = parse_x509_certificate(&issuing_der).unwrap();
    let (_, root) = parse_x509_certificate(&root_der).unwrap();
    assert_eq!(leaf.issuer(), issuing.subject());
    assert_eq!(issuing.issuer(), root.subject());
    assert_ne!(issuing.subject(), root.subject());

    // Revocations land in the CRL of the CA that signed each certificate.
    pki.revoke_serial(&old_b.serial).unwrap();
    let text = pki.refresh_crl().unwrap();
    let lists = crls(&text, &[pki.issuing_pem(), &old_issuing]);
    assert_eq!(lists.len(), 2, "one CRL per issuing CA in use");
    assert!(
        lists[0].1.is_empty(),
        "nothing of the new CA revoked: {lists:?}"
    );
    assert_eq!(lists[1].1, std::slice::from_ref(&old_b.serial));

    // old_a still depends on the old CA: not retired.
    assert!(
        pki.retire_unused(::time::OffsetDateTime::now_utc())
            .unwrap()
            .is_empty()
    );
    pki.revoke_serial(&old_a.serial).unwrap();
    assert_eq!(
        pki.retire_unused(::time::OffsetDateTime::now_utc())
            .unwrap(),
        std::slice::from_ref(&old_id)
    );
    let pki = Pki::open(&pki_dir).unwrap();
    assert!(pki.previous_issuers().is_empty());
    assert_eq!(
        crls(&pki.refresh_crl().unwrap(), &[pki.issuing_pem()]).len(),
        1
    );
    assert!(
        pki_dir
            .join("retired-issuing")
            .join(format!("{old_id}.key"))
            .exists()
    );
    // Every entry knows its issuer now.
    let inv = pki.inventory().unwrap();
    assert!(inv.entries.iter().all(|e| e.issuer.is_some()));
    assert_eq!(
        inv.by_serial(&new_a.serial).unwrap().issuer.as_deref(),
        Some(r.new_issuer.as_str())
    );
}

#[test]
fn a_rollover_without_the_root_key_is_refused_and_changes_nothing() {
    let (dir, pki) = new_pki();
    let pki_dir = dir.path().join("pki");
    std::fs::rename(pki_dir.join(ROOT_KEY), dir.path().join("offline.key")).unwrap();
    let before = pki.issuing_pem().to_owned();
    let err = pki.rollover(365).unwrap_err();
    assert!(err.to_string().contains("root key"), "{err}");
    assert_eq!(Pki::open(&pki_dir).unwrap().issuing_pem(), before);
}
