//! Meridian's wire contracts and shared vocabulary.
//!
//! * [`raft`]: the node-to-node Raft transport (tonic/prost), generated from `proto/raft.proto`.
//! * [`hub`]: forwarding of writes and read-index requests to the Raft leader (`proto/hub.proto`).
//! * [`telemetry`]: reading a node's telemetry partitions (`proto/telemetry.proto`).
//! * [`partition`]: appends forwarded to a partition group's leader, raw record reads for replicas
//!   that install a snapshot (`proto/partition.proto`).
//! * [`region`]: between the regions of a geo-paired hub (`proto/region.proto`).
//! * [`error`]: the one error-code table that maps every hub error to Azure IoT Hub's HTTP status
//!   and numeric error code, to a gRPC code and to MQTT behaviour.
//!
//! This crate depends on no other Meridian crate.

pub mod error;

/// Raft RPCs between the members of one Raft group.
pub mod raft {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meridian.raft.v1");
}

/// Leader forwarding for hub commands and linearizable reads.
pub mod hub {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meridian.hub.v1");
}

/// Reading telemetry partitions.
pub mod telemetry {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meridian.telemetry.v1");
}

/// Between regions: health, fencing leases, votes, demotion and log shipping.
pub mod region {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meridian.region.v1");
}

/// The control-plane API (operators: membership, health, placement, drains).
pub mod control {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meridian.control.v1");
}

/// Telemetry partition groups: appends forwarded to a partition's leader, raw reads for replicas.
pub mod partition {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meridian.partition.v1");
}

pub use error::ErrorCode;
