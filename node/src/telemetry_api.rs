//! The gRPC read API over telemetry partitions (`proto/telemetry.proto`).

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::domain::telemetry::TelemetryMessage;
use meridian_proto::telemetry::telemetry_read_server::TelemetryRead;
use meridian_proto::telemetry::{
    PartitionInfoRequest, PartitionInfoResponse, ReadPartitionRequest, TelemetryRecord,
};
use meridian_storage::TelemetryLog;

/// Serves reads of this node's partitions.
pub struct TelemetryReadImpl {
    log: TelemetryLog,
    partitions: u32,
}

impl TelemetryReadImpl {
    /// Wraps the node's telemetry log with its partition count.
    pub fn new(log: TelemetryLog, partitions: u32) -> Self {
        Self { log, partitions }
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
        let req = request.into_inner();
        if req.partition >= self.partitions
            && req.partition != crate::mqtt::CONNECTION_EVENTS_PARTITION
        {
            return Err(Status::invalid_argument(format!(
                "partition {} does not exist (0..{})",
                req.partition, self.partitions
            )));
        }
        let max = if req.max_records == 0 {
            1000
        } else {
            req.max_records as usize
        };
        let records = self
            .log
            .read(req.partition, req.from_offset, max)
            .map_err(|e| Status::internal(e.to_string()))?;
        let items: Vec<Result<TelemetryRecord, Status>> = records
            .into_iter()
            .map(|r| {
                let m = TelemetryMessage::decode(&r.data).ok_or_else(|| {
                    Status::data_loss(format!("record {}:{} is corrupt", r.partition, r.offset))
                })?;
                Ok(TelemetryRecord {
                    partition: r.partition,
                    offset: r.offset,
                    system_properties: m.system_properties.into_iter().collect(),
                    application_properties: m.application_properties.into_iter().collect(),
                    body: m.body,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(items))))
    }

    async fn partition_info(
        &self,
        _request: Request<PartitionInfoRequest>,
    ) -> Result<Response<PartitionInfoResponse>, Status> {
        let end_offsets = (0..self.partitions)
            .map(|p| self.log.end_offset(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(PartitionInfoResponse {
            partition_count: self.partitions,
            end_offsets,
        }))
    }
}
