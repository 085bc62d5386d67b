//! `PartitionService`: appends forwarded to this node as a partition's leader, and raw reads for
//! replicas installing a snapshot. Node-to-node only.

use tonic::{Request, Response, Status};

use super::{Partitions, Record};
use meridian_proto::partition::partition_service_server::PartitionService;
use meridian_proto::partition::{
    AppendRequest, AppendResponse, RawRecord, ReadRawRequest, ReadRawResponse,
};
use meridian_storage::TelemetryLog;

/// Serves [`PartitionService`].
pub struct PartitionServiceImpl {
    partitions: Partitions,
    log: TelemetryLog,
}

impl PartitionServiceImpl {
    /// Serves this node's partitions and telemetry log.
    pub fn new(partitions: Partitions, log: TelemetryLog) -> Self {
        Self { partitions, log }
    }
}

#[tonic::async_trait]
impl PartitionService for PartitionServiceImpl {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let req = request.into_inner();
        if req.expires_unix_ms != 0
            && super::unix_ms_after(std::time::Duration::ZERO)
                > req.expires_unix_ms + super::CLOCK_SKEW_ALLOWANCE.as_millis() as u64
        {
            return Err(Status::deadline_exceeded(
                "append expired before it reached the leader; not proposed",
            ));
        }
        let records = req
            .records
            .into_iter()
            .map(|r| Record {
                key: r.key,
                data: r.data,
            })
            .collect();
        match self
            .partitions
            .propose_locally(req.partition, records)
            .await
        {
            Ok(()) => Ok(Response::new(AppendResponse {})),
            // Name the leader, if known, so a node outside the group can go there directly.
            Err(None) => Err(Status::failed_precondition(format!(
                "{}; {}{}",
                crate::raft::service::NOT_LEADER,
                super::LEADER_HINT,
                self.partitions
                    .leader(req.partition)
                    .map(|(_, addr)| addr)
                    .unwrap_or_default()
            ))),
            Err(Some(e)) => Err(Status::new(e.code.grpc_code(), e.message)),
        }
    }

    async fn read_raw(
        &self,
        request: Request<ReadRawRequest>,
    ) -> Result<Response<ReadRawResponse>, Status> {
        let req = request.into_inner();
        let max = req.max_records.clamp(1, 10_000) as usize;
        let records = self
            .log
            .read(req.key, req.from_offset, max)
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .filter(|r| r.offset < req.to_offset)
            .map(|r| RawRecord {
                offset: r.offset,
                data: r.data,
            })
            .collect();
        Ok(Response::new(ReadRawResponse { records }))
    }
}
