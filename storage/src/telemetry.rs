//! Telemetry partition logs: append-only, one offset sequence per partition, fsync'd with group
//! commit before an append returns.
//!
//! Appends from every connection go to one writer thread. It takes whatever is queued (up to
//! [`MAX_BATCH`] records), assigns offsets, writes one RocksDB batch with `sync = true` and only
//! then answers each caller. While one fsync runs the next batch accumulates, so throughput grows
//! with concurrency instead of paying one fsync per message.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use rocksdb::{DB, Direction, IteratorMode, WriteBatch};
use tokio::sync::oneshot;

use crate::{Error, Result, synced};

/// Most records written in one batch (one fsync).
pub const MAX_BATCH: usize = 4096;

const CF_TELEMETRY: &str = "telemetry";
/// Delivery cursors of this node's outbound endpoints (webhooks), by name.
const CF_CURSORS: &str = "cursors";

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

struct Append {
    /// (partition, record) pairs written in the same batch.
    records: Vec<(u32, Vec<u8>)>,
    reply: oneshot::Sender<std::result::Result<Vec<u64>, String>>,
}

/// The node's telemetry partitions. Cheap to clone; the writer thread stops (and the database
/// closes) when the last clone is dropped.
#[derive(Clone)]
pub struct TelemetryLog {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    tx: std::sync::Mutex<Option<std_mpsc::Sender<Append>>>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop; joining it releases its handle on the database
        // before ours goes, so the directory can be reopened right away.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.writer.lock()
            && let Some(handle) = w.take()
        {
            let _ = handle.join();
        }
    }
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
    /// Opens (creating) the telemetry database at `path` and starts its writer thread.
    /// `retention_bytes` bounds the stored telemetry: past it the oldest data files are dropped.
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
        let cfs = [
            rocksdb::ColumnFamilyDescriptor::new(CF_TELEMETRY, cf_opts),
            rocksdb::ColumnFamilyDescriptor::new(CF_CURSORS, rocksdb::Options::default()),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
        let (tx, rx) = std_mpsc::channel::<Append>();
        let writer_db = db.clone();
        let handle = std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || writer(writer_db, rx))
            .map_err(|e| Error::Io(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                tx: std::sync::Mutex::new(Some(tx)),
                writer: std::sync::Mutex::new(Some(handle)),
            }),
        })
    }

    /// Appends a record and returns its offset once it is fsync'd.
    pub async fn append(&self, partition: u32, data: Vec<u8>) -> Result<u64> {
        self.append_many(vec![(partition, data)])
            .await?
            .first()
            .copied()
            .ok_or_else(|| Error::Io("no offset for the appended record".into()))
    }

    /// Appends records to several partitions in one batch (all or none), returning their offsets
    /// once the batch is fsync'd.
    pub async fn append_many(&self, records: Vec<(u32, Vec<u8>)>) -> Result<Vec<u64>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        let tx = self
            .inner
            .tx
            .lock()
            .ok()
            .and_then(|t| t.clone())
            .ok_or_else(|| Error::Io("telemetry writer stopped".into()))?;
        tx.send(Append { records, reply })
            .map_err(|_| Error::Io("telemetry writer stopped".into()))?;
        rx.await
            .map_err(|_| Error::Io("telemetry writer stopped".into()))?
            .map_err(Error::Io)
    }

    /// Reads up to `max` records of `partition` from `from_offset` on.
    pub fn read(&self, partition: u32, from_offset: u64, max: usize) -> Result<Vec<StoredRecord>> {
        let db = &self.inner.db;
        let cf = crate::cf(db, CF_TELEMETRY)?;
        let start = key(partition, from_offset);
        let mut out = Vec::new();
        for item in db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            let Some((p, offset)) = split_key(&k) else {
                return Err(Error::CorruptLogKey(k.len()));
            };
            if p != partition || out.len() >= max {
                break;
            }
            out.push(StoredRecord {
                partition,
                offset,
                data: v.to_vec(),
            });
        }
        Ok(out)
    }

    /// Deletes every record of `partition` below `offset` (retention). A range delete: appends
    /// and reads go on while it runs, and readers of deleted offsets simply get the next record.
    pub fn delete_before(&self, partition: u32, offset: u64) -> Result<()> {
        if offset == 0 {
            return Ok(());
        }
        let cf = crate::cf(&self.inner.db, CF_TELEMETRY)?;
        self.inner
            .db
            .delete_range_cf(cf, key(partition, 0), key(partition, offset))?;
        Ok(())
    }

    /// Deletes every record of `partition` from `offset` on (a returning old primary region
    /// discards the records its successor never received).
    pub fn delete_from(&self, partition: u32, offset: u64) -> Result<()> {
        let cf = crate::cf(&self.inner.db, CF_TELEMETRY)?;
        self.inner
            .db
            .delete_range_cf(cf, key(partition, offset), key(partition, u64::MAX))?;
        Ok(())
    }

    /// A delivery cursor (the next offset to deliver), 0 when never set.
    pub fn cursor(&self, name: &str) -> Result<u64> {
        let cf = crate::cf(&self.inner.db, CF_CURSORS)?;
        Ok(self
            .inner
            .db
            .get_cf(cf, name.as_bytes())?
            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Moves a delivery cursor. Not synced: after a crash a cursor may be a little behind, which
    /// means redelivery (at least once), never loss.
    pub fn set_cursor(&self, name: &str, next: u64) -> Result<()> {
        let cf = crate::cf(&self.inner.db, CF_CURSORS)?;
        self.inner
            .db
            .put_cf(cf, name.as_bytes(), next.to_be_bytes())?;
        Ok(())
    }

    /// Writes records at offsets chosen by the caller, together with a marker value under `marker`
    /// in the same atomic batch. Used by a replicated partition's state machine, which derives
    /// offsets from the Raft log; not synced, because the Raft log already holds the records
    /// durably and RocksDB keeps unsynced batches in order, so after a crash the marker and the
    /// records it covers are either both there or both gone (and the log re-applies them).
    pub fn write_at(
        &self,
        records: &[(u32, u64, &[u8])],
        marker: &str,
        value: &[u8],
    ) -> Result<()> {
        let db = &self.inner.db;
        let cf = crate::cf(db, CF_TELEMETRY)?;
        let cursors = crate::cf(db, CF_CURSORS)?;
        let mut batch = WriteBatch::default();
        for (partition, offset, data) in records {
            batch.put_cf(cf, key(*partition, *offset), data);
        }
        batch.put_cf(cursors, marker.as_bytes(), value);
        db.write(batch)?;
        Ok(())
    }

    /// Writes records at offsets chosen by the caller, bypassing the write-ahead log: the hot
    /// path of a replicated partition's state machine. The records are readable at once and
    /// become durable at the next [`TelemetryLog::checkpoint`] (or memtable flush, or clean
    /// close); until then the Raft log holds them, and after a crash the state machine re-applies
    /// everything after its last checkpoint to the same offsets. Writing them to a second WAL
    /// cost ~10% of the node's CPU under telemetry load (docs/adr/013).
    pub fn write_applied(&self, records: &[(u32, u64, &[u8])]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let db = &self.inner.db;
        let cf = crate::cf(db, CF_TELEMETRY)?;
        let mut batch = WriteBatch::default();
        for (partition, offset, data) in records {
            batch.put_cf(cf, key(*partition, *offset), data);
        }
        let mut unlogged = rocksdb::WriteOptions::default();
        unlogged.disable_wal(true);
        db.write_opt(batch, &unlogged)?;
        Ok(())
    }

    /// Makes every record written so far durable (records written without the WAL are flushed to
    /// a table file; the WAL is fsync'd), then stores `value` under `marker`, synced. A marker
    /// therefore never covers a record that a crash could lose. Blocks for the flush: call it off
    /// the async workers.
    pub fn checkpoint(&self, marker: &str, value: &[u8]) -> Result<()> {
        let db = &self.inner.db;
        db.flush_cf(crate::cf(db, CF_TELEMETRY)?)?;
        db.flush_wal(true)?;
        let cursors = crate::cf(db, CF_CURSORS)?;
        db.put_cf_opt(cursors, marker.as_bytes(), value, &synced())?;
        Ok(())
    }

    /// A marker written by [`TelemetryLog::write_at`] or [`TelemetryLog::checkpoint`], if any.
    pub fn marker(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let cf = crate::cf(&self.inner.db, CF_CURSORS)?;
        Ok(self.inner.db.get_cf(cf, name.as_bytes())?)
    }

    /// Makes every write so far durable (fsync of the WAL).
    pub fn sync(&self) -> Result<()> {
        self.inner.db.flush_wal(true)?;
        Ok(())
    }

    /// The next offset to be written in `partition` (0 when empty).
    pub fn end_offset(&self, partition: u32) -> Result<u64> {
        last_offset(&self.inner.db, partition).map(|o| o.map_or(0, |o| o + 1))
    }
}

fn last_offset(db: &DB, partition: u32) -> Result<Option<u64>> {
    let cf = crate::cf(db, CF_TELEMETRY)?;
    let upper = key(partition, u64::MAX);
    match db
        .iterator_cf(cf, IteratorMode::From(&upper, Direction::Reverse))
        .next()
    {
        Some(item) => {
            let (k, _) = item?;
            Ok(split_key(&k)
                .filter(|(p, _)| *p == partition)
                .map(|(_, o)| o))
        }
        None => Ok(None),
    }
}

fn writer(db: Arc<DB>, rx: std_mpsc::Receiver<Append>) {
    let mut next: HashMap<u32, u64> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut batch_items = vec![first];
        while batch_items.iter().map(|a| a.records.len()).sum::<usize>() < MAX_BATCH {
            match rx.try_recv() {
                Ok(a) => batch_items.push(a),
                Err(_) => break,
            }
        }
        let result = write_batch(&db, &mut next, &batch_items);
        match result {
            Ok(offsets) => {
                for (item, offsets) in batch_items.into_iter().zip(offsets) {
                    let _ = item.reply.send(Ok(offsets));
                }
            }
            Err(e) => {
                // Offsets handed out for this batch were not written: forget them so the next
                // batch re-reads the true end of each partition.
                next.clear();
                let message = e.to_string();
                for item in batch_items {
                    let _ = item.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

fn write_batch(db: &DB, next: &mut HashMap<u32, u64>, items: &[Append]) -> Result<Vec<Vec<u64>>> {
    let cf = crate::cf(db, CF_TELEMETRY)?;
    let mut batch = WriteBatch::default();
    let mut offsets = Vec::with_capacity(items.len());
    for item in items {
        let mut item_offsets = Vec::with_capacity(item.records.len());
        for (partition, data) in &item.records {
            let offset = match next.get(partition) {
                Some(o) => *o,
                None => last_offset(db, *partition)?.map_or(0, |o| o + 1),
            };
            next.insert(*partition, offset + 1);
            batch.put_cf(cf, key(*partition, offset), data);
            item_offsets.push(offset);
        }
        offsets.push(item_offsets);
    }
    db.write_opt(batch, &synced())?;
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_are_dense_per_partition_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = TelemetryLog::open(dir.path(), 1 << 30).expect("open");
            let mut tasks = Vec::new();
            for i in 0..200u32 {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    log.append(i % 4, format!("m{i}").into_bytes()).await
                }));
            }
            for t in tasks {
                t.await.expect("join").expect("append");
            }
            assert_eq!(log.end_offset(0).expect("end"), 50);
        }
        let log = TelemetryLog::open(dir.path(), 1 << 30).expect("reopen");
        for p in 0..4 {
            let records = log.read(p, 0, 1000).expect("read");
            let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, (0..50).collect::<Vec<_>>());
        }
        assert_eq!(log.append(1, b"after".to_vec()).await.expect("append"), 50);
        assert_eq!(log.read(1, 50, 10).expect("read")[0].data, b"after");
        assert!(log.read(7, 0, 10).expect("read").is_empty());
    }

    #[test]
    fn write_at_stores_records_and_marker_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = TelemetryLog::open(dir.path(), 1 << 30).expect("open");
            assert_eq!(log.marker("m").expect("marker"), None);
            let records: [(u32, u64, &[u8]); 2] = [(3, 0, b"a"), (3, 1, b"b")];
            log.write_at(&records, "m", b"v1").expect("write");
            log.sync().expect("sync");
        }
        let log = TelemetryLog::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(
            log.marker("m").expect("marker").as_deref(),
            Some(&b"v1"[..])
        );
        assert_eq!(log.end_offset(3).expect("end"), 2);
        assert_eq!(log.read(3, 1, 10).expect("read")[0].data, b"b");
    }

    #[test]
    fn applied_records_are_durable_from_the_next_checkpoint_and_a_marker_never_runs_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join("live");
        let log = TelemetryLog::open(&live, 1 << 30).expect("open");
        log.write_applied(&[(3, 0, b"a"), (3, 1, b"b")])
            .expect("write");
        // Readable at once...
        assert_eq!(log.end_offset(3).expect("end"), 2);
        // ...but not in the WAL: a crash now loses them, and the marker with them.
        crate::testing::crash_image(&live, &dir.path().join("crash1")).expect("image");
        let image = TelemetryLog::open(&dir.path().join("crash1"), 1 << 30).expect("open");
        assert_eq!(image.end_offset(3).expect("end"), 0);
        assert_eq!(image.marker("m").expect("marker"), None);
        drop(image);

        log.checkpoint("m", b"v1").expect("checkpoint");
        log.write_applied(&[(3, 2, b"c")]).expect("write");
        crate::testing::crash_image(&live, &dir.path().join("crash2")).expect("image");
        let image = TelemetryLog::open(&dir.path().join("crash2"), 1 << 30).expect("open");
        assert_eq!(
            image.marker("m").expect("marker").as_deref(),
            Some(&b"v1"[..])
        );
        // Everything the marker covers survived; what came after it did not.
        let data: Vec<Vec<u8>> = image
            .read(3, 0, 10)
            .expect("read")
            .into_iter()
            .map(|r| r.data)
            .collect();
        assert_eq!(data, vec![b"a".to_vec(), b"b".to_vec()]);
    }
}
