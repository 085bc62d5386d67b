//! Meridian's control plane: the cluster model (regions, nodes, hub → Raft-group placement),
//! membership changes (add learner, change membership) and hub provisioning, driven over the
//! node-to-node gRPC contracts in `meridian-proto`.
//!
//! Today a cluster forms from the static bootstrap membership in each node's configuration
//! (`[cluster] members`, see `meridian::server`); this crate takes over membership changes with
//! the gossip and region work (issues "Cluster" and "Regions"). It must not depend on `meridian`
//! (the node crate) or on `meridian-chaos`.
