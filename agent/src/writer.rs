//! The state writer: one thread that owns the journal, the outbox file and
//! the settings file, so that no `write`/`fsync` runs on the async thread (a
//! slow SD card must not stall the MQTT keep-alive).
//!
//! Jobs run in the order they were sent, which keeps the core's order of
//! effects on disk. They are handed over in batches (one per turn of the main
//! loop, or when the runtime must wait for one): each hand-over wakes the
//! thread, and on a small, busy device every wake-up costs the broker
//! connection CPU time. A journal append reports back when it is done (after
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
/// Longest time bookkeeping jobs wait to be handed over (see
/// [`StateWriter::outbox_lazy`]).
pub const LAZY_FLUSH: Duration = Duration::from_millis(200);
/// ... or this many of them.
const LAZY_MAX_JOBS: usize = 256;
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

/// Jobs handed over at once.
type Batch = Vec<Job>;

/// Handle on the writer thread. Dropping it lets the thread finish the
/// queued jobs, sync the outbox and end.
pub struct StateWriter {
    tx: mpsc::Sender<Batch>,
    /// Jobs not yet handed over (see [`StateWriter::flush`]).
    pending: Batch,
    /// Some pending job should reach the disk now (a new outbox record, a
    /// settings file); otherwise they may wait for [`LAZY_FLUSH`].
    urgent: bool,
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
            pending: Vec::new(),
            urgent: false,
            thread: Some(thread),
        })
    }

    /// Append a journal record; resolves once it is written (and synced when
    /// `durable`).
    pub async fn journal(&mut self, entry: JournalEntry, durable: bool) -> std::io::Result<()> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Journal {
            entry,
            durable,
            done: Some(done),
        });
        self.flush_all();
        rx.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the state writer has stopped")))
    }

    /// Append a journal record without an fsync and without waiting: for
    /// records whose loss costs at most a harmless repeat. [`barrier`]
    /// waits for it where order matters (before acknowledging a command).
    ///
    /// [`barrier`]: StateWriter::barrier
    pub fn note(&mut self, entry: JournalEntry) {
        self.send(Job::Journal {
            entry,
            durable: false,
            done: None,
        });
    }

    pub fn compact_journal(&mut self, entries: Vec<JournalEntry>) {
        self.send(Job::CompactJournal(entries));
    }

    /// New outbox records: written at the next [`StateWriter::flush`].
    pub fn outbox(&mut self, frames: Vec<u8>) {
        self.urgent = true;
        self.send(Job::Outbox(frames));
    }

    /// Bookkeeping frames ("record gone"): losing them to a crash only means
    /// sending those records once more, so they wait for company or for
    /// [`LAZY_FLUSH`] instead of waking the thread per PUBACK.
    pub fn outbox_lazy(&mut self, frames: Vec<u8>) {
        self.send(Job::Outbox(frames));
    }

    pub fn rewrite_outbox(&mut self, bytes: Vec<u8>) {
        self.send(Job::RewriteOutbox(bytes));
    }

    pub fn settings(&mut self, path: std::path::PathBuf, bytes: Vec<u8>) {
        self.urgent = true;
        self.send(Job::Settings { path, bytes });
    }

    /// Jobs are waiting to be handed over.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A future that resolves once every job sent before this call has been
    /// carried out (it holds no borrow: await it elsewhere).
    pub fn barrier(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Barrier(tx));
        self.flush_all();
        async move {
            let _ = rx.await;
        }
    }

    fn send(&mut self, job: Job) {
        self.pending.push(job);
    }

    /// Hand the jobs collected so far to the thread if one of them is
    /// urgent (or many are waiting).
    pub fn flush(&mut self) {
        if self.urgent || self.pending.len() >= LAZY_MAX_JOBS {
            self.flush_all();
        }
    }

    /// Hand every job collected so far to the thread.
    pub fn flush_all(&mut self) {
        self.urgent = false;
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        if self.tx.send(batch).is_err() {
            error!("the state writer thread has stopped; state is not being saved");
        }
    }

    /// Finish the queued jobs and sync (blocking: for the end of `run`).
    pub fn finish(mut self) {
        self.flush_all();
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(rx: mpsc::Receiver<Batch>, mut journal: JournalFile, mut outbox: OutboxFile) {
    let mut unsynced_since: Option<Instant> = None;
    loop {
        let timeout = unsynced_since
            .map(|t| OUTBOX_SYNC_EVERY.saturating_sub(t.elapsed()))
            .unwrap_or(Duration::from_secs(3600));
        let batch = match rx.recv_timeout(timeout) {
            Ok(batch) => batch,
            Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // Consecutive outbox frames go out in one write.
        let mut frames: Vec<u8> = Vec::new();
        for job in batch {
            match job {
                Job::Outbox(f) => frames.extend_from_slice(&f),
                other => {
                    if !frames.is_empty() {
                        let f = std::mem::take(&mut frames);
                        do_job(
                            Job::Outbox(f),
                            &mut journal,
                            &mut outbox,
                            &mut unsynced_since,
                        );
                    }
                    do_job(other, &mut journal, &mut outbox, &mut unsynced_since);
                }
            }
        }
        if !frames.is_empty() {
            do_job(
                Job::Outbox(frames),
                &mut journal,
                &mut outbox,
                &mut unsynced_since,
            );
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

fn do_job(
    job: Job,
    journal: &mut JournalFile,
    outbox: &mut OutboxFile,
    unsynced_since: &mut Option<Instant>,
) {
    match job {
        Job::Journal {
            entry,
            durable,
            done,
        } => {
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
        Job::CompactJournal(entries) => {
            if let Err(e) = journal.rewrite(&entries) {
                warn!(file = %journal.path().display(), error = %e, "journal compaction failed; appending to the old file");
            }
        }
        Job::Outbox(frames) => match outbox.append(&frames) {
            Ok(()) => {
                unsynced_since.get_or_insert_with(Instant::now);
            }
            Err(e) => {
                warn!(file = %outbox.path().display(), error = %e, "cannot write the outbox; queued records are kept in memory only")
            }
        },
        Job::RewriteOutbox(bytes) => {
            if let Err(e) = outbox.rewrite(&bytes) {
                warn!(file = %outbox.path().display(), error = %e, "outbox compaction failed; appending to the old file");
            } else {
                *unsynced_since = None;
            }
        }
        Job::Settings { path, bytes } => {
            if let Err(e) = write_atomically(&path, &bytes) {
                warn!(file = %path.display(), error = %e, "cannot save applied settings; they hold until restart");
            }
        }
        Job::Barrier(tx) => {
            let _ = tx.send(());
        }
    }
}

fn sync_outbox(outbox: &mut OutboxFile) {
    if let Err(e) = outbox.sync() {
        warn!(file = %outbox.path().display(), error = %e, "cannot sync the outbox");
    }
}
