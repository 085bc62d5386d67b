//! The latest state-machine snapshot in RocksDB.

use std::marker::PhantomData;
use std::sync::Arc;

use openraft::{RaftTypeConfig, SnapshotMeta};
use rocksdb::DB;
use serde::{Deserialize, Serialize};

use crate::{Error, Families, Result, cf, synced};

const KEY_CURRENT: &[u8] = b"current";
/// Starts a stored snapshot in the framed form: this, the metadata's JSON length (u32 LE), the
/// metadata as JSON, then the data as is. (The first form was one JSON object, in which the data
/// bytes became an array of numbers: ~3.5× their size to write, fsync and parse back. It is
/// still read; JSON never starts with this byte.)
const FRAMED: &[u8] = b"\0MS1";

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
            Some(bytes) => decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Replaces the saved snapshot; durable (fsync'd) when this returns.
    pub fn save(&self, snapshot: &StoredSnapshot<C>) -> Result<()> {
        let cf = cf(&self.db, &self.families.snapshot)?;
        self.db
            .put_cf_opt(cf, KEY_CURRENT, encode(snapshot)?, &synced())?;
        Ok(())
    }
}

fn encode<C: RaftTypeConfig>(snapshot: &StoredSnapshot<C>) -> Result<Vec<u8>> {
    let meta = serde_json::to_vec(&snapshot.meta)?;
    let meta_len =
        u32::try_from(meta.len()).map_err(|_| Error::CorruptSnapshot("metadata over 4 GiB"))?;
    let mut out = Vec::with_capacity(FRAMED.len() + 4 + meta.len() + snapshot.data.len());
    out.extend_from_slice(FRAMED);
    out.extend_from_slice(&meta_len.to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&snapshot.data);
    Ok(out)
}

fn decode<C: RaftTypeConfig>(bytes: &[u8]) -> Result<StoredSnapshot<C>> {
    let Some(rest) = bytes.strip_prefix(FRAMED) else {
        // The first form: one JSON object.
        return Ok(serde_json::from_slice(bytes)?);
    };
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or(Error::CorruptSnapshot("truncated metadata length"))?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(Error::CorruptSnapshot("truncated metadata"));
    }
    let (meta, data) = rest.split_at(len);
    Ok(StoredSnapshot {
        meta: serde_json::from_slice(meta)?,
        data: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, SnapshotMeta};

    use super::{StoredSnapshot, decode, encode};

    use crate::test_types::TestConfig;

    fn snapshot(data: Vec<u8>) -> StoredSnapshot<TestConfig> {
        StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 42)),
                last_membership: Default::default(),
                snapshot_id: "3-1-42-7".into(),
            },
            data,
        }
    }

    #[test]
    fn snapshots_are_stored_framed_and_the_json_form_is_still_read() {
        let data = br#"{"state":{"devices":{}}}"#.repeat(100);
        let framed = encode(&snapshot(data.clone())).expect("encode");
        // Data stored as is, not as a JSON array of numbers.
        assert!(framed.len() < data.len() + 300, "{} bytes", framed.len());
        let back = decode::<TestConfig>(&framed).expect("decode");
        assert_eq!(back.data, data);
        assert_eq!(back.meta, snapshot(Vec::new()).meta);

        let old = serde_json::to_vec(&snapshot(data.clone())).expect("json");
        assert!(old.len() > 3 * data.len());
        assert_eq!(decode::<TestConfig>(&old).expect("old form").data, data);

        // Empty data and truncations.
        assert!(decode::<TestConfig>(&encode(&snapshot(Vec::new())).expect("e")).is_ok());
        for cut in [5, 8, 20] {
            assert!(
                decode::<TestConfig>(&framed[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
