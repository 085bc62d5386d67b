//! The hub's Raft group: openraft wired to the RocksDB log store, the hub state machine and a
//! tonic transport.

pub mod network;
pub mod service;
pub mod state_machine;
pub mod transfer;

use std::io::Cursor;

use crate::domain::{HubCommand, HubError, HubResponse};

/// What the state machine answers for one log entry: the domain result, errors included (an
/// Azure-level error like 412 is a successful, deterministic outcome of consensus).
pub type ApplyResult = Result<HubResponse, HubError>;

openraft::declare_raft_types!(
    /// openraft type configuration of the hub Raft group.
    pub TypeConfig:
        D = HubCommand,
        R = ApplyResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The hub's Raft handle.
pub type HubRaft = openraft::Raft<TypeConfig>;
/// Raft node id.
pub type NodeId = u64;
/// Log store of the hub group.
pub type LogStore = meridian_storage::RocksLogStore<TypeConfig>;
