//! The broker's raw mutual-TLS accept capacity: how many complete
//! connections (TCP, TLS handshake with client certificate, MQTT CONNECT →
//! CONNACK, DISCONNECT) it takes per second when nothing else is going on.
//! A reconnect storm is judged against this figure, measured in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edgebind_fleet::mqtt::BrokerEndpoint;
use edgebind_link::ClientIdentity;
use edgebind_protocol::bundle::{CA_CERT, DEVICE_CERT, DEVICE_KEY};
use rumqttc::v5::Event;
use rumqttc::v5::mqttbytes::v5::Packet;
use serde::Serialize;

use crate::SimError;
use crate::identities::Identities;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct AcceptCapacity {
    pub connections: u64,
    pub failures: u64,
    pub seconds: f64,
    /// Completed connections per second.
    pub per_s: f64,
    /// Connections in flight at once.
    pub concurrency: usize,
}

impl AcceptCapacity {
    /// Time the broker needs to accept `n` connections at this rate.
    pub fn time_for(&self, n: u64) -> Duration {
        Duration::from_secs_f64(n as f64 / self.per_s.max(1e-9))
    }
}

/// Connect as each identity once (`identities.ids`, cycling if `count` is
/// larger), `concurrency` at a time, on `threads` worker threads; each
/// connection is closed as soon as the CONNACK arrives. Run it before the
/// simulated devices start: a probe as device X while X is connected would
/// take over X's session.
pub fn measure(
    identities: &Identities,
    endpoint: &BrokerEndpoint,
    count: usize,
    concurrency: usize,
    threads: usize,
) -> Result<AcceptCapacity, SimError> {
    let mut options = Vec::with_capacity(identities.ids.len().min(count));
    for id in identities.ids.iter().take(count) {
        let dir = identities.bundle(id);
        let files = ClientIdentity {
            cert: dir.join(DEVICE_CERT),
            key: dir.join(DEVICE_KEY),
            ca: dir.join(CA_CERT),
        };
        let mut o =
            edgebind_fleet::mqtt::options(id.as_str(), endpoint, &files, Duration::from_secs(30))
                .map_err(|e| SimError::Registration(format!("{id}: {e}")))?;
        o.set_clean_start(true);
        options.push(o);
    }
    if options.is_empty() {
        return Err(SimError::Usage("no identity to measure with".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| SimError::Runtime(e.to_string()))?;
    let options = Arc::new(options);
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let mut workers = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (options, next, ok, failed) =
                (options.clone(), next.clone(), ok.clone(), failed.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let o = options[i % options.len()].clone();
                    if connect_once(o).await {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let connections = ok.load(Ordering::Relaxed);
    Ok(AcceptCapacity {
        connections,
        failures: failed.load(Ordering::Relaxed),
        seconds,
        per_s: connections as f64 / seconds.max(1e-9),
        concurrency,
    })
}

/// One connection up to its CONNACK, then a clean DISCONNECT.
async fn connect_once(o: rumqttc::v5::MqttOptions) -> bool {
    let (client, mut eventloop) = edgebind_fleet::mqtt::connect(o, 4);
    let acked = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    if acked {
        // Until the DISCONNECT is written: polling on would reconnect.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    acked
}
