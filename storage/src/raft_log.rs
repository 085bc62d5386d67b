//! The Raft log: entries in RocksDB or, for the telemetry partitions, in the node's
//! [`SegmentLog`]; vote, committed and purge markers in RocksDB.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig,
    StorageError, Vote,
};
use rocksdb::{DB, Direction, IteratorMode, WriteBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::segment_log::{Batch, SegmentLog};
use crate::{Error, Families, Result, cf, synced};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// openraft log storage. Cheap to clone: clones share the database.
///
/// Entries are stored under their big-endian index in the group's column family, so RocksDB's
/// key order is log order; or, for the telemetry partitions ([`RocksLogStore::in_segments`]), in
/// the node's [`SegmentLog`], which writes each entry once and keeps no memtable (docs/adr/018).
/// Vote, committed and purge markers stay in the group's RocksDB metadata either way. Writes that
/// openraft must see durable (append, vote, purge marker, truncation) are fsync'd before it hears
/// they are done.
///
/// The newest entries are also kept in memory ([`TailCache`], shared by the clones): openraft
/// reads each entry back right after appending it, to apply it and to replicate it, and decoding
/// it from RocksDB cost ~5% of a node's CPU under telemetry load. Only this store and its clones
/// write the log's column family, so the cache always ends at the log's last entry.
pub struct RocksLogStore<C: RaftTypeConfig> {
    db: Arc<DB>,
    codec: EntryCodec,
    families: Arc<Families>,
    /// Where the entries are, if not in the group's column family.
    segments: Option<Arc<SegmentLog>>,
    tail: Arc<Mutex<TailCache<C::Entry>>>,
    /// When the committed log id was last written (see `save_committed`).
    committed_saved_at: Option<Instant>,
    /// Whether appends to this log are a bulk stream (telemetry) whose fsync rounds may be
    /// paced (see `wal_sync`); a registry's log is never held for it.
    bulk: bool,
    _c: PhantomData<C>,
}

/// The committed log id is written at most this often.
const SAVE_COMMITTED_EVERY: Duration = Duration::from_millis(100);

/// How log entries are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryCodec {
    /// serde_json: readable, used by the hub group.
    Json,
    /// postcard: compact and fast, used by telemetry partitions (entries carry message bodies).
    Binary,
}

impl EntryCodec {
    fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>> {
        Ok(match self {
            EntryCodec::Json => serde_json::to_vec(value)?,
            EntryCodec::Binary => postcard::to_stdvec(value)?,
        })
    }

    /// Appends the encoding of `value` to `out`.
    fn encode_into<T: Serialize>(self, value: &T, out: &mut Vec<u8>) -> Result<()> {
        match self {
            EntryCodec::Json => serde_json::to_writer(&mut *out, value)?,
            EntryCodec::Binary => *out = postcard::to_extend(value, std::mem::take(out))?,
        }
        Ok(())
    }

    fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        Ok(match self {
            EntryCodec::Json => serde_json::from_slice(bytes)?,
            EntryCodec::Binary => postcard::from_bytes(bytes)?,
        })
    }
}

impl<C: RaftTypeConfig> Clone for RocksLogStore<C> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            codec: self.codec,
            families: self.families.clone(),
            segments: self.segments.clone(),
            tail: self.tail.clone(),
            committed_saved_at: self.committed_saved_at,
            bulk: self.bulk,
            _c: PhantomData,
        }
    }
}

/// Entries, and bytes of encoded entries, a log keeps in memory at most (see [`TailCache`]). Under
/// load a partition has ~2 entries in flight, applied and replicated within milliseconds of their
/// append; a follower that lags further is served from RocksDB. Bounded twice so that a node with
/// many partitions (up to 1,024 per hub) holds at most ~64 recent entries of each, and at most
/// 1 MiB of a busy one.
const TAIL_CACHE_ENTRIES: usize = 64;
const TAIL_CACHE_BYTES: usize = 1 << 20;

/// The newest entries of a log, contiguous by index and ending at the log's last entry (appends
/// push, truncation and purges trim), at most `max_entries` of them and `max_bytes` of their
/// encoded sizes (the oldest go first).
#[derive(Debug)]
struct TailCache<E> {
    /// (index, entry, encoded bytes), oldest first.
    entries: VecDeque<(u64, E, usize)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl<E: Clone> TailCache<E> {
    fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    /// Mirrors a write of the entry at `index` into the log: after the last one it is added; over
    /// one the cache holds it replaces it (RocksDB overwrites that key and keeps the later ones;
    /// openraft truncates first, but the mirror does not rely on it); before the first it changes
    /// nothing cached; past a gap (the first append after opening, or after a purge emptied the
    /// log) it starts the cache afresh.
    fn push(&mut self, index: u64, entry: E, bytes: usize) {
        if let (Some((first, _, _)), Some((last, _, _))) =
            (self.entries.front(), self.entries.back())
        {
            let (first, last) = (*first, *last);
            if index < first {
                return;
            }
            if index <= last {
                let at = usize::try_from(index - first).unwrap_or(usize::MAX);
                if let Some(slot) = self.entries.get_mut(at) {
                    self.bytes = self.bytes - slot.2 + bytes;
                    *slot = (index, entry, bytes);
                }
                self.evict();
                return;
            }
            if last.checked_add(1) != Some(index) {
                self.clear();
            }
        }
        self.entries.push_back((index, entry, bytes));
        self.bytes += bytes;
        self.evict();
    }

    /// Drops the oldest entries until both bounds hold.
    fn evict(&mut self) {
        while self.bytes > self.max_bytes || self.entries.len() > self.max_entries {
            match self.entries.pop_front() {
                Some((_, _, b)) => self.bytes -= b,
                None => break,
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops entries at and after `index` (the log was truncated there).
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(i, _, _)| *i >= index) {
            if let Some((_, _, b)) = self.entries.pop_back() {
                self.bytes -= b;
            }
        }
    }

    /// Drops entries up to and including `index` (the log was purged to there).
    fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|(i, _, _)| *i <= index) {
            if let Some((_, _, b)) = self.entries.pop_front() {
                self.bytes -= b;
            }
        }
    }

    /// The entries in `start..end`, or `None` when the cache does not hold the whole range (the
    /// caller reads RocksDB). An unbounded range ends at the cache's last entry, the log's last.
    fn get(&self, start: u64, end: Bound<u64>) -> Option<Vec<E>> {
        let first = self.entries.front()?.0;
        let after_last = self.entries.back()?.0.saturating_add(1);
        let end = match end {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => e,
            Bound::Unbounded => after_last,
        };
        if start < first || end > after_last {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        let take = usize::try_from(end.saturating_sub(start)).ok()?;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(take)
                .map(|(_, e, _)| e.clone())
                .collect(),
        )
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| Error::CorruptLogKey(key.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

type RaftResult<C, T> = std::result::Result<T, StorageError<<C as RaftTypeConfig>::NodeId>>;

impl<C: RaftTypeConfig> RocksLogStore<C>
where
    C::Entry: Clone,
{
    pub(crate) fn new(db: Arc<DB>, codec: EntryCodec, families: Arc<Families>) -> Self {
        Self {
            db,
            codec,
            families,
            segments: None,
            tail: Arc::new(Mutex::new(TailCache::new(
                TAIL_CACHE_ENTRIES,
                TAIL_CACHE_BYTES,
            ))),
            committed_saved_at: None,
            bulk: false,
            _c: PhantomData,
        }
    }

    /// Marks this log's appends as a bulk stream (telemetry): under sustained load their fsync
    /// rounds are paced so that each covers more (see `wal_sync`). Durability is unchanged: an
    /// append is still reported durable only after the fsync that covers it.
    pub fn bulk(mut self) -> Self {
        self.bulk = true;
        self
    }

    /// Keeps this group's entries in `segments` from now on. Entries still in the group's column
    /// family (written before ADR 018) are moved there first, and entries the segment log replayed
    /// at or below the group's purge marker are dropped.
    pub(crate) fn in_segments(mut self, segments: Arc<SegmentLog>) -> Result<Self>
    where
        C::Entry: DeserializeOwned,
    {
        let group = self.families.log.clone();
        let cf = cf(&self.db, &self.families.log)?;
        let mut batch = Batch::default();
        let mut moved = None;
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (key, value) = item?;
            let index = key_index(&key)?;
            batch.entry(&group, index, |out| {
                out.extend_from_slice(&value);
                Ok(())
            })?;
            moved = Some(moved.map_or((index, index), |(first, _)| (first, index)));
        }
        if let Some((first, last)) = moved {
            // Copied and fsync'd before they leave RocksDB: a crash in between leaves both
            // copies, and the next open moves them again (same indexes, same bytes).
            segments.append(&batch)?;
            segments.sync()?;
            self.delete_range_synced(first, last.saturating_add(1))?;
            tracing::info!(
                group,
                first,
                last,
                "moved Raft log entries into the segment log"
            );
        }
        let purged: Option<LogId<C::NodeId>> = self.get_meta(KEY_LAST_PURGED)?;
        if let Some(purged) = purged {
            segments.purge(&group, purged.index)?;
        }
        self.segments = Some(segments);
        Ok(self)
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        let cf = cf(&self.db, &self.families.meta)?;
        match self.db.get_cf(cf, key)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T, sync: bool) -> Result<()> {
        let cf = cf(&self.db, &self.families.meta)?;
        let bytes = serde_json::to_vec(value)?;
        if sync {
            self.db.put_cf_opt(cf, key, bytes, &synced())?;
        } else {
            self.db.put_cf(cf, key, bytes)?;
        }
        Ok(())
    }

    /// The cache, which holds no invariant a panic elsewhere could break halfway (every method
    /// leaves it contiguous), so a poisoned lock is taken as is.
    fn tail(&self) -> std::sync::MutexGuard<'_, TailCache<C::Entry>> {
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_range(&self, start: u64, end: Bound<u64>) -> Result<Vec<C::Entry>>
    where
        C::Entry: DeserializeOwned,
    {
        if let Some(entries) = self.tail().get(start, end) {
            return Ok(entries);
        }
        self.read_range_stored(start, end)
    }

    fn read_range_stored(&self, start: u64, end: Bound<u64>) -> Result<Vec<C::Entry>>
    where
        C::Entry: DeserializeOwned,
    {
        if let Some(segments) = &self.segments {
            let mut out = Vec::new();
            for (index, bytes) in segments.read(&self.families.log, start, end)? {
                out.push(self.decode_at(index, &bytes)?);
            }
            return Ok(out);
        }
        let cf = cf(&self.db, &self.families.log)?;
        let start_key = index_key(start);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start_key, Direction::Forward))
        {
            let (key, value) = item?;
            let index = key_index(&key)?;
            let in_range = match end {
                Bound::Included(e) => index <= e,
                Bound::Excluded(e) => index < e,
                Bound::Unbounded => true,
            };
            if !in_range {
                break;
            }
            out.push(self.decode_at(index, &value)?);
        }
        Ok(out)
    }

    /// Decodes the entry stored under `index`, which must carry that index.
    fn decode_at(&self, index: u64, bytes: &[u8]) -> Result<C::Entry>
    where
        C::Entry: DeserializeOwned,
    {
        let entry: C::Entry = self.codec.decode(bytes)?;
        let entry_index = entry.get_log_id().index;
        if entry_index != index {
            return Err(Error::IndexMismatch {
                key: index,
                entry: entry_index,
            });
        }
        Ok(entry)
    }

    /// Writes entries (not synced) and adds them to the cache; returns the batch's bytes.
    fn write_entries(&self, entries: impl IntoIterator<Item = C::Entry>) -> Result<usize> {
        let mut written = Vec::new();
        let bytes = match &self.segments {
            Some(segments) => {
                let mut batch = Batch::default();
                for entry in entries {
                    let index = entry.get_log_id().index;
                    let size = batch.entry(&self.families.log, index, |out| {
                        self.codec.encode_into(&entry, out)
                    })?;
                    written.push((index, entry, size));
                }
                segments.append(&batch)?;
                batch.len()
            }
            None => {
                let cf = cf(&self.db, &self.families.log)?;
                let mut batch = WriteBatch::default();
                for entry in entries {
                    let index = entry.get_log_id().index;
                    let bytes = self.codec.encode(&entry)?;
                    let size = bytes.len();
                    batch.put_cf(cf, index_key(index), bytes);
                    written.push((index, entry, size));
                }
                let bytes = batch.size_in_bytes();
                self.db.write(batch)?;
                bytes
            }
        };
        let mut tail = self.tail();
        for (index, entry, size) in written {
            tail.push(index, entry, size);
        }
        Ok(bytes)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<C::NodeId>>>
    where
        C::Entry: DeserializeOwned,
    {
        if let Some(segments) = &self.segments {
            return match segments.last(&self.families.log)? {
                Some(bytes) => {
                    let entry: C::Entry = self.codec.decode(&bytes)?;
                    Ok(Some(entry.get_log_id().clone()))
                }
                None => Ok(None),
            };
        }
        let cf = cf(&self.db, &self.families.log)?;
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            Some(item) => {
                let (_, value) = item?;
                let entry: C::Entry = self.codec.decode(&value)?;
                Ok(Some(entry.get_log_id().clone()))
            }
            None => Ok(None),
        }
    }

    fn delete_range_synced(&self, from: u64, to_exclusive: u64) -> Result<()> {
        let cf = cf(&self.db, &self.families.log)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, index_key(from), index_key(to_exclusive));
        self.db.write_opt(batch, &synced())?;
        Ok(())
    }
}

impl<C: RaftTypeConfig> RaftLogReader<C> for RocksLogStore<C>
where
    C::Entry: Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> RaftResult<C, Vec<C::Entry>> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = range.end_bound().cloned();
        self.read_range(start, end)
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for RocksLogStore<C>
where
    C::Entry: Clone,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> RaftResult<C, LogState<C>> {
        let last_purged_log_id: Option<LogId<C::NodeId>> = self
            .get_meta(KEY_LAST_PURGED)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))?;
        let last = self
            .last_entry_log_id()
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))?;
        let last_log_id = last.or_else(|| last_purged_log_id.clone());
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> RaftResult<C, ()> {
        self.put_meta(KEY_VOTE, vote, true)
            .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> RaftResult<C, Option<Vote<C::NodeId>>> {
        self.get_meta(KEY_VOTE)
            .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId<C::NodeId>>) -> RaftResult<C, ()> {
        // Not synced, and at most every SAVE_COMMITTED_EVERY (openraft calls this on every commit,
        // and a write per commit cost ~2% of a node's CPU under telemetry load): openraft only
        // uses it to re-apply committed entries sooner after a restart (raised to the state
        // machine's last applied id first); an older value (never newer than the truth, and
        // possibly stale until the next commit after a quiet spell) only means re-applying less
        // before the leader reports the commit index again.
        if self
            .committed_saved_at
            .is_some_and(|at| at.elapsed() < SAVE_COMMITTED_EVERY)
        {
            return Ok(());
        }
        self.committed_saved_at = Some(Instant::now());
        self.put_meta(KEY_COMMITTED, &committed, false)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> RaftResult<C, Option<LogId<C::NodeId>>> {
        self.get_meta::<Option<LogId<C::NodeId>>>(KEY_COMMITTED)
            .map(Option::flatten)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> RaftResult<C, ()>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Readable now, durable once `wal_sync` has fsync'd the WAL. openraft 0.9's core awaits
        // the callback, but no Tokio worker blocks in fdatasync, and one fsync covers the appends
        // of every group queued by then.
        match self.write_entries(entries) {
            Ok(bytes) => {
                let bytes = if self.bulk { bytes } else { 0 };
                let done: crate::wal_sync::Done = Box::new(move |result| {
                    callback
                        .log_io_completed(result.map_err(|e| std::io::Error::other(e.to_string())))
                });
                match &self.segments {
                    Some(segments) => crate::wal_sync::after_sync(segments.clone(), bytes, done),
                    None => crate::wal_sync::after_sync(self.db.clone(), bytes, done),
                }
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e.into_raft(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> RaftResult<C, ()> {
        tracing::debug!(%log_id, "truncate raft log");
        self.tail().truncate(log_id.index);
        let truncated = match &self.segments {
            Some(segments) => segments.truncate(&self.families.log, log_id.index),
            None => self.delete_range_synced(log_id.index, u64::MAX),
        };
        truncated.map_err(|e| {
            // The log may still hold what the cache dropped: the cache must not claim its end.
            self.tail().clear();
            e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete)
        })
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> RaftResult<C, ()> {
        tracing::debug!(%log_id, "purge raft log");
        // The marker goes first: if we crash between the two writes, the log state still reports
        // the purge and openraft never reads the half-deleted prefix.
        self.put_meta(KEY_LAST_PURGED, &log_id, true)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))?;
        self.tail().purge(log_id.index);
        match &self.segments {
            Some(segments) => segments.purge(&self.families.log, log_id.index),
            None => self.delete_range_synced(0, log_id.index.saturating_add(1)),
        }
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;

    use openraft::storage::RaftLogStorage;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader};

    use crate::test_types::TestConfig;

    fn entry(index: u64) -> Entry<TestConfig> {
        entry_of_term(1, index, "e")
    }

    /// An entry of leader term `term` whose payload is `text` followed by the index.
    fn entry_of_term(term: u64, index: u64, text: &str) -> Entry<TestConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(format!("{text}{index}")),
        }
    }

    /// How many entries from `start` on the cache answers (None: it sends the read to RocksDB).
    fn cached_from(log: &super::RocksLogStore<TestConfig>, start: u64) -> Option<usize> {
        log.tail().get(start, Bound::Unbounded).map(|e| e.len())
    }

    /// Writes entries straight through the store (openraft's callback needs a running Raft, so
    /// this mirrors `append` without it).
    fn put(store: &super::RocksLogStore<TestConfig>, entries: &[Entry<TestConfig>]) {
        let cf = super::cf(&store.db, &store.families.log).expect("cf");
        let mut batch = rocksdb::WriteBatch::default();
        for e in entries {
            batch.put_cf(
                cf,
                super::index_key(e.log_id.index),
                store.codec.encode(e).expect("encode"),
            );
        }
        store.db.write_opt(batch, &super::synced()).expect("write");
    }

    #[tokio::test]
    async fn groups_share_one_instance_and_keep_their_logs_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let stores = crate::open_groups::<TestConfig>(
                dir.path(),
                crate::EntryCodec::Binary,
                &["p0", "p1"],
            )
            .expect("open");
            put(&stores[0].0, &(1..=5).map(entry).collect::<Vec<_>>());
            put(&stores[1].0, &(1..=2).map(entry).collect::<Vec<_>>());
            let mut p1 = stores[1].0.clone();
            p1.save_vote(&openraft::Vote::new(7, 2))
                .await
                .expect("vote");
        }
        let mut stores =
            crate::open_groups::<TestConfig>(dir.path(), crate::EntryCodec::Binary, &["p0", "p1"])
                .expect("reopen");
        let (mut p1, _) = stores.pop().expect("p1");
        let (mut p0, _) = stores.pop().expect("p0");
        let last = |s: openraft::storage::LogState<TestConfig>| s.last_log_id.map(|l| l.index);
        assert_eq!(last(p0.get_log_state().await.expect("state")), Some(5));
        assert_eq!(last(p1.get_log_state().await.expect("state")), Some(2));
        assert_eq!(p0.read_vote().await.expect("vote"), None);
        assert_eq!(
            p1.read_vote().await.expect("vote"),
            Some(openraft::Vote::new(7, 2))
        );
    }

    /// Opens groups p0 and p1 with their entries in a segment log beside the instance.
    fn open_in_segments(dir: &std::path::Path) -> Vec<super::RocksLogStore<TestConfig>> {
        crate::open_groups_in_segments::<TestConfig>(
            &dir.join("groups"),
            &dir.join("segments"),
            crate::EntryCodec::Binary,
            &["p0", "p1"],
        )
        .expect("open")
        .into_iter()
        .map(|(log, _)| log)
        .collect()
    }

    fn log_indexes(entries: &[Entry<TestConfig>]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[tokio::test]
    async fn partition_logs_in_segments_keep_entries_votes_truncations_and_purges() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut stores = open_in_segments(dir.path());
            stores[0].write_entries((1..=10).map(entry)).expect("write");
            stores[1].write_entries((1..=3).map(entry)).expect("write");
            stores[0]
                .save_vote(&openraft::Vote::new(3, 1))
                .await
                .expect("vote");
            stores[0]
                .purge(LogId::new(CommittedLeaderId::new(1, 1), 4))
                .await
                .expect("purge");
            stores[0]
                .truncate(LogId::new(CommittedLeaderId::new(1, 1), 9))
                .await
                .expect("truncate");
            stores[1]
                .write_entries([entry_of_term(2, 4, "new")])
                .expect("write");
            stores[1]
                .segments
                .as_ref()
                .expect("in segments")
                .sync()
                .expect("sync");
            // Nothing went to the instance's log column families.
            for store in &stores {
                let cf = super::cf(&store.db, &store.families.log).expect("cf");
                assert!(
                    store
                        .db
                        .iterator_cf(cf, rocksdb::IteratorMode::Start)
                        .next()
                        .is_none()
                );
            }
        }
        let mut stores = open_in_segments(dir.path());
        let state = stores[0].get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(4));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(8));
        assert_eq!(
            stores[0].read_vote().await.expect("vote"),
            Some(openraft::Vote::new(3, 1))
        );
        // Read from the segments, not the cache (empty after opening).
        assert_eq!(cached_from(&stores[0], 1), None);
        let got = stores[0].try_get_log_entries(1..).await.expect("read");
        assert_eq!(log_indexes(&got), vec![5, 6, 7, 8]);
        let got = stores[1].try_get_log_entries(1..=4).await.expect("read");
        assert_eq!(log_indexes(&got), vec![1, 2, 3, 4]);
        assert_eq!(got[3], entry_of_term(2, 4, "new"));
        assert_eq!(stores[1].read_vote().await.expect("vote"), None);
    }

    #[tokio::test]
    async fn entries_left_in_rocksdb_move_to_the_segment_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let stores = crate::open_groups::<TestConfig>(
                &dir.path().join("groups"),
                crate::EntryCodec::Binary,
                &["p0", "p1"],
            )
            .expect("open");
            put(&stores[0].0, &(1..=6).map(entry).collect::<Vec<_>>());
            let mut p0 = stores[0].0.clone();
            p0.purge(LogId::new(CommittedLeaderId::new(1, 1), 2))
                .await
                .expect("purge");
        }
        let mut stores = open_in_segments(dir.path());
        let state = stores[0].get_log_state().await.expect("state");
        assert_eq!(state.last_log_id.map(|l| l.index), Some(6));
        let got = stores[0].try_get_log_entries(0..).await.expect("read");
        assert_eq!(log_indexes(&got), vec![3, 4, 5, 6]);
        let cf = super::cf(&stores[0].db, &stores[0].families.log).expect("cf");
        assert!(
            stores[0]
                .db
                .iterator_cf(cf, rocksdb::IteratorMode::Start)
                .next()
                .is_none(),
            "moved out of RocksDB"
        );
        drop(stores);
        let mut stores = open_in_segments(dir.path());
        let got = stores[0].try_get_log_entries(0..).await.expect("read");
        assert_eq!(log_indexes(&got), vec![3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn entries_vote_and_purge_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut log, _) = crate::open::<TestConfig>(dir.path()).expect("open");
            put(&log, &(1..=10).map(entry).collect::<Vec<_>>());
            let vote = openraft::Vote::new(3, 1);
            log.save_vote(&vote).await.expect("vote");
            log.purge(LogId::new(CommittedLeaderId::new(1, 1), 4))
                .await
                .expect("purge");
            log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 9))
                .await
                .expect("truncate");
        }
        let (mut log, _) = crate::open::<TestConfig>(dir.path()).expect("reopen");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(4));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(8));
        assert_eq!(
            log.read_vote().await.expect("vote"),
            Some(openraft::Vote::new(3, 1))
        );
        let got = log.try_get_log_entries(5..=8).await.expect("read");
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            vec![5, 6, 7, 8]
        );
        assert!(
            log.try_get_log_entries(1..5)
                .await
                .expect("read")
                .is_empty()
        );
    }

    fn cached(cache: &super::TailCache<u64>, start: u64, end: Bound<u64>) -> Option<Vec<u64>> {
        cache.get(start, end)
    }

    #[test]
    fn the_tail_cache_serves_only_whole_ranges_it_holds() {
        let mut cache = super::TailCache::new(100, 1 << 20);
        assert_eq!(cached(&cache, 1, Bound::Unbounded), None);
        for i in 1..=5 {
            cache.push(i, i, 10);
        }
        assert_eq!(cached(&cache, 2, Bound::Included(4)), Some(vec![2, 3, 4]));
        assert_eq!(
            cached(&cache, 2, Bound::Excluded(6)),
            Some(vec![2, 3, 4, 5])
        );
        assert_eq!(cached(&cache, 4, Bound::Unbounded), Some(vec![4, 5]));
        assert_eq!(cached(&cache, 6, Bound::Unbounded), Some(vec![]));
        // Not held: before the first entry, or past the last (the log may hold it, not yet pushed).
        assert_eq!(cached(&cache, 0, Bound::Included(3)), None);
        assert_eq!(cached(&cache, 3, Bound::Included(6)), None);
        assert_eq!(cached(&cache, 3, Bound::Excluded(7)), None);

        cache.truncate(4);
        assert_eq!(cached(&cache, 1, Bound::Unbounded), Some(vec![1, 2, 3]));
        cache.push(4, 40, 10);
        assert_eq!(cached(&cache, 3, Bound::Unbounded), Some(vec![3, 40]));
        cache.purge(2);
        assert_eq!(cached(&cache, 2, Bound::Unbounded), None);
        assert_eq!(cached(&cache, 3, Bound::Unbounded), Some(vec![3, 40]));
        assert_eq!(cache.bytes, 20);

        // Writes over held entries replace them in place; before the first, nothing changes.
        cache.push(3, 33, 12);
        cache.push(2, 22, 10);
        assert_eq!(cached(&cache, 3, Bound::Unbounded), Some(vec![33, 40]));
        assert_eq!(cache.bytes, 22);

        // An entry that does not follow the last starts afresh (the cache stays contiguous).
        cache.push(9, 9, 10);
        assert_eq!(cached(&cache, 3, Bound::Unbounded), None);
        assert_eq!(cached(&cache, 9, Bound::Unbounded), Some(vec![9]));
        cache.purge(100);
        assert_eq!(cached(&cache, 9, Bound::Unbounded), None);
        assert_eq!(cache.bytes, 0);
    }

    #[test]
    fn the_tail_cache_keeps_the_newest_entries_within_its_count_and_bytes() {
        let mut cache = super::TailCache::new(3, 25);
        for i in 1..=5 {
            cache.push(i, i, 10);
        }
        assert_eq!(cached(&cache, 4, Bound::Unbounded), Some(vec![4, 5]));
        assert_eq!(cached(&cache, 3, Bound::Unbounded), None);
        assert_eq!(cache.bytes, 20);
        // Small entries: the count bounds it.
        for i in 6..=9 {
            cache.push(i, i, 1);
        }
        assert_eq!(cached(&cache, 7, Bound::Unbounded), Some(vec![7, 8, 9]));
        assert_eq!(cached(&cache, 6, Bound::Unbounded), None);
        assert_eq!(cache.bytes, 3);
        // One entry over the byte budget is not kept at all.
        cache.push(10, 10, 30);
        assert_eq!(cached(&cache, 10, Bound::Unbounded), None);
        assert_eq!(cache.bytes, 0);
    }

    /// Reads through the store (cache first) and straight from RocksDB, which must agree.
    async fn read_both(
        log: &mut super::RocksLogStore<TestConfig>,
        range: (Bound<u64>, Bound<u64>),
    ) -> Vec<String> {
        let payloads = |entries: Vec<Entry<TestConfig>>| {
            entries
                .into_iter()
                .map(|e| match e.payload {
                    EntryPayload::Normal(p) => format!("{}:{p}", e.log_id.index),
                    _ => String::new(),
                })
                .collect::<Vec<_>>()
        };
        let Bound::Included(start) = range.0 else {
            panic!("ranges here start included");
        };
        let stored = payloads(log.read_range_stored(start, range.1).expect("stored"));
        let read = payloads(log.try_get_log_entries(range).await.expect("read"));
        assert_eq!(read, stored, "{range:?}");
        read
    }

    #[tokio::test]
    async fn reads_through_the_tail_cache_match_the_stored_log_across_truncate_and_purge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = crate::open::<TestConfig>(dir.path()).expect("open");
        tail_cache_reads_match_the_stored_log(log).await;
    }

    #[tokio::test]
    async fn reads_through_the_tail_cache_match_the_stored_log_across_truncate_and_purge_in_segments()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open_in_segments(dir.path()).swap_remove(0);
        tail_cache_reads_match_the_stored_log(log).await;
    }

    async fn tail_cache_reads_match_the_stored_log(mut log: super::RocksLogStore<TestConfig>) {
        log.write_entries((1..=10).map(entry)).expect("append");
        let all = read_both(&mut log, (Bound::Included(1), Bound::Unbounded)).await;
        assert_eq!(all.len(), 10);
        assert_eq!(cached_from(&log, 1), Some(10));

        log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 6))
            .await
            .expect("truncate");
        assert_eq!(
            read_both(&mut log, (Bound::Included(3), Bound::Unbounded)).await,
            ["3:e3", "4:e4", "5:e5"]
        );
        log.write_entries((6..=7).map(|i| entry_of_term(2, i, "f")))
            .expect("append");
        assert_eq!(
            read_both(&mut log, (Bound::Included(5), Bound::Excluded(8))).await,
            ["5:e5", "6:f6", "7:f7"]
        );
        // Written over without a truncate first (openraft truncates, the mirror holds anyway):
        // RocksDB keeps the later entries, and so does the cache.
        log.write_entries([entry_of_term(3, 6, "g")])
            .expect("overwrite");
        assert_eq!(
            read_both(&mut log, (Bound::Included(5), Bound::Unbounded)).await,
            ["5:e5", "6:g6", "7:f7"]
        );
        assert_eq!(cached_from(&log, 5), Some(3));

        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 4))
            .await
            .expect("purge");
        assert_eq!(
            read_both(&mut log, (Bound::Included(1), Bound::Unbounded)).await,
            ["5:e5", "6:g6", "7:f7"]
        );
        // Served from the cache, not from RocksDB.
        assert_eq!(cached_from(&log, 5), Some(3));
    }

    #[test]
    fn keys_sort_in_log_order() {
        assert!(super::index_key(9) < super::index_key(10));
        assert!(super::index_key(255) < super::index_key(256));
        assert_eq!(super::key_index(&super::index_key(42)).ok(), Some(42));
        assert!(super::key_index(b"short").is_err());
    }
}
