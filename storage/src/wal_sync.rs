//! Group commit across every Raft log of the process.
//!
//! openraft hands `append` a callback to call once the entries are durable, so the append itself
//! need not wait for the disk. [`RocksLogStore::append`](crate::RocksLogStore) writes its batch
//! without sync (the entries are readable at once, as openraft requires) and queues the callback
//! here; one thread fsyncs every log with queued callbacks (a RocksDB instance's WAL, or the
//! partitions' [`SegmentLog`](crate::SegmentLog)) once and then calls them, in the order they were
//! queued. openraft 0.9's core still awaits its callback before its next
//! command, but it awaits asynchronously: no Tokio worker is parked in `fdatasync` (before, each
//! group's core blocked one per append), and one fsync round serves every group that appended
//! meanwhile.
//!
//! Under a busy stream of appends (the previous round made at least [`BUSY_ROUND_BYTES`]
//! durable) rounds start at most every [`BUSY_ROUND_INTERVAL`]: an fsync costs ~0.2 ms of CPU
//! on a virtual disk whatever it covers, and the appends that wait meanwhile join the next round
//! (fewer, larger Raft rounds too). Small appends (registry writes, a quiet hub) are never held.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rocksdb::DB;

use crate::{Result, SegmentLog};

/// A log whose unsynced writes one call makes durable.
pub(crate) trait Durable: Send + Sync {
    fn make_durable(&self) -> Result<()>;
}

impl Durable for DB {
    fn make_durable(&self) -> Result<()> {
        Ok(self.flush_wal(true)?)
    }
}

impl Durable for SegmentLog {
    fn make_durable(&self) -> Result<()> {
        self.sync()
    }
}

/// Called once the WAL holding an append is on disk (or failed to get there).
pub(crate) type Done = Box<dyn FnOnce(Result<()>) + Send>;

/// A round that made at least this many bytes durable marks a busy stream of appends.
pub(crate) const BUSY_ROUND_BYTES: usize = 4 * 1024;
/// After a busy round, the next starts no sooner than this after it started.
pub(crate) const BUSY_ROUND_INTERVAL: Duration = Duration::from_millis(1);

struct Request {
    db: Arc<dyn Durable>,
    /// Bytes the append wrote (what this round makes durable).
    bytes: usize,
    done: Done,
}

/// Calls `done` after everything written to `db` so far is fsync'd. If the sync thread cannot be
/// started, syncs on the caller's thread.
pub(crate) fn after_sync<D: Durable + 'static>(db: Arc<D>, bytes: usize, done: Done) {
    let db: Arc<dyn Durable> = db;
    static SYNCER: OnceLock<Option<Sender<Request>>> = OnceLock::new();
    let syncer = SYNCER.get_or_init(|| {
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || run(rx))
            .ok()
            .map(|_| tx)
    });
    let request = Request { db, bytes, done };
    let request = match syncer {
        Some(tx) => match tx.send(request) {
            Ok(()) => return,
            Err(e) => e.0,
        },
        None => request,
    };
    let result = request.db.make_durable();
    (request.done)(result);
}

/// How long the next round waits, given when the previous one started and whether it was busy.
fn pause_before_round(previous: Option<(Instant, bool)>) -> Option<Duration> {
    match previous {
        Some((started, true)) => BUSY_ROUND_INTERVAL.checked_sub(started.elapsed()),
        _ => None,
    }
}

fn run(rx: Receiver<Request>) {
    // When the previous round started and whether it was busy.
    let mut previous: Option<(Instant, bool)> = None;
    while let Ok(first) = rx.recv() {
        if let Some(wait) = pause_before_round(previous) {
            std::thread::sleep(wait);
        }
        let started = Instant::now();
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let bytes: usize = batch.iter().map(|r| r.bytes).sum();
        previous = Some((started, bytes >= BUSY_ROUND_BYTES));
        // One fsync per log, however many appends it holds.
        let mut synced: Vec<(*const (), std::result::Result<(), String>)> = Vec::new();
        for request in &batch {
            let db = Arc::as_ptr(&request.db) as *const ();
            if !synced.iter().any(|(d, _)| *d == db) {
                synced.push((db, request.db.make_durable().map_err(|e| e.to_string())));
            }
        }
        for Request { db, done, .. } in batch {
            // Our handle on the log goes before the callback runs: the woken Raft core may shut
            // down and its owner reopen the same path, which RocksDB refuses while any handle of
            // this process is alive.
            let db_ptr = Arc::as_ptr(&db) as *const ();
            drop(db);
            let db = db_ptr;
            let result = match synced.iter().find(|(d, _)| *d == db) {
                Some((_, Ok(()))) => Ok(()),
                Some((_, Err(e))) => Err(crate::Error::Io(format!("wal sync: {e}"))),
                None => Err(crate::Error::Io("wal sync: not attempted".into())),
            };
            done(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::{BUSY_ROUND_BYTES, BUSY_ROUND_INTERVAL};

    /// Appends `count` requests of `bytes` one after another, each after the previous is durable.
    fn sequential(db: &Arc<rocksdb::DB>, count: u32, bytes: usize) -> Duration {
        let start = Instant::now();
        for i in 0..count {
            db.put(i.to_be_bytes(), b"v").expect("put");
            let (tx, rx) = std::sync::mpsc::channel();
            super::after_sync(
                db.clone(),
                bytes,
                Box::new(move |result| {
                    let _ = tx.send(result.is_ok());
                }),
            );
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        }
        start.elapsed()
    }

    #[test]
    fn busy_rounds_are_paced_and_small_ones_are_not_held() {
        let dir = tempfile::tempdir().expect("dir");
        let db = Arc::new(rocksdb::DB::open_default(dir.path()).expect("open"));
        // Each busy round after the first waits for the interval since the previous began.
        let busy = sequential(&db, 21, BUSY_ROUND_BYTES);
        assert!(
            busy >= BUSY_ROUND_INTERVAL * 20,
            "21 busy rounds took {busy:?}"
        );
        // Small rounds are never held, and a busy round holds the next only within the interval.
        let pause = super::pause_before_round;
        assert_eq!(pause(None), None);
        assert_eq!(pause(Some((Instant::now(), false))), None);
        let held = pause(Some((Instant::now(), true))).expect("held after a busy round");
        assert!(held <= BUSY_ROUND_INTERVAL && held > BUSY_ROUND_INTERVAL / 2);
        let long_ago = Instant::now() - BUSY_ROUND_INTERVAL * 2;
        assert_eq!(pause(Some((long_ago, true))), None);
    }

    #[test]
    fn callbacks_run_after_the_sync_in_the_order_queued() {
        let dirs = [
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        ];
        let dbs: Vec<Arc<rocksdb::DB>> = dirs
            .iter()
            .map(|d| Arc::new(rocksdb::DB::open_default(d.path()).expect("open")))
            .collect();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..200u32 {
            let db = &dbs[(i % 2) as usize];
            db.put(i.to_be_bytes(), b"v").expect("put");
            let (order, tx) = (order.clone(), tx.clone());
            super::after_sync(
                db.clone(),
                1,
                Box::new(move |result| {
                    order.lock().expect("lock").push((i, result.is_ok()));
                    let _ = tx.send(());
                }),
            );
        }
        for _ in 0..200 {
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .expect("every callback runs");
        }
        let order = order.lock().expect("lock");
        assert_eq!(
            *order,
            (0..200).map(|i| (i, true)).collect::<Vec<_>>(),
            "in queue order, all synced"
        );
    }
}
