//! The Raft log in RocksDB.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig,
    StorageError, Vote,
};
use rocksdb::{DB, Direction, IteratorMode, WriteBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Families, Result, cf, synced};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// openraft log storage over RocksDB. Cheap to clone: clones share the database.
///
/// Entries are stored as JSON under their big-endian index, so RocksDB's key order is log order.
/// Writes that openraft must see durable (append, vote, purge marker) use a synced write.
pub struct RocksLogStore<C: RaftTypeConfig> {
    db: Arc<DB>,
    codec: EntryCodec,
    families: Arc<Families>,
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
            committed_saved_at: self.committed_saved_at,
            bulk: self.bulk,
            _c: PhantomData,
        }
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

impl<C: RaftTypeConfig> RocksLogStore<C> {
    pub(crate) fn new(db: Arc<DB>, codec: EntryCodec, families: Arc<Families>) -> Self {
        Self {
            db,
            codec,
            families,
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

    fn read_range(&self, start: u64, end: Bound<u64>) -> Result<Vec<C::Entry>>
    where
        C::Entry: DeserializeOwned,
    {
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
            let entry: C::Entry = self.codec.decode(&value)?;
            let entry_index = entry.get_log_id().index;
            if entry_index != index {
                return Err(Error::IndexMismatch {
                    key: index,
                    entry: entry_index,
                });
            }
            out.push(entry);
        }
        Ok(out)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<C::NodeId>>>
    where
        C::Entry: DeserializeOwned,
    {
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

impl<C: RaftTypeConfig> RaftLogReader<C> for RocksLogStore<C> {
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

impl<C: RaftTypeConfig> RaftLogStorage<C> for RocksLogStore<C> {
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
        let write = || -> Result<usize> {
            let cf = cf(&self.db, &self.families.log)?;
            let mut batch = WriteBatch::default();
            for entry in entries {
                let key = index_key(entry.get_log_id().index);
                batch.put_cf(cf, key, self.codec.encode(&entry)?);
            }
            // Readable now, durable once `wal_sync` has fsync'd the WAL. openraft 0.9's core awaits
            // the callback, but no Tokio worker blocks in fdatasync, and one fsync covers the
            // appends of every group queued by then.
            let bytes = batch.size_in_bytes();
            self.db.write(batch)?;
            Ok(bytes)
        };
        match write() {
            Ok(bytes) => {
                crate::wal_sync::after_sync(
                    self.db.clone(),
                    if self.bulk { bytes } else { 0 },
                    Box::new(move |result| {
                        callback.log_io_completed(
                            result.map_err(|e| std::io::Error::other(e.to_string())),
                        )
                    }),
                );
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
        self.delete_range_synced(log_id.index, u64::MAX)
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> RaftResult<C, ()> {
        tracing::debug!(%log_id, "purge raft log");
        // The marker goes first: if we crash between the two writes, the log state still reports
        // the purge and openraft never reads the half-deleted prefix.
        self.put_meta(KEY_LAST_PURGED, &log_id, true)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))?;
        self.delete_range_synced(0, log_id.index.saturating_add(1))
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorage;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader};

    use crate::test_types::TestConfig;

    fn entry(index: u64) -> Entry<TestConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(format!("e{index}")),
        }
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

    #[test]
    fn keys_sort_in_log_order() {
        assert!(super::index_key(9) < super::index_key(10));
        assert!(super::index_key(255) < super::index_key(256));
        assert_eq!(super::key_index(&super::index_key(42)).ok(), Some(42));
        assert!(super::key_index(b"short").is_err());
    }
}
