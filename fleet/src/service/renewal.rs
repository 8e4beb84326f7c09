//! The renewal thread: answers devices' renewal requests
//! ([`edgebind_protocol::renewal`]) with [`crate::ops::renew`], and retires
//! previous certificates whose grace period is over.
//!
//! Requests arrive on the shared subscription like every device message
//! (one instance gets each), and are acknowledged only once answered: a
//! request taken by an instance that dies before answering is delivered
//! again, and the same key asking again gets the same certificate, so a
//! redelivery signs nothing twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use edgebind_certs::Pki;
use edgebind_protocol::messages::now_unix;
use edgebind_protocol::renewal::{self, Leg, Request, Response};
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Publish;
use tokio::sync::mpsc;

use super::Counters;
use crate::ops::FleetHome;
use crate::ops::renew::{RenewalPolicy, confirm_renewal, retire_due, sign_renewal};
use crate::registry::Store;

/// How often previous certificates are checked for the end of their grace.
const RETIRE_EVERY: Duration = Duration::from_secs(5);

/// What the service needs to answer renewals: the fleet home (its PKI
/// signs, its broker policy is refreshed after a retirement) and the policy.
#[derive(Debug, Clone)]
pub struct RenewalService {
    pub home: FleetHome,
    pub policy: RenewalPolicy,
}

/// Counters of the renewal thread (tests and the benchmark read them).
#[derive(Debug, Default)]
pub struct RenewalCounters {
    pub signed: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    pub confirmed: std::sync::atomic::AtomicU64,
    pub retired: std::sync::atomic::AtomicU64,
}

pub(super) struct Renewer {
    pub service: RenewalService,
    pub pki: Pki,
    pub store: Box<dyn Store>,
    pub client: AsyncClient,
    pub runtime: tokio::runtime::Handle,
    pub acks: mpsc::UnboundedSender<Vec<Publish>>,
    pub counters: Arc<Counters>,
    pub stopping: Arc<AtomicBool>,
    pub holder: String,
}

impl Renewer {
    pub fn run(mut self, requests: Receiver<Publish>) {
        let mut retire_at = std::time::Instant::now();
        loop {
            match requests.recv_timeout(Duration::from_millis(500)) {
                Ok(p) => {
                    self.handle(&p);
                    let _ = self.acks.send(vec![p]);
                    self.counters.committed.fetch_add(1, Ordering::Relaxed);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            if retire_at.elapsed() >= RETIRE_EVERY {
                retire_at = std::time::Instant::now();
                self.retire();
            }
        }
    }

    fn handle(&mut self, p: &Publish) {
        let topic = String::from_utf8_lossy(&p.topic);
        let Some(device) = renewal::parse_request(&topic) else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let request: Request = match serde_json::from_slice(&p.payload) {
            Ok(r) => r,
            Err(e) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%device, error = %e, "dropping an unreadable renewal request");
                self.answer(
                    &device,
                    &Response::Refused {
                        reason: format!("unreadable renewal request: {e}"),
                        retry_after_s: None,
                    },
                );
                return;
            }
        };
        if matches!(request, Request::Renew { .. }) {
            // A rollover may have happened since the last retire tick: from
            // the rollover on, nothing is signed by the old CA.
            self.follow_rollover();
        }
        let rc = &self.counters.renewal;
        match request {
            Request::Renew {
                csr_pem,
                current_serial,
            } => {
                let answer = sign_renewal(
                    &self.pki,
                    self.store.as_mut(),
                    &device,
                    &csr_pem,
                    &current_serial,
                    &self.service.policy,
                    &self.holder,
                )
                .unwrap_or_else(|e| {
                    tracing::error!(%device, error = %e, "renewal failed");
                    Response::Refused {
                        reason: format!("the fleet could not sign now: {e}"),
                        retry_after_s: Some(60),
                    }
                });
                match &answer {
                    Response::Issued { serial, .. } => {
                        rc.signed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%device, %serial, "renewal signed");
                    }
                    Response::Refused { reason, .. } => {
                        rc.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%device, %reason, "renewal refused");
                    }
                }
                self.answer(&device, &answer);
            }
            Request::Connected { serial } => {
                match confirm_renewal(self.store.as_mut(), &device, &serial) {
                    Ok(changed) if !changed.is_empty() => {
                        rc.confirmed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%device, %serial, "device connected with its renewed certificate");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(%device, %serial, error = %e, "renewal not confirmed"),
                }
            }
        }
    }

    fn answer(&self, device: &edgebind_protocol::DeviceId, response: &Response) {
        let payload = serde_json::to_vec(response).expect("a response serializes");
        let published = self.runtime.block_on(self.client.publish(
            Leg::Response.topic(device),
            QoS::AtLeastOnce,
            false,
            payload,
        ));
        if let Err(e) = published {
            tracing::warn!(%device, error = %e, "renewal response not sent");
        }
    }

    /// A rollover by the CLI replaced the issuing CA: sign with the new one.
    fn follow_rollover(&mut self) {
        let path = self
            .service
            .home
            .pki_dir()
            .join(edgebind_certs::layout::ISSUING_CERT);
        let Ok(pem) = std::fs::read_to_string(&path) else {
            return;
        };
        if pem == self.pki.issuing_pem() {
            return;
        }
        match self.service.home.open_pki() {
            Ok(pki) => {
                tracing::info!(
                    issuer = pki.issuer_id(),
                    "the issuing CA was rolled over; renewals are signed by the new one"
                );
                self.pki = pki;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the rolled-over PKI; still signing with the previous issuing CA")
            }
        }
    }

    fn retire(&mut self) {
        self.follow_rollover();
        if !self.pki.previous_issuers().is_empty() {
            match crate::ops::rollover::retire_unused(&self.service.home) {
                Ok(r) if !r.retired.is_empty() => {
                    tracing::info!(retired = ?r.retired, "previous issuing CA retired: no usable certificate depends on it");
                    if let Ok(pki) = self.service.home.open_pki() {
                        self.pki = pki;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "checking previous issuing CAs failed"),
            }
        }
        match retire_due(
            &self.service.home,
            &self.pki,
            self.store.as_mut(),
            self.service.policy.grace_s,
            now_unix(),
            &self.holder,
        ) {
            Ok(r) if !r.serials.is_empty() => {
                self.counters
                    .renewal
                    .retired
                    .fetch_add(r.serials.len() as u64, Ordering::Relaxed);
                tracing::info!(serials = ?r.serials, "previous certificates retired (revoked) after their grace period");
                if let Some(Err(e)) = r.policy {
                    tracing::warn!(error = %e, "broker policy not refreshed after retiring certificates; run `edgebind broker reload`");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retiring previous certificates failed"),
        }
    }
}
