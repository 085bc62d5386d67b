//! The latest state-machine snapshot in RocksDB.

use std::marker::PhantomData;
use std::sync::Arc;

use openraft::{RaftTypeConfig, SnapshotMeta};
use rocksdb::DB;
use serde::{Deserialize, Serialize};

use crate::{Families, Result, cf, synced};

const KEY_CURRENT: &[u8] = b"current";

/// A snapshot as stored: openraft's metadata plus the state machine's serialized data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct StoredSnapshot<C: RaftTypeConfig> {
    /// openraft's snapshot metadata (last included log id, membership, snapshot id).
    pub meta: SnapshotMeta<C::NodeId, C::Node>,
    /// The serialized state machine.
    pub data: Vec<u8>,
}

/// Keeps the node's latest snapshot. Cheap to clone: clones share the database.
pub struct SnapshotStore<C: RaftTypeConfig> {
    db: Arc<DB>,
    families: Arc<Families>,
    _c: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for SnapshotStore<C> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            families: self.families.clone(),
            _c: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> SnapshotStore<C> {
    pub(crate) fn new(db: Arc<DB>, families: Arc<Families>) -> Self {
        Self {
            db,
            families,
            _c: PhantomData,
        }
    }

    /// Returns the latest saved snapshot, if any.
    pub fn load(&self) -> Result<Option<StoredSnapshot<C>>> {
        let cf = cf(&self.db, &self.families.snapshot)?;
        match self.db.get_cf(cf, KEY_CURRENT)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Replaces the saved snapshot; durable (fsync'd) when this returns.
    pub fn save(&self, snapshot: &StoredSnapshot<C>) -> Result<()> {
        let cf = cf(&self.db, &self.families.snapshot)?;
        let bytes = serde_json::to_vec(snapshot)?;
        self.db.put_cf_opt(cf, KEY_CURRENT, bytes, &synced())?;
        Ok(())
    }
}
