//! Fault injection for chaos runs: added latency on this process's node-to-node calls.
//!
//! Set through the operator API (`PUT /meridian/cluster/faults` on the node to slow down), off by
//! default. The kernel's `tc netem` is not available everywhere we test, so the node transport
//! delays its own outgoing calls instead: every Raft RPC (all groups), forwarded write, read index
//! and forwarded telemetry append waits this long before it is sent. One node per process: in
//! `meridian demo` (several nodes in one process) it would slow them all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static PEER_DELAY_MS: AtomicU64 = AtomicU64::new(0);

/// Sets the delay added to every outgoing node-to-node call (0 turns it off).
pub fn set_peer_delay(delay: Duration) {
    PEER_DELAY_MS.store(delay.as_millis() as u64, Ordering::Relaxed);
}

/// The current added delay.
pub fn peer_delay() -> Duration {
    Duration::from_millis(PEER_DELAY_MS.load(Ordering::Relaxed))
}

/// Waits the injected delay, if any, before a node-to-node call.
pub async fn before_peer_call() {
    let delay = peer_delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}
