//! A Meridian hub node.

pub mod amqp;
pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod control;
pub mod domain;
pub mod faults;
pub mod hub;
pub mod mqtt;
pub mod observability;
pub mod partition;
pub mod raft;
pub mod region;
pub mod server;
pub mod telemetry_api;
pub mod tls;
pub mod webhook;
