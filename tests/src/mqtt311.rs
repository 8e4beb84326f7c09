//! An MQTT 3.1.1 client over mutual TLS, for proving that the broker's
//! policy holds for old-protocol clients too. 3.1.1 has no PUBACK reason
//! codes (a denied QoS 1 publish is acknowledged like any other), so only
//! what is delivered tells; the client records every delivery.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail};
use rumqttc::{
    Client, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};

use crate::DEADLINE;
use crate::mqtt::{Received, tls_config};
use crate::pki::Identity;

#[derive(Default)]
struct State {
    connected: bool,
    stopped: bool,
    received: Vec<Received>,
    pubacks: usize,
    subacks: usize,
    errors: Vec<String>,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// MQTT 3.1.1 counterpart of [`crate::TestClient`]: connect, subscribe,
/// publish at QoS 1 (waiting for the PUBACK), record deliveries.
pub struct TestClient311 {
    name: String,
    client: Client,
    shared: Shared,
    thread: Option<JoinHandle<()>>,
}

impl TestClient311 {
    /// Connect and wait for a successful CONNACK; the error says why not.
    pub fn connect(identity: &Identity, host: &str, port: u16) -> anyhow::Result<TestClient311> {
        let mut mqtt = MqttOptions::new(identity.name.clone(), host, port);
        mqtt.set_keep_alive(Duration::from_secs(30));
        mqtt.set_max_packet_size(
            edgebind_protocol::messages::MAX_PACKET_BYTES,
            edgebind_protocol::messages::MAX_PACKET_BYTES,
        );
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(identity, true)?),
        )));
        let (client, mut connection) = Client::new(mqtt, 64);
        // The 3.1.1 API keeps socket options on the event loop.
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(10);
        connection.eventloop.set_network_options(net);
        let shared: Shared = Default::default();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mqtt311-{}", identity.name))
            .spawn(move || {
                let (lock, cvar) = &*thread_shared;
                loop {
                    let event = connection.recv();
                    let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let stop = match event {
                        Err(_) => true,
                        Ok(Err(e)) => {
                            st.errors.push(e.to_string());
                            true
                        }
                        Ok(Ok(Event::Incoming(packet))) => {
                            match packet {
                                Packet::ConnAck(_) => st.connected = true,
                                Packet::Publish(p) => st.received.push(Received {
                                    topic: p.topic.clone(),
                                    payload: p.payload.to_vec(),
                                    retain: p.retain,
                                    qos: match p.qos {
                                        QoS::AtMostOnce => crate::QoS::AtMostOnce,
                                        QoS::AtLeastOnce => crate::QoS::AtLeastOnce,
                                        QoS::ExactlyOnce => crate::QoS::ExactlyOnce,
                                    },
                                }),
                                Packet::PubAck(_) => st.pubacks += 1,
                                Packet::SubAck(_) => st.subacks += 1,
                                _ => {}
                            }
                            false
                        }
                        Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => true,
                        Ok(Ok(Event::Outgoing(_))) => false,
                    };
                    if stop {
                        st.connected = false;
                        st.stopped = true;
                    }
                    cvar.notify_all();
                    if stop {
                        break;
                    }
                }
            })?;
        let me = TestClient311 {
            name: identity.name.clone(),
            client,
            shared,
            thread: Some(thread),
        };
        match me.wait(DEADLINE, |st| {
            if st.connected {
                Some(Ok(()))
            } else if st.stopped {
                Some(Err(st.errors.join("; ")))
            } else {
                None
            }
        }) {
            Some(Ok(())) => Ok(me),
            Some(Err(why)) => bail!("{} could not connect (3.1.1): {why}", me.name),
            None => bail!("{} got no CONNACK within {DEADLINE:?}", me.name),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<T>(&self, timeout: Duration, f: impl FnMut(&State) -> Option<T>) -> Option<T> {
        crate::wait::wait_on(&self.shared, timeout, f)
    }

    /// Wait until the broker acknowledged `count` packets of a kind.
    fn wait_acks(
        &self,
        what: &str,
        count: impl Fn(&State) -> usize,
        want: usize,
    ) -> anyhow::Result<()> {
        self.wait(DEADLINE, |st| {
            if count(st) >= want {
                Some(Ok(()))
            } else if st.stopped {
                Some(Err(anyhow!(
                    "{}: connection lost before {what}: {}",
                    self.name,
                    st.errors.join("; ")
                )))
            } else {
                None
            }
        })
        .unwrap_or_else(|| Err(anyhow!("{}: no {what} within {DEADLINE:?}", self.name)))
    }

    /// Subscribe at QoS 1 and wait for the SUBACK.
    pub fn subscribe(&self, filter: &str) -> anyhow::Result<()> {
        let want = self.state().subacks + 1;
        self.client.subscribe(filter, QoS::AtLeastOnce)?;
        self.wait_acks("SUBACK", |st| st.subacks, want)
    }

    /// Publish at QoS 1 and wait for the PUBACK (sent for denied publishes too).
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> anyhow::Result<()> {
        let want = self.state().pubacks + 1;
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())?;
        self.wait_acks("PUBACK", |st| st.pubacks, want)
    }

    /// Everything delivered so far.
    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.state().connected
    }
}

impl Drop for TestClient311 {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        if let Some(thread) = self.thread.take()
            && self
                .wait(Duration::from_secs(5), |st| st.stopped.then_some(()))
                .is_some()
        {
            let _ = thread.join();
        }
    }
}
