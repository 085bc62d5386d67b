//! The state machine of a telemetry partition group: applied records live in the node's
//! [`TelemetryLog`], at offsets derived from the Raft log.
//!
//! The applied position, membership, per-key next offsets and delivery cursors form a small
//! [`Applied`] marker. Applying writes records without RocksDB's WAL (the Raft log already holds
//! them durably); a *checkpoint* flushes them to a table file and only then writes the marker,
//! synced. Checkpoints happen when a snapshot is built or installed (before openraft may purge
//! the log behind it) and when the state machine is dropped. After a crash the state machine
//! resumes from the last marker and openraft re-applies the entries after it, which rewrites the
//! same records at the same offsets (offsets derive from the log alone). See docs/adr/013.
//!
//! Snapshots do not copy telemetry: a snapshot is the marker plus the address of the node that
//! built it. A replica installing it fetches the records it lacks from that node (or another
//! member) over `PartitionService.ReadRaw`, so snapshots stay small however much is retained.

// openraft's trait methods fix the error type (`StorageError`, ~224 bytes).
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{NodeId, PartitionCommand, PartitionTypeConfig};
use meridian_proto::partition::ReadRawRequest;
use meridian_proto::partition::partition_service_client::PartitionServiceClient;
use meridian_storage::{SnapshotStore, StoredSnapshot, TelemetryLog};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// What a partition has applied (ends, delivery cursors), readable outside the state machine.
pub type SharedApplied = Arc<RwLock<Applied>>;

/// What the state machine has applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// Last applied log id.
    pub last_applied: Option<LogId<NodeId>>,
    /// Last applied membership.
    pub membership: Membership,
    /// Next offset of every stream key written so far.
    pub ends: BTreeMap<u32, u64>,
    /// Outbound delivery cursors.
    pub cursors: BTreeMap<String, u64>,
    /// The last promotion epoch of another region this partition was cut back to.
    #[serde(default)]
    pub reconciled_epoch: u64,
    /// The latest epoch of an applied append (this region was primary in it).
    #[serde(default)]
    pub appended_epoch: u64,
}

/// Records of one key at consecutive offsets from the first: (key, first offset, records).
type PendingRun = (u32, u64, Vec<Bytes>);

/// Checkpoints of one partition (see [`TelemetryLog::checkpoint`]). Clones share the log index
/// of the last checkpoint (`None`: none yet), so checkpoints take turns and a snapshot built
/// earlier never moves the marker back.
#[derive(Clone)]
struct Checkpointer {
    log: TelemetryLog,
    partition: u32,
    last: Arc<Mutex<Option<u64>>>,
}

impl Checkpointer {
    /// Makes `applied` the partition's durable resume point, on a blocking thread.
    async fn run(&self, applied: Applied) -> Result<(), StorageError<NodeId>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.now(&applied))
            .await
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?
    }

    /// Flushes every record written so far, then writes `applied` as the marker.
    fn now(&self, applied: &Applied) -> Result<(), StorageError<NodeId>> {
        let index = applied.last_applied.map(|l| l.index);
        let mut last = self
            .last
            .lock()
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        if index < *last {
            return Ok(());
        }
        let marker = serde_json::to_vec(applied)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        self.log
            .checkpoint(&marker_name(self.partition), &marker)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        *last = index;
        Ok(())
    }
}

/// A snapshot's body.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotRef {
    applied: Applied,
    /// gRPC address of the node that built the snapshot (it holds the records).
    source: String,
}

/// openraft state machine of one telemetry partition.
pub struct PartitionStateMachine {
    partition: u32,
    log: TelemetryLog,
    applied: Applied,
    shared: SharedApplied,
    snapshots: SnapshotStore<PartitionTypeConfig>,
    advertise: String,
    snapshot_seq: u64,
    checkpoints: Checkpointer,
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, AnyError::error(e.to_string())),
    }
}

fn marker_name(partition: u32) -> String {
    format!("partition-sm/{partition}")
}

impl PartitionStateMachine {
    /// Opens partition `partition`'s state machine over `log`, resuming from its marker.
    pub fn open(
        partition: u32,
        log: TelemetryLog,
        snapshots: SnapshotStore<PartitionTypeConfig>,
        advertise: String,
    ) -> Result<Self, StorageError<NodeId>> {
        let applied = match log
            .marker(&marker_name(partition))
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?
        {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?,
            None => Applied::default(),
        };
        Ok(Self {
            partition,
            shared: Arc::new(RwLock::new(applied.clone())),
            checkpoints: Checkpointer {
                log: log.clone(),
                partition,
                last: Arc::new(Mutex::new(applied.last_applied.map(|l| l.index))),
            },
            log,
            applied,
            snapshots,
            advertise,
            snapshot_seq: 0,
        })
    }

    /// The applied position, shared with the node.
    pub fn shared(&self) -> SharedApplied {
        self.shared.clone()
    }

    /// Publishes the applied position to the node's readers.
    fn publish(&self) {
        if let Ok(mut shared) = self.shared.write() {
            shared.clone_from(&self.applied);
        }
    }

    /// Writes pending runs (unlogged: durable from the next checkpoint on).
    fn flush(&mut self, runs: &mut Vec<PendingRun>) -> Result<(), StorageError<NodeId>> {
        let refs: Vec<meridian_storage::Run<'_>> = runs
            .iter()
            .map(|(key, first, records)| {
                (*key, *first, records.iter().map(|r| r.as_ref()).collect())
            })
            .collect();
        self.log
            .write_applied(&refs)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        runs.clear();
        Ok(())
    }

    /// Fetches `[from, to)` of `key` from a replica that has it, trying `sources` in turn.
    async fn fetch(
        &self,
        sources: &[String],
        key: u32,
        mut from: u64,
        to: u64,
    ) -> Result<(), String> {
        let mut last_error = String::from("no source");
        for attempt in 0..20 {
            let source = &sources[attempt % sources.len().max(1)];
            let Ok(ch) = crate::raft::network::channel(source) else {
                continue;
            };
            let mut client = PartitionServiceClient::new(ch);
            loop {
                if from >= to {
                    return Ok(());
                }
                let reply = client
                    .read_raw(ReadRawRequest {
                        key,
                        from_offset: from,
                        to_offset: to,
                        max_records: 1000,
                    })
                    .await;
                match reply {
                    Ok(r) => {
                        let records = r.into_inner().records;
                        let Some(last) = records.last() else {
                            // The source dropped them already (retention): nothing to copy.
                            return Ok(());
                        };
                        let next = last.offset + 1;
                        let rows: Vec<(u32, u64, &[u8])> = records
                            .iter()
                            .map(|r| (key, r.offset, r.data.as_slice()))
                            .collect();
                        // Records only; the marker moves once the whole snapshot is in.
                        self.log
                            .write_at(&rows, &format!("partition-fetch/{}", self.partition), b"")
                            .map_err(|e| e.to_string())?;
                        from = next;
                    }
                    Err(status) => {
                        last_error = format!("{source}: {}", status.message());
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(last_error)
    }
}

/// Builds a snapshot: checkpoints what it covers, then stores it.
pub struct PartitionSnapshotBuilder {
    checkpoints: Checkpointer,
    /// The applied position the snapshot covers.
    applied: Applied,
    body: Vec<u8>,
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    snapshots: SnapshotStore<PartitionTypeConfig>,
}

impl RaftSnapshotBuilder<PartitionTypeConfig> for PartitionSnapshotBuilder {
    async fn build_snapshot(
        &mut self,
    ) -> Result<Snapshot<PartitionTypeConfig>, StorageError<NodeId>> {
        // The log behind the snapshot may be purged next, so what it covers must be on disk and
        // the marker must not point before it.
        self.checkpoints.run(self.applied.clone()).await?;
        let stored = StoredSnapshot {
            meta: self.meta.clone(),
            data: self.body.clone(),
        };
        self.snapshots.save(&stored).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(self.meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })?;
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(Cursor::new(self.body.clone())),
        })
    }
}

impl Drop for PartitionStateMachine {
    /// A clean stop (shutdown, a partition moving away) checkpoints, so a restart need not
    /// re-apply the log since the last snapshot. A failure here loses nothing: the marker stays
    /// where it was and the log is re-applied from there.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoints.now(&self.applied) {
            tracing::warn!(partition = self.partition, error = %e, "partition checkpoint at stop failed");
        }
    }
}

impl RaftStateMachine<PartitionTypeConfig> for PartitionStateMachine {
    type SnapshotBuilder = PartitionSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<bool>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<PartitionTypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // One run per entry and key: the same boundaries however openraft batches the entries
        // it applies, so a re-apply after a crash rewrites exactly the runs it wrote before.
        let mut runs: Vec<PendingRun> = Vec::new();
        let mut out = Vec::new();
        for entry in entries {
            self.applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(PartitionCommand::Append { records, epoch }) => {
                    if epoch < self.applied.reconciled_epoch {
                        out.push(false);
                        continue;
                    }
                    self.applied.appended_epoch = self.applied.appended_epoch.max(epoch);
                    let entry_runs = runs.len();
                    for r in records {
                        let next = self.applied.ends.entry(r.key).or_insert(0);
                        match runs[entry_runs..].iter_mut().find(|(k, _, _)| *k == r.key) {
                            Some((_, _, run)) => run.push(r.data),
                            None => runs.push((r.key, *next, vec![r.data])),
                        }
                        *next += 1;
                    }
                }
                EntryPayload::Normal(PartitionCommand::ShipInEpoch { epoch, .. })
                    if epoch
                        < self
                            .applied
                            .appended_epoch
                            .max(self.applied.reconciled_epoch) =>
                {
                    out.push(false);
                    continue;
                }
                EntryPayload::Normal(
                    PartitionCommand::Ship {
                        key,
                        first_offset,
                        records,
                    }
                    | PartitionCommand::ShipInEpoch {
                        key,
                        first_offset,
                        records,
                        ..
                    },
                ) => {
                    let next = self.applied.ends.entry(key).or_insert(0);
                    if first_offset > *next {
                        *next = first_offset;
                    }
                    let first_new = *next;
                    let new: Vec<Bytes> = records
                        .into_iter()
                        .skip((first_new - first_offset) as usize)
                        .map(Bytes::from)
                        .collect();
                    *next += new.len() as u64;
                    if !new.is_empty() {
                        runs.push((key, first_new, new));
                    }
                }
                EntryPayload::Normal(PartitionCommand::Truncate {
                    epoch,
                    promoted_ends,
                }) => {
                    if epoch > self.applied.reconciled_epoch {
                        // Records before the cut are written first, in order, by this batch.
                        self.flush(&mut runs)?;
                        let cuts = meridian_failover::truncation_points(
                            &self.applied.ends,
                            &promoted_ends,
                        );
                        for (key, end) in cuts {
                            let current = self.applied.ends.entry(key).or_insert(0);
                            if end < *current {
                                self.log.delete_from(key, end).map_err(|e| {
                                    io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e)
                                })?;
                                *current = end;
                            }
                        }
                        self.applied.reconciled_epoch = epoch;
                    }
                }
                EntryPayload::Normal(PartitionCommand::SetCursor { name, next }) => {
                    let cursor = self.applied.cursors.entry(name).or_insert(0);
                    // Cursors only move forward: a stale leader's late update changes nothing.
                    *cursor = (*cursor).max(next);
                }
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                }
            }
            out.push(true);
        }
        self.flush(&mut runs)?;
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        let body = serde_json::to_vec(&SnapshotRef {
            applied: self.applied.clone(),
            source: self.advertise.clone(),
        })
        .unwrap_or_default();
        let snapshot_id = match &self.applied.last_applied {
            Some(l) => format!(
                "p{}-{}-{}-{}",
                self.partition, l.leader_id, l.index, self.snapshot_seq
            ),
            None => format!("p{}--{}", self.partition, self.snapshot_seq),
        };
        PartitionSnapshotBuilder {
            checkpoints: self.checkpoints.clone(),
            applied: self.applied.clone(),
            body,
            meta: SnapshotMeta {
                last_log_id: self.applied.last_applied,
                last_membership: self.applied.membership.clone(),
                snapshot_id,
            },
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let data = snapshot.into_inner();
        let body: SnapshotRef = serde_json::from_slice(&data)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
        // The builder first, then every other member, as sources of the records.
        let mut sources = vec![body.source.clone()];
        sources.extend(
            meta.last_membership
                .membership()
                .nodes()
                .map(|(_, n)| n.addr.clone())
                .filter(|a| *a != body.source && *a != self.advertise),
        );
        for (key, end) in &body.applied.ends {
            let have = self.applied.ends.get(key).copied().unwrap_or(0);
            if have < *end {
                // Whatever lies past this replica's end (records of an earlier life that a crash
                // left behind) goes first, so the fetched runs overlap nothing.
                self.log
                    .delete_from(*key, have)
                    .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
                self.fetch(&sources, *key, have, *end)
                    .await
                    .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
            }
        }
        self.applied = body.applied;
        self.publish();
        self.checkpoints.run(self.applied.clone()).await?;
        self.snapshots
            .save(&StoredSnapshot {
                meta: meta.clone(),
                data,
            })
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
        tracing::info!(partition = self.partition, snapshot_id = %meta.snapshot_id, "installed partition snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<PartitionTypeConfig>>, StorageError<NodeId>> {
        let stored = self
            .snapshots
            .load()
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::Record;
    use openraft::{CommittedLeaderId, Entry};

    fn entry(index: u64, command: PartitionCommand) -> Entry<PartitionTypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    fn append(keys: &[u32]) -> PartitionCommand {
        append_in(0, keys)
    }

    fn append_in(epoch: u64, keys: &[u32]) -> PartitionCommand {
        PartitionCommand::Append {
            epoch,
            records: keys
                .iter()
                .map(|k| Record {
                    key: *k,
                    data: format!("r{k}").into_bytes().into(),
                })
                .collect(),
        }
    }

    struct SegmentStoreBuilder;

    impl
        openraft::testing::StoreBuilder<
            PartitionTypeConfig,
            meridian_storage::RocksLogStore<PartitionTypeConfig>,
            PartitionStateMachine,
            tempfile::TempDir,
        > for SegmentStoreBuilder
    {
        async fn build(
            &self,
        ) -> Result<
            (
                tempfile::TempDir,
                meridian_storage::RocksLogStore<PartitionTypeConfig>,
                PartitionStateMachine,
            ),
            StorageError<NodeId>,
        > {
            let fail = |e: String| StorageError::IO {
                source: openraft::StorageIOError::write(openraft::AnyError::error(e)),
            };
            let dir = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
            let log = TelemetryLog::open(&dir.path().join("t"), 1 << 30)
                .map_err(|e| fail(e.to_string()))?;
            let (store, snaps) = meridian_storage::open_groups_in_segments::<PartitionTypeConfig>(
                &dir.path().join("groups"),
                &dir.path().join("segments"),
                meridian_storage::EntryCodec::Binary,
                &["p0"],
            )
            .map_err(|e| fail(e.to_string()))?
            .pop()
            .ok_or_else(|| fail("no group".into()))?;
            let sm = PartitionStateMachine::open(0, log, snaps, "a:1".into())?;
            Ok((dir, store, sm))
        }
    }

    /// openraft's storage conformance suite against the partitions' log store (entries in the
    /// segment log, docs/adr/018) and the partition state machine.
    #[test]
    fn openraft_storage_suite_over_the_segment_log() -> Result<(), StorageError<NodeId>> {
        openraft::testing::Suite::test_all(SegmentStoreBuilder)
    }

    #[tokio::test]
    async fn offsets_follow_the_log_and_resume_after_reopen() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = TelemetryLog::open(&dir.path().join("t"), 1 << 30)?;
        {
            let (_l, snaps) = meridian_storage::open::<PartitionTypeConfig>(&dir.path().join("r"))?;
            let mut sm = PartitionStateMachine::open(2, log.clone(), snaps, "a:1".into())?;
            sm.apply([entry(1, append(&[2, 1026, 2])), entry(2, append(&[2]))])
                .await?;
            sm.apply([entry(
                3,
                PartitionCommand::SetCursor {
                    name: "webhook/w/1026".into(),
                    next: 1,
                },
            )])
            .await?;
            assert_eq!(
                sm.shared()
                    .read()
                    .map(|c| c.cursors.get("webhook/w/1026").copied())
                    .ok()
                    .flatten(),
                Some(1)
            );
        }
        let offsets: Vec<u64> = log.read(2, 0, 10)?.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![0, 1, 2]);
        assert_eq!(log.end_offset(1026)?, 1);
        let (_l, snaps) = meridian_storage::open::<PartitionTypeConfig>(&dir.path().join("r"))?;
        let mut sm = PartitionStateMachine::open(2, log.clone(), snaps, "a:1".into())?;
        let (applied, _) = sm.applied_state().await?;
        assert_eq!(applied.map(|l| l.index), Some(3));
        sm.apply([entry(4, append(&[2]))]).await?;
        assert_eq!(log.read(2, 3, 10)?[0].data, b"r2");
        // A stale cursor update never moves a cursor back.
        sm.apply([entry(
            5,
            PartitionCommand::SetCursor {
                name: "webhook/w/1026".into(),
                next: 0,
            },
        )])
        .await?;
        assert_eq!(
            sm.shared()
                .read()
                .map(|c| c.cursors.get("webhook/w/1026").copied())
                .ok()
                .flatten(),
            Some(1)
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_crash_resumes_from_the_last_checkpoint_and_reapplying_rewrites_the_same_records()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let live = dir.path().join("t");
        let log = TelemetryLog::open(&live, 1 << 30)?;
        let (_l, snaps) = meridian_storage::open::<PartitionTypeConfig>(&dir.path().join("r"))?;
        let mut sm = PartitionStateMachine::open(2, log.clone(), snaps, "a:1".into())?;
        let after_snapshot = entry(3, append(&[2, 1026]));
        sm.apply([entry(1, append(&[2, 2])), entry(2, append(&[2]))])
            .await?;
        sm.get_snapshot_builder().await.build_snapshot().await?;
        sm.apply([after_snapshot.clone()]).await?;
        assert_eq!(log.end_offset(2)?, 4);

        // kill -9 now: what is on disk is the checkpoint of the snapshot at index 2.
        let crashed = dir.path().join("crashed");
        meridian_storage::testing::crash_image(&live, &crashed)?;
        let image = TelemetryLog::open(&crashed, 1 << 30)?;
        let (_l2, snaps2) = meridian_storage::open::<PartitionTypeConfig>(&dir.path().join("r2"))?;
        let mut resumed = PartitionStateMachine::open(2, image.clone(), snaps2, "a:1".into())?;
        let (applied, _) = resumed.applied_state().await?;
        assert_eq!(applied.map(|l| l.index), Some(2));
        assert_eq!(image.end_offset(2)?, 3);
        assert_eq!(image.end_offset(1026)?, 0);
        // openraft re-applies the log after the marker: the same records at the same offsets.
        resumed.apply([after_snapshot]).await?;
        assert_eq!(image.read(2, 0, 10)?, log.read(2, 0, 10)?);
        assert_eq!(image.read(1026, 0, 10)?, log.read(1026, 0, 10)?);
        drop(sm);
        Ok(())
    }

    #[tokio::test]
    async fn shipped_records_keep_their_offsets_and_a_truncation_cuts_once() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = TelemetryLog::open(&dir.path().join("t"), u64::MAX)?;
        let (_l, snaps) = meridian_storage::open::<PartitionTypeConfig>(&dir.path().join("r"))?;
        let mut sm = PartitionStateMachine::open(2, log.clone(), snaps, "a:1".into())?;
        let ship = |first: u64, n: u64| PartitionCommand::Ship {
            key: 2,
            first_offset: first,
            records: (first..first + n)
                .map(|o| format!("s{o}").into_bytes())
                .collect(),
        };
        sm.apply([entry(1, ship(0, 3))]).await?;
        // An overlapping copy (a retried ship) adds only what is new.
        sm.apply([entry(2, ship(1, 4))]).await?;
        // A gap (the source's retention dropped 5..7) moves the end forward.
        sm.apply([entry(3, ship(7, 2))]).await?;
        let stored: Vec<(u64, Vec<u8>)> = log
            .read(2, 0, 100)?
            .into_iter()
            .map(|r| (r.offset, r.data))
            .collect();
        let offsets: Vec<u64> = stored.iter().map(|r| r.0).collect();
        assert_eq!(offsets, vec![0, 1, 2, 3, 4, 7, 8]);
        assert!(
            stored
                .iter()
                .all(|(o, d)| *d == format!("s{o}").into_bytes())
        );
        assert_eq!(sm.shared().read().map(|a| a.ends[&2]).ok(), Some(9));
        let cut = |epoch: u64, end: u64| PartitionCommand::Truncate {
            epoch,
            promoted_ends: BTreeMap::from([(2, end)]),
        };
        sm.apply([entry(4, cut(2, 4))]).await?;
        assert_eq!(log.end_offset(2)?, 4);
        assert_eq!(
            sm.shared()
                .read()
                .map(|a| (a.ends[&2], a.reconciled_epoch))
                .ok(),
            Some((4, 2))
        );
        // The same promotion again cuts nothing more; appends go on at the cut.
        sm.apply([entry(5, cut(2, 1)), entry(6, append_in(3, &[2]))])
            .await?;
        assert_eq!(log.end_offset(2)?, 5);
        assert_eq!(log.read(2, 4, 10)?[0].data, b"r2");
        Ok(())
    }

    /// A region cut back to a new primary's history must hold exactly that history, whatever
    /// its log held when the cut was decided (found by `chaos --regions`: a cut-off leader's
    /// append committed after healing, between the shipper's look at the ends and the cut, and
    /// the old primary kept a record at an offset the new primary used for another).
    #[tokio::test]
    async fn a_truncation_cuts_what_is_there_when_it_applies_and_stale_appends_are_discarded()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = TelemetryLog::open(&dir.path().join("t"), u64::MAX)?;
        let (_l, snaps) = meridian_storage::open::<PartitionTypeConfig>(&dir.path().join("r"))?;
        let mut sm = PartitionStateMachine::open(2, log.clone(), snaps, "a:1".into())?;
        // Primary in epoch 5: three records of key 2, one of key 1026.
        sm.apply([entry(1, append_in(5, &[2, 2, 2, 1026]))]).await?;
        // The shipper saw ends {2: 3, 1026: 1} and the new primary's (epoch 6) {2: 3}; before
        // its cut applies, a late append of epoch 5 commits.
        let promoted = BTreeMap::from([(2, 3)]);
        let late = sm.apply([entry(2, append_in(5, &[2, 1026]))]).await?;
        assert_eq!(late, vec![true]);
        sm.apply([entry(
            3,
            PartitionCommand::Truncate {
                epoch: 6,
                promoted_ends: promoted,
            },
        )])
        .await?;
        assert_eq!(log.end_offset(2)?, 3);
        assert_eq!(log.end_offset(1026)?, 0);
        let ends = sm.shared().read().map(|a| a.ends.clone()).ok();
        assert_eq!(
            ends.map(|e| (e.get(&2).copied(), e.get(&1026).copied())),
            Some((Some(3), Some(0)))
        );
        // An append proposed under epoch 5 that reaches the log after the cut is refused; one of
        // a later epoch (this region primary again) applies.
        let answers = sm
            .apply([entry(4, append_in(5, &[2])), entry(5, append_in(7, &[2]))])
            .await?;
        assert_eq!(answers, vec![false, true]);
        assert_eq!(log.end_offset(2)?, 4);
        assert_eq!(log.read(2, 3, 10)?[0].data, b"r2");
        Ok(())
    }

    /// A copy from the old primary that commits after this region, promoted meanwhile, took
    /// appends must not land behind them (found by `chaos --regions async`: devices stored out of
    /// order).
    #[tokio::test]
    async fn a_copy_of_an_older_epoch_is_discarded_once_newer_appends_applied() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let log = TelemetryLog::open(&dir.path().join("t"), u64::MAX)?;
        let (_l, snaps) = meridian_storage::open::<PartitionTypeConfig>(&dir.path().join("r"))?;
        let mut sm = PartitionStateMachine::open(2, log.clone(), snaps, "a:1".into())?;
        let ship = |epoch: u64, first: u64, n: u64| PartitionCommand::ShipInEpoch {
            epoch,
            key: 2,
            first_offset: first,
            records: (first..first + n)
                .map(|o| format!("s{o}").into_bytes())
                .collect(),
        };
        // Secondary in epoch 4: copies two records; promoted in epoch 5, takes an append; then
        // the copy it proposed in epoch 4 commits.
        sm.apply([entry(1, ship(4, 0, 2))]).await?;
        let answers = sm
            .apply([entry(2, append_in(5, &[2])), entry(3, ship(4, 2, 3))])
            .await?;
        assert_eq!(answers, vec![true, false]);
        let data: Vec<Vec<u8>> = log.read(2, 0, 10)?.into_iter().map(|r| r.data).collect();
        assert_eq!(data, vec![b"s0".to_vec(), b"s1".to_vec(), b"r2".to_vec()]);
        // Demoted and cut back to the new primary (epoch 6), it copies again.
        sm.apply([entry(
            4,
            PartitionCommand::Truncate {
                epoch: 6,
                promoted_ends: BTreeMap::from([(2, 2)]),
            },
        )])
        .await?;
        let answers = sm.apply([entry(5, ship(6, 2, 2))]).await?;
        assert_eq!(answers, vec![true]);
        let data: Vec<Vec<u8>> = log.read(2, 0, 10)?.into_iter().map(|r| r.data).collect();
        assert_eq!(
            data,
            vec![
                b"s0".to_vec(),
                b"s1".to_vec(),
                b"s2".to_vec(),
                b"s3".to_vec()
            ]
        );
        Ok(())
    }
}
