//! The two pieces of the systemd service protocol the agent speaks, without
//! libsystemd: `sd_notify` datagrams to `$NOTIFY_SOCKET` (readiness, status
//! text, watchdog keep-alive, stopping) and the watchdog period from
//! `$WATCHDOG_USEC`.
//!
//! Readiness: the agent sends `READY=1` once its configuration and identity
//! are checked and the state directory is usable, *before* the first broker
//! connection. A device whose network or broker is down is still a correctly
//! running agent (it keeps retrying with backoff); making readiness wait for
//! the broker would turn every outage into a failed unit and restart loop.
//! The connection state is visible in `STATUS=`.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A handle on `$NOTIFY_SOCKET`, or a no-op when not run by systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// From the environment; `None` socket means "not under systemd".
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|p| connect(&p).ok());
        Notifier { target }
    }

    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send `state` (e.g. "READY=1\nSTATUS=connected"); errors are ignored
    /// on purpose: systemd going away must not take the agent down.
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            let _ = sock.send_to_addr(state.as_bytes(), addr);
        }
    }
}

fn connect(
    path: &std::ffi::OsStr,
) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        // Abstract namespace socket.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)?
    } else {
        std::os::unix::net::SocketAddr::from_pathname(path)?
    };
    Ok((UnixDatagram::unbound()?, addr))
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the
/// watchdog is enabled for this process (`$WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// True when stderr goes to the journal (systemd sets these for services).
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sends_datagrams_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(connect(path.as_os_str()).unwrap()),
        };
        n.notify("READY=1\nSTATUS=starting");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=starting");
        Notifier::disabled().notify("READY=1");
    }
}
