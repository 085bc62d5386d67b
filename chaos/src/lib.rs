//! Meridian's chaos and benchmark harness: drives real `meridian` processes (and the peer systems
//! we compare against) from outside, over the same APIs users call.
//!
//! * `registry-bench` (`src/bin/registry_bench.rs`): registry creates/s and latency on a 3-node
//!   loopback cluster, side by side with etcd 3.4, and leader-failover time.
//!
//! * `partition-bench` (`src/bin/partition_bench.rs`): acked telemetry msg/s by partition
//!   replication factor on a loopback cluster, and node-loss recovery time.
//!
//! * `chaos` (`src/bin/chaos.rs`): the cluster scenario of [`scenario::cluster_nemeses`] — kill -9,
//!   SIGSTOP and network partitions (nodes in network namespaces) under telemetry and registry
//!   load — with the checker ([`checker`]) and a JSON + Markdown report ([`report`]).
//!
//! * `chaos --regions async|sync`: the regions scenario of [`regions::regions`] — planned
//!   failover and failback, region loss, a partition between regions — with RTO and RPO per data
//!   type next to Azure IoT Hub's documented figures.
//!
//! Nothing depends on this crate.

pub mod checker;
pub mod cluster;
pub mod netns;
pub mod proc;
pub mod regions;
pub mod report;
pub mod scenario;
pub mod workload;
