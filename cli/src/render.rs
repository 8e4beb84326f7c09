//! How the CLI shows things: the one time format, the one table layout, and
//! the text of results several commands share (a broker policy refresh).

use edgebind_fleet::ops::PolicyRefresh;
use time::OffsetDateTime;

/// RFC 3339 in UTC (`2026-12-01T08:54:32Z`): one token, so tables stay
/// splittable by whitespace, and what scripts parse.
pub fn time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// [`time`] of a Unix timestamp; `-` for none.
pub fn unix_time(t: Option<u64>) -> String {
    match t.and_then(|t| OffsetDateTime::from_unix_timestamp(t as i64).ok()) {
        Some(dt) => time(dt),
        None => "-".into(),
    }
}

/// The date part of [`unix_time`].
pub fn unix_date(t: Option<u64>) -> String {
    let s = unix_time(t);
    s.split('T').next().unwrap_or("-").to_owned()
}

/// A device's renewal in a few words: a certificate waiting for the device
/// to connect with it, previous ones in their grace period, or how many
/// renewals so far.
pub fn renewal_state(r: &edgebind_fleet::registry::RenewalStatus) -> String {
    if let Some(p) = &r.pending {
        return format!("pending {}", short_serial(p));
    }
    if !r.previous.is_empty() {
        return format!("renewed ({} in grace)", r.previous.len());
    }
    match r.renewals {
        0 => "-".to_owned(),
        n => format!("renewed x{n} (last {})", unix_date(r.last_renewed_at)),
    }
}

fn short_serial(s: &str) -> &str {
    s.get(..8).unwrap_or(s)
}

/// Columns padded to their widest cell, two spaces apart, the last one unpadded.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// What `pki revoke`, `pki crl` and `broker reload` print about the broker
/// after the policy was refreshed. `crl_path` is the PKI's CRL, named when
/// no broker is configured.
pub fn policy(refresh: &PolicyRefresh, crl_path: &std::path::Path, broker_dir: &std::path::Path) {
    let Some(applied) = &refresh.applied else {
        println!(
            "CRL updated in {}; no broker configured in this home",
            crl_path.display()
        );
        return;
    };
    crl_summary(
        &applied.crl,
        applied.denied.len(),
        applied.crl_lapses_soon.then_some(applied.crl_warn_days),
    );
    misissued(applied.misissued_usable);
    match (applied.reloaded_pid, &applied.not_reloaded) {
        (Some(pid), _) => println!(
            "broker (pid {pid}) reloaded (SIGHUP): the new ACL and CRL apply from its next loop pass, no client disconnected"
        ),
        (None, why) => println!(
            "ACL and CRL regenerated in {}; broker not reloaded: {}",
            broker_dir.display(),
            why.as_deref().unwrap_or("-")
        ),
    }
}

/// The broker's CRL and how many principals its ACL denies; `lapses_within`
/// names the warning window when the CRL lapses inside it.
pub fn crl_summary(crl: &edgebind_certs::CrlStatus, denied: usize, lapses_within: Option<u32>) {
    println!(
        "CRL valid until {} ({} revoked); ACL denies {denied} revoked principal(s)",
        time(crl.next_update),
        crl.revoked,
    );
    if let Some(days) = lapses_within {
        eprintln!(
            "warning: the CRL lapses within {days} days; lower crl_warn_days or raise crl_days"
        );
    }
}

/// `broker config`/`reload` warn about mis-issued certificates (the full
/// list is `broker audit`'s).
pub fn misissued(usable: usize) {
    if usable > 0 {
        eprintln!(
            "warning: {usable} usable certificate(s) carry a name the fleet must not sign; \
             run `edgebind broker audit` and revoke them"
        );
    }
}

/// Why the presence shown may be wrong, or None when a fleet service keeps
/// it up to date right now.
pub fn stale_presence(view: edgebind_fleet::registry::rules::PresenceView) -> Option<String> {
    if view.fresh {
        return None;
    }
    Some(match view.as_of {
        Some(t) => format!(
            "presence is stale: no fleet service has kept it since {} (is `edgebind fleet serve` running?)",
            unix_time(Some(t))
        ),
        None => "presence is stale: no fleet service has ever recorded it (start `edgebind fleet serve`)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_format_for_every_time() {
        assert_eq!(unix_time(Some(1_796_114_072)), "2026-12-01T08:34:32Z");
        assert_eq!(unix_date(Some(1_796_114_072)), "2026-12-01");
        assert_eq!(unix_time(None), "-");
        assert_eq!(unix_date(None), "-");
        let t = OffsetDateTime::from_unix_timestamp(1_796_114_072).unwrap()
            + time::Duration::milliseconds(250);
        assert_eq!(self::time(t), "2026-12-01T08:34:32Z");
    }
}
