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

impl PartitionServiceImpl {
    /// An append, refused when it expired (on this node's clock) before it got here.
    async fn append_checked(
        &self,
        req: AppendRequest,
        received: u64,
    ) -> Result<Response<AppendResponse>, Status> {
        if req.expires_unix_ms != 0
            && received > req.expires_unix_ms + super::CLOCK_SKEW_ALLOWANCE.as_millis() as u64
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
                data: r.data.into(),
            })
            .collect();
        if req.relay {
            // The sender cannot reach the leader; this node submits the records wherever the
            // leader is, within the sender's deadline.
            let left = req.expires_unix_ms.saturating_sub(received);
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(left);
            return match self
                .partitions
                .submit_relayed(req.partition, records, deadline)
                .await
            {
                Ok(()) => Ok(Response::new(AppendResponse {})),
                Err(e) => Err(Status::new(e.code.grpc_code(), e.message)),
            };
        }
        // The acceptance check above, kept until the proposal is made (it may queue).
        let deadline = (req.expires_unix_ms != 0).then(|| {
            let last = req.expires_unix_ms + super::CLOCK_SKEW_ALLOWANCE.as_millis() as u64;
            std::time::Instant::now()
                + std::time::Duration::from_millis(last.saturating_sub(received))
        });
        match self
            .partitions
            .propose_locally(req.partition, records, deadline)
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
}

#[tonic::async_trait]
impl PartitionService for PartitionServiceImpl {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let received = crate::clock::unix_ms();
        let req = request.into_inner();
        // Every answer carries this node's clock, so the sender measures the offset between the
        // two clocks and sends expiry times in this node's time.
        let stamp = |mut metadata: tonic::metadata::MetadataMap| {
            if let Ok(v) = received.to_string().parse() {
                metadata.insert(super::CLOCK_METADATA, v);
            }
            metadata
        };
        let result = self.append_checked(req, received).await;
        match result {
            Ok(mut r) => {
                *r.metadata_mut() = stamp(std::mem::take(r.metadata_mut()));
                Ok(r)
            }
            Err(mut status) => {
                *status.metadata_mut() = stamp(std::mem::take(status.metadata_mut()));
                Err(status)
            }
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
