//! Generating the broker directory: mosquitto.conf, ACL, CRL, server identity.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use edgebind_certs::files::{create_dir, write_private, write_public};
use edgebind_certs::{CrlStatus, Pki, Validity};
use edgebind_protocol::messages::MAX_PACKET_BYTES;
use time::{Duration, OffsetDateTime};

use crate::layout::*;
use crate::settings::BrokerSettings;
use crate::{Error, acl, process};

#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Issue a new server certificate even if the current one still fits.
    pub renew_server_cert: bool,
    /// Validity of a newly issued server certificate (default 825 days).
    pub server_cert_days: Option<u32>,
}

/// What [`generate`] / [`regenerate_policy`] wrote.
#[derive(Debug, Clone)]
pub struct Generated {
    pub dir: PathBuf,
    pub conf: PathBuf,
    /// Serial of the server certificate if one was issued in this run.
    pub new_server_cert: Option<String>,
    pub crl: CrlStatus,
    /// Principals denied everything because all their certificates are revoked.
    pub revoked: Vec<String>,
}

/// Renew the server certificate when it lapses within this many days.
const SERVER_CERT_RENEW_DAYS: i64 = 30;

/// Write the whole broker directory for `settings`, issuing the broker's
/// server certificate from `pki` when there is none (or it no longer matches
/// the names, the CA, or expires within 30 days). Saves `settings.toml`.
pub fn generate(
    dir: &Path,
    pki: &Pki,
    settings: &BrokerSettings,
    opts: &GenerateOptions,
) -> Result<Generated, Error> {
    settings.validate().map_err(|message| Error::Settings {
        path: BrokerSettings::path(dir),
        message,
    })?;
    create_dir(dir, 0o755)?;
    let dir = fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    create_dir(&dir.join(DATA_DIR), 0o700)?;
    settings.save(&dir)?;

    let mut ca = String::from(pki.root_pem());
    ca.push_str(pki.issuing_pem());
    write_public(&dir.join(CA), ca.as_bytes())?;

    let new_server_cert = if opts.renew_server_cert || !server_cert_fits(&dir, pki, settings) {
        let days = opts
            .server_cert_days
            .unwrap_or(edgebind_certs::profile::default_days::BROKER);
        let issued = pki.issue_server(&settings.hosts, &settings.ips, Validity::days(days))?;
        write_private(&dir.join(SERVER_KEY), issued.key_pem.as_bytes())?;
        write_public(&dir.join(SERVER_CERT), issued.chain_pem.as_bytes())?;
        Some(issued.serial)
    } else {
        None
    };

    let conf = dir.join(CONF);
    write_public(&conf, render_conf(&dir, settings).as_bytes())?;
    let mut generated = regenerate_policy(&dir, pki, settings)?;
    generated.new_server_cert = new_server_cert;
    Ok(generated)
}

/// Re-render the ACL from the PKI inventory and write a fresh CRL (valid for
/// `settings.crl_days`). The running broker applies both on SIGHUP
/// ([`process::reload`]).
pub fn regenerate_policy(
    dir: &Path,
    pki: &Pki,
    settings: &BrokerSettings,
) -> Result<Generated, Error> {
    regenerate_policy_with_crl_lifetime(
        dir,
        pki,
        settings,
        Duration::days(i64::from(settings.crl_days)),
    )
}

/// [`regenerate_policy`] with an explicit CRL lifetime (`broker run`'s
/// test knob issues CRLs that live seconds).
pub fn regenerate_policy_with_crl_lifetime(
    dir: &Path,
    pki: &Pki,
    settings: &BrokerSettings,
    crl_lifetime: Duration,
) -> Result<Generated, Error> {
    let now = OffsetDateTime::now_utc();
    let crl = pki.refresh_crl_valid_for(crl_lifetime)?;
    write_public(&dir.join(CRL), crl.as_bytes())?;
    let inventory = pki.inventory()?;
    let active = inventory.active_principals(now);
    let revoked = inventory.revoked_principals(now);
    write_public(&dir.join(ACL), acl::render(&active, &revoked).as_bytes())?;
    write_public(
        &dir.join(ACL_PROVISIONING),
        acl::render_provisioning(&active, &revoked).as_bytes(),
    )?;
    give_to_broker_user(dir, settings)?;
    Ok(Generated {
        dir: dir.to_owned(),
        conf: dir.join(CONF),
        new_server_cert: None,
        crl: edgebind_certs::pki::crl_status(&dir.join(CRL))?,
        revoked: revoked.iter().map(|p| p.cn()).collect(),
    })
}

/// Re-issue only the CRL (valid for `lifetime`, signed by the issuing CA)
/// and replace the broker's copy atomically, readable by the user Mosquitto
/// drops to. The running broker loads it on SIGHUP. Used by `broker run`'s
/// refresh loop; the ACL is left as it is.
pub fn install_fresh_crl(
    dir: &Path,
    pki: &Pki,
    settings: &BrokerSettings,
    lifetime: Duration,
) -> Result<CrlStatus, Error> {
    let crl = pki.refresh_crl_valid_for(lifetime)?;
    let path = dir.join(CRL);
    write_public(&path, crl.as_bytes())?;
    if let Some((uid, gid)) = process::broker_user_ids(settings) {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|e| Error::io(&path, e))?;
    }
    Ok(edgebind_certs::pki::crl_status(&path)?)
}

/// Does `<dir>/server.crt` exist, chain to the current issuing CA, carry
/// exactly the configured names and stay valid for a while?
fn server_cert_fits(dir: &Path, pki: &Pki, settings: &BrokerSettings) -> bool {
    let Ok(chain) = fs::read_to_string(dir.join(SERVER_CERT)) else {
        return false;
    };
    if !dir.join(SERVER_KEY).exists() || !chain.ends_with(pki.issuing_pem()) {
        return false;
    }
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(chain.as_bytes()) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&pem.contents) else {
        return false;
    };
    let renew_at = OffsetDateTime::now_utc() + Duration::days(SERVER_CERT_RENEW_DAYS);
    if cert.validity().not_after.to_datetime() < renew_at {
        return false;
    }
    let mut dns: Vec<String> = Vec::new();
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let mut want_dns = settings.hosts.clone();
    let mut want_ips = settings.ips.clone();
    dns.sort();
    ips.sort();
    want_dns.sort();
    want_ips.sort();
    dns == want_dns && ips == want_ips
}

/// Seconds between `$SYS` updates. The fleet service's push-back reads the
/// broker's stored-messages count from `$SYS`, so this is how late it sees a
/// queue grow; the burst budget's headroom covers what arrives meanwhile.
/// (Mosquitto's default is 10; publishing the counters more often costs the
/// broker next to nothing.)
pub const SYS_INTERVAL_S: u32 = 1;

/// Mosquitto started as root drops to an unprivileged user before it reads
/// certificates, keys, the CRL and the ACL (also on every SIGHUP). The
/// public files are world-readable already; the server key (0600) and the
/// persistence directory are given to that user. Everything else stays
/// root's, so a compromised broker cannot rewrite its own ACL.
fn give_to_broker_user(dir: &Path, settings: &BrokerSettings) -> Result<(), Error> {
    let Some((uid, gid)) = process::broker_user_ids(settings) else {
        return Ok(());
    };
    for name in [
        "",
        CONF,
        ACL,
        ACL_PROVISIONING,
        CRL,
        CA,
        SERVER_CERT,
        SERVER_KEY,
        DATA_DIR,
        SETTINGS,
    ] {
        let path = dir.join(name);
        if path.exists() {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// The mosquitto.conf text. Every choice is explained in the file itself.
pub fn render_conf(dir: &Path, settings: &BrokerSettings) -> String {
    let limits = settings.budget.limits();
    let path = |name: &str| dir.join(name).display().to_string();
    let user = match &settings.run_as {
        Some(user) => format!(
            "# Started as root, Mosquitto drops to this user; it owns the files below.\nuser {user}\n"
        ),
        None => "# Started as root, Mosquitto drops to its default user `mosquitto`.\n".to_owned(),
    };
    let persistence = if settings.persistence {
        format!(
            "# Retained status/desired/reported messages and QoS 1 sessions survive a restart.\n\
             persistence true\npersistence_location {}/\nautosave_interval 60\n",
            path(DATA_DIR)
        )
    } else {
        "# Retained messages are lost on restart (devices re-publish status on reconnect).\npersistence false\n"
            .to_owned()
    };
    // Both listeners authenticate the same way; their ACLs differ, and so
    // does the client id (below).
    let tls = format!(
        "protocol mqtt\n\
         tls_version tlsv1.2\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         crlfile {crl}\n\
         require_certificate true\n\
         allow_anonymous false\n\
         use_identity_as_username true\n",
        ca = path(CA),
        cert = path(SERVER_CERT),
        key = path(SERVER_KEY),
        crl = path(CRL),
    );
    let provisioning = match settings.provisioning_port {
        Some(port) => format!(
            "\n# Provisioning listener: claim identities (one certificate per production batch,\n\
             # shared by its units). The CN is the username but NOT the client id: each unit\n\
             # connects with its serial as client id, and the ACL's %u/%c patterns give it\n\
             # its own request and response topic only, so units of one batch never see\n\
             # each other's exchange. No device pattern applies here.\n\
             listener {port} {bind}\n\
             {tls}\
             acl_file {acl}\n",
            bind = settings.bind,
            acl = path(ACL_PROVISIONING),
        ),
        None => String::new(),
    };
    format!(
        "# Generated by `edgebind broker config`; do not edit, re-run it instead.\n\
         # Run with `edgebind broker run`; apply ACL/CRL changes with `edgebind broker reload` (SIGHUP).\n\n\
         {user}\n\
         # Each listener has its own ACL (device patterns apply on the device\n\
         # listener only); there is no plain-text listener.\n\
         per_listener_settings true\n\n\
         # Without it the TLS 1.3 CONNECT/CONNACK exchange waits on Nagle + delayed ACK (~40 ms).\n\
         set_tcp_nodelay true\n\
         # Largest MQTT packet, from edgebind_protocol::messages::MAX_PACKET_BYTES; it also\n\
         # bounds every message (2.0 deprecates message_size_limit in its favour).\n\
         max_packet_size {max_packet}\n\
         # The fleet service subscribes to every device's telemetry at QoS 1: past these\n\
         # limits Mosquitto drops messages it already PUBACKed to devices. They follow\n\
         # from the {budget}\n\
         # (`edgebind broker config --budget-*` changes it). Devices only ever queue\n\
         # their own commands, so the deeper queue costs nothing there.\n\
         max_queued_messages {max_queued}\n\
         max_queued_bytes {max_queued_bytes}\n\
         # How often $SYS counters are published: the fleet service reads the dropped\n\
         # and stored message counts, so it sees a queue grow (and pushes back) and a\n\
         # drop is reported within this many seconds.\n\
         sys_interval {sys_interval}\n\n\
         {persistence}\n\
         log_dest stderr\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
         connection_messages true\n\n\
         # Device listener: devices, operators and fleet services. Mutual TLS: the\n\
         # certificate CN is the username (and, with use_username_as_clientid, the\n\
         # client id, so nobody can take over another device's session by choosing\n\
         # its client id).\n\
         listener {port} {bind}\n\
         {tls}\
         use_username_as_clientid true\n\
         acl_file {acl}\n\
         {provisioning}",
        tls = tls,
        provisioning = provisioning,
        acl = path(ACL),
        max_packet = MAX_PACKET_BYTES,
        budget = settings.budget.describe().replace(';', ";\n#"),
        max_queued = limits.max_queued_messages,
        max_queued_bytes = limits.max_queued_bytes,
        sys_interval = SYS_INTERVAL_S,
        port = settings.port,
        bind = settings.bind,
    )
}
