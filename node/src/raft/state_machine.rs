//! The openraft state machine around [`HubState`].
//!
//! The state lives in memory and is snapshotted to RocksDB: after a restart the node loads the
//! latest snapshot and openraft re-applies the committed log after it. Readers take the lock only
//! for the length of one read; apply holds it only while applying one batch.

// openraft's trait methods fix the error type (`StorageError`, ~224 bytes); boxing it here would only
// add conversions at every boundary.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{ApplyResult, NodeId, TypeConfig};
use crate::domain::events::{HubEvent, events_after};
use crate::domain::{HubResponse, HubState};
use meridian_storage::{SnapshotStore, StoredSnapshot};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// Shared, readable view of the applied hub state.
pub type SharedState = Arc<RwLock<HubState>>;

/// The data part of a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: HubState,
}

/// [`SnapshotBody`] as written: the same JSON, borrowing the state.
#[derive(Serialize)]
struct SnapshotBodyRef<'a> {
    state: &'a HubState,
}

/// openraft state machine for the hub.
pub struct HubStateMachine {
    state: SharedState,
    events: tokio::sync::broadcast::Sender<HubEvent>,
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    snapshots: SnapshotStore<TypeConfig>,
    snapshot_seq: u64,
    /// This node's region in a geo-paired hub (None: a one-region hub).
    region: Option<String>,
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, AnyError::new(&e)),
    }
}

fn poisoned() -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::new(
            ErrorSubject::StateMachine,
            ErrorVerb::Write,
            AnyError::error("hub state lock poisoned"),
        ),
    }
}

impl HubStateMachine {
    /// Opens the state machine, restoring it from the latest snapshot if there is one.
    pub fn open(snapshots: SnapshotStore<TypeConfig>) -> Result<Self, StorageError<NodeId>> {
        Self::open_in_region(snapshots, None)
    }

    /// Opens the state machine of a node in `region` of a geo-paired hub: client commands apply
    /// only while the region is primary ([`crate::domain::region::admits`]).
    pub fn open_in_region(
        snapshots: SnapshotStore<TypeConfig>,
        region: Option<String>,
    ) -> Result<Self, StorageError<NodeId>> {
        let (events, _) = tokio::sync::broadcast::channel(4096);
        let mut sm = Self {
            state: Arc::new(RwLock::new(HubState::default())),
            events,
            last_applied: None,
            last_membership: Membership::default(),
            snapshots,
            snapshot_seq: 0,
            region,
        };
        let stored = sm
            .snapshots
            .load()
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        if let Some(stored) = stored {
            sm.restore(&stored.meta, &stored.data)?;
        }
        Ok(sm)
    }

    /// Events derived from applied commands (desired patches, C2D arrivals, identity changes).
    /// Receivers that lag lose events; they must re-read the state they care about.
    pub fn events(&self) -> tokio::sync::broadcast::Sender<HubEvent> {
        self.events.clone()
    }

    /// The shared state that readers use.
    pub fn shared_state(&self) -> SharedState {
        self.state.clone()
    }

    fn restore(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        data: &[u8],
    ) -> Result<(), StorageError<NodeId>> {
        let body: SnapshotBody = serde_json::from_slice(data).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        *self.state.write().map_err(|_| poisoned())? = body.state;
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        Ok(())
    }
}

/// Builds a snapshot from a copy of the state taken at `get_snapshot_builder` time.
pub struct HubSnapshotBuilder {
    data: Vec<u8>,
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    snapshots: SnapshotStore<TypeConfig>,
}

impl RaftSnapshotBuilder<TypeConfig> for HubSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // The builder is used once: the data moves into the snapshot rather than being copied.
        let stored = StoredSnapshot {
            meta: self.meta.clone(),
            data: std::mem::take(&mut self.data),
        };
        self.snapshots.save(&stored).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(self.meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })?;
        tracing::info!(snapshot_id = %self.meta.snapshot_id, bytes = stored.data.len(), "built snapshot");
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for HubStateMachine {
    type SnapshotBuilder = HubSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.state.write().map_err(|_| poisoned())?;
        let mut out = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            state.applied_index = entry.log_id.index;
            match entry.payload {
                EntryPayload::Blank => out.push(Ok(HubResponse::Deleted)),
                EntryPayload::Normal(command) => {
                    let watched = command.clone();
                    let result = crate::domain::region::admits(
                        &state.region,
                        self.region.as_deref(),
                        &command,
                    )
                    .and_then(|()| state.apply(command));
                    if let Ok(response) = &result {
                        for event in events_after(&state, &watched, response) {
                            // No receiver is fine (no front-end running, e.g. in storage tests).
                            let _ = self.events.send(event);
                        }
                    }
                    out.push(result);
                }
                EntryPayload::Membership(m) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    out.push(Ok(HubResponse::Deleted));
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        // Serialize under the read lock so the snapshot is exactly the state at `last_applied`.
        let data = self
            .state
            .read()
            .ok()
            .and_then(|s| {
                // Serialized from the locked state, not from a copy: a copy of a 100k-device
                // registry is hundreds of MB (applies wait on this task anyway).
                serde_json::to_vec(&SnapshotBodyRef { state: &s }).ok()
            })
            .unwrap_or_default();
        let snapshot_id = match &self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshot_seq),
            None => format!("--{}", self.snapshot_seq),
        };
        HubSnapshotBuilder {
            data,
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.last_membership.clone(),
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
        let data = snapshot.into_inner();
        self.restore(meta, &data)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.snapshots.save(&stored).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })?;
        tracing::info!(snapshot_id = %meta.snapshot_id, "installed snapshot from leader");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
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
    use openraft::StorageError;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, super::super::LogStore, HubStateMachine, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<
            (tempfile::TempDir, super::super::LogStore, HubStateMachine),
            StorageError<NodeId>,
        > {
            let dir = tempfile::tempdir()
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
            let (log, snapshots) = meridian_storage::open::<TypeConfig>(dir.path())
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
            let sm = HubStateMachine::open(snapshots)?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's storage conformance suite against the RocksDB log store and the hub state machine.
    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
        Suite::test_all(Builder)
    }

    #[tokio::test]
    async fn snapshot_survives_reopen() -> anyhow::Result<()> {
        use crate::domain::HubCommand;
        let dir = tempfile::tempdir()?;
        {
            let (_log, snapshots) = meridian_storage::open::<TypeConfig>(dir.path())?;
            let mut sm = HubStateMachine::open(snapshots)?;
            let settings = crate::domain::state::HubSettings {
                initial_members: Default::default(),
                operator_key: String::new(),
                policies: Default::default(),
                twin_limits: Default::default(),
                max_devices: 10,
                max_modules_per_device: 2,
                routing_limits: Default::default(),
                created_ms: 0,
            };
            let entry = openraft::Entry::<TypeConfig> {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
                payload: EntryPayload::Normal(HubCommand::InitHub { settings }),
            };
            sm.apply([entry]).await?;
            let mut builder = sm.get_snapshot_builder().await;
            builder.build_snapshot().await?;
        }
        let (_log, snapshots) = meridian_storage::open::<TypeConfig>(dir.path())?;
        let mut sm = HubStateMachine::open(snapshots)?;
        let (applied, _) = sm.applied_state().await?;
        assert_eq!(applied.map(|l| l.index), Some(1));
        let settings_max = sm
            .shared_state()
            .read()
            .map(|s| s.settings.as_ref().map(|s| s.max_devices))
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        assert_eq!(settings_max, Some(10));
        Ok(())
    }
}
