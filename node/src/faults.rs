//! Fault injection for chaos runs: added latency on this process's node-to-node calls, overall
//! and towards chosen peers (other regions: a WAN delay).
//!
//! Set through the operator API (`PUT /meridian/cluster/faults` on the node to slow down), off by
//! default. The kernel's `tc netem` is not available everywhere we test, so the node transport
//! delays its own outgoing calls instead: every Raft RPC (all groups), forwarded write, read index
//! and forwarded telemetry append waits this long before it is sent. One node per process: in
//! `meridian demo` (several nodes in one process) it would slow them all.

use std::collections::BTreeSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static PEER_DELAY_MS: AtomicU64 = AtomicU64::new(0);
static WAN_DELAY_MS: AtomicU64 = AtomicU64::new(0);
static WAN_PEERS: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());
static BLOCKED_PEERS: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());

/// Blackholes this node's calls to `peers` (a partition from this side: calls hang until their
/// own timeouts, as with dropped packets). Empty heals.
pub fn set_blocked(peers: impl IntoIterator<Item = String>) {
    if let Ok(mut p) = BLOCKED_PEERS.write() {
        *p = peers.into_iter().collect();
    }
}

/// Whether calls to `addr` are blackholed.
pub fn is_blocked(addr: &str) -> bool {
    BLOCKED_PEERS.read().is_ok_and(|p| p.contains(addr))
}

/// The peers whose calls are blackholed.
pub fn blocked() -> Vec<String> {
    BLOCKED_PEERS
        .read()
        .map(|p| p.iter().cloned().collect())
        .unwrap_or_default()
}

/// Sets the extra delay of calls to `peers` (gRPC addresses: the nodes of other regions).
pub fn set_wan_delay(delay: Duration, peers: impl IntoIterator<Item = String>) {
    WAN_DELAY_MS.store(delay.as_millis() as u64, Ordering::Relaxed);
    if let Ok(mut p) = WAN_PEERS.write() {
        *p = peers.into_iter().collect();
    }
}

/// The WAN delay and the peers it applies to.
pub fn wan_delay() -> (Duration, Vec<String>) {
    (
        Duration::from_millis(WAN_DELAY_MS.load(Ordering::Relaxed)),
        WAN_PEERS
            .read()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default(),
    )
}

/// Waits the injected delays, if any, before a call to the node at `addr`; a call to a blocked
/// peer waits until the block is lifted (its caller's timeout fires first).
pub async fn before_peer_call_to(addr: &str) {
    while BLOCKED_PEERS.read().is_ok_and(|p| p.contains(addr)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut delay = peer_delay();
    let wan = WAN_DELAY_MS.load(Ordering::Relaxed);
    if wan > 0 && WAN_PEERS.read().is_ok_and(|p| p.contains(addr)) {
        delay += Duration::from_millis(wan);
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// Sets the delay added to every outgoing node-to-node call (0 turns it off).
pub fn set_peer_delay(delay: Duration) {
    PEER_DELAY_MS.store(delay.as_millis() as u64, Ordering::Relaxed);
}

/// The current added delay.
pub fn peer_delay() -> Duration {
    Duration::from_millis(PEER_DELAY_MS.load(Ordering::Relaxed))
}
