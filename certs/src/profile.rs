//! Certificate profiles: what each kind of certificate may be used for.
//!
//! * root CA: may sign one level of CA below it (path length 1);
//! * issuing CA: signs leaves and CRLs only (path length 0);
//! * device / operator / service / claim: `clientAuth` only, CN = the
//!   principal's CN (Mosquitto turns it into the MQTT username);
//! * broker: `serverAuth` only, SANs = the names clients dial.

use std::net::IpAddr;

use edgebind_protocol::Principal;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};

use crate::Error;

/// How long a certificate is valid, starting shortly before now (clock skew).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Back-date every certificate a little so a device whose clock is a few
/// minutes behind the CA's still accepts a fresh certificate.
const BACKDATE: Duration = Duration::minutes(5);

impl Validity {
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - BACKDATE,
            not_after: now + Duration::days(i64::from(days)),
        }
    }

    /// Valid for `seconds` from now (renewal tests use lifetimes of minutes).
    pub fn seconds(seconds: u64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - BACKDATE,
            not_after: now + Duration::seconds(i64::try_from(seconds).unwrap_or(i64::MAX / 2)),
        }
    }

    /// An explicit window (tests use it to make expired or not-yet-valid certificates).
    pub fn between(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        Validity {
            not_before,
            not_after,
        }
    }
}

/// Default validity of each kind, in days.
pub mod default_days {
    pub const ROOT_CA: u32 = 20 * 365;
    pub const ISSUING_CA: u32 = 10 * 365;
    /// Short on purpose: the agent renews its certificate by itself at
    /// about two thirds of its life (`edgebind_protocol::renewal`), so a
    /// leaked key is worth little. Configurable per fleet.
    pub const DEVICE: u32 = 90;
    pub const BROKER: u32 = 825;
    pub const OPERATOR: u32 = 365;
    pub const SERVICE: u32 = 365;
    pub const CLAIM: u32 = 90;
}

pub fn default_days_for(principal: &Principal) -> u32 {
    match principal {
        Principal::Device(_) => default_days::DEVICE,
        Principal::Operator(_) => default_days::OPERATOR,
        Principal::Service(_) => default_days::SERVICE,
        Principal::Claim(_) => default_days::CLAIM,
    }
}

/// A random positive 128-bit serial (RFC 5280: at most 20 octets, positive, unpredictable).
pub fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Invalid("the system random number generator failed".into()))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero octet, so the hex form always has 32 digits
    Ok(SerialNumber::from_slice(&bytes))
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    if let Some(org) = org {
        name.push(DnType::OrganizationName, org);
    }
    name.push(DnType::CommonName, cn);
    name
}

fn base(cn: &str, org: Option<&str>, validity: Validity) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn, org);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

pub fn root_ca(fleet: &str, validity: Validity) -> Result<CertificateParams, Error> {
    let mut params = base(&format!("{fleet} Edgebind Root CA"), Some(fleet), validity)?;
    params.use_authority_key_identifier_extension = false;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

pub fn issuing_ca(fleet: &str, validity: Validity) -> Result<CertificateParams, Error> {
    let mut params = base(
        &format!("{fleet} Edgebind Issuing CA"),
        Some(fleet),
        validity,
    )?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Client certificate of any principal: CN = `principal.cn()`, `clientAuth` only.
pub fn client(principal: &Principal, validity: Validity) -> Result<CertificateParams, Error> {
    let mut params = base(&principal.cn(), None, validity)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// The broker's TLS server certificate: `serverAuth` only, SANs for every name clients dial.
pub fn broker(
    hosts: &[String],
    ips: &[IpAddr],
    validity: Validity,
) -> Result<CertificateParams, Error> {
    let cn = hosts
        .first()
        .cloned()
        .or_else(|| ips.first().map(IpAddr::to_string))
        .ok_or_else(|| {
            Error::Invalid("a broker certificate needs at least one --host or --ip".into())
        })?;
    let mut params = base(&cn, None, validity)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    for host in hosts {
        let name = host
            .clone()
            .try_into()
            .map_err(|e| Error::crypto(format!("broker host name {host:?}"), e))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    Ok(params)
}
