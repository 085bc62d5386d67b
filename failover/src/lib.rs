//! Meridian's failover planning: a pure model of region health and the planner that decides
//! manual and automatic failovers with fencing epochs (no runtime, no clock), plus the gossip
//! membership (foca) that feeds it.
//!
//! The planner arrives with the "Regions" issue; until then a hub runs in one region with the
//! Raft group's own leader election as its only failover. It must not depend on `meridian` (the
//! node crate) or on `meridian-chaos`.
