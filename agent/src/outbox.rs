//! The outbox: telemetry, events and command results on their way to the
//! broker, kept on disk until the broker acknowledged them (QoS 1 PUBACK).
//!
//! - [`Queue`] is the pure part: order, the size bound and the drop policy,
//!   which records are on the wire. The core owns it.
//! - [`encode_data`], [`encode_done`] and [`decode`] are the file format.
//! - [`OutboxFile`] is the file under the state directory (`outbox.bin`).
//!
//! # File format
//!
//! An append-only sequence of frames, little-endian:
//!
//! ```text
//! frame = magic 0xEB 0x0B | len: u32 | crc: u32 (crc32/IEEE of body) | body[len]
//! body  = 0x01 seq: u64 class: u8 ts: u64 topic_len: u16 topic payload   (a record)
//!       | 0x02 seq: u64                                                   (record gone)
//! ```
//!
//! A record is gone once the broker acknowledged it or the drop policy
//! dropped it. Loading replays the frames in order. A frame whose length,
//! checksum or body does not check out is skipped by scanning forward to the
//! next magic that starts a valid frame: a torn tail or garbage in the middle
//! costs the records it overlaps, never the file. The file is rewritten with
//! only the live records when it holds more than twice their size.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use edgebind_protocol::messages::{MAX_PACKET_BYTES, UnixSeconds};

pub const OUTBOX_FILE_NAME: &str = "outbox.bin";

const MAGIC: [u8; 2] = [0xEB, 0x0B];
const HEADER: usize = 2 + 4 + 4;
const TAG_DATA: u8 = 1;
const TAG_DONE: u8 = 2;
/// Fixed part of a data body: tag, seq, class, ts, topic length.
const DATA_FIXED: usize = 1 + 8 + 1 + 8 + 2;
/// No valid body is larger: a length above it is garbage.
const MAX_BODY: usize = DATA_FIXED + u16::MAX as usize + MAX_PACKET_BYTES;
/// Encoded size of a "gone" frame.
pub const DONE_FRAME_BYTES: u64 = (HEADER + 1 + 8) as u64;

/// What a record is; decides what the drop policy sacrifices first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Telemetry,
    Event,
    Result,
}

impl Class {
    fn code(self) -> u8 {
        match self {
            Class::Telemetry => 1,
            Class::Event => 2,
            Class::Result => 3,
        }
    }

    fn from_code(c: u8) -> Option<Class> {
        match c {
            1 => Some(Class::Telemetry),
            2 => Some(Class::Event),
            3 => Some(Class::Result),
            _ => None,
        }
    }
}

/// One queued publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub class: Class,
    /// When it was produced (the drop report gives the span it lost).
    pub ts: UnixSeconds,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Record {
    /// Bytes it takes in the file, which is also what counts against the bound.
    pub fn cost(&self) -> u64 {
        (HEADER + DATA_FIXED + self.topic.len() + self.payload.len()) as u64
    }
}

/// Records the drop policy sacrificed, not yet reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub telemetry: u64,
    pub events: u64,
    pub results: u64,
    pub first_ts: UnixSeconds,
    pub last_ts: UnixSeconds,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.telemetry + self.events + self.results == 0
    }

    fn count(&mut self, r: &Record) {
        if self.is_empty() {
            self.first_ts = r.ts;
        }
        self.first_ts = self.first_ts.min(r.ts);
        self.last_ts = self.last_ts.max(r.ts);
        match r.class {
            Class::Telemetry => self.telemetry += 1,
            Class::Event => self.events += 1,
            Class::Result => self.results += 1,
        }
    }
}

/// The outbox in memory: records in production order, bounded by bytes.
///
/// Drop policy, once the records take more than `max_bytes`: the oldest
/// telemetry sample not yet on the wire goes first. Events and command
/// results go only when no such telemetry is left, oldest first. Every drop
/// is counted in [`Queue::take_dropped`], for an event once the link is back.
/// Records already handed to the connection are never dropped (at most the
/// in-flight window of them).
#[derive(Debug, Clone)]
pub struct Queue {
    records: VecDeque<Record>,
    /// `records[..sent]` are on the wire, awaiting their PUBACK.
    sent: usize,
    bytes: u64,
    max_bytes: u64,
    next_seq: u64,
    dropped: Dropped,
}

impl Queue {
    /// A queue holding `records` (as loaded; any order) with room for
    /// `max_bytes`; numbering continues after `min_next_seq` and after every
    /// record's own number.
    pub fn new(max_bytes: u64, records: Vec<Record>, min_next_seq: u64) -> Queue {
        let mut records: Vec<Record> = records;
        records.sort_by_key(|r| r.seq);
        let next_seq = records
            .last()
            .map(|r| r.seq + 1)
            .unwrap_or(0)
            .max(min_next_seq);
        let bytes = records.iter().map(Record::cost).sum();
        let mut q = Queue {
            records: records.into(),
            sent: 0,
            bytes,
            max_bytes,
            next_seq,
            dropped: Dropped::default(),
        };
        q.make_room();
        q
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Bytes the live records take (in memory and in a compacted file).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records on the wire, not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.sent
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.iter()
    }

    /// Append a record; returns it and the records dropped to make room.
    pub fn push(
        &mut self,
        class: Class,
        ts: UnixSeconds,
        topic: String,
        payload: Vec<u8>,
    ) -> (Record, Vec<Record>) {
        let r = Record {
            seq: self.next_seq,
            class,
            ts,
            topic,
            payload,
        };
        self.next_seq += 1;
        self.bytes += r.cost();
        self.records.push_back(r.clone());
        let dropped = self.make_room();
        (r, dropped)
    }

    fn make_room(&mut self) -> Vec<Record> {
        let mut dropped = Vec::new();
        while self.bytes > self.max_bytes {
            // Never the newest record: it is what the caller just produced,
            // and a queue of one is within any sane bound.
            let candidates = self.sent..self.records.len().saturating_sub(1);
            let victim = candidates
                .clone()
                .find(|&i| self.records[i].class == Class::Telemetry)
                .or_else(|| candidates.clone().next());
            let Some(i) = victim else { break };
            let Some(r) = self.records.remove(i) else {
                break;
            };
            self.bytes -= r.cost();
            self.dropped.count(&r);
            dropped.push(r);
        }
        dropped
    }

    /// Up to `window - in_flight` records not yet on the wire, oldest first;
    /// they count as on the wire from now on.
    pub fn take_sendable(&mut self, window: usize) -> Vec<Record> {
        let room = window.saturating_sub(self.sent);
        let end = (self.sent + room).min(self.records.len());
        let out: Vec<Record> = self.records.range(self.sent..end).cloned().collect();
        self.sent = end;
        out
    }

    /// The broker acknowledged record `seq`: it leaves the queue.
    pub fn remove(&mut self, seq: u64) -> Option<Record> {
        let i = self.records.binary_search_by_key(&seq, |r| r.seq).ok()?;
        let r = self.records.remove(i)?;
        if i < self.sent {
            self.sent -= 1;
        }
        self.bytes -= r.cost();
        Some(r)
    }

    /// Drops since the last call.
    pub fn take_dropped(&mut self) -> Dropped {
        std::mem::take(&mut self.dropped)
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The frame that stores `r`.
pub fn encode_data(r: &Record) -> Vec<u8> {
    // Topics are ours and short; one longer than the length field can hold
    // cannot be stored (nor published: the broker caps topics too).
    let topic = &r.topic.as_bytes()[..r.topic.len().min(u16::MAX as usize)];
    let mut body = Vec::with_capacity(DATA_FIXED + topic.len() + r.payload.len());
    body.push(TAG_DATA);
    body.extend_from_slice(&r.seq.to_le_bytes());
    body.push(r.class.code());
    body.extend_from_slice(&r.ts.to_le_bytes());
    body.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(&r.payload);
    frame(&body)
}

/// The frame that says record `seq` is gone.
pub fn encode_done(seq: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(9);
    body.push(TAG_DONE);
    body.extend_from_slice(&seq.to_le_bytes());
    frame(&body)
}

/// Every live record, encoded: a compacted file.
pub fn encode_all<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(&encode_data(r));
    }
    out
}

/// What [`decode`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Live records in sequence order.
    pub records: Vec<Record>,
    /// Highest sequence number seen in any valid frame, plus one.
    pub next_seq: u64,
    /// Damaged stretches skipped (each a torn write or garbage).
    pub damaged: usize,
    /// Bytes in those stretches.
    pub damaged_bytes: usize,
    /// Valid frames in the file (live or not): compaction is due when this
    /// is far above the live count.
    pub frames: usize,
}

enum Body {
    Data(Record),
    Done(u64),
}

fn parse_body(body: &[u8]) -> Option<Body> {
    let (&tag, rest) = body.split_first()?;
    let seq = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    match tag {
        TAG_DONE if rest.len() == 8 => Some(Body::Done(seq)),
        TAG_DATA => {
            let class = Class::from_code(*rest.get(8)?)?;
            let ts = u64::from_le_bytes(rest.get(9..17)?.try_into().ok()?);
            let tlen = u16::from_le_bytes(rest.get(17..19)?.try_into().ok()?) as usize;
            let topic = std::str::from_utf8(rest.get(19..19 + tlen)?).ok()?;
            let payload = rest.get(19 + tlen..)?.to_vec();
            Some(Body::Data(Record {
                seq,
                class,
                ts,
                topic: topic.to_owned(),
                payload,
            }))
        }
        _ => None,
    }
}

/// The frame starting at `bytes[0]`, with its total length, if valid.
fn parse_frame(bytes: &[u8]) -> Option<(Body, usize)> {
    if bytes.get(..2)? != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(bytes.get(2..6)?.try_into().ok()?) as usize;
    if len > MAX_BODY {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(6..10)?.try_into().ok()?);
    let body = bytes.get(HEADER..HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some((parse_body(body)?, HEADER + len))
}

/// Replay an outbox file's bytes. Never fails: whatever does not check out
/// is skipped and counted.
pub fn decode(bytes: &[u8]) -> Decoded {
    let mut live: BTreeMap<u64, Record> = BTreeMap::new();
    let mut out = Decoded::default();
    let mut pos = 0;
    let mut in_damage = false;
    while pos < bytes.len() {
        match parse_frame(&bytes[pos..]) {
            Some((body, len)) => {
                in_damage = false;
                out.frames += 1;
                let seq = match body {
                    Body::Data(r) => {
                        let seq = r.seq;
                        live.insert(seq, r);
                        seq
                    }
                    Body::Done(seq) => {
                        live.remove(&seq);
                        seq
                    }
                };
                out.next_seq = out.next_seq.max(seq.saturating_add(1));
                pos += len;
            }
            None => {
                if !in_damage {
                    out.damaged += 1;
                    in_damage = true;
                }
                // Resynchronise at the next possible frame start.
                let skip = bytes[pos + 1..]
                    .windows(2)
                    .position(|w| w == MAGIC)
                    .map_or(bytes.len() - pos, |p| p + 1);
                out.damaged_bytes += skip;
                pos += skip;
            }
        }
    }
    out.records = live.into_values().collect();
    out
}

/// `outbox.bin` under the state directory.
#[derive(Debug)]
pub struct OutboxFile {
    path: PathBuf,
    file: File,
}

impl OutboxFile {
    /// Open (creating if needed) the outbox and read it. Reads at most
    /// `read_limit` bytes (a file grown past any sane size is damage, and
    /// must not exhaust memory); the rest counts as damaged. When anything
    /// was damaged, or the file is mostly acknowledged records, it is
    /// rewritten with only the live records at once, so the damage cannot
    /// swallow the next append.
    pub fn open(dir: &Path, read_limit: u64) -> io::Result<(OutboxFile, Decoded)> {
        let path = dir.join(OUTBOX_FILE_NAME);
        let mut bytes = Vec::new();
        let mut beyond = 0u64;
        match File::open(&path) {
            Ok(f) => {
                let total = f.metadata().map(|m| m.len()).unwrap_or(0);
                f.take(read_limit).read_to_end(&mut bytes)?;
                beyond = total.saturating_sub(bytes.len() as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut decoded = decode(&bytes);
        if beyond > 0 {
            decoded.damaged += 1;
            decoded.damaged_bytes += beyond as usize;
        }
        let existed = path.exists();
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut f = OutboxFile { path, file };
        if decoded.damaged > 0 || decoded.frames > 2 * decoded.records.len() + 64 {
            f.rewrite(&encode_all(&decoded.records))?;
        } else if !existed {
            crate::journal::sync_dir(dir)?;
        }
        Ok((f, decoded))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hand frames to the kernel (durable against a crash of the agent; see
    /// [`OutboxFile::sync`] for power cuts).
    pub fn append(&mut self, frames: &[u8]) -> io::Result<()> {
        self.file.write_all(frames)
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Replace the content atomically (temp file, fsync, rename).
    pub fn rewrite(&mut self, bytes: &[u8]) -> io::Result<()> {
        crate::journal::write_atomically(&self.path, bytes)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(q: &mut Queue, class: Class, ts: u64, n: usize) -> (Record, Vec<Record>) {
        q.push(class, ts, "edgebind/v1/devices/d/x".into(), vec![b'x'; n])
    }

    #[test]
    fn frames_round_trip_and_done_removes() {
        let mut q = Queue::new(1 << 20, vec![], 0);
        let (a, _) = rec(&mut q, Class::Telemetry, 1, 10);
        let (b, _) = rec(&mut q, Class::Result, 2, 0);
        let (c, _) = rec(&mut q, Class::Event, 3, 300);
        let mut file = encode_data(&a);
        file.extend(encode_data(&b));
        file.extend(encode_done(a.seq));
        file.extend(encode_data(&c));
        let d = decode(&file);
        assert_eq!(d.records, vec![b.clone(), c.clone()]);
        assert_eq!(d.next_seq, 3);
        assert_eq!((d.damaged, d.frames), (0, 4));
        assert_eq!(encode_data(&c).len() as u64, c.cost());
    }

    #[test]
    fn garbage_in_the_middle_costs_only_the_records_it_overlaps() {
        let mut q = Queue::new(1 << 20, vec![], 0);
        let recs: Vec<Record> = (0..20)
            .map(|i| rec(&mut q, Class::Telemetry, i, 50).0)
            .collect();
        let mut file = encode_all(&recs);
        let mid = file.len() / 2;
        for (i, b) in file[mid..mid + 40].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) ^ 0x5a;
        }
        // And a torn tail.
        file.extend_from_slice(&encode_data(&recs[0])[..17]);
        let d = decode(&file);
        assert_eq!(d.damaged, 2);
        assert!(d.records.len() >= 17, "{}", d.records.len());
        let seqs: Vec<u64> = d.records.iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn oldest_unsent_telemetry_goes_first_and_is_counted() {
        let one = rec(
            &mut Queue::new(1 << 20, vec![], 0),
            Class::Telemetry,
            0,
            100,
        )
        .0
        .cost();
        let mut q = Queue::new(one * 4, vec![], 0);
        rec(&mut q, Class::Telemetry, 1, 100);
        rec(&mut q, Class::Event, 2, 100);
        rec(&mut q, Class::Telemetry, 3, 100);
        rec(&mut q, Class::Result, 4, 100);
        assert!(q.take_dropped().is_empty());
        let (_, dropped) = rec(&mut q, Class::Telemetry, 5, 100);
        assert_eq!(dropped.iter().map(|r| r.ts).collect::<Vec<_>>(), [1]);
        let (_, dropped) = rec(&mut q, Class::Telemetry, 6, 100);
        assert_eq!(dropped.iter().map(|r| r.ts).collect::<Vec<_>>(), [3]);
        let left: Vec<u64> = q.records().map(|r| r.ts).collect();
        assert_eq!(left, [2, 4, 5, 6]);
        let d = q.take_dropped();
        assert_eq!((d.telemetry, d.events, d.results), (2, 0, 0));
        assert_eq!((d.first_ts, d.last_ts), (1, 3));
        // Only events and results left (plus the newest): the oldest of them
        // goes, and is counted.
        let mut q = Queue::new(one * 2, vec![], 0);
        rec(&mut q, Class::Event, 1, 100);
        rec(&mut q, Class::Result, 2, 100);
        rec(&mut q, Class::Result, 3, 100);
        assert_eq!(q.take_dropped().events, 1);
    }

    #[test]
    fn records_on_the_wire_are_never_dropped_and_acks_remove() {
        let one = rec(
            &mut Queue::new(1 << 20, vec![], 0),
            Class::Telemetry,
            0,
            100,
        )
        .0
        .cost();
        let mut q = Queue::new(one * 3, vec![], 0);
        for ts in 0..3 {
            rec(&mut q, Class::Telemetry, ts, 100);
        }
        let sent = q.take_sendable(2);
        assert_eq!(sent.iter().map(|r| r.ts).collect::<Vec<_>>(), [0, 1]);
        assert!(q.take_sendable(2).is_empty(), "window full");
        let (_, dropped) = rec(&mut q, Class::Telemetry, 3, 100);
        assert_eq!(dropped.iter().map(|r| r.ts).collect::<Vec<_>>(), [2]);
        assert_eq!(q.remove(sent[0].seq).map(|r| r.ts), Some(0));
        assert_eq!(q.in_flight(), 1);
        assert_eq!(
            q.take_sendable(2).iter().map(|r| r.ts).collect::<Vec<_>>(),
            [3]
        );
        assert!(q.remove(999).is_none());
    }

    #[test]
    fn the_file_is_repaired_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::new(1 << 20, vec![], 0);
        let recs: Vec<Record> = (0..5).map(|i| rec(&mut q, Class::Event, i, 20).0).collect();
        let mut bytes = encode_all(&recs);
        bytes.extend_from_slice(b"\xff\xfe torn");
        std::fs::write(dir.path().join(OUTBOX_FILE_NAME), &bytes).unwrap();
        let (mut f, d) = OutboxFile::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((d.records.len(), d.damaged), (5, 1));
        f.append(&encode_done(recs[0].seq)).unwrap();
        drop(f);
        let (_, d) = OutboxFile::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((d.records.len(), d.damaged), (4, 0));
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
                let d = decode(&bytes);
                prop_assert!(d.damaged_bytes <= bytes.len());
            }

            #[test]
            fn any_file_content_opens_and_is_repaired(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join(OUTBOX_FILE_NAME), &bytes).unwrap();
                let (_, first) = OutboxFile::open(dir.path(), 1 << 20).unwrap();
                // After the repair at open, the file reads back clean.
                let (_, again) = OutboxFile::open(dir.path(), 1 << 20).unwrap();
                prop_assert_eq!(again.damaged, 0);
                prop_assert_eq!(again.records, first.records);
            }

            #[test]
            fn valid_records_survive_random_damage(
                n in 1usize..30,
                at in any::<prop::sample::Index>(),
                junk in proptest::collection::vec(any::<u8>(), 1..200),
            ) {
                let mut q = Queue::new(1 << 20, vec![], 0);
                let recs: Vec<Record> = (0..n)
                    .map(|i| q.push(Class::Telemetry, i as u64, "t".into(), vec![7; 40]).0)
                    .collect();
                let mut bytes = encode_all(&recs);
                let i = at.index(bytes.len());
                let end = (i + junk.len()).min(bytes.len());
                bytes[i..end].copy_from_slice(&junk[..end - i]);
                let d = decode(&bytes);
                // Every record decoded is one that was written, in order.
                for r in &d.records {
                    prop_assert_eq!(r, &recs[r.seq as usize]);
                }
                // The damage overlaps at most a few frames.
                let frame = recs[0].cost() as usize;
                prop_assert!(d.records.len() + junk.len() / frame + 2 >= n);
            }
        }
    }
}
