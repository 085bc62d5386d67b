//! A Raft log of our own for the telemetry partitions (docs/adr/018): the entries of every
//! partition group of a node appended to one sequence of segment files, each entry encoded once
//! and written once, made durable by one `fdatasync` per group-commit round (`wal_sync`).
//!
//! RocksDB copied every entry into a write batch, its WAL, a memtable and, at the memtable's
//! flush, a compressed table file, although a partition's entries live only until its next
//! snapshot and are read back (from the tail cache) within milliseconds of their append.
//!
//! Layout: `dir/{seq:016x}.seg`, written in sequence. A record is
//!
//! ```text
//! crc32 of the rest (u32 LE) | payload length (u32 LE) | kind (u8) | group length (u8) | group
//! | log index (u64 LE) | payload
//! ```
//!
//! of kind [`KIND_ENTRY`] (the payload is the encoded entry) or [`KIND_TRUNCATE`] (no payload:
//! the group's entries from the index on are gone). Opening replays the segments in order into
//! an in-memory index (group, log index → where the payload is); a later record of an index
//! replaces an earlier one. A record whose checksum fails or that runs past the end of the
//! *last* segment is a write a crash cut short: the segment is cut there, and nothing after it
//! was ever acknowledged (an acknowledgement follows an fsync of everything written before it).
//! In an earlier segment it is corruption, and opening fails: rolling to a new segment fsyncs the
//! old one first.
//!
//! Purges are not recorded here: the group's purge marker (in RocksDB, synced before the purge)
//! is authoritative, and the store drops replayed entries at or below it when it opens.
//! Segments are deleted oldest first once no group has a live entry in them; deleting only a
//! prefix keeps a deleted TRUNCATE from resurrecting entries of an older segment. A group that
//! goes quiet keeps its last entries until its next snapshot and would pin every later segment,
//! so a segment that is still the oldest after `relocate_after` has its live entries copied to
//! the active segment (fsync'd there) and is then deleted.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A log entry: the payload is the encoded entry.
const KIND_ENTRY: u8 = 1;
/// The group's entries from the index on are gone.
const KIND_TRUNCATE: u8 = 2;
/// crc, payload length, kind, group length; then the group and the index.
const FIXED_HEADER: usize = 4 + 4 + 1 + 1;

/// A segment is closed once the next write would take it past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// An oldest segment that lives this long has its live entries copied forward (see the module
/// docs). Under load a partition purges every few seconds, so only a quiet group's entries are
/// still live by then.
pub const RELOCATE_AFTER: Duration = Duration::from_secs(60);

fn io(e: std::io::Error) -> Error {
    Error::Io(e.to_string())
}

/// Where a live entry's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seq: u64,
    /// Offset of the payload in the segment.
    offset: u64,
    len: u32,
    /// Bytes of the whole record (what deleting it frees).
    record: u32,
}

struct Segment {
    file: Arc<File>,
    len: u64,
    /// Bytes of records holding live entries.
    live: u64,
    created: Instant,
}

impl Segment {
    /// A segment whose records replay or appends have yet to account for.
    fn new(file: File) -> Self {
        Self {
            file: Arc::new(file),
            len: 0,
            live: 0,
            created: Instant::now(),
        }
    }
}

#[derive(Default)]
struct State {
    segments: BTreeMap<u64, Segment>,
    groups: HashMap<String, BTreeMap<u64, Loc>>,
    /// Set when a write left a partial record that could not be cut away (appending after it
    /// would hide every later record from replay) or an fsync failed (Linux marks the lost
    /// pages clean, so a later fsync would report success for writes that never reached the
    /// disk): every later call fails until the log is reopened and replayed.
    broken: Option<String>,
}

impl State {
    fn unlive(segments: &mut BTreeMap<u64, Segment>, loc: Loc) {
        if let Some(s) = segments.get_mut(&loc.seq) {
            s.live = s.live.saturating_sub(u64::from(loc.record));
        }
    }

    fn put(&mut self, group: &str, index: u64, loc: Loc) {
        if let Some(s) = self.segments.get_mut(&loc.seq) {
            s.live += u64::from(loc.record);
        }
        let entries = match self.groups.get_mut(group) {
            Some(entries) => entries,
            None => self.groups.entry(group.to_string()).or_default(),
        };
        if let Some(old) = entries.insert(index, loc) {
            Self::unlive(&mut self.segments, old);
        }
    }

    /// Drops the group's entries from `index` on.
    fn cut_from(&mut self, group: &str, index: u64) {
        if let Some(entries) = self.groups.get_mut(group) {
            for loc in entries.split_off(&index).into_values() {
                Self::unlive(&mut self.segments, loc);
            }
        }
    }

    /// Drops the group's entries up to and including `index`.
    fn cut_to(&mut self, group: &str, index: u64) {
        if let Some(entries) = self.groups.get_mut(group) {
            let kept = match index.checked_add(1) {
                Some(next) => entries.split_off(&next),
                None => BTreeMap::new(),
            };
            for loc in std::mem::replace(entries, kept).into_values() {
                Self::unlive(&mut self.segments, loc);
            }
        }
    }

    fn active(&mut self) -> Result<(u64, &mut Segment)> {
        self.segments
            .iter_mut()
            .next_back()
            .map(|(seq, s)| (*seq, s))
            .ok_or_else(|| Error::Io("segment log has no active segment".into()))
    }
}

/// Records to append, encoded in one buffer (see [`SegmentLog::append`]).
#[derive(Default)]
pub(crate) struct Batch {
    buf: Vec<u8>,
    /// What each record does to the index once written, in order.
    records: Vec<Pending>,
}

enum Pending {
    Entry {
        group: String,
        index: u64,
        /// Offset of the payload in the batch's buffer.
        payload_at: usize,
        len: u32,
        record: u32,
    },
    Truncate {
        group: String,
        index: u64,
    },
}

impl Batch {
    /// Adds an entry of `group` at `index` whose payload `encode` appends to the buffer it is
    /// given; returns the payload's length.
    pub(crate) fn entry(
        &mut self,
        group: &str,
        index: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<()>,
    ) -> Result<usize> {
        let (start, payload_at) = self.header(KIND_ENTRY, group, index)?;
        encode(&mut self.buf)?;
        let len = self.finish(start, payload_at)?;
        let record = u32::try_from(self.buf.len() - start)
            .map_err(|_| Error::Io("log entry over 4 GiB".into()))?;
        self.records.push(Pending::Entry {
            group: group.to_string(),
            index,
            payload_at,
            len,
            record,
        });
        Ok(len as usize)
    }

    fn truncate(&mut self, group: &str, index: u64) -> Result<()> {
        let (start, payload_at) = self.header(KIND_TRUNCATE, group, index)?;
        self.finish(start, payload_at)?;
        self.records.push(Pending::Truncate {
            group: group.to_string(),
            index,
        });
        Ok(())
    }

    /// Bytes encoded so far.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    fn header(&mut self, kind: u8, group: &str, index: u64) -> Result<(usize, usize)> {
        let name = group.as_bytes();
        let name_len =
            u8::try_from(name.len()).map_err(|_| Error::Io(format!("group name {group:?}")))?;
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 8]);
        self.buf.push(kind);
        self.buf.push(name_len);
        self.buf.extend_from_slice(name);
        self.buf.extend_from_slice(&index.to_le_bytes());
        Ok((start, self.buf.len()))
    }

    /// Fills in the payload length and the checksum of the record that starts at `start`.
    fn finish(&mut self, start: usize, payload_at: usize) -> Result<u32> {
        let len = u32::try_from(self.buf.len() - payload_at)
            .map_err(|_| Error::Io("log entry over 4 GiB".into()))?;
        self.buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[start + 4..]);
        self.buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(len)
    }
}

/// One record parsed from a segment.
struct Parsed<'a> {
    kind: u8,
    group: &'a str,
    index: u64,
    payload_at: usize,
    payload_len: u32,
    end: usize,
}

/// Parses the record at `at`; `None` if it is cut short or fails its checksum.
fn parse(bytes: &[u8], at: usize) -> Option<Parsed<'_>> {
    let fixed = bytes.get(at..at.checked_add(FIXED_HEADER)?)?;
    let crc = u32::from_le_bytes(fixed[0..4].try_into().ok()?);
    let payload_len = u32::from_le_bytes(fixed[4..8].try_into().ok()?);
    let kind = fixed[8];
    let name_len = usize::from(fixed[9]);
    let payload_at = at + FIXED_HEADER + name_len + 8;
    let end = payload_at.checked_add(payload_len as usize)?;
    let record = bytes.get(at..end)?;
    if crc32fast::hash(&record[4..]) != crc {
        return None;
    }
    let name = &record[FIXED_HEADER..FIXED_HEADER + name_len];
    let index = u64::from_le_bytes(
        record[FIXED_HEADER + name_len..FIXED_HEADER + name_len + 8]
            .try_into()
            .ok()?,
    );
    Some(Parsed {
        kind,
        group: std::str::from_utf8(name).ok()?,
        index,
        payload_at,
        payload_len,
        end,
    })
}

/// The Raft log of every partition group of a node (see the module docs). Shared by the groups'
/// stores; each call takes a short lock.
pub struct SegmentLog {
    dir: PathBuf,
    segment_bytes: u64,
    relocate_after: Duration,
    state: Mutex<State>,
    /// fsyncs done, and the count at which one fails (tests: a page cache survives kill -9, so
    /// only counting and failing fsyncs shows what a power loss would).
    #[cfg(test)]
    syncs: std::sync::atomic::AtomicU64,
    #[cfg(test)]
    fail_sync_at: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SegmentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLog")
            .field("dir", &self.dir)
            .finish()
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.seg"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

impl SegmentLog {
    /// Opens (creating if missing) the log in `dir` and replays it.
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        Self::open_with(dir, SEGMENT_BYTES, RELOCATE_AFTER)
    }

    pub(crate) fn open_with(
        dir: &Path,
        segment_bytes: u64,
        relocate_after: Duration,
    ) -> Result<Arc<Self>> {
        // Directories this creates must be durable by name too, or a power loss could take the
        // whole log (whose entries are acknowledged) with them.
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(dir).map_err(io)?;
        for created in &missing {
            if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(io)?;
            }
        }
        let mut seqs = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io)? {
            let name = item.map_err(io)?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".seg")
                && let Ok(seq) = u64::from_str_radix(stem, 16)
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut state = State::default();
        let last = seqs.last().copied();
        for seq in seqs {
            let path = segment_path(dir, seq);
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io)?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes).map_err(io)?;
            state.segments.insert(seq, Segment::new(file));
            let mut at = 0;
            while at < bytes.len() {
                let Some(record) = parse(&bytes, at) else {
                    break;
                };
                match record.kind {
                    KIND_ENTRY => {
                        let loc = Loc {
                            seq,
                            offset: record.payload_at as u64,
                            len: record.payload_len,
                            record: (record.end - at) as u32,
                        };
                        state.put(record.group, record.index, loc);
                    }
                    KIND_TRUNCATE => state.cut_from(record.group, record.index),
                    other => {
                        return Err(Error::Io(format!(
                            "{}: unknown record kind {other} at {at}",
                            path.display()
                        )));
                    }
                }
                at = record.end;
            }
            if at < bytes.len() {
                if Some(seq) != last {
                    return Err(Error::Io(format!(
                        "{}: corrupt record at {at} of {} bytes (not the last segment)",
                        path.display(),
                        bytes.len()
                    )));
                }
                tracing::warn!(
                    segment = %path.display(),
                    at,
                    dropped = bytes.len() - at,
                    "cutting a torn write from the partition log's last segment"
                );
                let segment = state.active()?.1;
                segment.file.set_len(at as u64).map_err(io)?;
                segment.file.sync_all().map_err(io)?;
            }
            if let Some(segment) = state.segments.get_mut(&seq) {
                segment.len = at as u64;
            }
        }
        let log = Self {
            dir: dir.to_path_buf(),
            segment_bytes,
            relocate_after,
            state: Mutex::new(state),
            #[cfg(test)]
            syncs: Default::default(),
            #[cfg(test)]
            fail_sync_at: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        {
            let mut state = log.lock();
            if state.segments.is_empty() {
                log.create_segment(&mut state, 1)?;
            }
        }
        Ok(Arc::new(log))
    }

    /// The state, which every method leaves consistent before it can fail, so a poisoned lock is
    /// taken as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// fsyncs `file` (or the log's directory), marking the log broken if that fails.
    fn durable(&self, state: &mut State, file: Option<&File>) -> Result<()> {
        let result = self.fsync(file);
        if let Err(e) = &result {
            state.broken = Some(format!("fsync failed: {e}"));
        }
        result
    }

    fn fsync(&self, file: Option<&File>) -> Result<()> {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering;
            if self.syncs.fetch_add(1, Ordering::SeqCst) + 1
                == self.fail_sync_at.load(Ordering::SeqCst)
            {
                return Err(Error::Io("fsync failed (test)".into()));
            }
        }
        match file {
            Some(file) => file.sync_data(),
            None => sync_dir(&self.dir),
        }
        .map_err(io)
    }

    fn check(state: &State) -> Result<()> {
        match &state.broken {
            Some(why) => Err(Error::Io(format!(
                "partition log unusable until reopened: {why}"
            ))),
            None => Ok(()),
        }
    }

    fn create_segment(&self, state: &mut State, seq: u64) -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_path(&self.dir, seq))
            .map_err(io)?;
        // The new file's name must survive a crash before anything in it is acknowledged.
        self.durable(state, None)?;
        state.segments.insert(seq, Segment::new(file));
        Ok(())
    }

    /// Appends a batch to the active segment (not synced: [`SegmentLog::sync`] makes it durable),
    /// rolling to a new segment first if the batch would overfill it.
    pub(crate) fn append(&self, batch: &Batch) -> Result<()> {
        let mut state = self.lock();
        self.append_locked(&mut state, batch, true)
    }

    fn append_locked(&self, state: &mut State, batch: &Batch, may_roll: bool) -> Result<()> {
        Self::check(state)?;
        if may_roll {
            self.roll_if_full(state, batch.buf.len() as u64)?;
        }
        let (seq, segment) = state.active()?;
        let at = segment.len;
        if let Err(e) = segment.file.write_all_at(&batch.buf, at) {
            // Cut the partial record away, or nothing appended after it could be replayed.
            if let Err(cut) = segment.file.set_len(at) {
                state.broken = Some(format!("write failed ({e}) and could not be cut ({cut})"));
            }
            return Err(io(e));
        }
        segment.len += batch.buf.len() as u64;
        for pending in &batch.records {
            match pending {
                Pending::Entry {
                    group,
                    index,
                    payload_at,
                    len,
                    record,
                } => {
                    let loc = Loc {
                        seq,
                        offset: at + *payload_at as u64,
                        len: *len,
                        record: *record,
                    };
                    state.put(group, *index, loc);
                }
                Pending::Truncate { group, index } => state.cut_from(group, *index),
            }
        }
        Ok(())
    }

    fn roll_if_full(&self, state: &mut State, incoming: u64) -> Result<()> {
        let (seq, segment) = state.active()?;
        if segment.len == 0 || segment.len + incoming <= self.segment_bytes {
            return Ok(());
        }
        // A round's fsync covers only the active segment: what this one holds must be durable
        // before later appends go elsewhere.
        let file = segment.file.clone();
        self.durable(state, Some(&file))?;
        self.create_segment(state, seq + 1)?;
        self.collect(state)
    }

    /// Deletes segments no group needs, oldest first, relocating a long-lived oldest segment's
    /// live entries.
    fn collect(&self, state: &mut State) -> Result<()> {
        while let (Some((&oldest, segment)), Some(&active)) = (
            state.segments.first_key_value(),
            state.segments.keys().next_back(),
        ) {
            if oldest == active {
                break;
            }
            if segment.live == 0 {
                state.segments.remove(&oldest);
                match std::fs::remove_file(segment_path(&self.dir, oldest)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(e)),
                }
                // Each deletion is durable before the next: a crash must never keep an older
                // segment while losing a newer one whose TRUNCATE records it depends on.
                self.durable(state, None)?;
                continue;
            }
            if segment.created.elapsed() < self.relocate_after {
                break;
            }
            self.relocate(state, oldest)?;
        }
        Ok(())
    }

    /// Copies the live entries of segment `seq` to the active segment and makes them durable.
    fn relocate(&self, state: &mut State, seq: u64) -> Result<()> {
        let file = match state.segments.get(&seq) {
            Some(s) => s.file.clone(),
            None => return Ok(()),
        };
        let mut moving: Vec<(String, u64, Loc)> = state
            .groups
            .iter()
            .flat_map(|(group, entries)| {
                entries
                    .iter()
                    .filter(|(_, loc)| loc.seq == seq)
                    .map(|(index, loc)| (group.clone(), *index, *loc))
            })
            .collect();
        moving.sort_by_key(|(_, _, loc)| loc.offset);
        let mut batch = Batch::default();
        for (group, index, loc) in &moving {
            batch.entry(group, *index, |buf| {
                let start = buf.len();
                buf.resize(start + loc.len as usize, 0);
                file.read_exact_at(&mut buf[start..], loc.offset)
                    .map_err(io)
            })?;
        }
        tracing::info!(
            segment = seq,
            entries = moving.len(),
            bytes = batch.len(),
            "relocating the live entries of an old partition log segment"
        );
        self.append_locked(state, &batch, false)?;
        let active = state.active()?.1.file.clone();
        // Should this fail, the log is broken and nothing deletes the old segment.
        self.durable(state, Some(&active))?;
        if let Some(segment) = state.segments.get_mut(&seq) {
            // Every live entry now points at its copy.
            segment.live = 0;
        }
        Ok(())
    }

    /// Writes a truncation of the group's entries from `index` on, durably.
    pub(crate) fn truncate(&self, group: &str, index: u64) -> Result<()> {
        let mut batch = Batch::default();
        batch.truncate(group, index)?;
        let mut state = self.lock();
        self.append_locked(&mut state, &batch, true)?;
        let active = state.active()?.1.file.clone();
        self.durable(&mut state, Some(&active))
    }

    /// Forgets the group's entries up to and including `index` (the caller recorded the purge
    /// durably first) and deletes the segments nothing needs any more.
    pub(crate) fn purge(&self, group: &str, index: u64) -> Result<()> {
        let mut state = self.lock();
        Self::check(&state)?;
        state.cut_to(group, index);
        self.collect(&mut state)
    }

    /// The payloads of the group's entries in `start..end`, by index. The files are read after
    /// the lock is released (a deleted segment stays readable through its open handle), so a
    /// long read does not hold up every partition's appends.
    pub(crate) fn read(
        &self,
        group: &str,
        start: u64,
        end: Bound<u64>,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let wanted: Vec<(u64, Loc, Arc<File>)> = {
            let state = self.lock();
            let Some(entries) = state.groups.get(group) else {
                return Ok(Vec::new());
            };
            entries
                .range((Bound::Included(start), end))
                .map(|(index, loc)| Ok((*index, *loc, Self::file_of(&state, *loc)?)))
                .collect::<Result<_>>()?
        };
        wanted
            .into_iter()
            .map(|(index, loc, file)| Ok((index, Self::payload(&file, loc)?)))
            .collect()
    }

    /// The payload of the group's last entry.
    pub(crate) fn last(&self, group: &str) -> Result<Option<Vec<u8>>> {
        let found = {
            let state = self.lock();
            match state.groups.get(group).and_then(|e| e.last_key_value()) {
                Some((_, loc)) => Some((*loc, Self::file_of(&state, *loc)?)),
                None => None,
            }
        };
        found
            .map(|(loc, file)| Self::payload(&file, loc))
            .transpose()
    }

    fn file_of(state: &State, loc: Loc) -> Result<Arc<File>> {
        state
            .segments
            .get(&loc.seq)
            .map(|s| s.file.clone())
            .ok_or_else(|| Error::Io(format!("partition log segment {} is gone", loc.seq)))
    }

    fn payload(file: &File, loc: Loc) -> Result<Vec<u8>> {
        let mut buf = vec![0; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset).map_err(io)?;
        Ok(buf)
    }

    /// Makes everything appended so far durable. Earlier segments were fsync'd when the log
    /// rolled past them.
    pub(crate) fn sync(&self) -> Result<()> {
        let file = {
            let mut state = self.lock();
            Self::check(&state)?;
            state.active()?.1.file.clone()
        };
        // Outside the lock: appends go on meanwhile (the next round covers them).
        let result = self.fsync(Some(&file));
        if let Err(e) = &result {
            self.lock().broken = Some(format!("fsync failed: {e}"));
        }
        result
    }

    /// Segment files on disk, oldest first (for tests and diagnostics).
    pub fn segments(&self) -> Vec<u64> {
        self.lock().segments.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;
    use std::time::Duration;

    use super::{Batch, SegmentLog};

    const KEEP: Duration = Duration::from_secs(3600);

    fn payload(group: &str, index: u64) -> Vec<u8> {
        format!("{group}:{index}:").repeat(3).into_bytes()
    }

    fn append(log: &SegmentLog, group: &str, indexes: impl IntoIterator<Item = u64>) {
        let mut batch = Batch::default();
        for index in indexes {
            batch
                .entry(group, index, |out| {
                    out.extend_from_slice(&payload(group, index));
                    Ok(())
                })
                .expect("encode");
        }
        log.append(&batch).expect("append");
    }

    fn indexes(log: &SegmentLog, group: &str) -> Vec<u64> {
        let read = log.read(group, 0, Bound::Unbounded).expect("read");
        for (index, bytes) in &read {
            assert_eq!(*bytes, payload(group, *index), "payload of {group} {index}");
        }
        read.into_iter().map(|(index, _)| index).collect()
    }

    #[test]
    fn entries_truncations_and_purges_survive_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = SegmentLog::open(dir.path()).expect("open");
            append(&log, "p0", 1..=10);
            append(&log, "p1", 1..=3);
            log.truncate("p0", 8).expect("truncate");
            append(&log, "p0", 8..=9);
            log.purge("p1", 1).expect("purge");
            log.sync().expect("sync");
            assert_eq!(indexes(&log, "p0"), (1..=9).collect::<Vec<_>>());
            assert_eq!(indexes(&log, "p1"), vec![2, 3]);
        }
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(indexes(&log, "p0"), (1..=9).collect::<Vec<_>>());
        // Purges live in the caller's marker: the segment log replays the entry until its
        // segment goes, and the store drops it again when it opens.
        assert_eq!(indexes(&log, "p1"), vec![1, 2, 3]);
        assert_eq!(log.last("p0").expect("last"), Some(payload("p0", 9)));
        assert_eq!(log.last("p2").expect("last"), None);
        assert_eq!(
            log.read("p0", 4, Bound::Excluded(6))
                .expect("read")
                .into_iter()
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
    }

    #[test]
    fn a_torn_write_at_the_end_is_cut_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().expect("dir");
        let segment = {
            let log = SegmentLog::open(dir.path()).expect("open");
            append(&log, "p0", 1..=5);
            log.sync().expect("sync");
            super::segment_path(dir.path(), log.segments()[0])
        };
        let whole = std::fs::metadata(&segment).expect("meta").len();
        // A crash in the middle of the next write: half a record, then a record whose bytes
        // were flipped (a page written back out of order).
        let mut next = Batch::default();
        for index in 6..=7 {
            next.entry("p0", index, |out| {
                out.extend_from_slice(&payload("p0", index));
                Ok(())
            })
            .expect("encode");
        }
        let mut torn = next.buf.clone();
        torn.truncate(torn.len() - 3);
        std::fs::write(&segment, {
            let mut bytes = std::fs::read(&segment).expect("read");
            bytes.extend_from_slice(&torn);
            bytes
        })
        .expect("write");
        let Some(super::Pending::Entry { record, .. }) = next.records.first() else {
            panic!("an entry first");
        };
        let kept = whole + u64::from(*record);
        {
            let log = SegmentLog::open(dir.path()).expect("reopen after a torn write");
            // The whole first record of the torn batch is intact, so it is kept; the rest is cut
            // from the file.
            assert_eq!(indexes(&log, "p0"), (1..=6).collect::<Vec<_>>());
            assert_eq!(std::fs::metadata(&segment).expect("meta").len(), kept);
            append(&log, "p0", 7..=8);
            log.sync().expect("sync");
        }
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(indexes(&log, "p0"), (1..=8).collect::<Vec<_>>());
        assert!(std::fs::metadata(&segment).expect("meta").len() > whole);

        // A flipped byte inside the last record is cut the same way.
        let len = std::fs::metadata(&segment).expect("meta").len() as usize;
        let mut bytes = std::fs::read(&segment).expect("read");
        bytes[len - 2] ^= 0xff;
        std::fs::write(&segment, &bytes).expect("write");
        drop(log);
        let log = SegmentLog::open(dir.path()).expect("reopen after a flipped byte");
        assert_eq!(indexes(&log, "p0"), (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn a_bad_record_before_the_last_segment_is_corruption() {
        let dir = tempfile::tempdir().expect("dir");
        let first = {
            let log = SegmentLog::open_with(dir.path(), 80, KEEP).expect("open");
            for index in 1..=6 {
                append(&log, "p0", [index]);
            }
            assert!(log.segments().len() > 2, "{:?}", log.segments());
            super::segment_path(dir.path(), log.segments()[0])
        };
        let mut bytes = std::fs::read(&first).expect("read");
        bytes[12] ^= 0xff;
        std::fs::write(&first, &bytes).expect("write");
        let err = SegmentLog::open(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("not the last segment"), "{err}");
    }

    #[test]
    fn segments_go_once_no_group_needs_them_oldest_first() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open_with(dir.path(), 300, KEEP).expect("open");
        for index in 1..=20 {
            append(&log, "p0", [index]);
            append(&log, "p1", [index]);
        }
        let rolled = log.segments();
        assert!(rolled.len() > 5, "{rolled:?}");
        // p1 still needs everything: nothing goes.
        log.purge("p0", 20).expect("purge");
        assert_eq!(log.segments(), rolled);
        // Once p1 is purged past the first segments they go, and only a prefix does: the
        // segment holding p1's entry 15 and every later one stay.
        log.purge("p1", 14).expect("purge");
        let left = log.segments();
        assert!(left.len() < rolled.len(), "{left:?}");
        assert_eq!(left.last(), rolled.last());
        assert!(left.windows(2).all(|w| w[1] == w[0] + 1), "{left:?}");
        for seq in &rolled {
            let exists = super::segment_path(dir.path(), *seq).exists();
            assert_eq!(exists, left.contains(seq), "segment {seq}");
        }
        assert_eq!(indexes(&log, "p1"), (15..=20).collect::<Vec<_>>());
        drop(log);
        // Reopened, the kept segments may still hold purged entries; the store's marker drops
        // them again.
        let log = SegmentLog::open(dir.path()).expect("reopen");
        log.purge("p1", 14).expect("purge");
        assert_eq!(indexes(&log, "p1"), (15..=20).collect::<Vec<_>>());
    }

    #[test]
    fn a_truncation_outlives_the_entries_it_cut() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = SegmentLog::open_with(dir.path(), 200, KEEP).expect("open");
            append(&log, "g", 1..=5);
            append(&log, "h", 1..=3);
            log.truncate("g", 5).expect("truncate");
            append(&log, "h", 4..=6);
            let segments = log.segments();
            assert_eq!(segments.len(), 3, "g | h and the truncation | h");
            // The middle segment holds nothing live (h is purged), but g's entry 5 in the first
            // one would come back without the truncation it holds: it stays as long as the first.
            log.purge("h", 6).expect("purge");
            assert_eq!(log.segments(), segments);
            log.sync().expect("sync");
        }
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(indexes(&log, "g"), (1..=4).collect::<Vec<_>>());
        // Once g's entries are purged, every segment but the active one goes.
        log.purge("g", 4).expect("purge");
        log.purge("h", 6).expect("purge");
        assert_eq!(log.segments().len(), 1);
    }

    fn syncs(log: &SegmentLog) -> u64 {
        log.syncs.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes the `n`-th fsync from now fail.
    fn fail_sync(log: &SegmentLog, n: u64) {
        log.fail_sync_at
            .store(syncs(log) + n, std::sync::atomic::Ordering::SeqCst);
    }

    #[test]
    fn rolls_truncations_and_deletions_are_fsynced_where_acknowledgements_need_them() {
        let dir = tempfile::tempdir().expect("dir");
        // Records of "p0" here are 35 bytes: 1-3 fill the first segment, 4 and 5 roll.
        let log = SegmentLog::open_with(dir.path(), 120, KEEP).expect("open");
        append(&log, "p0", [1, 2]);
        let before = syncs(&log);
        // Appends alone are not synced (the round's `sync` is)...
        append(&log, "p0", [3]);
        assert_eq!(syncs(&log), before);
        // ...but rolling syncs the segment it leaves and the directory naming the new one.
        append(&log, "p0", [4, 5]);
        assert_eq!(log.segments().len(), 2);
        assert_eq!(syncs(&log), before + 2);
        log.truncate("p0", 5).expect("truncate");
        assert_eq!(syncs(&log), before + 3);
        // A deletion is made durable before anything else happens.
        log.purge("p0", 4).expect("purge");
        assert_eq!(log.segments().len(), 1);
        assert_eq!(syncs(&log), before + 4);
    }

    #[test]
    fn a_failed_fsync_stops_the_log_until_it_is_reopened() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = SegmentLog::open(dir.path()).expect("open");
            append(&log, "p0", 1..=3);
            log.sync().expect("sync");
            append(&log, "p0", [4]);
            fail_sync(&log, 1);
            assert!(log.sync().is_err());
            // The lost pages may now look clean: nothing more is accepted or reported durable.
            let mut batch = Batch::default();
            batch
                .entry("p0", 5, |out| {
                    out.extend_from_slice(b"x");
                    Ok(())
                })
                .expect("encode");
            let err = log.append(&batch).expect_err("broken");
            assert!(err.to_string().contains("unusable"), "{err}");
            assert!(log.sync().is_err());
            assert!(log.truncate("p0", 2).is_err());
            assert!(log.purge("p0", 1).is_err());
        }
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(indexes(&log, "p0"), (1..=4).collect::<Vec<_>>());
        append(&log, "p0", [5]);
        log.sync().expect("sync after reopening");
    }

    #[test]
    fn a_failed_fsync_while_relocating_keeps_the_old_segment() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open_with(dir.path(), 200, Duration::ZERO).expect("open");
        append(&log, "quiet", [1]);
        append(&log, "busy", [1, 2]);
        let first = log.segments()[0];
        // The next append rolls (fsync 1: the old segment, 2: the directory), then relocates
        // the first segment's live entries and fsyncs their copies (3), which fails.
        fail_sync(&log, 3);
        let mut batch = Batch::default();
        for index in 3..=5 {
            batch
                .entry("busy", index, |out| {
                    out.extend_from_slice(&payload("busy", index));
                    Ok(())
                })
                .expect("encode");
        }
        assert!(log.append(&batch).is_err());
        assert_eq!(log.segments().len(), 2, "rolled, then relocated");
        // The copies took every live byte from the first segment, but a broken log deletes
        // nothing.
        assert!(log.purge("busy", 2).is_err());
        assert!(super::segment_path(dir.path(), first).exists());
        drop(log);
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(indexes(&log, "quiet"), vec![1]);
        assert_eq!(indexes(&log, "busy"), vec![1, 2]);
    }

    #[test]
    fn a_new_log_directory_is_created_with_its_parents() {
        let dir = tempfile::tempdir().expect("dir");
        let deep = dir.path().join("a").join("b").join("segments");
        let log = SegmentLog::open(&deep).expect("open");
        append(&log, "p0", [1]);
        log.sync().expect("sync");
        drop(log);
        assert_eq!(
            indexes(&SegmentLog::open(&deep).expect("reopen"), "p0"),
            vec![1]
        );
    }

    #[test]
    fn a_quiet_groups_entries_move_forward_and_free_the_old_segments() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open_with(dir.path(), 300, Duration::ZERO).expect("open");
        // p0 writes twice and goes quiet; p1 keeps writing and purging.
        append(&log, "p0", 1..=2);
        for index in 1..=30 {
            append(&log, "p1", [index]);
            log.purge("p1", index).expect("purge");
        }
        let segments = log.segments();
        assert!(segments.len() <= 3, "old segments stayed: {segments:?}");
        assert!(segments[0] > 3, "the first segments are gone: {segments:?}");
        assert_eq!(indexes(&log, "p0"), vec![1, 2]);
        drop(log);
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(indexes(&log, "p0"), vec![1, 2]);
    }
}
