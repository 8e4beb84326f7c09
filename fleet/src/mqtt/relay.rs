//! The fleet service's TLS leg to the broker, relayed so that its
//! acknowledgements travel in few TLS records.
//!
//! Why a relay: the service acknowledges every message after its commit,
//! thousands a second. rumqttc (0.25) writes and flushes each request on its
//! own, so every PUBACK becomes one TLS record of some 30 bytes. Mosquitto
//! (2.0.11) reads a TLS client one record per pass of its event loop (it
//! loops only while OpenSSL holds decrypted bytes, and OpenSSL reads one
//! record at a time). Under a flood from many devices the broker took the
//! service's acknowledgements far slower than it delivered messages: they
//! waited in the socket (`ss` showed it 1.37 MB deep, window-limited, in
//! `bench_ingest --push-back`), every message they acknowledged still
//! counted against the service's queue limit, the broker dropped, and the
//! service's throttle publication sat behind them and reached no device.
//!
//! rumqttc takes no custom stream, but it speaks MQTT over a Unix socket.
//! So the service's client connects to a private socket of this process
//! (in a fresh 0700 directory; a peer that is not this process is turned
//! away), and each connection there is relayed to the broker over TCP and
//! rustls with the service's identity. The broker sees the same mTLS
//! client; certificate checks are unchanged (the same rustls configuration,
//! the broker name verified against the dialled host).
//!
//! Copying what is in the socket is not enough to coalesce: as long as the
//! broker's receive buffer has room, every read finds one acknowledgement
//! and every write makes one record, so megabytes of tiny records pile up
//! in the kernel before any backpressure reaches the relay. The upstream
//! pump therefore writes at most once per [`GATHER`] while busy: the first
//! bytes after a quiet spell go at once, and what arrives within the gap
//! after a write waits for it and leaves as one write (records of up to
//! 16 KiB, some 4,000 acknowledgements). The broker then takes a whole
//! batch per wakeup; the delay is far inside the service's receive window.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgebind_link::BrokerEndpoint;
use rumqttc::v5::MqttOptions;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::time::Instant;

/// Bytes read from one side before they are written to the other.
const CHUNK: usize = 64 * 1024;

/// Shortest time between two writes upstream while the service is busy.
/// 5 ms is at most 200 records a second, so even a broker that reads one
/// record per pass of its event loop keeps up with any acknowledgement
/// rate; a PUBACK waiting 5 ms holds one of 2,000 receive-maximum slots
/// for 5 ms.
pub const GATHER: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot create the relay socket in {dir}: {source}")]
    Socket {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the broker host {0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// A running relay; stops and removes its socket when dropped.
pub struct Relay {
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listen on a private socket and relay each connection to `endpoint`.
    /// Must run inside a tokio runtime.
    pub fn start(
        endpoint: &BrokerEndpoint,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Relay, RelayError> {
        let name = ServerName::try_from(endpoint.host.clone())
            .map_err(|_| RelayError::ServerName(endpoint.host.clone()))?;
        let dir = tempfile::Builder::new()
            .prefix("edgebind-relay-")
            .tempdir()
            .map_err(|source| RelayError::Socket {
                dir: std::env::temp_dir(),
                source,
            })?;
        let path = dir.path().join("broker.sock");
        let listener = UnixListener::bind(&path).map_err(|source| RelayError::Socket {
            dir: dir.path().to_owned(),
            source,
        })?;
        let task = tokio::spawn(accept(listener, endpoint.clone(), name, tls));
        Ok(Relay { dir, task })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("broker.sock")
    }

    /// MQTT options that reach the broker through this relay
    /// ([`edgebind_link::base_options`] over the relay's socket).
    pub fn options(&self, client_id: &str, keep_alive: Duration) -> MqttOptions {
        let socket = self.socket();
        let mut o =
            edgebind_link::base_options(client_id, &socket.to_string_lossy(), 0, keep_alive);
        o.set_transport(rumqttc::Transport::Unix);
        let mut net = rumqttc::NetworkOptions::new();
        // The relay's TCP and TLS connect happen inside the MQTT connect.
        net.set_connection_timeout(2 * edgebind_link::CONNECT_TIMEOUT_S);
        o.set_network_options(net);
        o
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: UnixListener,
    endpoint: BrokerEndpoint,
    name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
) {
    let connector = tokio_rustls::TlsConnector::from(tls);
    loop {
        let local = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "relay socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !from_this_process(&local) {
            tracing::warn!("relay socket: a connection from another process was turned away");
            continue;
        }
        let connector = connector.clone();
        let endpoint = endpoint.clone();
        let name = name.clone();
        tokio::spawn(async move {
            if let Err(e) = relay_one(local, &endpoint, name, connector).await {
                tracing::warn!(broker = %endpoint, error = %e, "broker connection (TLS leg) ended");
            }
        });
    }
}

fn from_this_process(stream: &UnixStream) -> bool {
    stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .is_some_and(|pid| u32::try_from(pid).ok() == Some(std::process::id()))
}

async fn relay_one(
    local: UnixStream,
    endpoint: &BrokerEndpoint,
    name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
) -> std::io::Result<()> {
    let timeout = Duration::from_secs(edgebind_link::CONNECT_TIMEOUT_S);
    let tcp = tokio::time::timeout(
        timeout,
        TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect timed out"))??;
    tcp.set_nodelay(true)?;
    let remote = tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
        })??;
    let (local_read, mut local_write) = local.into_split();
    let (mut remote_read, remote_write) = tokio::io::split(remote);
    let down = async {
        tokio::io::copy_buf(
            &mut tokio::io::BufReader::with_capacity(CHUNK, &mut remote_read),
            &mut local_write,
        )
        .await?;
        local_write.shutdown().await
    };
    tokio::try_join!(pump_gathered(local_read, remote_write, GATHER), down)?;
    Ok(())
}

/// Copy `from` to `to`, writing at most once per `gap` while data keeps
/// coming (see the module doc). Ends, shutting `to` down, when `from` does.
async fn pump_gathered<R, W>(mut from: R, mut to: W, gap: Duration) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    let mut last_write: Option<Instant> = None;
    loop {
        let mut len = from.read(&mut buf).await?;
        if len == 0 {
            break;
        }
        let mut ended = false;
        if let Some(due) = last_write.map(|t| t + gap) {
            while len < buf.len() {
                match tokio::time::timeout_at(due, from.read(&mut buf[len..])).await {
                    Err(_) => break,
                    Ok(Ok(0)) => {
                        ended = true;
                        break;
                    }
                    Ok(Ok(n)) => len += n,
                    Ok(Err(e)) => return Err(e),
                }
            }
        }
        to.write_all(&buf[..len]).await?;
        to.flush().await?;
        last_write = Some(Instant::now());
        if ended {
            break;
        }
    }
    to.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Counts the write calls it is given (each one a TLS record upstream).
    struct Writes {
        calls: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn puback(mid: u16) -> [u8; 4] {
        let [hi, lo] = mid.to_be_bytes();
        [0x40, 0x02, hi, lo]
    }

    #[tokio::test]
    async fn a_burst_of_acknowledgements_leaves_in_few_writes_and_in_order() {
        let (mut client, relay_side) = tokio::io::duplex(1 << 20);
        let mut out = Writes {
            calls: 0,
            bytes: Vec::new(),
        };
        let sender = async {
            // As rumqttc does: one flushed write per acknowledgement.
            for mid in 1..=3000u16 {
                client.write_all(&puback(mid)).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            drop(client);
        };
        let (_, pumped) = tokio::join!(
            sender,
            pump_gathered(relay_side, &mut out, Duration::from_millis(50))
        );
        pumped.unwrap();
        let expected: Vec<u8> = (1..=3000u16).flat_map(puback).collect();
        assert_eq!(out.bytes, expected, "every byte, in order");
        assert!(
            out.calls < 10,
            "3,000 acknowledgements became {} writes",
            out.calls
        );
    }

    #[tokio::test]
    async fn a_lone_packet_is_not_held_back_for_more() {
        let (mut client, relay_side) = tokio::io::duplex(1024);
        let (upstream, mut broker) = tokio::io::duplex(1024);
        let pump = tokio::spawn(pump_gathered(
            relay_side,
            upstream,
            Duration::from_secs(3600),
        ));
        client.write_all(&puback(7)).await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(60), broker.read_exact(&mut got))
            .await
            .expect("the first packet after a quiet spell goes at once")
            .unwrap();
        assert_eq!(got, puback(7));
        drop(client);
        pump.await.unwrap().unwrap();
    }
}
