//! Where a partition's appends wait to be batched.
//!
//! Every device message is one append, and the appends of one partition are proposed together
//! (see `batch_appends`). An append joins the open batch under a short lock and waits on the
//! batch's shared outcome: no per-message channel slot, reply channel or allocation (a
//! per-message channel and reply took ~7% of a node's CPU under telemetry load, docs/adr/016).
//!
//! Each caller waits for its own append before sending the next (a device has one message in
//! flight per connection, and a connection waits for its PUBACK's append), so what waits here is
//! bounded by the number of callers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::Record;
use crate::domain::HubError;
use meridian_proto::ErrorCode;

/// The appends of one partition not yet taken into a batch.
pub(crate) struct Intake {
    state: Mutex<State>,
    /// Wakes the batcher when the intake turns non-empty.
    ready: Notify,
}

struct State {
    /// Batches not yet taken, oldest first; appends join the last one until it holds
    /// `max_records`.
    open: VecDeque<Open>,
    max_records: usize,
    /// Records in the last batch taken: a new batch's capacity, so that it rarely regrows.
    last_taken: usize,
    /// The batcher has stopped: appends are refused instead of waiting forever.
    closed: bool,
}

struct Open {
    records: Vec<Record>,
    /// The appends, in arrival order. Deadlines are taken under the lock with one timeout, so
    /// they never decrease: the appends that expired are always a prefix.
    appends: Vec<Append>,
    /// The outcome every append of this batch waits on.
    outcome: Arc<Outcome>,
}

impl Open {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            records: Vec::with_capacity(capacity),
            appends: Vec::with_capacity(capacity),
            outcome: Arc::default(),
        }
    }
}

/// One append's place in its batch.
struct Append {
    /// Index of its first record.
    start: usize,
    /// Not proposed after this.
    deadline: Instant,
    /// Told the outcome when the batch settles (None: the appender awaits its [`Ticket`]).
    watcher: Option<(Arc<dyn AppendWatcher>, u64)>,
}

/// Told how an append ended instead of awaiting it: a device connection writes its PUBACK from
/// here, in the task that settled the batch, which saves waking the connection once per message
/// (docs/adr/019). Called once per append, with the tag it was pushed with; must not block.
pub(crate) trait AppendWatcher: Send + Sync {
    fn settled(&self, tag: u64, result: Result<(), HubError>);
}

/// How one batch ended, shared by its appends.
#[derive(Default)]
struct Outcome {
    settled: OnceLock<Settled>,
    done: Notify,
}

struct Settled {
    /// Appends whose first record index is below this expired before they could be proposed.
    expired_below: usize,
    /// The outcome of the records that were proposed.
    result: Result<(), HubError>,
}

/// One append's place in a batch: await [`Ticket::outcome`].
pub(crate) struct Ticket {
    outcome: Arc<Outcome>,
    start: usize,
}

/// The appends taken from an intake at once.
pub(crate) struct Batch {
    records: Vec<Record>,
    appends: Vec<Append>,
    outcome: Arc<Outcome>,
    /// Records dropped from the front because their appends expired.
    expired_below: usize,
}

fn stopped() -> HubError {
    HubError::new(ErrorCode::ServiceUnavailable, "partition stopped")
}

fn expired() -> HubError {
    HubError::new(
        ErrorCode::ServiceUnavailable,
        "append expired before it could be proposed",
    )
}

impl Intake {
    /// An intake whose batches hold at most `max_records` records (one larger append alone).
    pub(crate) fn new(max_records: usize) -> Self {
        Self {
            state: Mutex::new(State {
                open: VecDeque::new(),
                max_records,
                last_taken: 0,
                closed: false,
            }),
            ready: Notify::new(),
        }
    }

    /// Adds one append (its records stay together and in order) that is not proposed after
    /// `timeout` from now.
    pub(crate) fn push(
        &self,
        records: impl IntoIterator<Item = Record, IntoIter: ExactSizeIterator>,
        timeout: Duration,
    ) -> Result<Ticket, HubError> {
        self.push_watched(records, timeout, None)
    }

    /// Like [`Intake::push`], and `watcher` is told the outcome with `tag` when the batch
    /// settles (the returned ticket may be dropped).
    pub(crate) fn push_watched(
        &self,
        records: impl IntoIterator<Item = Record, IntoIter: ExactSizeIterator>,
        timeout: Duration,
        watcher: Option<(Arc<dyn AppendWatcher>, u64)>,
    ) -> Result<Ticket, HubError> {
        let mut state = self.state.lock().map_err(|_| stopped())?;
        if state.closed {
            return Err(stopped());
        }
        let records = records.into_iter();
        if records.len() == 0 {
            return Err(HubError::invalid("an append needs at least one record"));
        }
        let was_empty = state.open.is_empty();
        let max = state.max_records;
        let open = match state.open.back_mut() {
            Some(open) if open.records.len() + records.len() <= max || open.records.is_empty() => {
                open
            }
            _ => {
                let capacity = records.len().max(state.last_taken).min(max);
                state.open.push_back(Open::with_capacity(capacity));
                state.open.back_mut().ok_or_else(stopped)?
            }
        };
        let start = open.records.len();
        open.records.extend(records);
        open.appends.push(Append {
            start,
            deadline: Instant::now() + timeout,
            watcher,
        });
        let ticket = Ticket {
            outcome: open.outcome.clone(),
            start,
        };
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(ticket)
    }

    /// Takes the oldest waiting batch, or None when no append waits.
    pub(crate) fn take(&self) -> Option<Batch> {
        let mut state = self.state.lock().ok()?;
        let open = state.open.pop_front()?;
        state.last_taken = open.records.len();
        drop(state);
        Some(Batch {
            records: open.records,
            appends: open.appends,
            outcome: open.outcome,
            expired_below: 0,
        })
    }

    /// Waits until there are appends and takes them.
    pub(crate) async fn next(&self) -> Batch {
        loop {
            if let Some(batch) = self.take() {
                return batch;
            }
            self.ready.notified().await;
            // Woken by the first append, the batcher would run next on that worker (Tokio's
            // LIFO slot) and take a batch of one. A yielded task is deferred until the worker
            // runs out of tasks or next polls for I/O, so the connections already scheduled
            // push theirs first and each Raft entry carries more (docs/adr/020).
            tokio::task::yield_now().await;
        }
    }

    /// Refuses further appends and fails those waiting (the batcher is gone).
    pub(crate) fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
        }
        while let Some(batch) = self.take() {
            batch.settle(Err(stopped()));
        }
    }
}

impl Ticket {
    /// The outcome of this append's records: Ok once they are committed and applied.
    pub(crate) async fn outcome(self) -> Result<(), HubError> {
        loop {
            let notified = self.outcome.done.notified();
            tokio::pin!(notified);
            // Registered before the check, so a settle in between still wakes this waiter.
            notified.as_mut().enable();
            if let Some(settled) = self.outcome.settled.get() {
                return if self.start < settled.expired_below {
                    Err(expired())
                } else {
                    settled.result.clone()
                };
            }
            notified.await;
        }
    }
}

impl Batch {
    /// Drops the appends whose deadline has passed (they are answered `expired` when the batch
    /// settles) and returns the earliest deadline of the rest, None when none is left.
    /// Called once per batch.
    pub(crate) fn drop_expired(&mut self, now: Instant) -> Option<Instant> {
        let live = self.appends.partition_point(|a| a.deadline <= now);
        self.expired_below = self
            .appends
            .get(live)
            .map_or(self.records.len(), |a| a.start);
        self.records.drain(..self.expired_below);
        self.appends.get(live).map(|a| a.deadline)
    }

    /// The records to propose (after [`Batch::drop_expired`]).
    pub(crate) fn take_records(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.records)
    }

    /// Answers every append of the batch: `result` for the proposed records, an expiry error
    /// for the dropped ones.
    pub(crate) fn settle(mut self, result: Result<(), HubError>) {
        self.settle_with(result);
    }

    fn settle_with(&mut self, result: Result<(), HubError>) {
        for append in &mut self.appends {
            if let Some((watcher, tag)) = append.watcher.take() {
                watcher.settled(
                    tag,
                    if append.start < self.expired_below {
                        Err(expired())
                    } else {
                        result.clone()
                    },
                );
            }
        }
        let settled = Settled {
            expired_below: self.expired_below,
            result,
        };
        if self.outcome.settled.set(settled).is_ok() {
            self.outcome.done.notify_waiters();
        }
    }
}

impl Drop for Batch {
    /// A batch dropped unanswered (its task was cancelled) fails its appends rather than leaving
    /// their callers waiting.
    fn drop(&mut self) {
        if self.outcome.settled.get().is_none() {
            self.settle_with(Err(stopped()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: u32, data: &'static [u8]) -> Record {
        Record {
            key,
            data: bytes::Bytes::from_static(data),
        }
    }

    #[tokio::test]
    async fn appends_of_one_batch_share_its_outcome_and_keep_their_order() {
        let intake = Intake::new(100);
        let long = Duration::from_secs(60);
        let a = intake
            .push([record(1, b"a1"), record(1, b"a2")], long)
            .expect("accepted");
        let b = intake.push([record(2, b"b1")], long).expect("accepted");
        let mut batch = intake.next().await;
        assert!(intake.take().is_none(), "the batch took everything waiting");
        let c = intake.push([record(3, b"c1")], long).expect("accepted");
        assert!(batch.drop_expired(Instant::now()).is_some());
        let records = batch.take_records();
        let data: Vec<&[u8]> = records.iter().map(|r| &r.data[..]).collect();
        assert_eq!(data, [&b"a1"[..], b"a2", b"b1"]);
        batch.settle(Err(HubError::new(
            ErrorCode::ServiceUnavailable,
            "no quorum",
        )));
        assert_eq!(a.outcome().await.expect_err("fails").message, "no quorum");
        assert_eq!(b.outcome().await.expect_err("fails").message, "no quorum");
        // The next batch has its own outcome.
        let next = intake.next().await;
        next.settle(Ok(()));
        assert!(c.outcome().await.is_ok());
    }

    #[tokio::test]
    async fn expired_appends_are_dropped_from_the_front_and_answered_expired() {
        let intake = Intake::new(100);
        let old = intake
            .push([record(1, b"old")], Duration::ZERO)
            .expect("accepted");
        let fresh = intake
            .push(
                [record(2, b"f1"), record(2, b"f2")],
                Duration::from_secs(60),
            )
            .expect("accepted");
        let mut batch = intake.next().await;
        let deadline = batch
            .drop_expired(Instant::now())
            .expect("one append is live");
        assert!(deadline > Instant::now() + Duration::from_secs(30));
        let records = batch.take_records();
        assert_eq!(records.len(), 2);
        assert_eq!(&records[0].data[..], b"f1");
        batch.settle(Ok(()));
        assert!(
            old.outcome()
                .await
                .expect_err("fails")
                .message
                .contains("expired")
        );
        assert!(fresh.outcome().await.is_ok());

        let all_old = intake
            .push([record(1, b"x")], Duration::ZERO)
            .expect("accepted");
        let mut batch = intake.next().await;
        assert_eq!(batch.drop_expired(Instant::now()), None);
        assert!(batch.take_records().is_empty());
        batch.settle(Ok(()));
        assert!(all_old.outcome().await.is_err());
    }

    #[tokio::test]
    async fn a_waiter_is_woken_when_its_batch_settles_later() {
        let intake = Arc::new(Intake::new(100));
        let ticket = intake
            .push([record(1, b"a")], Duration::from_secs(60))
            .expect("accepted");
        let waiter = tokio::spawn(ticket.outcome());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        let batch = intake.next().await;
        batch.settle(Ok(()));
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(outcome, Ok(Ok(Ok(())))));
    }

    #[tokio::test]
    async fn a_batch_holds_at_most_its_record_limit_and_a_larger_append_goes_alone() {
        let intake = Intake::new(3);
        let long = Duration::from_secs(60);
        let two = || [record(1, b"x"), record(1, b"y")];
        let first = intake.push(two(), long).expect("accepted");
        let second = intake.push(two(), long).expect("accepted");
        let big = intake
            .push(
                [
                    record(2, b"1"),
                    record(2, b"2"),
                    record(2, b"3"),
                    record(2, b"4"),
                ],
                long,
            )
            .expect("accepted");
        let lens: Vec<usize> = std::iter::from_fn(|| intake.take())
            .map(|mut b| {
                let n = b.take_records().len();
                b.settle(Ok(()));
                n
            })
            .collect();
        assert_eq!(lens, [2, 2, 4]);
        for ticket in [first, second, big] {
            assert!(ticket.outcome().await.is_ok());
        }
    }

    #[tokio::test]
    async fn a_dropped_batch_or_a_closed_intake_fails_its_appends() {
        let intake = Intake::new(100);
        let long = Duration::from_secs(60);
        let dropped = intake.push([record(1, b"a")], long).expect("accepted");
        drop(intake.next().await);
        // Bounded: a batch that failed to answer would leave the waiter hanging.
        let answer = |t: Ticket| tokio::time::timeout(Duration::from_secs(5), t.outcome());
        assert!(matches!(answer(dropped).await, Ok(Err(_))));
        assert!(intake.push(Vec::new(), long).is_err());
        let waiting = intake.push([record(1, b"b")], long).expect("accepted");
        intake.close();
        assert!(matches!(answer(waiting).await, Ok(Err(_))));
        assert!(intake.push([record(1, b"c")], long).is_err());
    }

    /// Records what each watched append was told, in the order it was told.
    #[derive(Default)]
    struct Told(Mutex<Vec<(u64, Result<(), String>)>>);

    impl AppendWatcher for Told {
        fn settled(&self, tag: u64, result: Result<(), HubError>) {
            if let Ok(mut told) = self.0.lock() {
                told.push((tag, result.map_err(|e| e.message)));
            }
        }
    }

    #[tokio::test]
    async fn watchers_are_told_each_appends_outcome_in_order_when_the_batch_settles() {
        let intake = Intake::new(100);
        let told = Arc::new(Told::default());
        let watch = |tag| Some((told.clone() as Arc<dyn AppendWatcher>, tag));
        intake
            .push_watched([record(1, b"old")], Duration::ZERO, watch(1))
            .expect("accepted");
        let awaited = intake
            .push([record(2, b"a")], Duration::from_secs(60))
            .expect("accepted");
        intake
            .push_watched([record(3, b"b")], Duration::from_secs(60), watch(3))
            .expect("accepted");
        let mut batch = intake.next().await;
        assert!(batch.drop_expired(Instant::now()).is_some());
        assert_eq!(batch.take_records().len(), 2);
        assert!(
            told.0.lock().expect("lock").is_empty(),
            "told only on settle"
        );
        batch.settle(Ok(()));
        let outcomes = told.0.lock().expect("lock").clone();
        assert_eq!(outcomes.len(), 2);
        assert_eq!(outcomes[0].0, 1);
        assert!(outcomes[0].1.as_ref().is_err_and(|e| e.contains("expired")));
        assert_eq!(outcomes[1], (3, Ok(())));
        assert!(awaited.outcome().await.is_ok());

        // A batch dropped unanswered fails its watched appends too.
        intake
            .push_watched([record(1, b"c")], Duration::from_secs(60), watch(4))
            .expect("accepted");
        drop(intake.next().await);
        let last = told.0.lock().expect("lock").last().cloned();
        assert!(matches!(last, Some((4, Err(_)))));
    }

    /// On a multi-threaded runtime a task woken by another runs next on that worker (Tokio's
    /// LIFO slot), ahead of tasks already scheduled. The batcher yields once woken, so an append
    /// already on its way joins the batch instead of waiting for the next one.
    #[test]
    fn an_append_scheduled_when_the_batcher_wakes_joins_its_batch() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        let taken = runtime.block_on(async {
            tokio::spawn(async {
                let intake = Arc::new(Intake::new(100));
                let batcher = tokio::spawn({
                    let intake = intake.clone();
                    async move { intake.next().await.take_records().len() }
                });
                // The batcher runs and waits for appends.
                tokio::task::yield_now().await;
                let push = |data: &'static [u8]| {
                    let intake = intake.clone();
                    async move {
                        intake
                            .push([record(1, data)], Duration::from_secs(60))
                            .map(drop)
                    }
                };
                // Both scheduled on the one worker; the second runs first (LIFO) and wakes
                // the batcher, while the first still waits its turn.
                let first = tokio::spawn(push(b"first"));
                let second = tokio::spawn(push(b"second"));
                let taken = batcher.await.expect("batcher");
                assert!(first.await.expect("pushed").is_ok());
                assert!(second.await.expect("pushed").is_ok());
                taken
            })
            .await
            .expect("test task")
        });
        assert_eq!(taken, 2, "both appends in the batch");
    }
}
