//! A Meridian hub node.

pub mod domain;
pub mod raft;
