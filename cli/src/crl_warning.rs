//! The warning every PKI command prints when the CRL the broker loads is
//! about to lapse (a lapsed CRL locks every client out).

use edgebind_certs::layout;
use edgebind_fleet::ops::FleetHome;
use time::OffsetDateTime;

use crate::render;

/// Print a warning when the broker's (or the PKI's) CRL is about to lapse.
pub fn warn_crl(home: &FleetHome) {
    let settings = edgebind_broker::BrokerSettings::load(&home.broker_dir()).ok();
    let warn_days = settings.as_ref().map_or(3, |s| s.crl_warn_days);
    let path = match settings {
        Some(_) => home.broker_dir().join(edgebind_broker::layout::CRL),
        None => home.pki_dir().join(layout::CRL),
    };
    if let Ok(status) = edgebind_certs::pki::crl_status(&path) {
        let now = OffsetDateTime::now_utc();
        if status.is_lapsed(now) {
            eprintln!(
                "warning: {} lapsed at {}: the broker refuses EVERY client until `edgebind pki crl` runs",
                path.display(),
                render::time(status.next_update)
            );
        } else if status.expires_within(now, warn_days) {
            eprintln!(
                "warning: {} lapses at {} (within {warn_days} days); run `edgebind pki crl` (schedule it daily)",
                path.display(),
                render::time(status.next_update)
            );
        }
    }
}
