use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
pub use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{Client, Event};

use crate::DEADLINE;
use crate::broker::Broker;
use crate::pki::Identity;

/// One message delivered to a [`TestClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub qos: QoS,
}

/// Connection options of a [`TestClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// MQTT client id to send (the broker replaces it by the CN anyway).
    pub client_id: Option<String>,
    pub clean_start: bool,
    pub keep_alive: Duration,
    /// (topic, payload, qos, retain)
    pub will: Option<(String, Vec<u8>, QoS, bool)>,
    /// Present no client certificate at all.
    pub no_client_cert: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            client_id: None,
            clean_start: true,
            keep_alive: Duration::from_secs(30),
            will: None,
            no_client_cert: false,
        }
    }
}

#[derive(Default)]
struct State {
    connacks: u32,
    connected: bool,
    received: Vec<Received>,
    pubacks: Vec<PubAckReason>,
    subacks: Vec<Vec<SubscribeReasonCode>>,
    errors: Vec<String>,
    broker_disconnects: u32,
    stopped: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// An MQTT 5 client over mutual TLS that records what happens (see crate docs).
/// It never reconnects on its own: once the connection is lost it stays lost.
pub struct TestClient {
    name: String,
    client: Client,
    shared: Shared,
    thread: Option<JoinHandle<()>>,
    /// Serialises publish/subscribe so each waits for its own acknowledgement.
    op: Mutex<()>,
}

/// A rustls client config trusting `ca` and presenting `identity` (or no
/// certificate at all): the workspace's one client setup.
pub fn tls_config(identity: &Identity, with_cert: bool) -> anyhow::Result<rustls::ClientConfig> {
    let files = edgebind_link::ClientIdentity {
        cert: identity.cert.clone(),
        key: identity.key.clone(),
        ca: identity.ca.clone(),
    };
    if with_cert {
        return Ok(edgebind_link::tls_from_files(&files)?);
    }
    let ca = edgebind_link::pem::certificates(&files.ca)?;
    Ok(edgebind_link::client_config(edgebind_link::ClientAuth {
        chain: None,
        key: None,
        ca: &ca,
        server_name: None,
    })?)
}

impl TestClient {
    /// Connect `identity` to `broker` and wait for a successful CONNACK.
    pub fn connect(identity: &Identity, broker: &Broker) -> anyhow::Result<TestClient> {
        Self::connect_with(identity, broker, ClientOptions::default())
    }

    /// Like [`TestClient::connect`] with options. The error text says why the
    /// connection failed (TLS alert, CONNACK code, ...).
    pub fn connect_with(
        identity: &Identity,
        broker: &Broker,
        opts: ClientOptions,
    ) -> anyhow::Result<TestClient> {
        Self::connect_addr(identity, broker.host(), broker.port(), opts)
    }

    /// Connect to a broker this harness did not start (e.g. `edgebind broker run`).
    pub fn connect_addr(
        identity: &Identity,
        host: &str,
        port: u16,
        opts: ClientOptions,
    ) -> anyhow::Result<TestClient> {
        let client_id = opts
            .client_id
            .clone()
            .unwrap_or_else(|| identity.name.clone());
        let tls = tls_config(identity, !opts.no_client_cert)?;
        let endpoint = edgebind_link::BrokerEndpoint {
            host: host.to_owned(),
            port,
        };
        let mut mqtt =
            edgebind_link::options(&client_id, &endpoint, Arc::new(tls), opts.keep_alive);
        mqtt.set_clean_start(opts.clean_start);
        if let Some((topic, payload, qos, retain)) = opts.will.clone() {
            mqtt.set_last_will(LastWill::new(topic, payload, qos, retain, None));
        }
        let (client, mut connection) = Client::new(mqtt, 64);
        let shared: Shared = Default::default();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mqtt-{}", identity.name))
            .spawn(move || {
                let (lock, cvar) = &*thread_shared;
                loop {
                    let event = connection.recv();
                    let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let stop = match event {
                        Err(_) => true, // client dropped
                        Ok(Err(e)) => {
                            st.errors.push(e.to_string());
                            st.connected = false;
                            true
                        }
                        Ok(Ok(Event::Incoming(packet))) => {
                            match packet {
                                Packet::ConnAck(_) => {
                                    st.connacks += 1;
                                    st.connected = true;
                                }
                                Packet::Publish(p) => st.received.push(Received {
                                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                    payload: p.payload.to_vec(),
                                    retain: p.retain,
                                    qos: p.qos,
                                }),
                                Packet::PubAck(ack) => st.pubacks.push(ack.reason),
                                Packet::SubAck(ack) => st.subacks.push(ack.return_codes),
                                Packet::Disconnect(d) => {
                                    st.broker_disconnects += 1;
                                    st.errors.push(format!(
                                        "broker sent DISCONNECT {:?}",
                                        d.reason_code
                                    ));
                                }
                                _ => {}
                            }
                            st.stopped
                        }
                        Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => {
                            st.connected = false;
                            true
                        }
                        Ok(Ok(Event::Outgoing(_))) => st.stopped,
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
        let me = TestClient {
            name: identity.name.clone(),
            client,
            shared,
            thread: Some(thread),
            op: Mutex::new(()),
        };
        let outcome = me.wait_state(DEADLINE, |st| {
            if st.connacks > 0 {
                Some(Ok(()))
            } else if st.stopped {
                Some(Err(st.errors.join("; ")))
            } else {
                None
            }
        });
        match outcome {
            Some(Ok(())) => Ok(me),
            Some(Err(why)) => bail!("{} could not connect: {why}", identity.name),
            None => bail!("{} got no CONNACK within {DEADLINE:?}", identity.name),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait (condition variable, deadline) until `f` returns Some.
    fn wait_state<T>(&self, timeout: Duration, f: impl FnMut(&State) -> Option<T>) -> Option<T> {
        crate::wait::wait_on(&self.shared, timeout, f)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Subscribe at QoS 1 and wait for the SUBACK (whose codes say little:
    /// Mosquitto grants filters the ACL forbids and filters at delivery).
    pub fn subscribe(&self, filter: &str) -> anyhow::Result<Vec<SubscribeReasonCode>> {
        let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.state().subacks.len();
        self.client.subscribe(filter, QoS::AtLeastOnce)?;
        self.wait_state(DEADLINE, |st| {
            if st.subacks.len() > before {
                Some(Ok(st.subacks[before].clone()))
            } else if st.stopped {
                Some(Err(anyhow!(
                    "{}: connection lost before SUBACK: {}",
                    self.name,
                    st.errors.join("; ")
                )))
            } else {
                None
            }
        })
        .unwrap_or_else(|| {
            Err(anyhow!(
                "{}: no SUBACK for {filter} within {DEADLINE:?}",
                self.name
            ))
        })
    }

    /// Publish; for QoS 1 wait for the PUBACK and return its reason code
    /// (`NotAuthorized` = 0x87 when the ACL forbids it); QoS 0 returns None.
    pub fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
    ) -> anyhow::Result<Option<PubAckReason>> {
        let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.state().pubacks.len();
        self.client.publish(topic, qos, retain, payload.to_vec())?;
        if qos != QoS::AtLeastOnce {
            return Ok(None);
        }
        self.wait_state(DEADLINE, |st| {
            if st.pubacks.len() > before {
                Some(Ok(Some(st.pubacks[before])))
            } else if st.stopped {
                Some(Err(anyhow!(
                    "{}: connection lost before PUBACK: {}",
                    self.name,
                    st.errors.join("; ")
                )))
            } else {
                None
            }
        })
        .unwrap_or_else(|| {
            Err(anyhow!(
                "{}: no PUBACK for {topic} within {DEADLINE:?}",
                self.name
            ))
        })
    }

    /// Everything delivered so far.
    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    /// Forget what was delivered so far.
    pub fn clear(&self) {
        self.state().received.clear();
    }

    /// Wait for a delivered message matching `pred`.
    pub fn wait_for_message(
        &self,
        timeout: Duration,
        pred: impl Fn(&Received) -> bool,
    ) -> Option<Received> {
        self.wait_state(timeout, |st| st.received.iter().find(|m| pred(m)).cloned())
    }

    /// Wait for a message on exactly `topic`.
    pub fn wait_for_topic(&self, topic: &str, timeout: Duration) -> Option<Received> {
        self.wait_for_message(timeout, |m| m.topic == topic)
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.state().connected
    }

    /// Number of CONNACKs seen: stays 1 as long as the first connection lives.
    pub fn connack_count(&self) -> u32 {
        self.state().connacks
    }

    /// Errors and broker DISCONNECTs seen, as text.
    pub fn errors(&self) -> Vec<String> {
        self.state().errors.clone()
    }

    /// Wait until the connection is lost (returns false if it stays up).
    pub fn wait_disconnected(&self, timeout: Duration) -> bool {
        self.wait_state(timeout, |st| (!st.connected && st.stopped).then_some(()))
            .is_some()
    }

    /// Send DISCONNECT and stop the event loop.
    pub fn disconnect(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.client.try_disconnect();
        if let Some(thread) = self.thread.take() {
            let done = self.wait_state(Duration::from_secs(5), |st| st.stopped.then_some(()));
            if done.is_some() {
                let _ = thread.join();
            }
            // else: leave the thread; it ends when the socket does.
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.shutdown();
    }
}
