//! Meridian's control plane: the cluster model and membership changes.
//!
//! This crate holds the pure rules; the node applies them to its Raft group (openraft's
//! `add_learner` then `change_membership`) and serves them over REST and the `meridian cluster`
//! CLI. It must not depend on `meridian` (the node crate) or on `meridian-chaos`.

pub mod gossip;

use std::collections::BTreeSet;

/// A requested change of the voters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a node: it joins as a learner, catches up, then becomes a voter.
    Add {
        /// Its Raft node id.
        id: u64,
        /// Its node-to-node gRPC address.
        addr: String,
    },
    /// Remove a voter.
    Remove {
        /// Its Raft node id.
        id: u64,
    },
}

/// Why a membership change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// Node id 0 is reserved.
    #[error("node id 0 is reserved")]
    ZeroId,
    /// The address is empty or has no port.
    #[error("node address {0:?} must be host:port")]
    BadAddress(String),
    /// The node to remove is not a voter.
    #[error("node {0} is not a voter")]
    NotAVoter(u64),
    /// Removing it would leave no voter.
    #[error("node {0} is the last voter")]
    LastVoter(u64),
}

/// The voters after `change`, or why it cannot be made. Adding a current voter is a no-op that
/// still succeeds (a retried request must not fail).
pub fn plan(
    voters: &BTreeSet<u64>,
    change: &MembershipChange,
) -> Result<BTreeSet<u64>, MembershipError> {
    let mut next = voters.clone();
    match change {
        MembershipChange::Add { id, addr } => {
            if *id == 0 {
                return Err(MembershipError::ZeroId);
            }
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(MembershipError::BadAddress(addr.clone()));
            }
            next.insert(*id);
        }
        MembershipChange::Remove { id } => {
            if !next.remove(id) {
                return Err(MembershipError::NotAVoter(*id));
            }
            if next.is_empty() {
                return Err(MembershipError::LastVoter(*id));
            }
        }
    }
    Ok(next)
}

/// Rendezvous score of `node` for `partition`: a fixed 64-bit mix, the same on every node and
/// release, so every node computes the same placement.
fn score(partition: u32, node: u64) -> u64 {
    let mut x = (u64::from(partition) << 32) ^ node.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finalizer
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn ranked(partition: u32, voters: &BTreeSet<u64>) -> Vec<u64> {
    let mut nodes: Vec<u64> = voters.iter().copied().collect();
    nodes.sort_by_key(|n| std::cmp::Reverse(score(partition, *n)));
    nodes
}

/// The replicas of telemetry `partition` among `voters`: the `replication_factor` nodes with the
/// highest rendezvous score (all voters when there are fewer). Rendezvous hashing spreads
/// partitions evenly and, when a node joins or leaves, moves only the replicas it gains or loses.
pub fn placement(
    partition: u32,
    voters: &BTreeSet<u64>,
    replication_factor: usize,
) -> BTreeSet<u64> {
    ranked(partition, voters)
        .into_iter()
        .take(replication_factor.max(1))
        .collect()
}

/// Like [`placement`], spread over regions first: the highest-ranked node of each region in
/// rank order, then the next ranked nodes. With voters in three regions (2+2+1) and three
/// replicas, every partition has one replica per region, so losing a whole region leaves each
/// partition a majority (sync mode, docs/adr/009-regions.md). Nodes of unknown region count as
/// one region. The highest-ranked node is always chosen, so [`preferred_leader`] is a replica.
pub fn placement_in_regions(
    partition: u32,
    voters: &BTreeSet<u64>,
    regions: &std::collections::BTreeMap<u64, String>,
    replication_factor: usize,
) -> BTreeSet<u64> {
    let want = replication_factor.max(1);
    let order = ranked(partition, voters);
    let mut chosen: Vec<u64> = Vec::with_capacity(want);
    let mut used: BTreeSet<&str> = BTreeSet::new();
    for n in &order {
        if chosen.len() == want {
            break;
        }
        if used.insert(regions.get(n).map_or("", String::as_str)) {
            chosen.push(*n);
        }
    }
    for n in &order {
        if chosen.len() == want {
            break;
        }
        if !chosen.contains(n) {
            chosen.push(*n);
        }
    }
    chosen.into_iter().collect()
}

/// The replica that should lead `partition` when its group starts: the highest-ranked one.
pub fn preferred_leader(partition: u32, voters: &BTreeSet<u64>) -> Option<u64> {
    ranked(partition, voters).first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn placement_spreads_replicas_over_regions() {
        let voters = set(&[1, 2, 3, 4, 5]);
        let regions: std::collections::BTreeMap<u64, String> = [
            (1, "east"),
            (2, "east"),
            (3, "west"),
            (4, "west"),
            (5, "witness"),
        ]
        .into_iter()
        .map(|(id, r)| (id, r.to_string()))
        .collect();
        for p in 0..64 {
            let replicas = placement_in_regions(p, &voters, &regions, 3);
            assert_eq!(replicas.len(), 3);
            let spread: BTreeSet<&String> = replicas.iter().map(|id| &regions[id]).collect();
            assert_eq!(spread.len(), 3, "partition {p}: {replicas:?}");
            let leader = preferred_leader(p, &voters);
            assert!(leader.is_some_and(|l| replicas.contains(&l)));
        }
        // Without regions it is plain rendezvous placement.
        assert_eq!(
            placement_in_regions(7, &voters, &Default::default(), 3),
            placement(7, &voters, 3)
        );
    }

    #[test]
    fn plans() {
        let voters = set(&[1, 2, 3]);
        let add = MembershipChange::Add {
            id: 4,
            addr: "127.0.0.1:7104".into(),
        };
        assert_eq!(plan(&voters, &add), Ok(set(&[1, 2, 3, 4])));
        let again = MembershipChange::Add {
            id: 2,
            addr: "127.0.0.1:7102".into(),
        };
        assert_eq!(plan(&voters, &again), Ok(voters.clone()));
        assert_eq!(
            plan(&voters, &MembershipChange::Remove { id: 1 }),
            Ok(set(&[2, 3]))
        );
        assert_eq!(
            plan(&voters, &MembershipChange::Remove { id: 9 }),
            Err(MembershipError::NotAVoter(9))
        );
        assert_eq!(
            plan(&set(&[1]), &MembershipChange::Remove { id: 1 }),
            Err(MembershipError::LastVoter(1))
        );
        assert!(
            plan(
                &voters,
                &MembershipChange::Add {
                    id: 0,
                    addr: "h:1".into()
                }
            )
            .is_err()
        );
        assert!(
            plan(
                &voters,
                &MembershipChange::Add {
                    id: 5,
                    addr: "nohost".into()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn placement_is_sized_deterministic_and_spread() {
        let voters: BTreeSet<u64> = (1..=5).collect();
        let mut replicas_per_node = std::collections::BTreeMap::<u64, usize>::new();
        let mut leaders_per_node = std::collections::BTreeMap::<u64, usize>::new();
        for p in 0..400 {
            let r = placement(p, &voters, 3);
            assert_eq!(r.len(), 3);
            assert_eq!(r, placement(p, &voters, 3));
            let leader = preferred_leader(p, &voters).expect("leader");
            assert!(r.contains(&leader));
            *leaders_per_node.entry(leader).or_default() += 1;
            for n in r {
                *replicas_per_node.entry(n).or_default() += 1;
            }
        }
        // 1200 replicas and 400 leaders over 5 nodes: each within 25% of the mean.
        assert!(
            replicas_per_node.values().all(|c| (180..=300).contains(c)),
            "{replicas_per_node:?}"
        );
        assert!(
            leaders_per_node.values().all(|c| (60..=100).contains(c)),
            "{leaders_per_node:?}"
        );
        // Fewer voters than the factor: every voter.
        let two: BTreeSet<u64> = [4, 9].into_iter().collect();
        assert_eq!(placement(7, &two, 3), two);
    }

    #[test]
    fn a_joining_node_moves_only_the_replicas_it_takes() {
        let before: BTreeSet<u64> = (1..=3).collect();
        let after: BTreeSet<u64> = (1..=4).collect();
        let mut moved = 0;
        for p in 0..300 {
            let a = placement(p, &before, 3);
            let b = placement(p, &after, 3);
            let lost: Vec<_> = a.difference(&b).collect();
            let gained: Vec<_> = b.difference(&a).collect();
            assert!(lost.len() <= 1 && gained.len() == lost.len());
            if let Some(g) = gained.first() {
                assert_eq!(**g, 4, "only the new node gains replicas");
                moved += 1;
            }
        }
        // The new node takes about 3/4 of the partitions' one replica each.
        assert!((180..=270).contains(&moved), "{moved}");
    }
}
