//! The state writer: one thread that owns the journal, the outbox file and
//! the settings file, so that no `write`/`fsync` runs on the async thread (a
//! slow SD card must not stall the MQTT keep-alive).
//!
//! Jobs run in the order they were sent, which keeps the core's order of
//! effects on disk. A journal append reports back when it is done (after
//! `fdatasync` for a durable one), so that the runtime acknowledges a command
//! to the broker only once its id is recorded.
//!
//! fsync policy:
//! - journal: `fdatasync` per durable record (side-effecting commands) before
//!   the runtime goes on; other records are written without one.
//! - outbox: frames are written at once (a crash or `kill -9` of the agent
//!   keeps them: they are in the page cache) and `fdatasync`ed at most once
//!   per [`OUTBOX_SYNC_EVERY`] while there are unsynced frames, so a power cut
//!   loses at most that much telemetry; results are also in the journal.
//! - settings and compactions: temp file, fsync, rename, fsync of the
//!   directory.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{error, warn};

use crate::journal::{JournalEntry, JournalFile, write_atomically};
use crate::outbox::OutboxFile;

/// Longest time outbox frames stay unsynced.
pub const OUTBOX_SYNC_EVERY: Duration = Duration::from_secs(1);
/// The thread does little but syscalls and small JSON encodes.
const STACK_BYTES: usize = 256 * 1024;

enum Job {
    Journal {
        entry: JournalEntry,
        durable: bool,
        done: Option<oneshot::Sender<std::io::Result<()>>>,
    },
    CompactJournal(Vec<JournalEntry>),
    Outbox(Vec<u8>),
    RewriteOutbox(Vec<u8>),
    Settings {
        path: std::path::PathBuf,
        bytes: Vec<u8>,
    },
    Barrier(oneshot::Sender<()>),
}

/// Handle on the writer thread. Dropping it lets the thread finish the
/// queued jobs, sync the outbox and end.
pub struct StateWriter {
    tx: mpsc::Sender<Job>,
    thread: Option<thread::JoinHandle<()>>,
}

impl StateWriter {
    pub fn spawn(journal: JournalFile, outbox: OutboxFile) -> std::io::Result<StateWriter> {
        let (tx, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("state-writer".into())
            .stack_size(STACK_BYTES)
            .spawn(move || run(rx, journal, outbox))?;
        Ok(StateWriter {
            tx,
            thread: Some(thread),
        })
    }

    /// Append a journal record; resolves once it is written (and synced when
    /// `durable`).
    pub async fn journal(&self, entry: JournalEntry, durable: bool) -> std::io::Result<()> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Journal {
            entry,
            durable,
            done: Some(done),
        });
        rx.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the state writer has stopped")))
    }

    /// Append a journal record without an fsync and without waiting: for
    /// records whose loss costs at most a harmless repeat. [`barrier`]
    /// waits for it where order matters (before acknowledging a command).
    ///
    /// [`barrier`]: StateWriter::barrier
    pub fn note(&self, entry: JournalEntry) {
        self.send(Job::Journal {
            entry,
            durable: false,
            done: None,
        });
    }

    pub fn compact_journal(&self, entries: Vec<JournalEntry>) {
        self.send(Job::CompactJournal(entries));
    }

    pub fn outbox(&self, frames: Vec<u8>) {
        self.send(Job::Outbox(frames));
    }

    pub fn rewrite_outbox(&self, bytes: Vec<u8>) {
        self.send(Job::RewriteOutbox(bytes));
    }

    pub fn settings(&self, path: std::path::PathBuf, bytes: Vec<u8>) {
        self.send(Job::Settings { path, bytes });
    }

    /// Resolves once every job sent before it has been carried out.
    pub async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Barrier(tx));
        let _ = rx.await;
    }

    fn send(&self, job: Job) {
        if self.tx.send(job).is_err() {
            error!("the state writer thread has stopped; state is not being saved");
        }
    }

    /// Finish the queued jobs and sync (blocking: for the end of `run`).
    pub fn finish(mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(rx: mpsc::Receiver<Job>, mut journal: JournalFile, mut outbox: OutboxFile) {
    let mut unsynced_since: Option<Instant> = None;
    loop {
        let timeout = unsynced_since
            .map(|t| OUTBOX_SYNC_EVERY.saturating_sub(t.elapsed()))
            .unwrap_or(Duration::from_secs(3600));
        let job = match rx.recv_timeout(timeout) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match job {
            Some(Job::Journal {
                entry,
                durable,
                done,
            }) => {
                let r = if durable {
                    journal.append(&entry)
                } else {
                    journal.append_unsynced(&entry)
                };
                match done {
                    Some(done) => {
                        let _ = done.send(r);
                    }
                    None => {
                        if let Err(e) = r {
                            warn!(file = %journal.path().display(), id = %entry.id, error = %e, "cannot journal a command outcome; a redelivery would be answered again");
                        }
                    }
                }
            }
            Some(Job::CompactJournal(entries)) => {
                if let Err(e) = journal.rewrite(&entries) {
                    warn!(file = %journal.path().display(), error = %e, "journal compaction failed; appending to the old file");
                }
            }
            Some(Job::Outbox(frames)) => match outbox.append(&frames) {
                Ok(()) => {
                    unsynced_since.get_or_insert_with(Instant::now);
                }
                Err(e) => {
                    warn!(file = %outbox.path().display(), error = %e, "cannot write the outbox; queued records are kept in memory only")
                }
            },
            Some(Job::RewriteOutbox(bytes)) => {
                if let Err(e) = outbox.rewrite(&bytes) {
                    warn!(file = %outbox.path().display(), error = %e, "outbox compaction failed; appending to the old file");
                } else {
                    unsynced_since = None;
                }
            }
            Some(Job::Settings { path, bytes }) => {
                if let Err(e) = write_atomically(&path, &bytes) {
                    warn!(file = %path.display(), error = %e, "cannot save applied settings; they hold until restart");
                }
            }
            Some(Job::Barrier(tx)) => {
                let _ = tx.send(());
            }
            None => {}
        }
        if unsynced_since.is_some_and(|t| t.elapsed() >= OUTBOX_SYNC_EVERY) {
            sync_outbox(&mut outbox);
            unsynced_since = None;
        }
    }
    if unsynced_since.is_some() {
        sync_outbox(&mut outbox);
    }
}

fn sync_outbox(outbox: &mut OutboxFile) {
    if let Err(e) = outbox.sync() {
        warn!(file = %outbox.path().display(), error = %e, "cannot sync the outbox");
    }
}
