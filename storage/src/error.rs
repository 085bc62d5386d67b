//! Storage errors.

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB reported an I/O or corruption error.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] serde_json::Error),
    /// A log entry could not be encoded or decoded in the binary codec.
    #[error("binary codec: {0}")]
    Binary(#[from] postcard::Error),
    /// The database was opened without a column family this crate needs.
    #[error("missing column family {0}")]
    MissingColumnFamily(String),
    /// A thread could not start or stopped.
    #[error("io: {0}")]
    Io(String),
    /// A stored snapshot is cut short or malformed.
    #[error("corrupt snapshot: {0}")]
    CorruptSnapshot(&'static str),
    /// A stored run of telemetry records is malformed.
    #[error("corrupt telemetry run: {0}")]
    CorruptRun(&'static str),
    /// A data directory holds a layout this version no longer reads.
    #[error("{0}")]
    OldLayout(String),
    /// A log key is not an 8-byte big-endian index.
    #[error("corrupt log key of {0} bytes")]
    CorruptLogKey(usize),
    /// The entry stored under an index carries another index.
    #[error("log entry under index {key} has index {entry}")]
    IndexMismatch {
        /// Index in the key.
        key: u64,
        /// Index in the entry.
        entry: u64,
    },
}

/// Result with the storage [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps this error as openraft's storage I/O error for the given subject and verb.
    pub(crate) fn into_raft<NID: openraft::NodeId>(
        self,
        subject: openraft::ErrorSubject<NID>,
        verb: openraft::ErrorVerb,
    ) -> openraft::StorageError<NID> {
        openraft::StorageError::IO {
            source: openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&self)),
        }
    }
}
