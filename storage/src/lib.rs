//! Meridian's durable storage. This is the only crate that links RocksDB.
//!
//! * [`RocksLogStore`]: an openraft [`RaftLogStorage`](openraft::storage::RaftLogStorage), generic
//!   over the Raft type config. Every append, vote and purge is fsync'd before openraft hears it is
//!   done, so an acknowledged write survives `kill -9` and power loss. Appends are group-committed:
//!   one thread fsyncs the WAL for every append queued by all Raft groups of the process meanwhile
//!   (`wal_sync`), and only then tells openraft they are durable.
//! * [`SegmentLog`]: the telemetry partitions' log entries, every partition of a node in one
//!   sequence of segment files: each entry written once, no memtable, no flush (docs/adr/018).
//! * [`SnapshotStore`]: keeps the latest state-machine snapshot, so a restarted node restores its
//!   state machine from the snapshot and replays only the log after it.
//!
//! * [`TelemetryLog`]: device-to-cloud partition logs in their own RocksDB instance, written by
//!   the partitions' Raft state machines as runs of records (docs/adr/013, 014).
//!
//! The Raft log and snapshots live in one RocksDB instance per node ([`open`]), in separate column
//! families; several groups can share one instance ([`open_groups`]). The crate knows nothing about the hub domain: values are opaque serde types or bytes.

mod error;
mod raft_log;
mod segment_log;
mod snapshot;
mod telemetry;
mod wal_sync;

/// Helpers for crash tests (here and in the crates above).
pub mod testing {
    use std::path::Path;

    /// Copies a database directory's files as they are now into `to`: what a process crash
    /// (kill -9) would leave on disk, to open beside the live database.
    pub fn crash_image(from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
        Ok(())
    }
}

/// The openraft type config the storage tests run with.
#[cfg(test)]
mod test_types {
    use std::io::Cursor;

    openraft::declare_raft_types!(
        pub(crate) TestConfig:
            D = String,
            R = String,
    );
}

use std::path::Path;
use std::sync::Arc;

pub use error::{Error, Result};
pub use raft_log::{EntryCodec, RocksLogStore};
pub use segment_log::SegmentLog;
pub use snapshot::{SnapshotStore, StoredSnapshot};
pub use telemetry::{Run, StoredRecord, TelemetryLog};

/// Column family of Raft log entries, keyed by big-endian log index.
const CF_RAFT_LOG: &str = "raft_log";
/// Column family of Raft metadata: vote, committed log id, last purged log id.
const CF_RAFT_META: &str = "raft_meta";
/// Column family holding the latest state-machine snapshot.
const CF_SNAPSHOT: &str = "snapshot";

/// Opens (creating if missing) the node's RocksDB instance at `path` and returns the Raft log store
/// and the snapshot store that share it.
pub fn open<C>(path: &Path) -> Result<(RocksLogStore<C>, SnapshotStore<C>)>
where
    C: openraft::RaftTypeConfig,
    C::Entry: Clone,
{
    open_with_codec(path, EntryCodec::Json)
}

/// Like [`open`], storing log entries with `codec`.
pub fn open_with_codec<C>(
    path: &Path,
    codec: EntryCodec,
) -> Result<(RocksLogStore<C>, SnapshotStore<C>)>
where
    C: openraft::RaftTypeConfig,
    C::Entry: Clone,
{
    let mut stores = open_groups(path, codec, &[""])?;
    stores
        .pop()
        .ok_or(Error::MissingColumnFamily(CF_RAFT_LOG.into()))
}

/// Opens one RocksDB instance at `path` holding the logs and snapshots of several Raft groups
/// (named by `groups`; the empty name keeps [`open`]'s column families), each in column families
/// of its own. The groups share the instance's WAL, so one fsync makes all their appends durable.
pub fn open_groups<C>(
    path: &Path,
    codec: EntryCodec,
    groups: &[&str],
) -> Result<Vec<(RocksLogStore<C>, SnapshotStore<C>)>>
where
    C: openraft::RaftTypeConfig,
    C::Entry: Clone,
{
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let families: Vec<Arc<Families>> = groups
        .iter()
        .map(|group| Arc::new(Families::of(group)))
        .collect();
    let cfs = families
        .iter()
        .flat_map(|f| [f.log.clone(), f.meta.clone(), f.snapshot.clone()])
        .map(|name| rocksdb::ColumnFamilyDescriptor::new(name, rocksdb::Options::default()));
    let db = Arc::new(rocksdb::DB::open_cf_descriptors(&opts, path, cfs)?);
    Ok(families
        .into_iter()
        .map(|f| {
            (
                RocksLogStore::new(db.clone(), codec, f.clone()),
                SnapshotStore::new(db.clone(), f),
            )
        })
        .collect())
}

/// Like [`open_groups`], but the groups' log entries go to one [`SegmentLog`] in `segments` (its
/// files written once per entry and fsync'd once per round for every group; docs/adr/018) while
/// their votes, markers and snapshots stay in the RocksDB instance at `path`. Entries an earlier
/// version left in the instance move to the segment log.
pub fn open_groups_in_segments<C>(
    path: &Path,
    segments: &Path,
    codec: EntryCodec,
    groups: &[&str],
) -> Result<Vec<(RocksLogStore<C>, SnapshotStore<C>)>>
where
    C: openraft::RaftTypeConfig,
    C::Entry: Clone + serde::de::DeserializeOwned,
{
    // RocksDB first: its LOCK keeps a second process off the data dir before the segment log's
    // replay may cut a torn tail the live process is still writing.
    let stores = open_groups(path, codec, groups)?;
    let log = SegmentLog::open(segments)?;
    stores
        .into_iter()
        .map(|(store, snapshots)| Ok((store.in_segments(log.clone())?, snapshots)))
        .collect()
}

/// The column families of one Raft group.
#[derive(Debug)]
struct Families {
    log: String,
    meta: String,
    snapshot: String,
}

impl Families {
    fn of(group: &str) -> Self {
        let name = |cf: &str| {
            if group.is_empty() {
                cf.to_string()
            } else {
                format!("{group}.{cf}")
            }
        };
        Self {
            log: name(CF_RAFT_LOG),
            meta: name(CF_RAFT_META),
            snapshot: name(CF_SNAPSHOT),
        }
    }
}

/// Write options that fsync the WAL before the write returns.
fn synced() -> rocksdb::WriteOptions {
    let mut w = rocksdb::WriteOptions::default();
    w.set_sync(true);
    w
}

/// Returns the handle of a column family that [`open`] always creates.
fn cf<'a>(db: &'a rocksdb::DB, name: &str) -> Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| Error::MissingColumnFamily(name.to_string()))
}
