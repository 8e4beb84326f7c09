//! The fleet service's side of claim-based first boot: a second broker
//! connection, to the provisioning listener, that answers units' claim
//! requests ([`edgebind_protocol::provision`]).
//!
//! ```text
//!  provisioning listener ──$share/edgebind-fleet/…/request/+/+──> event loop ──> provisioner thread
//!        ^                                                                          │ rate limit per batch
//!        └──────────── response/{claim-cn}/{serial} (QoS 1) ────────────────────────┘ lease per serial, ops::provision_device
//! ```
//!
//! - Every instance subscribes as a member of the fleet's shared group, so
//!   the broker hands each request to one of them.
//! - Each batch has a token bucket ([`RateLimit`]) per instance: a burst of
//!   units is answered `deferred` with a time to ask again, not queued
//!   without bound.
//! - Before signing, the instance takes the registry lease
//!   `provision/<serial>` ([`crate::registry::Store::claim`]) so two
//!   instances never work on one serial at once; the one that does not get
//!   it answers `deferred`. The registry transaction of
//!   [`crate::ops::provision_device`] is the final word anyway: a serial is
//!   provisioned once, whoever commits first.
//! - A unit that gets no answer (an instance died mid-request) asks again:
//!   the subscription needs no persistent session.
//!
//! The connection's client id is `service:NAME:provision`: on the
//! provisioning listener the client id is not the CN, and `:` after the
//! name cannot occur in any principal's CN, so it never takes over the
//! instance's own session on the device listener.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgebind_certs::Pki;
use edgebind_protocol::provision::{self, Leg, Request, Response};
use edgebind_protocol::{DeviceId, UnitSerial};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};

use crate::mqtt::{self, BrokerEndpoint, ClientIdentity};
use crate::ops::{ClaimRequest, OpsError, provision_device};
use crate::registry::{Board, RegistryError, Store};

/// How long an instance holds a serial while it provisions it.
pub const LEASE_S: u64 = 30;

/// Settings of the provisioning connection (`fleet serve` enables it when
/// the broker has a provisioning listener).
#[derive(Debug, Clone)]
pub struct ProvisionConfig {
    /// The provisioning listener.
    pub endpoint: BrokerEndpoint,
    /// The fleet PKI (its issuing CA signs the units' requests).
    pub pki_dir: PathBuf,
    /// The board units are registered with.
    pub board: Board,
    /// Lifetime of the certificates issued.
    pub validity_days: u32,
    pub rate: RateLimit,
}

/// A token bucket per batch: `burst` requests at once, then `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for RateLimit {
    /// A production line boots units by the hundred: 50 per second with a
    /// burst of 100 lets a whole tray through without letting a leaked claim
    /// key sign thousands of identities a minute.
    fn default() -> Self {
        RateLimit {
            per_second: 50.0,
            burst: 100,
        }
    }
}

/// The token buckets of every batch (plain state, no I/O).
#[derive(Debug)]
pub struct Buckets {
    limit: RateLimit,
    batches: HashMap<DeviceId, (f64, Instant)>,
}

impl Buckets {
    pub fn new(limit: RateLimit) -> Self {
        Buckets {
            limit,
            batches: HashMap::new(),
        }
    }

    /// Take one token of `batch` at `now`; `Err(wait)` when there is none
    /// (`wait`: until the next one).
    pub fn take(&mut self, batch: &DeviceId, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.limit.burst.max(1));
        let rate = self.limit.per_second.max(0.001);
        let (tokens, at) = self.batches.entry(batch.clone()).or_insert((burst, now));
        let refilled =
            (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            Err(Duration::from_secs_f64((1.0 - refilled) / rate))
        }
    }
}

/// Counters of the provisioning connection (tests, benchmark, logs).
#[derive(Debug, Default)]
pub struct ProvisionCounters {
    /// Times the broker granted the request subscription (readiness).
    pub subscribed: AtomicU64,
    pub requests: AtomicU64,
    pub issued: AtomicU64,
    /// Answered again with the chain issued before (same key).
    pub repeated: AtomicU64,
    pub refused: AtomicU64,
    pub deferred: AtomicU64,
}

/// One request as it arrived.
struct Incoming {
    batch: DeviceId,
    serial: UnitSerial,
    payload: Vec<u8>,
}

/// What the provisioner decided for one request (pure mapping of the
/// operation's outcome).
pub fn response_for(result: Result<crate::ops::Provisioned, OpsError>) -> Response {
    match result {
        Ok(p) => Response::Issued {
            device_id: p.device,
            chain_pem: p.chain_pem,
        },
        // The registry or the PKI files failing is not the unit's fault.
        Err(e @ OpsError::Registry(RegistryError::Backend { .. }))
        | Err(e @ OpsError::Io { .. }) => Response::Deferred {
            reason: format!("the fleet cannot provision now: {e}"),
            retry_after_s: 10,
        },
        Err(e) => Response::Refused {
            reason: e.to_string(),
        },
    }
}

/// Serve the provisioning listener until `stop` fires. The provisioner
/// thread owns its own registry connection and the PKI.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    instance: String,
    registry: crate::registry::RegistryUrl,
    retention: crate::registry::Retention,
    identity: ClientIdentity,
    keep_alive: Duration,
    config: ProvisionConfig,
    counters: Arc<ProvisionCounters>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), super::ServiceError> {
    let store = crate::registry::open_store(&registry, retention)?;
    let pki = Pki::open(&config.pki_dir)
        .map_err(|e| super::ServiceError::Internal(format!("provisioning: the fleet PKI: {e}")))?;
    let client_id = format!("service:{instance}:provision");
    let mut opts = mqtt::options(&client_id, &config.endpoint, &identity, keep_alive)?;
    opts.set_clean_start(true);
    let (client, mut eventloop) = mqtt::connect(opts, 1000);

    let (tx, rx) = std::sync::mpsc::channel::<Incoming>();
    let worker = Provisioner {
        holder: format!("service:{instance}"),
        pki,
        store,
        client: client.clone(),
        runtime: tokio::runtime::Handle::current(),
        buckets: Buckets::new(config.rate),
        board: config.board.clone(),
        validity_days: config.validity_days,
        counters: counters.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("fleet-provision".into())
        .spawn(move || worker.run(rx))
        .map_err(|e| super::ServiceError::Internal(format!("cannot start the provisioner: {e}")))?;

    let result = loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break Ok(()),
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(listener = %config.endpoint, "provisioning listener connected: answering claim requests");
                    if let Err(e) = client.subscribe(Leg::Request.filter_shared(), QoS::AtLeastOnce).await {
                        break Err(super::ServiceError::Internal(format!("provisioning subscribe: {e}")));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
                    if let Some(bad) = ack.return_codes.iter().find(|c| !matches!(c, R::Success(_))) {
                        break Err(super::ServiceError::Internal(format!(
                            "the broker refused the provisioning subscription ({bad:?}): is service:{instance} in the broker policy?"
                        )));
                    }
                    counters.subscribed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic);
                    // Only an exact-depth request topic of a claim identity.
                    let Some((batch, serial)) = provision::parse_request(&topic) else {
                        tracing::warn!(topic = %topic, "ignoring a message that is not a claim request");
                        continue;
                    };
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Incoming { batch, serial, payload: p.payload.to_vec() }).is_err() {
                        break Err(super::ServiceError::Internal("the provisioner thread stopped".into()));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "provisioning connection lost; reconnecting");
                    tokio::select! {
                        _ = stop.changed() => break Ok(()),
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    };
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    result
}

struct Provisioner {
    holder: String,
    pki: Pki,
    store: Box<dyn Store>,
    client: AsyncClient,
    runtime: tokio::runtime::Handle,
    buckets: Buckets,
    board: Board,
    validity_days: u32,
    counters: Arc<ProvisionCounters>,
}

impl Provisioner {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Incoming>) {
        while let Ok(req) = rx.recv() {
            let response = self.handle(&req);
            let counter = match &response {
                Response::Issued { .. } => &self.counters.issued,
                Response::Refused { .. } => &self.counters.refused,
                Response::Deferred { .. } => &self.counters.deferred,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            match &response {
                Response::Issued { device_id, .. } => {
                    tracing::info!(batch = %req.batch, serial = %req.serial, device = %device_id, "unit provisioned")
                }
                Response::Refused { reason } => {
                    tracing::warn!(batch = %req.batch, serial = %req.serial, "claim refused: {reason}")
                }
                Response::Deferred { reason, .. } => {
                    tracing::info!(batch = %req.batch, serial = %req.serial, "claim deferred: {reason}")
                }
            }
            let topic = Leg::Response.topic(&req.batch, &req.serial);
            let payload = serde_json::to_vec(&response).expect("a response serializes");
            if self
                .runtime
                .block_on(self.client.publish(topic, QoS::AtLeastOnce, false, payload))
                .is_err()
            {
                return;
            }
        }
    }

    fn handle(&mut self, req: &Incoming) -> Response {
        let request: Request = match serde_json::from_slice(&req.payload) {
            Ok(r) => r,
            Err(e) => {
                return Response::Refused {
                    reason: format!("unreadable request ({e})"),
                };
            }
        };
        if let Err(wait) = self.buckets.take(&req.batch, Instant::now()) {
            return Response::Deferred {
                reason: format!("batch {} is over its provisioning rate", req.batch),
                retry_after_s: wait.as_secs().max(1),
            };
        }
        let lease = format!("provision/{}", req.serial);
        match self.store.claim(&lease, &self.holder, LEASE_S) {
            Ok(true) => {}
            Ok(false) => {
                return Response::Deferred {
                    reason: "another fleet service instance is provisioning this unit".into(),
                    retry_after_s: 5,
                };
            }
            Err(e) => return response_for(Err(e.into())),
        }
        let claim = ClaimRequest {
            batch: req.batch.clone(),
            serial: req.serial.clone(),
            csr_pem: request.csr_pem,
            board: self.board.clone(),
            validity_days: self.validity_days,
        };
        let result = provision_device(&self.pki, self.store.as_mut(), &claim);
        // Done with the serial: let the lease lapse now rather than in
        // LEASE_S, so a repeat that another instance receives is answered.
        let _ = self.store.claim(&lease, &self.holder, 1);
        if let Ok(p) = &result
            && !p.issued_now
        {
            self.counters.repeated.fetch_add(1, Ordering::Relaxed);
        }
        response_for(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gets_its_burst_then_its_rate_and_batches_are_apart() {
        let mut b = Buckets::new(RateLimit {
            per_second: 2.0,
            burst: 3,
        });
        let a = DeviceId::new("line-a").unwrap();
        let other = DeviceId::new("line-b").unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(&a, t0).unwrap();
        }
        let wait = b.take(&a, t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(500) && wait > Duration::ZERO,
            "{wait:?}"
        );
        b.take(&other, t0).unwrap();
        b.take(&a, t0 + Duration::from_millis(500)).unwrap();
        assert!(b.take(&a, t0 + Duration::from_millis(500)).is_err());
        // Idle time refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            b.take(&a, later).unwrap();
        }
        assert!(b.take(&a, later).is_err());
    }

    #[test]
    fn refusals_are_final_and_backend_trouble_is_deferred() {
        let r = response_for(Err(OpsError::ClaimRefused("no".into())));
        assert!(matches!(r, Response::Refused { reason } if reason.contains("no")));
        let r = response_for(Err(OpsError::Registry(RegistryError::backend("down"))));
        assert!(matches!(r, Response::Deferred { .. }), "{r:?}");
    }
}
