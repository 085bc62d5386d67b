//! A Meridian hub node.

pub mod domain;
