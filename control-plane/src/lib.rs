//! Meridian's control plane: the cluster model and membership changes.
//!
//! This crate holds the pure rules; the node applies them to its Raft group (openraft's
//! `add_learner` then `change_membership`) and serves them over REST and the `meridian cluster`
//! CLI. It must not depend on `meridian` (the node crate) or on `meridian-chaos`.

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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
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
}
