//! Telemetry partition logs: one dense offset sequence per partition (stream key), written by
//! the partitions' Raft state machines at offsets derived from the Raft log.
//!
//! Records are stored in *runs*: consecutive records of one partition under the key of the
//! first one's offset (`partition` and `offset`, big-endian), the value a record count followed
//! by each record's length and bytes. A state machine writes one run per Raft entry and key, so
//! a stored record costs RocksDB a fraction of a key (memtable insert, table-file index entry)
//! instead of a whole one (docs/adr/014). Runs of one partition never overlap: entries give them
//! fixed boundaries, a cut (retention, truncation) rewrites the run it falls into, and a replica
//! installing a snapshot clears what lies past its end before fetching. Readers still skip any
//! offset they have already returned.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{DB, Direction, IteratorMode, WriteBatch};

use crate::{Error, Result, synced};

/// Records in one partition, stored as runs (see the module docs).
const CF_RUNS: &str = "telemetry_runs";
/// Where versions before ADR 014 kept one key per record; refused when not empty.
const CF_PER_RECORD: &str = "telemetry";
/// Delivery cursors of this node's outbound endpoints (webhooks), by name.
const CF_CURSORS: &str = "cursors";

/// Longest run written; longer sequences are split, which bounds a cut's rewrite.
const MAX_RUN: usize = 4096;

fn key(partition: u32, offset: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn split_key(k: &[u8]) -> Option<(u32, u64)> {
    let p: [u8; 4] = k.get(..4)?.try_into().ok()?;
    let o: [u8; 8] = k.get(4..12)?.try_into().ok()?;
    Some((u32::from_be_bytes(p), u64::from_be_bytes(o)))
}

fn encode_run(records: &[&[u8]]) -> Vec<u8> {
    let bytes: usize = records.iter().map(|r| r.len() + 4).sum();
    let mut out = Vec::with_capacity(4 + bytes);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        out.extend_from_slice(r);
    }
    out
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(Error::CorruptRun("cut short"))
}

/// The records of a stored run.
fn decode_run(value: &[u8]) -> Result<Vec<&[u8]>> {
    let count = read_u32(value, 0)? as usize;
    let mut records = Vec::with_capacity(count.min(MAX_RUN));
    let mut at = 4;
    for _ in 0..count {
        let len = read_u32(value, at)? as usize;
        at += 4;
        records.push(
            value
                .get(at..at + len)
                .ok_or(Error::CorruptRun("record cut short"))?,
        );
        at += len;
    }
    Ok(records)
}

/// Puts `records` (consecutive, from `first`) as runs of at most [`MAX_RUN`].
fn put_runs(
    batch: &mut WriteBatch,
    cf: &rocksdb::ColumnFamily,
    partition: u32,
    first: u64,
    records: &[&[u8]],
) {
    for (i, chunk) in records.chunks(MAX_RUN).enumerate() {
        let offset = first + (i * MAX_RUN) as u64;
        batch.put_cf(cf, key(partition, offset), encode_run(chunk));
    }
}

/// A run to write: partition, offset of its first record, the records.
pub type Run<'a> = (u32, u64, Vec<&'a [u8]>);

/// The node's telemetry partitions. Cheap to clone.
#[derive(Clone)]
pub struct TelemetryLog {
    db: Arc<DB>,
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Partition.
    pub partition: u32,
    /// Offset within the partition (0-based, dense).
    pub offset: u64,
    /// The record bytes as appended.
    pub data: Vec<u8>,
}

impl TelemetryLog {
    /// Opens (creating) the telemetry database at `path`. `retention_bytes` bounds the stored
    /// telemetry: past it the oldest data files are dropped.
    pub fn open(path: &Path, retention_bytes: u64) -> Result<Self> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The log is append-only with ever-increasing keys, so level compaction would only rewrite
        // data: FIFO compaction keeps flushed files as they are and drops the oldest past the
        // retention size. Bodies are small and often compact already, so no compression on the
        // ingest path; a larger write buffer means fewer flushes.
        let mut cf_opts = rocksdb::Options::default();
        cf_opts.set_compression_type(rocksdb::DBCompressionType::None);
        cf_opts.set_write_buffer_size(64 * 1024 * 1024);
        cf_opts.set_compaction_style(rocksdb::DBCompactionStyle::Fifo);
        let mut fifo = rocksdb::FifoCompactOptions::default();
        fifo.set_max_table_files_size(retention_bytes);
        cf_opts.set_fifo_compaction_options(&fifo);
        let existing = DB::list_cf(&opts, path).unwrap_or_default();
        let mut cfs = vec![
            rocksdb::ColumnFamilyDescriptor::new(CF_RUNS, cf_opts),
            rocksdb::ColumnFamilyDescriptor::new(CF_CURSORS, rocksdb::Options::default()),
        ];
        let per_record = existing.iter().any(|c| c == CF_PER_RECORD);
        if per_record {
            cfs.push(rocksdb::ColumnFamilyDescriptor::new(
                CF_PER_RECORD,
                rocksdb::Options::default(),
            ));
        }
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
        if per_record {
            let cf = crate::cf(&db, CF_PER_RECORD)?;
            if db.iterator_cf(cf, IteratorMode::Start).next().is_some() {
                return Err(Error::OldLayout(format!(
                    "{} holds telemetry in the one-key-per-record layout of earlier versions; this \
                     version stores runs of records (docs/adr/014): start from an empty data dir",
                    path.display()
                )));
            }
        }
        Ok(Self { db })
    }

    fn runs(&self) -> Result<&rocksdb::ColumnFamily> {
        crate::cf(&self.db, CF_RUNS)
    }

    /// The run of `partition` keyed at or before `offset`: (its first offset, its value).
    fn run_at_or_before(&self, partition: u32, offset: u64) -> Result<Option<(u64, Box<[u8]>)>> {
        let at = key(partition, offset);
        match self
            .db
            .iterator_cf(self.runs()?, IteratorMode::From(&at, Direction::Reverse))
            .next()
        {
            Some(item) => {
                let (k, v) = item?;
                let (p, first) = split_key(&k).ok_or(Error::CorruptLogKey(k.len()))?;
                Ok((p == partition).then_some((first, v)))
            }
            None => Ok(None),
        }
    }

    /// Reads up to `max` records of `partition` from `from_offset` on (from the next one still
    /// stored when `from_offset` was deleted).
    pub fn read(&self, partition: u32, from_offset: u64, max: usize) -> Result<Vec<StoredRecord>> {
        let start = self
            .run_at_or_before(partition, from_offset)?
            .map_or(from_offset, |(first, _)| first);
        let mut next = from_offset;
        let mut out = Vec::new();
        let begin = key(partition, start);
        for item in self
            .db
            .iterator_cf(self.runs()?, IteratorMode::From(&begin, Direction::Forward))
        {
            if out.len() >= max {
                break;
            }
            let (k, v) = item?;
            let (p, first) = split_key(&k).ok_or(Error::CorruptLogKey(k.len()))?;
            if p != partition {
                break;
            }
            for (i, data) in decode_run(&v)?.into_iter().enumerate() {
                let offset = first + i as u64;
                if offset < next {
                    continue;
                }
                if out.len() >= max {
                    break;
                }
                out.push(StoredRecord {
                    partition,
                    offset,
                    data: data.to_vec(),
                });
                next = offset + 1;
            }
        }
        Ok(out)
    }

    /// Deletes every record of `partition` below `offset` (retention). Appends and reads go on
    /// while it runs, and readers of deleted offsets simply get the next record.
    pub fn delete_before(&self, partition: u32, offset: u64) -> Result<()> {
        if offset == 0 {
            return Ok(());
        }
        let cf = self.runs()?;
        let mut batch = WriteBatch::default();
        // The run the cut falls into keeps its records from the cut on, under the cut's offset.
        if let Some((first, value)) = self.run_at_or_before(partition, offset - 1)? {
            let records = decode_run(&value)?;
            if first + records.len() as u64 > offset {
                let kept = records.get((offset - first) as usize..).unwrap_or_default();
                put_runs(&mut batch, cf, partition, offset, kept);
            }
        }
        batch.delete_range_cf(cf, key(partition, 0), key(partition, offset));
        self.db.write(batch)?;
        Ok(())
    }

    /// Deletes every record of `partition` from `offset` on (a returning old primary region
    /// discards the records its successor never received; a replica clears what lies past its
    /// end before fetching a snapshot's records).
    pub fn delete_from(&self, partition: u32, offset: u64) -> Result<()> {
        let cf = self.runs()?;
        let mut batch = WriteBatch::default();
        if offset > 0
            && let Some((first, value)) = self.run_at_or_before(partition, offset - 1)?
        {
            let records = decode_run(&value)?;
            if first + records.len() as u64 > offset {
                let kept = records.get(..(offset - first) as usize).unwrap_or_default();
                put_runs(&mut batch, cf, partition, first, kept);
            }
        }
        batch.delete_range_cf(cf, key(partition, offset), key(partition, u64::MAX));
        self.db.write(batch)?;
        Ok(())
    }

    /// A delivery cursor (the next offset to deliver), 0 when never set.
    pub fn cursor(&self, name: &str) -> Result<u64> {
        let cf = crate::cf(&self.db, CF_CURSORS)?;
        Ok(self
            .db
            .get_cf(cf, name.as_bytes())?
            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Moves a delivery cursor. Not synced: after a crash a cursor may be a little behind, which
    /// means redelivery (at least once), never loss.
    pub fn set_cursor(&self, name: &str, next: u64) -> Result<()> {
        let cf = crate::cf(&self.db, CF_CURSORS)?;
        self.db.put_cf(cf, name.as_bytes(), next.to_be_bytes())?;
        Ok(())
    }

    /// Writes records at offsets chosen by the caller (consecutive offsets of a partition become
    /// one run), together with a marker value under `marker` in the same atomic batch, through
    /// the WAL. Used for records a replica fetches while installing a snapshot.
    pub fn write_at(
        &self,
        records: &[(u32, u64, &[u8])],
        marker: &str,
        value: &[u8],
    ) -> Result<()> {
        let cf = self.runs()?;
        let cursors = crate::cf(&self.db, CF_CURSORS)?;
        let mut batch = WriteBatch::default();
        let mut rest = records;
        while let Some(&(partition, first, _)) = rest.first() {
            let len = rest
                .iter()
                .enumerate()
                .take_while(|(i, (p, o, _))| *p == partition && *o == first + *i as u64)
                .count();
            let (run, tail) = rest.split_at(len);
            let data: Vec<&[u8]> = run.iter().map(|(_, _, d)| *d).collect();
            put_runs(&mut batch, cf, partition, first, &data);
            rest = tail;
        }
        batch.put_cf(cursors, marker.as_bytes(), value);
        self.db.write(batch)?;
        Ok(())
    }

    /// Writes runs of records at offsets chosen by the caller, bypassing the write-ahead log:
    /// the hot path of a replicated partition's state machine (one run per Raft entry and key).
    /// The records are readable at once and become durable at the next
    /// [`TelemetryLog::checkpoint`] (or memtable flush, or clean close); until then the Raft log
    /// holds them, and after a crash the state machine re-applies everything after its last
    /// checkpoint, writing the same runs again (docs/adr/013).
    pub fn write_applied(&self, runs: &[Run<'_>]) -> Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        let cf = self.runs()?;
        let mut batch = WriteBatch::default();
        for (partition, first, records) in runs {
            put_runs(&mut batch, cf, *partition, *first, records);
        }
        let mut unlogged = rocksdb::WriteOptions::default();
        unlogged.disable_wal(true);
        self.db.write_opt(batch, &unlogged)?;
        Ok(())
    }

    /// Makes every record written so far durable (records written without the WAL are flushed to
    /// a table file; the WAL is fsync'd), then stores `value` under `marker`, synced. A marker
    /// therefore never covers a record that a crash could lose. Blocks for the flush: call it off
    /// the async workers.
    pub fn checkpoint(&self, marker: &str, value: &[u8]) -> Result<()> {
        self.db.flush_cf(self.runs()?)?;
        self.db.flush_wal(true)?;
        let cursors = crate::cf(&self.db, CF_CURSORS)?;
        self.db
            .put_cf_opt(cursors, marker.as_bytes(), value, &synced())?;
        Ok(())
    }

    /// A marker written by [`TelemetryLog::write_at`] or [`TelemetryLog::checkpoint`], if any.
    pub fn marker(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let cf = crate::cf(&self.db, CF_CURSORS)?;
        Ok(self.db.get_cf(cf, name.as_bytes())?)
    }

    /// Makes every write through the WAL so far durable (fsync of the WAL).
    pub fn sync(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// The next offset to be written in `partition` (0 when empty): the end of its last run.
    pub fn end_offset(&self, partition: u32) -> Result<u64> {
        match self.run_at_or_before(partition, u64::MAX)? {
            Some((first, value)) => Ok(first + u64::from(read_u32(&value, 0)?)),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(records: &[StoredRecord]) -> Vec<(u64, Vec<u8>)> {
        records.iter().map(|r| (r.offset, r.data.clone())).collect()
    }

    fn numbered(range: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|o| (o, format!("m{o}").into_bytes())).collect()
    }

    /// Writes offsets `range` of `partition` as one applied run.
    fn apply(log: &TelemetryLog, partition: u32, range: std::ops::Range<u64>) {
        let bodies = numbered(range.clone());
        let records: Vec<&[u8]> = bodies.iter().map(|(_, b)| b.as_slice()).collect();
        log.write_applied(&[(partition, range.start, records)])
            .expect("write");
    }

    #[test]
    fn runs_read_from_any_offset_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = TelemetryLog::open(dir.path(), 1 << 30).expect("open");
            assert_eq!(log.end_offset(3).expect("end"), 0);
            apply(&log, 3, 0..5);
            apply(&log, 3, 5..6);
            apply(&log, 3, 6..20);
            apply(&log, 4, 0..2);
            assert_eq!(log.end_offset(3).expect("end"), 20);
            assert_eq!(log.end_offset(4).expect("end"), 2);
            // From inside a run, across run boundaries, bounded by `max`.
            assert_eq!(data(&log.read(3, 4, 3).expect("read")), numbered(4..7));
            assert_eq!(data(&log.read(3, 7, 100).expect("read")), numbered(7..20));
            assert!(log.read(3, 20, 10).expect("read").is_empty());
            assert_eq!(data(&log.read(4, 0, 10).expect("read")), numbered(0..2));
        }
        // A clean close flushes what was written without the WAL.
        let log = TelemetryLog::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(data(&log.read(3, 0, 100).expect("read")), numbered(0..20));
        assert!(log.read(7, 0, 10).expect("read").is_empty());
    }

    #[test]
    fn cuts_inside_a_run_keep_exactly_the_records_on_their_side() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = TelemetryLog::open(dir.path(), 1 << 30).expect("open");
        apply(&log, 1, 0..10);
        apply(&log, 1, 10..20);
        apply(&log, 2, 0..5);
        // Retention: the run holding offset 13 keeps 13..20.
        log.delete_before(1, 13).expect("delete before");
        assert_eq!(data(&log.read(1, 0, 100).expect("read")), numbered(13..20));
        assert_eq!(data(&log.read(1, 15, 2).expect("read")), numbered(15..17));
        assert_eq!(log.end_offset(1).expect("end"), 20);
        // Truncation: the run holding offset 16 keeps 13..16, and the next append follows it.
        log.delete_from(1, 16).expect("delete from");
        assert_eq!(log.end_offset(1).expect("end"), 16);
        assert_eq!(data(&log.read(1, 0, 100).expect("read")), numbered(13..16));
        apply(&log, 1, 16..18);
        assert_eq!(data(&log.read(1, 14, 100).expect("read")), numbered(14..18));
        // Other partitions are untouched; cuts at run boundaries and past the end are exact too.
        assert_eq!(data(&log.read(2, 0, 100).expect("read")), numbered(0..5));
        log.delete_from(2, 5).expect("delete from");
        log.delete_before(2, 0).expect("delete before");
        assert_eq!(data(&log.read(2, 0, 100).expect("read")), numbered(0..5));
        log.delete_from(2, 0).expect("delete from");
        assert_eq!(log.end_offset(2).expect("end"), 0);
    }

    #[test]
    fn write_at_stores_records_and_marker_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = TelemetryLog::open(dir.path(), 1 << 30).expect("open");
            assert_eq!(log.marker("m").expect("marker"), None);
            // Two runs of partition 3 (a gap between them) and one of partition 4.
            let records: [(u32, u64, &[u8]); 4] =
                [(3, 0, b"a"), (3, 1, b"b"), (3, 5, b"f"), (4, 0, b"x")];
            log.write_at(&records, "m", b"v1").expect("write");
            log.sync().expect("sync");
        }
        let log = TelemetryLog::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(
            log.marker("m").expect("marker").as_deref(),
            Some(&b"v1"[..])
        );
        assert_eq!(log.end_offset(3).expect("end"), 6);
        let read: Vec<(u64, Vec<u8>)> = data(&log.read(3, 1, 10).expect("read"));
        assert_eq!(read, vec![(1, b"b".to_vec()), (5, b"f".to_vec())]);
        assert_eq!(log.read(4, 0, 10).expect("read")[0].data, b"x");
    }

    #[test]
    fn a_data_dir_with_records_in_the_per_record_layout_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        {
            let db = DB::open_cf(&opts, dir.path(), [CF_PER_RECORD, CF_CURSORS]).expect("old db");
            let cf = db.cf_handle(CF_PER_RECORD).expect("cf");
            db.put_cf(cf, key(0, 0), b"old record").expect("put");
        }
        let refused = TelemetryLog::open(dir.path(), 1 << 30);
        assert!(matches!(refused, Err(Error::OldLayout(_))));
        // An empty per-record family (nothing to lose) is fine.
        let empty = tempfile::tempdir().expect("tempdir");
        drop(DB::open_cf(&opts, empty.path(), [CF_PER_RECORD]).expect("old db"));
        assert!(TelemetryLog::open(empty.path(), 1 << 30).is_ok());
    }

    #[test]
    fn a_corrupt_run_is_an_error_not_a_panic() {
        assert!(matches!(decode_run(&[1, 0]), Err(Error::CorruptRun(_))));
        assert!(matches!(
            decode_run(&[1, 0, 0, 0, 9, 0, 0, 0, b'x']),
            Err(Error::CorruptRun(_))
        ));
        let run = encode_run(&[&b"ab"[..], &b""[..]]);
        assert_eq!(
            decode_run(&run).expect("decode"),
            vec![&b"ab"[..], &b""[..]]
        );
    }

    #[test]
    fn applied_records_are_durable_from_the_next_checkpoint_and_a_marker_never_runs_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join("live");
        let log = TelemetryLog::open(&live, 1 << 30).expect("open");
        apply(&log, 3, 0..2);
        // Readable at once...
        assert_eq!(log.end_offset(3).expect("end"), 2);
        // ...but not in the WAL: a crash now loses them, and the marker with them.
        crate::testing::crash_image(&live, &dir.path().join("crash1")).expect("image");
        let image = TelemetryLog::open(&dir.path().join("crash1"), 1 << 30).expect("open");
        assert_eq!(image.end_offset(3).expect("end"), 0);
        assert_eq!(image.marker("m").expect("marker"), None);
        drop(image);

        log.checkpoint("m", b"v1").expect("checkpoint");
        apply(&log, 3, 2..3);
        crate::testing::crash_image(&live, &dir.path().join("crash2")).expect("image");
        let image = TelemetryLog::open(&dir.path().join("crash2"), 1 << 30).expect("open");
        assert_eq!(
            image.marker("m").expect("marker").as_deref(),
            Some(&b"v1"[..])
        );
        // Everything the marker covers survived; what came after it did not.
        assert_eq!(data(&image.read(3, 0, 10).expect("read")), numbered(0..2));
    }
}
