//! Group commit across every Raft log of the process.
//!
//! openraft hands `append` a callback to call once the entries are durable, so the append itself
//! need not wait for the disk. [`RocksLogStore::append`](crate::RocksLogStore) writes its batch
//! without sync (the entries are readable at once, as openraft requires) and queues the callback
//! here; one thread fsyncs the WAL of every database with queued callbacks and then calls them, in
//! the order they were queued. openraft 0.9's core still awaits its callback before its next
//! command, but it awaits asynchronously: no Tokio worker is parked in `fdatasync` (before, each
//! group's core blocked one per append), and one fsync round serves every group that appended
//! meanwhile.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};

use rocksdb::DB;

use crate::Result;

/// Called once the WAL holding an append is on disk (or failed to get there).
pub(crate) type Done = Box<dyn FnOnce(Result<()>) + Send>;

struct Request {
    db: Arc<DB>,
    done: Done,
}

/// Calls `done` after everything written to `db` so far is fsync'd. If the sync thread cannot be
/// started, syncs on the caller's thread.
pub(crate) fn after_sync(db: Arc<DB>, done: Done) {
    static SYNCER: OnceLock<Option<Sender<Request>>> = OnceLock::new();
    let syncer = SYNCER.get_or_init(|| {
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || run(rx))
            .ok()
            .map(|_| tx)
    });
    let request = Request { db, done };
    let request = match syncer {
        Some(tx) => match tx.send(request) {
            Ok(()) => return,
            Err(e) => e.0,
        },
        None => request,
    };
    let result = sync(&request.db);
    (request.done)(result);
}

fn sync(db: &DB) -> Result<()> {
    Ok(db.flush_wal(true)?)
}

fn run(rx: Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // One fsync per database, however many appends it holds.
        let mut synced: Vec<(*const DB, std::result::Result<(), String>)> = Vec::new();
        for request in &batch {
            let db = Arc::as_ptr(&request.db);
            if !synced.iter().any(|(d, _)| *d == db) {
                synced.push((db, sync(&request.db).map_err(|e| e.to_string())));
            }
        }
        for Request { db, done } in batch {
            // Our handle on the database goes before the callback runs: the woken Raft core may
            // shut down and its owner reopen the same path, which RocksDB refuses while any handle
            // of this process is alive.
            let db_ptr = Arc::as_ptr(&db);
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
