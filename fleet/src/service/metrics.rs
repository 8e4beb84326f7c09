//! Prometheus metrics of a fleet service instance (`fleet serve --metrics
//! 127.0.0.1:PORT`), exposed with `prometheus-client` in the OpenMetrics text
//! format that Prometheus scrapes.
//!
//! The names (the `_total` suffix of counters is added by the encoder):
//!
//! ```text
//! edgebind_messages_received_total{kind}    taken from the broker
//! edgebind_messages_committed_total{kind}   in a committed registry transaction (then acknowledged)
//! edgebind_messages_duplicated_total{kind}  delivered again and not stored twice (telemetry, events)
//! edgebind_messages_invalid_total           malformed or from unknown devices (acknowledged, not stored)
//! edgebind_commit_seconds                   registry transaction time per batch (histogram)
//! edgebind_lag_messages                     taken from the broker, not committed yet
//! edgebind_oldest_uncommitted_seconds       age of the oldest of those
//! edgebind_broker_waiting_messages          held by the broker (stored less retained), -1 unknown
//! edgebind_broker_dropped_messages          the broker's dropped-messages counter, -1 unknown
//! edgebind_push_back_active                 1 while the fleet-wide throttle is in force
//! edgebind_devices{state}                   online, offline, never_seen, revoked
//! edgebind_command_results_total{outcome}   accepted, succeeded, failed, timed_out, rejected (as reported)
//! edgebind_registry_errors_total            failed registry operations (commits retried included)
//! ```
//!
//! `kind` is the topic kind (`status`, `telemetry`, `events`, `reported`,
//! `cmd`, `cmd-result`; `other` for anything else).
//!
//! `broker run --metrics 127.0.0.1:PORT` serves the broker supervisor's own
//! figures ([`render_supervisor`]); Mosquitto's message counters are in
//! `$SYS`, which only fleet services may read, so they reach Prometheus as
//! the `edgebind_broker_*` metrics above:
//!
//! ```text
//! edgebind_broker_up                        1 while Mosquitto runs under this supervisor
//! edgebind_broker_uptime_seconds            since Mosquitto was started
//! edgebind_broker_reloads_total             SIGHUPs forwarded (ACL/CRL reloads), CRL refreshes included
//! edgebind_broker_crl_expiry_seconds        until the broker CRL's nextUpdate (negative: lapsed, every client refused)
//! edgebind_broker_crl_refreshes_total       CRLs re-issued by the refresh loop
//! edgebind_broker_crl_refresh_failures_total
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use edgebind_protocol::topics::Kind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// The label of a topic's kind.
pub fn kind_label(topic: &[u8]) -> KindLabel {
    let kind = std::str::from_utf8(topic)
        .ok()
        .and_then(edgebind_protocol::topics::Topic::parse)
        .map(|t| t.kind().segment())
        .unwrap_or("other");
    KindLabel { kind }
}

/// The label of a reported command outcome.
pub fn outcome_label(status: edgebind_protocol::messages::CommandStatus) -> &'static str {
    use edgebind_protocol::messages::CommandStatus as S;
    match status {
        S::Accepted => "accepted",
        S::Succeeded => "succeeded",
        S::Failed => "failed",
        S::TimedOut => "timed_out",
        S::Rejected => "rejected",
    }
}

pub fn kind_of(kind: Kind) -> KindLabel {
    KindLabel {
        kind: kind.segment(),
    }
}

/// Every metric of one instance; cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub received: Family<KindLabel, Counter>,
    pub committed: Family<KindLabel, Counter>,
    pub duplicated: Family<KindLabel, Counter>,
    pub invalid: Counter,
    pub commit_seconds: Histogram,
    pub lag: Gauge,
    pub oldest_uncommitted_s: Gauge,
    pub broker_waiting: Gauge,
    pub broker_dropped: Gauge,
    pub push_back: Gauge,
    pub devices: Family<StateLabel, Gauge>,
    pub command_results: Family<OutcomeLabel, Counter>,
    pub registry_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let received = Family::<KindLabel, Counter>::default();
        let committed = Family::<KindLabel, Counter>::default();
        let duplicated = Family::<KindLabel, Counter>::default();
        let invalid = Counter::default();
        // 1 ms .. ~16 s.
        let commit_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let lag = Gauge::default();
        let oldest_uncommitted_s = Gauge::default();
        let broker_waiting = Gauge::default();
        let broker_dropped = Gauge::default();
        broker_waiting.set(-1);
        broker_dropped.set(-1);
        let push_back = Gauge::default();
        let devices = Family::<StateLabel, Gauge>::default();
        let command_results = Family::<OutcomeLabel, Counter>::default();
        let registry_errors = Counter::default();
        let r = registry.sub_registry_with_prefix("edgebind");
        r.register(
            "messages_received",
            "Messages taken from the broker, by topic kind",
            received.clone(),
        );
        r.register(
            "messages_committed",
            "Messages in a committed registry transaction (then acknowledged), by topic kind",
            committed.clone(),
        );
        r.register(
            "messages_duplicated",
            "Messages delivered again and not stored twice, by topic kind",
            duplicated.clone(),
        );
        r.register(
            "messages_invalid",
            "Messages dropped as malformed or from devices not in the registry",
            invalid.clone(),
        );
        r.register(
            "commit_seconds",
            "Registry transaction time of one batch",
            commit_seconds.clone(),
        );
        r.register(
            "lag_messages",
            "Messages taken from the broker and not committed yet",
            lag.clone(),
        );
        r.register(
            "oldest_uncommitted_seconds",
            "Age of the oldest message taken from the broker and not committed yet",
            oldest_uncommitted_s.clone(),
        );
        r.register(
            "broker_waiting_messages",
            "Messages the broker holds (stored less retained; -1 until read)",
            broker_waiting.clone(),
        );
        r.register(
            "broker_dropped_messages",
            "The broker's dropped-messages counter since it started (-1 until read)",
            broker_dropped.clone(),
        );
        r.register(
            "push_back_active",
            "1 while the fleet-wide throttle this instance published is in force",
            push_back.clone(),
        );
        r.register(
            "devices",
            "Devices in the registry by state",
            devices.clone(),
        );
        r.register(
            "command_results",
            "Command results reported by devices, by outcome",
            command_results.clone(),
        );
        r.register(
            "registry_errors",
            "Registry operations that failed (each retried commit counts)",
            registry_errors.clone(),
        );
        Metrics {
            registry,
            received,
            committed,
            duplicated,
            invalid,
            commit_seconds,
            lag,
            oldest_uncommitted_s,
            broker_waiting,
            broker_dropped,
            push_back,
            devices,
            command_results,
            registry_errors,
        }
    }
}

impl Metrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn set_devices(&self, o: &crate::registry::Overview) {
        for (state, n) in [
            ("online", o.online),
            ("offline", o.offline),
            ("never_seen", o.never_seen),
            ("revoked", o.revoked),
        ] {
            self.devices
                .get_or_create(&StateLabel { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// The exposition text of a broker supervisor's figures at `now_unix`.
pub fn render_supervisor(
    stats: &edgebind_broker::supervise::SupervisorStats,
    now_unix: i64,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut registry = Registry::default();
    let r = registry.sub_registry_with_prefix("edgebind_broker");
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let up = stats.up.load(Relaxed);
    let started = i64::try_from(stats.started_unix.load(Relaxed)).unwrap_or(0);
    r.register(
        "up",
        "1 while Mosquitto runs under this supervisor",
        gauge(i64::from(up)),
    );
    r.register(
        "uptime_seconds",
        "Seconds since Mosquitto was started",
        gauge(if up { (now_unix - started).max(0) } else { 0 }),
    );
    r.register(
        "reloads",
        "SIGHUPs forwarded to Mosquitto (ACL and CRL reloads)",
        counter(stats.reloads.load(Relaxed)),
    );
    let next_update = stats.crl_next_update_unix.load(Relaxed);
    r.register(
        "crl_expiry_seconds",
        "Seconds until the broker CRL's nextUpdate; negative: lapsed, Mosquitto refuses every client",
        gauge(if next_update == 0 { 0 } else { next_update - now_unix }),
    );
    r.register(
        "crl_refreshes",
        "CRLs re-issued by the refresh loop",
        counter(stats.crl_refreshes.load(Relaxed)),
    );
    r.register(
        "crl_refresh_failures",
        "Failed CRL re-issues",
        counter(stats.crl_refresh_failures.load(Relaxed)),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "--metrics {0}: serve metrics on a loopback address (127.0.0.1:PORT or [::1]:PORT); they \
         tell anyone who can reach them about the fleet, and there is no TLS"
    )]
    NotLoopback(SocketAddr),
    #[error("--metrics {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The bound listener of the metrics endpoint: bind first (so a taken port
/// fails `fleet serve` at once), serve later.
pub struct MetricsListener {
    listener: tokio::net::TcpListener,
}

/// Metrics are served on loopback only.
pub fn check_addr(addr: SocketAddr) -> Result<(), MetricsError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(MetricsError::NotLoopback(addr))
    }
}

impl MetricsListener {
    pub async fn bind(addr: SocketAddr) -> Result<MetricsListener, MetricsError> {
        check_addr(addr)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(MetricsListener { listener })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serve `GET /metrics` with the fleet service's counters until the task is aborted.
    pub async fn serve_counters(self, counters: Arc<super::Counters>) {
        self.serve(move || counters.render_metrics()).await;
    }

    /// Serve `GET /metrics`, the text `render` makes at each scrape, until
    /// the task is aborted.
    pub async fn serve(self, render: impl Fn() -> String + Clone + Send + Sync + 'static) {
        use axum::routing::get;
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        render(),
                    )
                }
            }),
        );
        if let Err(e) = axum::serve(self.listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_names() {
        let m = Metrics::default();
        m.received
            .get_or_create(&kind_of(Kind::Telemetry))
            .inc_by(3);
        m.committed
            .get_or_create(&kind_of(Kind::Telemetry))
            .inc_by(2);
        m.commit_seconds.observe(0.004);
        m.lag.set(1);
        m.set_devices(&crate::registry::Overview {
            online: 2,
            ..Default::default()
        });
        let text = m.render();
        for line in [
            "edgebind_messages_received_total{kind=\"telemetry\"} 3",
            "edgebind_messages_committed_total{kind=\"telemetry\"} 2",
            "edgebind_commit_seconds_count 1",
            "edgebind_lag_messages 1",
            "edgebind_broker_dropped_messages -1",
            "edgebind_devices{state=\"online\"} 2",
            "edgebind_registry_errors_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert_eq!(
            kind_label(b"edgebind/v2/cmd-result/a/c1").kind,
            "cmd-result"
        );
        assert_eq!(kind_label(b"$SYS/x").kind, "other");
    }

    #[tokio::test]
    async fn refuses_a_non_loopback_address() {
        let e = MetricsListener::bind("0.0.0.0:0".parse().unwrap())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
    }
}
