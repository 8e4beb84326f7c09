//! Obeying the fleet's reconnect hint (`edgebind_protocol::reconnect`): the
//! window the backoff spreads retries over ([`crate::backoff`]).
//!
//! The hint is remembered in the state directory, so a device that reboots
//! while the broker is away still spreads its retries: the retained message
//! only reaches it once it is connected again. A hint that is invalid is
//! ignored (the one in force stays); an empty one withdraws it.
//!
//! No I/O here: the runtime reads the file at start and writes what
//! [`Window::on_message`] asks it to.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgebind_protocol::reconnect::{HintError, ReconnectHint};

/// The file in the state directory that holds the last hint.
pub const HINT_FILE: &str = "reconnect.json";
/// Largest hint file read at start (it is a few dozen bytes).
const MAX_HINT_READ: u64 = 64 * 1024;

/// The window in force, shared with the network task (which reads it on
/// every lost connection); 0 ms means none.
#[derive(Debug, Clone, Default)]
pub struct Window(Arc<AtomicU64>);

/// What a hint message changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new window: persist these bytes as [`HINT_FILE`].
    Set {
        window_s: u32,
        persist: Vec<u8>,
    },
    /// Withdrawn: persist the empty file.
    Withdrawn,
    Unchanged,
}

impl Window {
    /// The window remembered in `state_dir`, or none. An unreadable or
    /// invalid file is reported and ignored: the configured backoff applies
    /// until the fleet sends the hint again.
    pub fn load(state_dir: &Path) -> (Window, Option<String>) {
        let w = Window::default();
        let path = state_dir.join(HINT_FILE);
        let bytes = match std::fs::File::open(&path) {
            Ok(f) => {
                use std::io::Read;
                let mut bytes = Vec::new();
                if let Err(e) = f.take(MAX_HINT_READ).read_to_end(&mut bytes) {
                    return (w, Some(e.to_string()));
                }
                bytes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (w, None),
            Err(e) => return (w, Some(e.to_string())),
        };
        match ReconnectHint::decode(&bytes) {
            Ok(hint) => {
                w.set(hint.map(|h| h.window_s));
                (w, None)
            }
            Err(e) => (w, Some(e.to_string())),
        }
    }

    pub fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    fn set(&self, window_s: Option<u32>) {
        let ms = window_s.map_or(0, |s| u64::from(s) * 1000);
        self.0.store(ms, Ordering::Relaxed);
    }

    /// A message on the hint topic.
    pub fn on_message(&self, payload: &[u8]) -> Result<Change, HintError> {
        let hint = ReconnectHint::decode(payload)?;
        let was = self.get();
        let now = hint.as_ref().map(|h| h.window_s);
        if was == now.map(|s| Duration::from_secs(u64::from(s))) {
            return Ok(Change::Unchanged);
        }
        self.set(now);
        Ok(match hint {
            Some(h) => Change::Set {
                window_s: h.window_s,
                persist: h.encode(),
            },
            None => Change::Withdrawn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_sets_the_window_once_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (w, err) = Window::load(dir.path());
        assert_eq!((w.get(), err), (None, None), "nothing remembered yet");
        let hint = ReconnectHint::new(45, "service:fleet").encode();
        let Ok(Change::Set { window_s, persist }) = w.on_message(&hint) else {
            panic!("the first hint changes the window");
        };
        assert_eq!(window_s, 45);
        assert_eq!(w.get(), Some(Duration::from_secs(45)));
        // The retained message again on every connect: nothing to write.
        assert_eq!(w.on_message(&hint), Ok(Change::Unchanged));
        std::fs::write(dir.path().join(HINT_FILE), persist).unwrap();
        let (after_reboot, err) = Window::load(dir.path());
        assert_eq!(err, None);
        assert_eq!(after_reboot.get(), Some(Duration::from_secs(45)));
        // Withdrawn: the empty file is remembered as "none".
        assert_eq!(after_reboot.on_message(b""), Ok(Change::Withdrawn));
        assert_eq!(after_reboot.get(), None);
        std::fs::write(dir.path().join(HINT_FILE), b"").unwrap();
        assert_eq!(Window::load(dir.path()).0.get(), None);
    }

    #[test]
    fn a_bad_hint_or_file_is_refused_and_the_window_in_force_stays() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::default();
        w.on_message(&ReconnectHint::new(30, "x").encode()).unwrap();
        for bad in [&b"junk"[..], br#"{"window_s":0}"#, br#"{"window_s":99999}"#] {
            assert!(w.on_message(bad).is_err());
            assert_eq!(w.get(), Some(Duration::from_secs(30)));
        }
        std::fs::write(dir.path().join(HINT_FILE), b"\xff\x00 not json").unwrap();
        let (loaded, err) = Window::load(dir.path());
        assert_eq!(loaded.get(), None);
        assert!(err.unwrap().contains("invalid JSON"));
    }
}
