//! The command journal: which command ids this device has seen and what
//! became of them, kept under the state directory across restarts and
//! reboots so that every id runs at most once.
//!
//! Two halves, after the core/I-O split of the rest of the agent:
//! - [`Ledger`] (pure): the in-memory index and the pruning policy.
//! - [`JournalFile`] (I/O): an append-only JSON-lines file. Each record is
//!   written and `fdatasync`ed before the agent acts on it; the file is
//!   rewritten atomically (temp file, fsync, rename, fsync of the directory)
//!   when it has grown to twice the retained entries. A torn last line (power
//!   cut mid-append) is skipped on load; the record before it is intact.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use edgebind_protocol::CommandId;
use edgebind_protocol::messages::{Action, CommandResult, CommandStatus, UnixSeconds};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// One record: the latest known state of a command id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: CommandId,
    /// None when the command was rejected before its action was known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    pub status: CommandStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Result output as compact JSON text: one allocation per entry instead
    /// of a tree of maps (thousands of ids may be held in memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<CompactJson>,
    /// When the id was first recorded (pruning age).
    pub first_seen: UnixSeconds,
    /// When this record was written.
    pub ts: UnixSeconds,
    /// Boot the command was accepted in (a reboot succeeded once it differs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// A final result not yet acknowledged by the broker: republished at
    /// start. Absent (false) in records of older agents, which published
    /// directly; a later record of the id clears it once the PUBACK came.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub undelivered: bool,
    /// The output is the device's facts (see `CommandResult::facts`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub facts: bool,
}

impl JournalEntry {
    /// Store `value` as the entry's output.
    pub fn compact_output(value: &Value) -> Option<CompactJson> {
        RawValue::from_string(value.to_string())
            .ok()
            .map(CompactJson)
    }

    /// The result message this record stands for.
    pub fn result(&self) -> CommandResult {
        CommandResult {
            id: self.id.clone(),
            status: self.status,
            reason: self.reason.clone(),
            output: self
                .output
                .as_ref()
                .and_then(|raw| serde_json::from_str(raw.0.get()).ok()),
            facts: self.facts,
            ts: self.ts,
        }
    }
}

/// A JSON value kept as its compact text (written to the file verbatim).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CompactJson(Box<RawValue>);

impl PartialEq for CompactJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

/// How long ids are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Ids older than this are forgotten.
    pub max_age_s: u64,
    /// Beyond this many ids the oldest go, except protected ones.
    pub max_entries: usize,
    /// Ids younger than this are never forgotten for count reasons: the
    /// broker may still redeliver them (session expiry, with margin).
    pub protect_s: u64,
}

/// Protected ids are kept beyond `max_entries`, but never beyond this many
/// times it.
pub const HARD_CEILING_FACTOR: usize = 10;

/// In-memory index of the journal plus the pruning policy. Pure.
#[derive(Debug, Clone)]
pub struct Ledger {
    entries: HashMap<CommandId, JournalEntry>,
    retention: Retention,
}

impl Ledger {
    pub fn new(retention: Retention, records: impl IntoIterator<Item = JournalEntry>) -> Ledger {
        let mut entries = HashMap::new();
        for r in records {
            // Later records of an id supersede earlier ones.
            entries.insert(r.id.clone(), r);
        }
        Ledger { entries, retention }
    }

    pub fn get(&self, id: &CommandId) -> Option<&JournalEntry> {
        self.entries.get(id)
    }

    pub fn insert(&mut self, entry: JournalEntry) {
        self.entries.insert(entry.id.clone(), entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// More ids than even protection allows (see [`HARD_CEILING_FACTOR`]).
    pub fn over_ceiling(&self) -> bool {
        self.entries.len()
            > self
                .retention
                .max_entries
                .saturating_mul(HARD_CEILING_FACTOR)
    }

    /// More ids than the retention keeps, by a quarter (the slack spares a
    /// rewrite of the file for every new command).
    pub fn over_capacity(&self) -> bool {
        let max = self.retention.max_entries;
        self.entries.len() > max + max / 4
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &JournalEntry> {
        self.entries.values()
    }

    /// Forget what the retention allows; returns how many ids were dropped.
    /// A clock that went backwards makes entries look young, never old, so
    /// it can only keep ids longer.
    pub fn prune(&mut self, now: UnixSeconds) -> usize {
        let before = self.entries.len();
        let r = self.retention;
        let age = |e: &JournalEntry| now.saturating_sub(e.first_seen);
        self.entries.retain(|_, e| age(e) <= r.max_age_s);
        if self.entries.len() > r.max_entries {
            let mut old: Vec<(UnixSeconds, CommandId)> = self
                .entries
                .values()
                .filter(|e| age(e) > r.protect_s)
                .map(|e| (e.first_seen, e.id.clone()))
                .collect();
            old.sort();
            let excess = self.entries.len() - r.max_entries;
            for (_, id) in old.into_iter().take(excess) {
                self.entries.remove(&id);
            }
        }
        // A flood of commands must not exhaust a small device's memory: past
        // the hard ceiling even protected ids go, oldest (least likely to
        // be redelivered) first.
        let ceiling = r.max_entries.saturating_mul(HARD_CEILING_FACTOR);
        if self.entries.len() > ceiling {
            let mut all: Vec<(UnixSeconds, CommandId)> = self
                .entries
                .values()
                .map(|e| (e.first_seen, e.id.clone()))
                .collect();
            all.sort();
            // A tenth below the ceiling, so that a flood prunes (and
            // rewrites the file) once per tenth, not once per command.
            let excess = self.entries.len() - (ceiling - ceiling / 10);
            for (_, id) in all.into_iter().take(excess) {
                self.entries.remove(&id);
            }
        }
        before - self.entries.len()
    }

    /// Entries in a stable order (oldest first) for rewriting the file.
    pub fn snapshot(&self) -> Vec<JournalEntry> {
        let mut all: Vec<_> = self.entries.values().cloned().collect();
        all.sort_by(|a, b| (a.first_seen, a.id.as_str()).cmp(&(b.first_seen, b.id.as_str())));
        all
    }
}

/// The journal file under the state directory.
#[derive(Debug)]
pub struct JournalFile {
    path: PathBuf,
    file: File,
    lines: usize,
}

/// What loading found, besides the records.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub skipped_lines: usize,
}

pub const JOURNAL_FILE_NAME: &str = "commands.jsonl";
/// A compacted journal is ~200 bytes per id, at most 10 x 1000s of ids:
/// anything past this is damage, and must not exhaust a small device's RAM.
const MAX_JOURNAL_READ: u64 = 64 * 1024 * 1024;

impl JournalFile {
    /// Open (creating if needed) `dir/commands.jsonl` and read its records.
    pub fn open(dir: &Path) -> io::Result<(JournalFile, Vec<JournalEntry>, LoadReport)> {
        let path = dir.join(JOURNAL_FILE_NAME);
        let mut records = Vec::new();
        let mut report = LoadReport::default();
        let mut lines = 0;
        let mut clean_end = true;
        match File::open(&path) {
            Ok(f) => {
                // Bytes, not text: a power cut on flash can leave anything,
                // and one bad line must cost that line only.
                let mut bytes = Vec::new();
                f.take(MAX_JOURNAL_READ).read_to_end(&mut bytes)?;
                clean_end = bytes.last().is_none_or(|&b| b == b'\n');
                for line in bytes.split(|&b| b == b'\n') {
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    lines += 1;
                    match serde_json::from_slice::<JournalEntry>(line) {
                        Ok(r) => records.push(r),
                        Err(_) => report.skipped_lines += 1,
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let existed = path.exists();
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if !existed {
            // The new directory entry must survive a power cut too.
            sync_dir(dir)?;
        }
        let mut journal = JournalFile { path, file, lines };
        if report.skipped_lines > 0 || !clean_end {
            // Rewrite without the damage now: a line without its newline
            // would swallow the next append.
            journal.rewrite(&records)?;
        }
        Ok((journal, records, report))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines in the file (records, including superseded ones).
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// Append one record durably: returns only once it is on stable storage.
    pub fn append(&mut self, entry: &JournalEntry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.lines += 1;
        Ok(())
    }

    /// Append one record, handed to the kernel but not forced to storage:
    /// it survives a crash of the agent, not a power cut.
    pub fn append_unsynced(&mut self, entry: &JournalEntry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.lines += 1;
        Ok(())
    }

    /// Replace the file's content by `entries`, atomically and durably.
    pub fn rewrite(&mut self, entries: &[JournalEntry]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(entries.len() * 160);
        for e in entries {
            serde_json::to_writer(&mut buf, e).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        write_atomically(&self.path, &buf)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = entries.len();
        Ok(())
    }
}

/// Write `bytes` to `path` so that a crash leaves either the old or the new
/// content: temp file in the same directory, fsync, rename, fsync directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, first_seen: u64, status: CommandStatus) -> JournalEntry {
        JournalEntry {
            id: CommandId::new(id).unwrap(),
            action: Some(edgebind_protocol::actions::PING),
            status,
            reason: None,
            output: None,
            first_seen,
            ts: first_seen,
            boot_id: None,
            undelivered: false,
            facts: false,
        }
    }

    const RET: Retention = Retention {
        max_age_s: 1000,
        max_entries: 3,
        protect_s: 100,
    };

    #[test]
    fn later_records_supersede_earlier_ones() {
        let l = Ledger::new(
            RET,
            [
                entry("a", 1, CommandStatus::Accepted),
                entry("a", 1, CommandStatus::Succeeded),
            ],
        );
        assert_eq!(l.len(), 1);
        assert_eq!(
            l.get(&CommandId::new("a").unwrap()).unwrap().status,
            CommandStatus::Succeeded
        );
    }

    #[test]
    fn prune_drops_old_ids_but_never_redeliverable_ones() {
        let now = 2000;
        let mut l = Ledger::new(
            RET,
            [
                entry("ancient", 10, CommandStatus::Succeeded), // older than max_age
                entry("old1", 1500, CommandStatus::Succeeded),
                entry("old2", 1600, CommandStatus::Succeeded),
                entry("young1", 1950, CommandStatus::Succeeded),
                entry("young2", 1960, CommandStatus::Succeeded),
                entry("young3", 1970, CommandStatus::Succeeded),
                entry("young4", 1980, CommandStatus::Succeeded),
            ],
        );
        l.prune(now);
        let mut left: Vec<_> = l.entries().map(|e| e.id.to_string()).collect();
        left.sort();
        // Count limit 3 is exceeded, but the four young ids are protected.
        assert_eq!(left, ["young1", "young2", "young3", "young4"]);
    }

    #[test]
    fn a_flood_is_capped_even_when_every_id_is_protected() {
        let r = Retention {
            max_age_s: 1_000_000,
            max_entries: 5,
            protect_s: 1_000_000,
        };
        let mut l = Ledger::new(
            r,
            (0..80).map(|i| entry(&format!("c{i}"), 1000 + i, CommandStatus::Succeeded)),
        );
        l.prune(2000);
        assert_eq!(l.len(), 45, "a tenth below the ceiling of 50");
        // The newest ones stay.
        assert!(l.get(&CommandId::new("c79").unwrap()).is_some());
        assert!(l.get(&CommandId::new("c0").unwrap()).is_none());
    }

    #[test]
    fn outputs_survive_the_file_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, _) = JournalFile::open(dir.path()).unwrap();
        let value = serde_json::json!({"previous_boot_id": "b1", "boot_id": "b2"});
        let mut e = entry("r", 1, CommandStatus::Succeeded);
        e.output = JournalEntry::compact_output(&value);
        f.append(&e).unwrap();
        let (_, recs, _) = JournalFile::open(dir.path()).unwrap();
        assert_eq!(recs, vec![e]);
        assert_eq!(recs[0].result().output, Some(value));
    }

    #[test]
    fn non_utf8_garbage_costs_its_lines_only_and_is_cleaned_away() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _, _) = JournalFile::open(dir.path()).unwrap();
        f.append(&entry("a", 1, CommandStatus::Succeeded)).unwrap();
        drop(f);
        let path = dir.path().join(JOURNAL_FILE_NAME);
        let mut raw = std::fs::read(&path).unwrap();
        raw.extend((0..64u8).map(|i| 0x80 | i)); // 64 non-UTF-8 bytes, no newline
        std::fs::write(&path, &raw).unwrap();
        let (mut f, recs, report) = JournalFile::open(dir.path()).unwrap();
        assert_eq!((recs.len(), report.skipped_lines), (1, 1));
        // The next append is not glued to the garbage.
        f.append(&entry("b", 2, CommandStatus::Succeeded)).unwrap();
        let (_, recs, report) = JournalFile::open(dir.path()).unwrap();
        assert_eq!((recs.len(), report.skipped_lines), (2, 0));
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_bytes_open_as_a_journal(
                bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                good in proptest::collection::vec(any::<bool>(), 0..6),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let mut raw = Vec::new();
                for (i, g) in good.iter().enumerate() {
                    if *g {
                        let e = super::entry(&format!("g{i}"), i as u64, CommandStatus::Succeeded);
                        raw.extend(serde_json::to_vec(&e).unwrap());
                        raw.push(b'\n');
                    }
                }
                raw.extend(&bytes);
                std::fs::write(dir.path().join(JOURNAL_FILE_NAME), &raw).unwrap();
                let (mut f, recs, _) = JournalFile::open(dir.path()).unwrap();
                let wanted = good.iter().filter(|g| **g).count();
                // Good lines before the garbage are kept (the garbage may at
                // most take the line it starts in, which is its own).
                prop_assert!(recs.len() >= wanted);
                f.append(&super::entry("after", 99, CommandStatus::Succeeded)).unwrap();
                let (_, again, report) = JournalFile::open(dir.path()).unwrap();
                prop_assert_eq!(report.skipped_lines, 0);
                prop_assert!(again.iter().any(|e| e.id.as_str() == "after"));
            }

            /// Damage inside the file (a bad sector, a torn write) costs at
            /// most the lines it touches: the rest is read, and the file
            /// takes appends that read back clean.
            #[test]
            fn a_damaged_journal_loses_only_the_lines_it_touches(
                n in 1usize..12,
                edits in crate::fuzz_support::byte_edits(),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let lines: Vec<Vec<u8>> = (0..n)
                    .map(|i| {
                        let e = super::entry(&format!("g{i}"), i as u64, CommandStatus::Succeeded);
                        serde_json::to_vec(&e).unwrap()
                    })
                    .collect();
                let raw: Vec<u8> = lines.iter().flat_map(|l| l.iter().chain(b"\n")).copied().collect();
                let damaged = crate::fuzz_support::apply(raw, &edits);
                std::fs::write(dir.path().join(JOURNAL_FILE_NAME), &damaged).unwrap();
                let (mut f, recs, _) = JournalFile::open(dir.path()).unwrap();
                // Every line the damage left whole is read.
                let mut whole: Vec<&[u8]> = damaged.split(|b| *b == b'\n').collect();
                whole.pop(); // after the last newline: not a complete line
                let intact = lines.iter().filter(|l| whole.contains(&l.as_slice())).count();
                prop_assert!(recs.len() >= intact, "{} read, {} intact", recs.len(), intact);
                f.append(&super::entry("after", 99, CommandStatus::Succeeded)).unwrap();
                let (_, again, report) = JournalFile::open(dir.path()).unwrap();
                prop_assert_eq!(report.skipped_lines, 0);
                prop_assert!(again.iter().any(|e| e.id.as_str() == "after"));
            }
        }
    }

    #[test]
    fn file_round_trips_skips_torn_line_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, recs, _) = JournalFile::open(dir.path()).unwrap();
        assert!(recs.is_empty());
        f.append(&entry("a", 1, CommandStatus::Accepted)).unwrap();
        f.append(&entry("a", 1, CommandStatus::Succeeded)).unwrap();
        f.append(&entry("b", 2, CommandStatus::Rejected)).unwrap();
        drop(f);
        // Simulate a power cut in the middle of an append.
        let path = dir.path().join(JOURNAL_FILE_NAME);
        let mut raw = std::fs::read(&path).unwrap();
        raw.extend_from_slice(b"{\"id\":\"c\",\"sta");
        std::fs::write(&path, raw).unwrap();

        let (mut f, recs, report) = JournalFile::open(dir.path()).unwrap();
        assert_eq!(report.skipped_lines, 1);
        let l = Ledger::new(RET, recs);
        assert_eq!(l.len(), 2);
        f.rewrite(&l.snapshot()).unwrap();
        assert_eq!(f.lines(), 2);
        f.append(&entry("d", 3, CommandStatus::Succeeded)).unwrap();
        let (_, recs, report) = JournalFile::open(dir.path()).unwrap();
        assert_eq!(report.skipped_lines, 0);
        assert_eq!(recs.len(), 3);
    }
}
