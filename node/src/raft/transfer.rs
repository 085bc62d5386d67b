//! Leadership transfer to a chosen node, for the hub group and the partition groups.
//!
//! openraft 0.9 has no transfer API, and its leader lease makes followers refuse a forced election
//! while the leader is healthy. So the leader steps aside through membership: it quiets the
//! election timer of every other voter except the target (`HubForward.SuppressElection`, which
//! expires by itself), removes itself from the voters (a leader that commits a configuration
//! without itself steps down), waits until the target — the only node campaigning — leads, then
//! resumes the others' timers. The old leader is out of the group; the caller makes it a voter again
//! (the hub group through the new leader, partition groups through placement reconciliation).
//! While it runs the group has one voter fewer. That is acceptable for the hub group (five voters
//! in a geo cluster, rejoined at once), not for partition groups of three voters over three
//! regions: they use [`hand_over_leadership`], which keeps the voters and lets the leader's lease
//! lapse instead.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::{BasicNode, Raft, RaftTypeConfig};

use super::NodeId;
use crate::domain::HubError;
use meridian_proto::ErrorCode;
use meridian_proto::hub::hub_forward_client::HubForwardClient;
use meridian_proto::hub::{GroupLeaderRequest, SuppressElectionRequest};

/// How long other voters keep quiet at most.
const QUIET_FOR: Duration = Duration::from_secs(15);

fn unavailable(message: impl Into<String>) -> HubError {
    HubError::new(ErrorCode::ServiceUnavailable, message)
}

async fn suppress(addr: &str, group: u32, millis: u64) -> Result<(), String> {
    election_call(addr, group, millis, false).await
}

/// Asks the node at `addr` to campaign for `group` now.
async fn campaign(addr: &str, group: u32) -> Result<(), String> {
    election_call(addr, group, 0, true).await
}

async fn election_call(addr: &str, group: u32, millis: u64, campaign: bool) -> Result<(), String> {
    let channel = super::network::channel(addr).map_err(|e| e.to_string())?;
    let mut client = HubForwardClient::new(channel);
    tokio::time::timeout(
        Duration::from_secs(2),
        client.suppress_election(SuppressElectionRequest {
            group,
            millis,
            campaign,
        }),
    )
    .await
    .map_err(|_| format!("{addr}: timed out"))?
    .map(|_| ())
    .map_err(|e| e.message().to_string())
}

/// Whether the node at `addr` answers for `group` within a second.
async fn answers(addr: &str, group: u32) -> bool {
    let Ok(channel) = super::network::channel(addr) else {
        return false;
    };
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            HubForwardClient::new(channel).group_leader(GroupLeaderRequest { group }),
        )
        .await,
        Ok(Ok(_))
    )
}

/// The leader of `group` as the node at `addr` sees it.
async fn leader_seen_by(addr: &str, group: u32) -> Option<NodeId> {
    let channel = super::network::channel(addr).ok()?;
    let reply = tokio::time::timeout(
        Duration::from_secs(1),
        HubForwardClient::new(channel).group_leader(GroupLeaderRequest { group }),
    )
    .await
    .ok()?
    .ok()?;
    Some(reply.into_inner().leader).filter(|l| *l != 0)
}

/// The checked starting point of a transfer: this node leads and `to` is a voter.
struct Plan {
    me: NodeId,
    /// The target is this node or one of `also`: nothing to do.
    done: bool,
    voters: BTreeSet<NodeId>,
    membership: openraft::Membership<NodeId, BasicNode>,
    target_addr: String,
    /// The voters to quiet while the target campaigns: all but this node, `to` and `also`.
    others: Vec<(NodeId, String)>,
}

fn plan<C>(raft: &Raft<C>, to: NodeId, also: &[NodeId]) -> Result<Plan, HubError>
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
{
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        return Err(unavailable(super::service::NOT_LEADER));
    }
    let membership = m.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let done = to == m.id || also.contains(&m.id);
    if !done && !voters.contains(&to) {
        return Err(HubError::invalid(format!(
            "node {to} is not a voter of this group"
        )));
    }
    let target_addr = membership
        .get_node(&to)
        .map(|n| n.addr.clone())
        .unwrap_or_default();
    let others = voters
        .iter()
        .filter(|v| **v != m.id && **v != to && !also.contains(v))
        .filter_map(|v| membership.get_node(v).map(|n| (*v, n.addr.clone())))
        .collect();
    Ok(Plan {
        me: m.id,
        done,
        voters,
        membership,
        target_addr,
        others,
    })
}

/// This leader's last log index, how far `to` matched it, and whether this node still leads.
fn progress(m: &openraft::RaftMetrics<NodeId, BasicNode>, to: NodeId) -> (u64, u64, bool) {
    (
        m.last_log_index.unwrap_or(0),
        m.replication
            .as_ref()
            .and_then(|r| r.get(&to).cloned().flatten())
            .map_or(0, |l| l.index),
        m.current_leader == Some(m.id),
    )
}

/// Quiets the election timers of `others` for `millis` (0 resumes them).
async fn quiet(others: &[(NodeId, String)], group: u32, millis: u64) {
    for (id, addr) in others {
        if let Err(e) = suppress(addr, group, millis).await {
            // A node we cannot reach cannot campaign either; one not resumed resumes by itself.
            tracing::warn!(node = id, millis, error = %e, "could not quiet or resume a voter's elections");
        }
    }
}

/// Asks the target to campaign (from `first_campaign` on, then every half second: the others
/// refuse while the old leader's lease runs) until it or one of `also` leads — as the target or
/// `local_leader` sees it — or `deadline` passes (`Err` with the last leader the target named).
async fn await_takeover(
    target_addr: &str,
    group: u32,
    to: NodeId,
    also: &[NodeId],
    mut next_campaign: Instant,
    deadline: Instant,
    local_leader: impl Fn() -> Option<NodeId>,
) -> Result<NodeId, Option<NodeId>> {
    let taker = |l: &NodeId| *l == to || also.contains(l);
    loop {
        if let Some(l) = local_leader().filter(taker) {
            return Ok(l);
        }
        let leader = leader_seen_by(target_addr, group).await;
        if let Some(l) = leader.filter(taker) {
            return Ok(l);
        }
        if Instant::now() >= next_campaign {
            if let Err(e) = campaign(target_addr, group).await {
                tracing::debug!(error = %e, "asking the target to campaign");
            }
            next_campaign = Instant::now() + Duration::from_millis(500);
        }
        if Instant::now() > deadline {
            return Err(leader);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Moves leadership of `raft` (group number `group`, this node leading) to voter `to` or one of
/// `also`. Returns the new leader once one of them leads; this node is then outside the group
/// until it is added back.
pub async fn transfer_leadership<C>(
    raft: &Raft<C>,
    group: u32,
    to: NodeId,
    also: &[NodeId],
) -> Result<NodeId, HubError>
where
    C: RaftTypeConfig<
            NodeId = NodeId,
            Node = BasicNode,
            Responder = openraft::impls::OneshotResponder<C>,
        >,
{
    let Plan {
        me,
        done,
        voters,
        membership,
        target_addr,
        others,
    } = plan(raft, to, also)?;
    if done {
        return Ok(me);
    }
    let replicating = raft
        .metrics()
        .borrow()
        .replication
        .as_ref()
        .is_some_and(|r| r.get(&to).is_some_and(Option::is_some));
    if !replicating {
        return Err(unavailable(format!(
            "node {to} is not replicating; not a safe target"
        )));
    }
    let takers: Vec<String> = also
        .iter()
        .filter(|v| **v != me && voters.contains(v))
        .filter_map(|v| membership.get_node(v).map(|n| n.addr.clone()))
        .collect();
    // Stepping out commits a configuration without this node, which needs a majority of the
    // remaining voters. With fewer of them alive (a lost region), the change could never commit
    // and the joint configuration would block every later write: refuse instead.
    let mut alive = 0;
    for addr in others
        .iter()
        .map(|o| &o.1)
        .chain(&takers)
        .chain(std::iter::once(&target_addr))
    {
        alive += usize::from(answers(addr, group).await);
    }
    let remaining_count = others.len() + takers.len() + 1;
    if alive * 2 <= remaining_count {
        return Err(unavailable(format!(
            "only {alive} of the {remaining_count} other voters answer: the group could not commit a configuration without this node"
        )));
    }
    // The target's log first catches up with this leader's (bounded): a target left behind
    // when this node steps out loses every election to voters with longer logs.
    let caught_up_deadline = Instant::now() + Duration::from_secs(3);
    let mut metrics = raft.metrics();
    loop {
        let (last, matched, _) = progress(&metrics.borrow_and_update(), to);
        if matched >= last || Instant::now() >= caught_up_deadline {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), metrics.changed()).await;
    }
    quiet(&others, group, QUIET_FOR.as_millis() as u64).await;
    let remaining: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != me).collect();
    tracing::info!(
        group,
        to,
        "transferring leadership: stepping out of the voters"
    );
    // Not retained as a learner: a leader that is still in the membership keeps leading (openraft
    // lets learners lead); one that left it steps down once the configuration is committed.
    let result = raft.change_membership(remaining, false).await;
    let outcome = match result {
        Err(e) => Err(unavailable(format!("stepping out: {e}"))),
        // This node left the group and hears no more of it: only the target's view counts.
        Ok(_) => await_takeover(
            &target_addr,
            group,
            to,
            also,
            Instant::now(),
            Instant::now() + QUIET_FOR,
            || None,
        )
        .await
        .map_err(|leader| {
            unavailable(format!(
                "node {to} did not take over within {QUIET_FOR:?} (leader now {leader:?})"
            ))
        }),
    };
    quiet(&others, group, 0).await;
    outcome
}

/// Moves leadership of a partition group (`raft`, group number `group`, this node leading) to
/// voter `to` or one of `also` **without changing the voters**: this node stops proposing
/// (`pause`, which the partition's append path honours) and stops its heartbeats, so the
/// followers' leader leases lapse; the target, the only voter allowed to campaign, is asked to
/// campaign until it wins. The group keeps all its voters throughout, so no fault during or
/// after a hand-over can leave it with an even, region-spanning voter set (stepping out of the
/// voters did: a cut right after a hand-over left partitions of two voters in two regions
/// without a leader). If the target does not win within a few election timeouts, this node
/// resumes as leader. Returns the new leader.
pub async fn hand_over_leadership<C>(
    raft: &Raft<C>,
    group: u32,
    to: NodeId,
    also: &[NodeId],
    pause: &std::sync::atomic::AtomicBool,
) -> Result<NodeId, HubError>
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
{
    use std::sync::atomic::Ordering;
    let Plan {
        me,
        done,
        target_addr,
        others,
        ..
    } = plan(raft, to, also)?;
    if done {
        return Ok(me);
    }
    if !answers(&target_addr, group).await {
        return Err(unavailable(format!("node {to} does not answer")));
    }
    let config = raft.config().clone();
    // Long enough for the leases to lapse (one election timeout) and a few campaigns.
    let give_up = Duration::from_millis(3 * config.election_timeout_max + 1000);
    // The target must hold everything this leader proposed, or the others would not vote for it:
    // first it catches up while writes go on (bounded), then, paused, with the last entries.
    let mut metrics = raft.metrics();
    let unpaused_deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (last, matched, _) = progress(&metrics.borrow_and_update(), to);
        if last.saturating_sub(matched) <= 64 || Instant::now() >= unpaused_deadline {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), metrics.changed()).await;
    }
    pause.store(true, Ordering::SeqCst);
    let caught_up_deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let (last, matched, leads) = progress(&metrics.borrow_and_update(), to);
        if !leads {
            pause.store(false, Ordering::SeqCst);
            return Err(unavailable(super::service::NOT_LEADER));
        }
        if matched >= last {
            break;
        }
        if Instant::now() >= caught_up_deadline {
            pause.store(false, Ordering::SeqCst);
            return Err(unavailable(format!(
                "node {to} did not catch up ({matched} of {last}); not handing over"
            )));
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), metrics.changed()).await;
    }
    quiet(&others, group, give_up.as_millis() as u64).await;
    tracing::info!(group, to, "handing over leadership: heartbeats off");
    raft.runtime_config().heartbeat(false);
    // This node stays in the group: its own view of the leader counts too.
    let outcome = await_takeover(
        &target_addr,
        group,
        to,
        also,
        Instant::now() + Duration::from_millis(config.election_timeout_min),
        Instant::now() + give_up,
        || raft.metrics().borrow().current_leader,
    )
    .await
    .map_err(|_| {
        unavailable(format!(
            "node {to} did not take over within {give_up:?}; this node leads on"
        ))
    });
    raft.runtime_config().heartbeat(true);
    pause.store(false, Ordering::SeqCst);
    quiet(&others, group, 0).await;
    outcome
}

/// Adds node `id` (address `addr`) back as a voter of the hub group through the leader at
/// `leader_addr`, retrying for a while (the new leader may still be settling).
pub async fn rejoin_through(leader_addr: &str, id: NodeId, addr: &str) -> Result<(), HubError> {
    let deadline = Instant::now() + QUIET_FOR;
    loop {
        let channel = super::network::channel(leader_addr)
            .map_err(|e| HubError::new(ErrorCode::ServerError, e.to_string()))?;
        let reply = HubForwardClient::new(channel)
            .change_membership(meridian_proto::hub::ChangeMembershipRequest {
                add_id: id,
                add_addr: addr.to_string(),
                remove_id: 0,
            })
            .await;
        match reply {
            Ok(r) if r.get_ref().error_json.is_empty() => return Ok(()),
            Ok(r) => {
                return Err(serde_json::from_slice(&r.get_ref().error_json)
                    .unwrap_or_else(|e| HubError::new(ErrorCode::ServerError, e.to_string())));
            }
            Err(status) if Instant::now() < deadline => {
                tracing::debug!(%status, "rejoining after the transfer; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Err(unavailable(status.message().to_string())),
        }
    }
}

/// Quiets this node's election timer of `raft` for `millis` (0 resumes it now), or with
/// `campaign`, resumes it and starts an election right away.
pub async fn suppress_election<C>(raft: &Raft<C>, millis: u64, campaign: bool)
where
    C: RaftTypeConfig,
{
    if campaign {
        raft.runtime_config().elect(true);
        if let Err(e) = raft.trigger().elect().await {
            tracing::debug!(error = %e, "campaigning for a leadership transfer");
        }
        return;
    }
    raft.runtime_config().elect(millis == 0);
    if millis > 0 {
        let raft = raft.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            raft.runtime_config().elect(true);
        });
    }
}

/// The election timer of a tie-breaker region's voter (sync mode): off while `raft`'s group has a
/// live leader (`alive`: gossip's view), so it votes but does not campaign; on once the group went
/// `patience` without one (it may hold the only log that others would vote for).
/// `leaderless_since` is the caller's memory.
pub fn tie_breaker_elections<C>(
    raft: &Raft<C>,
    leaderless_since: &mut Option<Instant>,
    patience: Duration,
    alive: impl Fn(&C::NodeId) -> bool,
) where
    C: RaftTypeConfig,
{
    // A follower keeps naming its last leader after that one died: ask whether it is alive.
    let has_leader = raft
        .metrics()
        .borrow()
        .current_leader
        .as_ref()
        .is_some_and(alive);
    if has_leader {
        *leaderless_since = None;
        raft.runtime_config().elect(false);
    } else {
        let since = *leaderless_since.get_or_insert_with(Instant::now);
        raft.runtime_config().elect(since.elapsed() >= patience);
    }
}
