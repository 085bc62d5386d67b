//! Reading telemetry partitions: the gRPC service (`proto/telemetry.proto`) and the shared reader
//! the REST/JSON form and the CLI use. Consumer-group checkpoints live in the Raft state, so a
//! reader can resume from any node.

use std::pin::Pin;

use futures::Stream;
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use crate::domain::telemetry::TelemetryMessage;
use crate::domain::{HubCommand, HubError, HubResult};
use crate::hub::{Hub, ReadConsistency};
use meridian_proto::ErrorCode;
use meridian_proto::telemetry::telemetry_read_server::TelemetryRead;
use meridian_proto::telemetry::{
    CheckpointRequest, CheckpointResponse, PartitionInfoRequest, PartitionInfoResponse,
    ReadPartitionRequest, TelemetryRecord,
};
use meridian_storage::TelemetryLog;

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// At this offset.
    Offset(u64),
    /// At the end (only new records).
    End,
    /// At the first record enqueued at or after this ISO-8601 time.
    EnqueuedAt(String),
    /// Right after this consumer group's checkpoint.
    Checkpoint(String),
}

/// One decoded record.
#[derive(Debug, Clone)]
pub struct Event {
    /// Partition.
    pub partition: u32,
    /// Offset (also the sequence number within the partition).
    pub offset: u64,
    /// The message.
    pub message: TelemetryMessage,
}

impl Event {
    /// The JSON form of the REST API and the CLI: the body as text when it is UTF-8, else base64.
    pub fn to_json(&self) -> Value {
        use base64::Engine;
        let (body, encoding) = match std::str::from_utf8(&self.message.body) {
            Ok(text) => (Value::String(text.to_string()), "utf-8"),
            Err(_) => (
                Value::String(base64::engine::general_purpose::STANDARD.encode(&self.message.body)),
                "base64",
            ),
        };
        json!({
            "partition": self.partition,
            "offset": self.offset,
            "sequenceNumber": self.offset,
            "enqueuedTime": self.message.system_properties.get("iothub-enqueuedtime"),
            "systemProperties": self.message.system_properties,
            "properties": self.message.application_properties,
            "body": body,
            "bodyEncoding": encoding,
        })
    }
}

/// Reads telemetry partitions: from this node's log when it is a replica of the partition, else
/// from a replica over `TelemetryRead` (the `*_any` methods).
#[derive(Clone)]
pub struct EventReader {
    log: TelemetryLog,
    partitions: u32,
    hub: Hub,
    groups: Option<crate::partition::Partitions>,
}

/// Metadata on a forwarded read: the receiving node answers from its own log, never forwards.
pub const LOCAL_READ: &str = "x-meridian-local-read";

impl EventReader {
    /// A reader over `log` with `partitions` partitions; checkpoints go through `hub`.
    pub fn new(log: TelemetryLog, partitions: u32, hub: Hub) -> Self {
        Self {
            log,
            partitions,
            hub,
            groups: None,
        }
    }

    /// Lets the reader find replicas of partitions this node does not hold.
    pub fn with_groups(mut self, groups: crate::partition::Partitions) -> Self {
        self.groups = Some(groups);
        self
    }

    /// The replicas to read stream `key` from, when this node is not one of them.
    fn remote_replicas(&self, key: u32) -> Vec<String> {
        let Some(groups) = &self.groups else {
            return Vec::new();
        };
        let p = crate::partition::partition_of_key(key);
        if groups.is_replica(p) {
            Vec::new()
        } else {
            groups.replica_addrs(p)
        }
    }

    fn local_request<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(LOCAL_READ, tonic::metadata::MetadataValue::from_static("1"));
        request
    }

    /// Like [`EventReader::read`], from a replica when this node does not hold the partition.
    pub async fn read_any(&self, key: u32, offset: u64, max: usize) -> HubResult<Vec<Event>> {
        let remotes = self.remote_replicas(key);
        if remotes.is_empty() {
            return self.read(key, offset, max);
        }
        let mut last = String::from("no replica address known yet");
        for addr in remotes {
            match Self::read_remote(&addr, key, offset, max).await {
                Ok(events) => return Ok(events),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(HubError::new(
            ErrorCode::ServiceUnavailable,
            format!("no replica of partition {key} answered: {last}"),
        ))
    }

    async fn read_remote(
        addr: &str,
        key: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Event>, String> {
        use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
        let channel = crate::raft::network::channel(addr).map_err(|e| e.to_string())?;
        let mut client = TelemetryReadClient::new(channel);
        let mut stream = client
            .read_partition(Self::local_request(ReadPartitionRequest {
                partition: key,
                from_offset: offset,
                max_records: max.min(u32::MAX as usize) as u32,
                ..Default::default()
            }))
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream
            .message()
            .await
            .map_err(|e| e.message().to_string())?
        {
            out.push(Event {
                partition: r.partition,
                offset: r.offset,
                message: TelemetryMessage {
                    system_properties: r.system_properties.into_iter().collect(),
                    application_properties: r.application_properties.into_iter().collect(),
                    body: r.body,
                },
            });
        }
        Ok(out)
    }

    /// The end offset of `events` partition `p` as a replica reports it (None: none answered).
    async fn remote_end(&self, p: u32) -> Option<u64> {
        use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
        for addr in self.remote_replicas(p) {
            let Ok(channel) = crate::raft::network::channel(&addr) else {
                continue;
            };
            let reply = TelemetryReadClient::new(channel)
                .partition_info(Self::local_request(PartitionInfoRequest {}))
                .await;
            if let Some(end) = reply
                .ok()
                .and_then(|r| r.into_inner().end_offsets.get(p as usize).copied())
            {
                return Some(end);
            }
        }
        None
    }

    /// Like [`EventReader::end_offsets`], asking a replica for partitions this node does not hold.
    pub async fn end_offsets_any(&self) -> HubResult<Vec<u64>> {
        let mut ends = self.end_offsets()?;
        for (p, end) in ends.iter_mut().enumerate() {
            if let Some(remote) = self.remote_end(p as u32).await {
                *end = remote;
            }
        }
        Ok(ends)
    }

    async fn end_offset_any(&self, key: u32) -> HubResult<u64> {
        if self.remote_replicas(key).is_empty() {
            return self.log.end_offset(key).map_err(Self::storage);
        }
        // `events` partitions: the end a replica reports, without reading the partition.
        if key < self.partitions
            && let Some(end) = self.remote_end(key).await
        {
            return Ok(end);
        }
        // Other streams: the last record's offset + 1, read from a replica.
        let mut offset = self.start_of_remote(key).await?;
        loop {
            let batch = self.read_any(key, offset, 10_000).await?;
            match batch.last() {
                Some(last) => offset = last.offset + 1,
                None => return Ok(offset),
            }
        }
    }

    async fn start_of_remote(&self, key: u32) -> HubResult<u64> {
        Ok(self
            .read_any(key, 0, 1)
            .await?
            .first()
            .map_or(0, |e| e.offset))
    }

    /// Partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    fn check_partition(&self, partition: u32) -> HubResult<()> {
        // Keys of custom endpoint streams are `stream * STREAM_STRIDE + partition`.
        let within = partition % crate::domain::routing::STREAM_STRIDE;
        if within >= self.partitions && partition != crate::mqtt::CONNECTION_EVENTS_PARTITION {
            return Err(HubError::invalid(format!(
                "partition {partition} does not exist (0..{})",
                self.partitions
            )));
        }
        Ok(())
    }

    fn storage(e: meridian_storage::Error) -> HubError {
        HubError::new(ErrorCode::ServerError, e.to_string())
    }

    /// The next offset to be written in each partition.
    pub fn end_offsets(&self) -> HubResult<Vec<u64>> {
        (0..self.partitions)
            .map(|p| self.log.end_offset(p).map_err(Self::storage))
            .collect()
    }

    /// Resolves where a read of `partition` starts.
    pub async fn start_offset(&self, partition: u32, start: &StartAt) -> HubResult<u64> {
        self.check_partition(partition)?;
        match start {
            StartAt::Offset(o) => Ok(*o),
            StartAt::End => self.end_offset_any(partition).await,
            StartAt::Checkpoint(group) => {
                let group = group.clone();
                self.hub
                    .read(ReadConsistency::Linearizable, move |s| {
                        let checkpoints = s.consumer_groups.get(&group).ok_or_else(|| {
                            HubError::new(
                                ErrorCode::ResourceNotFound,
                                format!("no consumer group named {group}"),
                            )
                        })?;
                        Ok(checkpoints.get(&partition).map_or(0, |o| o + 1))
                    })
                    .await
            }
            StartAt::EnqueuedAt(time) => {
                // Enqueued times only grow within a partition: the first record at or after
                // `time` is where the read starts.
                let mut offset = 0;
                loop {
                    let batch = self.read_any(partition, offset, 1000).await?;
                    let Some(last) = batch.last() else {
                        return Ok(offset);
                    };
                    for r in &batch {
                        let at = r
                            .message
                            .system_properties
                            .get("iothub-enqueuedtime")
                            .cloned()
                            .unwrap_or_default();
                        if at.as_str() >= time.as_str() {
                            return Ok(r.offset);
                        }
                    }
                    offset = last.offset + 1;
                }
            }
        }
    }

    /// Reads up to `max` events of `partition` from `offset`.
    pub fn read(&self, partition: u32, offset: u64, max: usize) -> HubResult<Vec<Event>> {
        self.check_partition(partition)?;
        self.log
            .read(partition, offset, max)
            .map_err(Self::storage)?
            .into_iter()
            .map(|r| {
                let message = TelemetryMessage::decode(&r.data).ok_or_else(|| {
                    HubError::new(
                        ErrorCode::ServerError,
                        format!("record {}:{} is corrupt", r.partition, r.offset),
                    )
                })?;
                Ok(Event {
                    partition: r.partition,
                    offset: r.offset,
                    message,
                })
            })
            .collect()
    }

    /// Drops records enqueued before `cutoff` (ISO-8601) from every stream partition this hub
    /// uses: `events`, custom endpoint streams and connection events. Returns how many partitions
    /// had records removed.
    pub async fn apply_retention(&self, cutoff: &str) -> HubResult<usize> {
        let streams: Vec<u32> = self
            .hub
            .read(ReadConsistency::Stale, |s| {
                Ok(std::iter::once(0)
                    .chain(s.routing.endpoints.values().map(|e| e.stream_id))
                    .collect())
            })
            .await?;
        let mut keys: Vec<u32> = streams
            .iter()
            .flat_map(|s| {
                (0..self.partitions).map(move |p| s * crate::domain::routing::STREAM_STRIDE + p)
            })
            .collect();
        keys.push(crate::mqtt::CONNECTION_EVENTS_PARTITION);
        let mut trimmed = 0;
        for key in keys {
            let first_kept = self
                .start_offset(key, &StartAt::EnqueuedAt(cutoff.to_string()))
                .await?;
            let oldest = self.read(key, 0, 1)?.first().map(|e| e.offset);
            if oldest.is_some_and(|o| o < first_kept) {
                self.log
                    .delete_before(key, first_kept)
                    .map_err(Self::storage)?;
                trimmed += 1;
            }
        }
        Ok(trimmed)
    }

    /// Stores a checkpoint (replicated).
    pub async fn checkpoint(
        &self,
        consumer_group: &str,
        partition: u32,
        offset: u64,
    ) -> HubResult<()> {
        self.check_partition(partition)?;
        self.hub
            .write(HubCommand::Checkpoint {
                consumer_group: consumer_group.to_string(),
                partition,
                offset,
            })
            .await
            .map(|_| ())
    }
}

fn status(e: HubError) -> Status {
    Status::new(e.code.grpc_code(), e.message)
}

/// Serves reads of this node's partitions over gRPC.
pub struct TelemetryReadImpl {
    reader: EventReader,
}

impl TelemetryReadImpl {
    /// Wraps the reader.
    pub fn new(reader: EventReader) -> Self {
        Self { reader }
    }
}

type RecordStream = Pin<Box<dyn Stream<Item = Result<TelemetryRecord, Status>> + Send>>;

#[tonic::async_trait]
impl TelemetryRead for TelemetryReadImpl {
    type ReadPartitionStream = RecordStream;

    async fn read_partition(
        &self,
        request: Request<ReadPartitionRequest>,
    ) -> Result<Response<Self::ReadPartitionStream>, Status> {
        let local_only = request.metadata().contains_key(LOCAL_READ);
        let req = request.into_inner();
        let start = if !req.consumer_group.is_empty() {
            StartAt::Checkpoint(req.consumer_group)
        } else if req.from_end {
            StartAt::End
        } else if !req.from_enqueued_time.is_empty() {
            StartAt::EnqueuedAt(req.from_enqueued_time)
        } else {
            StartAt::Offset(req.from_offset)
        };
        let offset = self
            .reader
            .start_offset(req.partition, &start)
            .await
            .map_err(status)?;
        let max = if req.max_records == 0 {
            1000
        } else {
            req.max_records as usize
        };
        let events = if local_only {
            self.reader.read(req.partition, offset, max)
        } else {
            self.reader.read_any(req.partition, offset, max).await
        }
        .map_err(status)?;
        let items: Vec<Result<TelemetryRecord, Status>> = events
            .into_iter()
            .map(|e| {
                Ok(TelemetryRecord {
                    partition: e.partition,
                    offset: e.offset,
                    system_properties: e.message.system_properties.into_iter().collect(),
                    application_properties: e.message.application_properties.into_iter().collect(),
                    body: e.message.body,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(items))))
    }

    async fn partition_info(
        &self,
        request: Request<PartitionInfoRequest>,
    ) -> Result<Response<PartitionInfoResponse>, Status> {
        let end_offsets = if request.metadata().contains_key(LOCAL_READ) {
            self.reader.end_offsets()
        } else {
            self.reader.end_offsets_any().await
        }
        .map_err(status)?;
        Ok(Response::new(PartitionInfoResponse {
            partition_count: self.reader.partitions(),
            end_offsets,
        }))
    }

    async fn checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointResponse>, Status> {
        let req = request.into_inner();
        self.reader
            .checkpoint(&req.consumer_group, req.partition, req.offset)
            .await
            .map_err(status)?;
        Ok(Response::new(CheckpointResponse {}))
    }
}
