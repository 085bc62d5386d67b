//! Meridian's failover planning: the pure rules that decide which region of a geo-paired hub may
//! accept writes, when a secondary may promote itself, and how an old primary is fenced. No
//! runtime, no clock, no I/O: every time is a number of milliseconds on the caller's own monotonic
//! clock, and times of different nodes are never compared (so wall-clock skew cannot break it).
//!
//! The model (docs/adr/009-regions.md):
//! * A hub's regions agree on a [`RegionEpoch`]: a number that only grows and the primary region
//!   at that number. Every write path checks the local epoch and a [`Fence`].
//! * A node of the primary region accepts writes only while it holds a *lease*: a promise from
//!   another region (the secondary's hub leader or the witness) that it will not help any other
//!   region become primary before the promise expires ([`Promiser`]). With a witness, the lease
//!   must be renewed continuously; without one, a promise once after start ("confirmation") is
//!   enough, and an unreachable primary can only be failed over by an operator (`--force`).
//! * Promotion of another region needs every promise given to the old primary to have expired:
//!   the candidate seals its own promiser and waits its leases out, and the witness votes for a
//!   new epoch only once its own promise to the old primary expired ([`Promiser::vote`]).
//!
//! The property test at the bottom simulates three regions with random message loss, delays,
//! clock offsets and crashes, and checks that two regions never accept writes at the same time.

use std::collections::BTreeMap;

/// The fencing epoch of a hub: which region is primary, numbered so that a later decision always
/// wins over an earlier one.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize,
)]
pub struct RegionEpoch {
    /// Grows by one on every failover and failback.
    pub number: u64,
    /// The primary region at this epoch.
    pub primary: String,
}

impl RegionEpoch {
    /// The epoch after a failover to `region`.
    pub fn next(&self, region: &str) -> Self {
        Self {
            number: self.number + 1,
            primary: region.to_string(),
        }
    }
}

/// Why a node may not accept a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// This region is not the primary at the current epoch.
    NotPrimary {
        /// The primary region.
        primary: String,
        /// The epoch.
        epoch: u64,
    },
    /// This region is primary but holds no valid lease (never confirmed since start, or the lease
    /// expired because no other region answered in time).
    NoLease,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotPrimary { primary, epoch } => write!(
                f,
                "this region is not the hub's primary (primary region '{primary}', epoch {epoch})"
            ),
            Self::NoLease => write!(
                f,
                "the primary region has no valid lease from another region; writes are fenced"
            ),
        }
    }
}

/// How leases are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseMode {
    /// One region only: no fencing at all.
    None,
    /// Two regions, no witness: a promise once after start, then epoch fencing only.
    Confirmation,
    /// A witness exists: the lease must be renewed before it expires.
    Continuous,
}

/// The lease holder's side on a node of the primary region.
#[derive(Debug, Clone)]
pub struct Fence {
    mode: LeaseMode,
    /// How long a promise lasts, in ms.
    lease_ms: u64,
    /// Allowance for clock rate drift and scheduling, subtracted from every lease.
    margin_ms: u64,
    /// Local time until which the lease is valid.
    valid_until: Option<u64>,
    confirmed: bool,
}

impl Fence {
    /// A fence with no lease yet.
    pub fn new(mode: LeaseMode, lease_ms: u64, margin_ms: u64) -> Self {
        Self {
            mode,
            lease_ms,
            margin_ms,
            valid_until: None,
            confirmed: false,
        }
    }

    /// The lease mode.
    pub fn mode(&self) -> LeaseMode {
        self.mode
    }

    /// Records a promise granted for a request *sent* at local time `sent_at` (the promiser's
    /// own expiry is measured from when it received the request, which is later).
    pub fn on_granted(&mut self, sent_at: u64) {
        let until = sent_at + self.lease_ms.saturating_sub(self.margin_ms);
        self.valid_until = Some(self.valid_until.map_or(until, |u| u.max(until)));
        self.confirmed = true;
    }

    /// How long the continuous lease stays valid from local time `now` (None: no such lease, or
    /// a mode without expiry).
    pub fn remaining(&self, now: u64) -> Option<u64> {
        match self.mode {
            LeaseMode::Continuous => self.valid_until.filter(|u| now < *u).map(|u| u - now),
            _ => None,
        }
    }

    /// Forgets the lease (the node learned of a newer epoch).
    pub fn revoke(&mut self) {
        self.valid_until = None;
        self.confirmed = false;
    }

    /// Whether a node of `my_region` may accept a write at local time `now`.
    pub fn check(&self, my_region: &str, epoch: &RegionEpoch, now: u64) -> Result<(), Refusal> {
        if self.mode == LeaseMode::None {
            return Ok(());
        }
        if epoch.primary != my_region {
            return Err(Refusal::NotPrimary {
                primary: epoch.primary.clone(),
                epoch: epoch.number,
            });
        }
        match self.mode {
            LeaseMode::None => Ok(()),
            LeaseMode::Confirmation if self.confirmed => Ok(()),
            LeaseMode::Continuous if self.valid_until.is_some_and(|u| now < u) => Ok(()),
            _ => Err(Refusal::NoLease),
        }
    }
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseReply {
    /// Promised: no promotion of another region before the promiser's `now + lease`.
    Granted,
    /// The requester's epoch is old: it must demote itself to this epoch.
    Fenced(RegionEpoch),
    /// Not now (sealed for a promotion, or the requester is not the primary of its epoch).
    Refused(String),
}

/// The answer to a promotion vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteReply {
    /// The voter moved to the candidate's epoch and will give leases only to its primary.
    Granted,
    /// Retry after this many ms (a promise to the old primary is still running).
    Wait(u64),
    /// Never (the voter knows an epoch at least as new with another primary).
    Refused(String),
}

/// The promiser's side: a secondary region's hub leader, or a witness. It grants leases to the
/// primary and votes for promotions, never both in a way that could overlap.
#[derive(Debug, Clone)]
pub struct Promiser {
    epoch: RegionEpoch,
    lease_ms: u64,
    /// Local time until which the last promise runs.
    promised_until: u64,
    /// No promise is given once a promotion is being prepared; since this local time.
    sealed: Option<u64>,
    /// Local time of the last lease request from the primary's confirmed hub leader: proof that
    /// the primary region is alive and can write.
    primary_alive_at: Option<u64>,
}

impl Promiser {
    /// A promiser that started at local time `now`: it acts as if it had just promised, because
    /// it cannot know what it promised before a restart.
    pub fn new(epoch: RegionEpoch, lease_ms: u64, now: u64) -> Self {
        Self {
            epoch,
            lease_ms,
            promised_until: now + lease_ms,
            sealed: None,
            primary_alive_at: None,
        }
    }

    /// The epoch this promiser knows.
    pub fn epoch(&self) -> &RegionEpoch {
        &self.epoch
    }

    /// Learns a newer epoch (from a peer or from the replicated state).
    pub fn observe(&mut self, epoch: &RegionEpoch) {
        if epoch.number > self.epoch.number {
            self.epoch = epoch.clone();
            self.sealed = None;
            self.primary_alive_at = None;
        }
    }

    /// A lease request from a node of `region` that believes in `epoch`, received at `now`.
    /// `leader_confirmed`: the requester leads its region's hub group with a quorum behind it
    /// (so the primary region can write; the other nodes of a region that lost its quorum still
    /// ask, and must not keep it looking alive).
    pub fn lease(
        &mut self,
        region: &str,
        epoch: &RegionEpoch,
        now: u64,
        leader_confirmed: bool,
    ) -> LeaseReply {
        if epoch.number < self.epoch.number {
            return LeaseReply::Fenced(self.epoch.clone());
        }
        self.observe(epoch);
        if region != self.epoch.primary {
            return LeaseReply::Refused(format!(
                "{region} is not the primary at epoch {}",
                self.epoch.number
            ));
        }
        if leader_confirmed {
            self.primary_alive_at = Some(now);
        }
        // A seal whose candidate never came back (it crashed, or the primary recovered) is
        // lifted after two leases, so the primary does not lose its lease for good.
        if let Some(since) = self.sealed {
            if now < since + 2 * self.lease_ms {
                return LeaseReply::Refused("a promotion is being prepared".into());
            }
            self.sealed = None;
        }
        self.promised_until = self.promised_until.max(now + self.lease_ms);
        LeaseReply::Granted
    }

    /// Stops promising (this region prepares its own promotion). Returns the local time after
    /// which every promise it gave has expired.
    pub fn seal(&mut self, now: u64) -> u64 {
        self.sealed.get_or_insert(now);
        self.promised_until
    }

    /// Local time until which the last promise runs.
    pub fn promised_until(&self) -> u64 {
        self.promised_until
    }

    /// Whether sealed.
    pub fn is_sealed(&self) -> bool {
        self.sealed.is_some()
    }

    /// Lifts a seal (the promotion was abandoned).
    pub fn unseal(&mut self) {
        self.sealed = None;
    }

    /// A vote request from `candidate` for epoch `proposed`, at local time `now`.
    pub fn vote(&mut self, proposed: &RegionEpoch, now: u64) -> VoteReply {
        if proposed.number < self.epoch.number
            || (proposed.number == self.epoch.number && proposed.primary != self.epoch.primary)
        {
            return VoteReply::Refused(format!(
                "epoch {} with primary {} is already decided",
                self.epoch.number, self.epoch.primary
            ));
        }
        if proposed.number == self.epoch.number {
            return VoteReply::Granted;
        }
        // A primary that still renews its lease here is alive and writable: the candidate only
        // lost its own link to it. Promoting would take a working primary down (and the two data
        // regions would then take turns promoting as long as their link is cut).
        if let Some(alive) = self.primary_alive_at
            && now < alive + self.lease_ms
        {
            self.sealed = None;
            return VoteReply::Refused(format!(
                "the primary region {} is alive (it renewed its lease {} ms ago)",
                self.epoch.primary,
                now.saturating_sub(alive)
            ));
        }
        // Stop promising the old primary right away, then wait for the last promise to run out.
        self.sealed.get_or_insert(now);
        if now < self.promised_until {
            return VoteReply::Wait(self.promised_until - now);
        }
        self.epoch = proposed.clone();
        self.sealed = None;
        VoteReply::Granted
    }
}

/// What the automatic-failover loop of a secondary region's leader should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoDecision {
    /// Nothing: the primary is healthy, or the grace time has not passed.
    Wait,
    /// Seal this region's promiser and wait until this local time.
    SealUntil(u64),
    /// Ask the witness for a vote on this epoch.
    RequestVote(RegionEpoch),
    /// Commit this epoch: this region is primary.
    Promote(RegionEpoch),
}

/// The automatic-failover inputs on a secondary region's hub leader.
#[derive(Debug, Clone)]
pub struct AutoView<'a> {
    /// This region.
    pub my_region: &'a str,
    /// The epoch as replicated in this region.
    pub epoch: &'a RegionEpoch,
    /// Whether automatic failover is enabled (it needs a witness).
    pub enabled: bool,
    /// Local time the primary was last seen healthy (any of its nodes answered).
    pub primary_last_seen: u64,
    /// Local time this node became the region's leader.
    pub leader_since: u64,
    /// How long the primary must be unreachable.
    pub grace_ms: u64,
    /// The lease length.
    pub lease_ms: u64,
    /// The promiser's sealed-until time, when sealed.
    pub sealed_until: Option<u64>,
    /// Whether this region's promiser is still sealed now (a seal is lifted by itself after two
    /// leases, and the promiser may then have promised again).
    pub promiser_sealed: bool,
    /// Until when this region's promiser's last promise runs, now.
    pub promised_until: u64,
    /// Whether the witness granted the vote for `epoch.next(my_region)`.
    pub witness_granted: bool,
    /// Failovers allowed right now by the daily caps and spacing.
    pub caps_allow: bool,
    /// Now, local.
    pub now: u64,
}

/// Decides the next automatic-failover step.
pub fn plan_automatic(v: &AutoView<'_>) -> AutoDecision {
    if !v.enabled || v.epoch.primary == v.my_region || !v.caps_allow {
        return AutoDecision::Wait;
    }
    // Once the witness voted, it has committed the next epoch naming this region and fences the
    // old primary's leases with it: a heartbeat from the old primary now (a cut that healed
    // while the vote was under way) must not turn this region back, or neither region would be
    // primary until an operator stepped in.
    if !v.witness_granted && v.now < v.primary_last_seen + v.grace_ms {
        return AutoDecision::Wait;
    }
    // A new leader cannot know what its predecessor promised: it waits one lease first.
    let earliest = v.leader_since + v.lease_ms;
    let Some(sealed_until) = v.sealed_until else {
        return AutoDecision::SealUntil(earliest);
    };
    // The seal was lifted meanwhile (the vote took long) and the promiser may have promised the
    // old primary again: seal again and wait that promise out too.
    let until = sealed_until.max(earliest).max(v.promised_until);
    if !v.promiser_sealed || v.now < until {
        return AutoDecision::SealUntil(until);
    }
    let next = v.epoch.next(v.my_region);
    if !v.witness_granted {
        return AutoDecision::RequestVote(next);
    }
    AutoDecision::Promote(next)
}

/// Daily caps and spacing of failovers (Azure: at most two failovers and two failbacks a day).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// Most failovers in any 24 h window (0: no cap).
    pub per_day: u32,
    /// Least time between two failovers in seconds (0: none).
    pub spacing_secs: u64,
}

impl Caps {
    /// Whether a failover at `now_unix_secs` is allowed after the earlier ones at `history`.
    pub fn allow(&self, history: &[u64], now_unix_secs: u64) -> Result<(), String> {
        if let Some(last) = history.iter().max()
            && self.spacing_secs > 0
            && now_unix_secs < last + self.spacing_secs
        {
            return Err(format!(
                "the last failover was {} s ago; the configured spacing is {} s",
                now_unix_secs.saturating_sub(*last),
                self.spacing_secs
            ));
        }
        let recent = history
            .iter()
            .filter(|t| now_unix_secs.saturating_sub(**t) < 86_400)
            .count();
        if self.per_day > 0 && recent >= self.per_day as usize {
            return Err(format!(
                "{recent} failovers in the last 24 h; the configured cap is {}",
                self.per_day
            ));
        }
        Ok(())
    }
}

/// Per stream key, where a returning old primary must cut its partition logs: the new primary's
/// ends when it was promoted. Records beyond them were never copied and are discarded.
pub fn truncation_points(
    local_ends: &BTreeMap<u32, u64>,
    promoted_ends: &BTreeMap<u32, u64>,
) -> BTreeMap<u32, u64> {
    local_ends
        .iter()
        .filter_map(|(key, end)| {
            let keep = promoted_ends.get(key).copied().unwrap_or(0);
            (*end > keep).then_some((*key, keep))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(n: u64, p: &str) -> RegionEpoch {
        RegionEpoch {
            number: n,
            primary: p.into(),
        }
    }

    #[test]
    fn fence_needs_primary_and_lease() {
        let e = epoch(1, "a");
        let mut f = Fence::new(LeaseMode::Continuous, 3000, 200);
        assert_eq!(f.check("a", &e, 10), Err(Refusal::NoLease));
        f.on_granted(100);
        assert_eq!(f.check("a", &e, 2899), Ok(()));
        assert_eq!(f.check("a", &e, 2900), Err(Refusal::NoLease));
        assert!(matches!(
            f.check("b", &e, 10),
            Err(Refusal::NotPrimary { .. })
        ));
        let mut c = Fence::new(LeaseMode::Confirmation, 3000, 200);
        assert_eq!(c.check("a", &e, 0), Err(Refusal::NoLease));
        c.on_granted(0);
        assert_eq!(c.check("a", &e, 1_000_000), Ok(()));
        c.revoke();
        assert_eq!(c.check("a", &e, 1), Err(Refusal::NoLease));
        assert_eq!(Fence::new(LeaseMode::None, 0, 0).check("b", &e, 0), Ok(()));
    }

    #[test]
    fn promiser_fences_old_epochs_and_waits_out_promises_before_voting() {
        let mut p = Promiser::new(epoch(1, "a"), 3000, 0);
        assert_eq!(
            p.vote(&epoch(2, "b"), 1000),
            VoteReply::Wait(2000),
            "a restarted promiser assumes it just promised"
        );
        // Sealed by the vote request: no new promise for the old primary (asked by a node that
        // does not lead its region, so it says nothing about the primary being alive).
        assert!(matches!(
            p.lease("a", &epoch(1, "a"), 1500, false),
            LeaseReply::Refused(_)
        ));
        assert_eq!(p.vote(&epoch(2, "b"), 3000), VoteReply::Granted);
        assert_eq!(
            p.lease("a", &epoch(1, "a"), 3001, true),
            LeaseReply::Fenced(epoch(2, "b"))
        );
        assert_eq!(
            p.lease("b", &epoch(2, "b"), 3001, true),
            LeaseReply::Granted
        );
        assert!(matches!(
            p.vote(&epoch(2, "a"), 9000),
            VoteReply::Refused(_)
        ));
        assert!(matches!(
            p.vote(&epoch(1, "a"), 9000),
            VoteReply::Refused(_)
        ));
    }

    #[test]
    fn witness_refuses_to_depose_a_primary_whose_leader_still_renews() {
        let mut p = Promiser::new(epoch(1, "a"), 3000, 0);
        assert_eq!(
            p.lease("a", &epoch(1, "a"), 5000, true),
            LeaseReply::Granted
        );
        // The secondary lost its link to the primary, the witness did not.
        assert!(
            matches!(p.vote(&epoch(2, "b"), 7000), VoteReply::Refused(r) if r.contains("alive"))
        );
        assert!(
            !p.is_sealed(),
            "a refused vote must not cost the primary its lease"
        );
        assert_eq!(
            p.lease("a", &epoch(1, "a"), 7500, true),
            LeaseReply::Granted
        );
        // Only followers of a region that lost its quorum still ask: the primary is not alive.
        assert_eq!(
            p.lease("a", &epoch(1, "a"), 8000, false),
            LeaseReply::Granted
        );
        assert_eq!(p.vote(&epoch(2, "b"), 10_600), VoteReply::Wait(400));
        assert_eq!(p.vote(&epoch(2, "b"), 11_000), VoteReply::Granted);
    }

    #[test]
    fn automatic_failover_waits_grace_then_seals_then_votes_then_promotes() {
        let e = epoch(1, "a");
        let mut v = AutoView {
            my_region: "b",
            epoch: &e,
            enabled: true,
            primary_last_seen: 1000,
            leader_since: 0,
            grace_ms: 5000,
            lease_ms: 3000,
            sealed_until: None,
            promiser_sealed: true,
            promised_until: 0,
            witness_granted: false,
            caps_allow: true,
            now: 5999,
        };
        assert_eq!(plan_automatic(&v), AutoDecision::Wait);
        v.now = 6000;
        assert_eq!(plan_automatic(&v), AutoDecision::SealUntil(3000));
        v.sealed_until = Some(7000);
        assert_eq!(plan_automatic(&v), AutoDecision::SealUntil(7000));
        v.now = 7000;
        assert_eq!(plan_automatic(&v), AutoDecision::RequestVote(epoch(2, "b")));
        v.witness_granted = true;
        assert_eq!(plan_automatic(&v), AutoDecision::Promote(epoch(2, "b")));
        // The old primary is heard from again after the vote: the promotion goes on.
        v.primary_last_seen = 7000;
        assert_eq!(plan_automatic(&v), AutoDecision::Promote(epoch(2, "b")));
        // The seal was lifted while waiting for the vote and the promiser promised the old
        // primary again: seal again and wait that promise out before promoting.
        v.promiser_sealed = false;
        v.promised_until = 9000;
        assert_eq!(plan_automatic(&v), AutoDecision::SealUntil(9000));
        v.promiser_sealed = true;
        assert_eq!(plan_automatic(&v), AutoDecision::SealUntil(9000));
        v.now = 9000;
        assert_eq!(plan_automatic(&v), AutoDecision::Promote(epoch(2, "b")));
        v.enabled = false;
        assert_eq!(plan_automatic(&v), AutoDecision::Wait);
    }

    #[test]
    fn caps_limit_failovers_per_day_and_spacing() {
        let caps = Caps {
            per_day: 2,
            spacing_secs: 600,
        };
        assert!(caps.allow(&[], 1_000_000).is_ok());
        assert!(caps.allow(&[1_000_000], 1_000_100).is_err());
        assert!(caps.allow(&[950_000, 1_000_000], 1_000_700).is_err());
        assert!(
            caps.allow(&[900_000, 1_000_000], 1_000_000 + 86_400)
                .is_ok()
        );
        assert!(Caps::default().allow(&[1, 2, 3], 4).is_ok());
    }

    #[test]
    fn truncation_cuts_only_keys_past_the_promotion_point() {
        let local = BTreeMap::from([(1, 10), (2, 5), (3, 7)]);
        let promoted = BTreeMap::from([(1, 8), (2, 5)]);
        assert_eq!(
            truncation_points(&local, &promoted),
            BTreeMap::from([(1, 8), (3, 0)])
        );
    }

    /// The liveness bug the node-level randomized test found: with only the link between the two
    /// data regions cut, the secondary must not depose a primary that the witness still hears.
    #[test]
    fn a_cut_between_data_regions_alone_causes_no_failover() {
        const LEASE: u64 = 3000;
        let mut witness = Promiser::new(epoch(1, "a"), LEASE, 0);
        let mut fence = Fence::new(LeaseMode::Continuous, LEASE, 300);
        let mut b_promiser = Promiser::new(epoch(1, "a"), LEASE, 0);
        let mut sealed_until = None;
        let b_epoch = epoch(1, "a");
        for now in (0..120_000u64).step_by(250) {
            if now % 750 == 0
                && witness.lease("a", &epoch(1, "a"), now, true) == LeaseReply::Granted
            {
                fence.on_granted(now);
            }
            let view = AutoView {
                my_region: "b",
                epoch: &b_epoch,
                enabled: true,
                primary_last_seen: 0,
                leader_since: 0,
                grace_ms: 5000,
                lease_ms: LEASE,
                sealed_until,
                promiser_sealed: b_promiser.is_sealed(),
                promised_until: b_promiser.promised_until(),
                witness_granted: false,
                caps_allow: true,
                now,
            };
            match plan_automatic(&view) {
                AutoDecision::SealUntil(t) => sealed_until = Some(b_promiser.seal(now).max(t)),
                AutoDecision::RequestVote(next) => {
                    assert!(matches!(witness.vote(&next, now), VoteReply::Refused(_)));
                }
                AutoDecision::Wait => {}
                AutoDecision::Promote(_) => panic!("promoted at {now}"),
            }
            if now > 1000 {
                assert_eq!(fence.check("a", &epoch(1, "a"), now), Ok(()), "at {now}");
            }
        }
    }

    /// A small deterministic generator, so the property test needs no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A node with its own clock offset (skew) on a shared real timeline.
    struct Node {
        offset: u64,
        alive: bool,
    }
    impl Node {
        fn now(&self, real: u64) -> u64 {
            real + self.offset
        }
    }

    /// Regions a (primary), b (secondary with automatic failover), w (witness). Every step, real
    /// time advances; messages are lost or delayed at random; nodes crash and restart (a restarted
    /// promiser forgets its promises, a restarted fence its lease). Invariant: at no real time do
    /// two regions both pass their fence.
    #[test]
    fn never_two_writable_primaries_under_random_partitions_crashes_and_skew() {
        const LEASE: u64 = 3000;
        const MARGIN: u64 = 300;
        const GRACE: u64 = 5000;
        let mut promotions = 0u64;
        for seed in 1..=400u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let nodes: Vec<Node> = (0..3)
                .map(|_| Node {
                    offset: rng.below(1_000_000_000),
                    alive: true,
                })
                .collect();
            let mut nodes = nodes;
            let names = ["a", "b", "w"];
            // Replicated epochs of the two data regions (the witness keeps its own in its promiser).
            let mut epochs = [epoch(1, "a"), epoch(1, "a")];
            let mut fences = [
                Fence::new(LeaseMode::Continuous, LEASE, MARGIN),
                Fence::new(LeaseMode::Continuous, LEASE, MARGIN),
            ];
            let mut promisers = [
                Promiser::new(epoch(1, "a"), LEASE, nodes[0].now(0)),
                Promiser::new(epoch(1, "a"), LEASE, nodes[1].now(0)),
                Promiser::new(epoch(1, "a"), LEASE, nodes[2].now(0)),
            ];
            let mut b_last_seen_a = nodes[1].now(0);
            let mut a_last_seen_b = nodes[0].now(0);
            let mut b_leader_since = nodes[1].now(0);
            let mut a_leader_since = nodes[0].now(0);
            let mut sealed_until: [Option<u64>; 2] = [None, None];
            let mut granted = [false, false];
            // In-flight lease grants: (deliver at real time, to region, sent at holder-local time).
            let mut grants: Vec<(u64, usize, u64, RegionEpoch)> = Vec::new();
            let mut real = 0u64;
            let mut link_up = [[true; 3]; 3];
            for _ in 0..3000 {
                real += 1 + rng.below(400);
                // Random network changes and crashes.
                if rng.chance(3) {
                    let (x, y) = (rng.below(3) as usize, rng.below(3) as usize);
                    let up = rng.chance(50);
                    link_up[x][y] = up;
                    link_up[y][x] = up;
                }
                if rng.chance(1) {
                    let n = rng.below(3) as usize;
                    nodes[n].alive = !nodes[n].alive;
                    if nodes[n].alive {
                        let now = nodes[n].now(real);
                        let e = if n < 2 {
                            epochs[n].clone()
                        } else {
                            promisers[2].epoch().clone()
                        };
                        promisers[n] = Promiser::new(e, LEASE, now);
                        if n < 2 {
                            fences[n].revoke();
                            sealed_until[n] = None;
                            granted[n] = false;
                            if n == 0 {
                                a_leader_since = now;
                            } else {
                                b_leader_since = now;
                            }
                        }
                    }
                }
                let can = |x: usize, y: usize, nodes: &[Node], link: &[[bool; 3]; 3]| {
                    nodes[x].alive && nodes[y].alive && link[x][y]
                };
                // Deliver due grants (possibly late: a delayed reply still only extends the
                // lease from its send time).
                let mut keep = Vec::new();
                for g in grants.drain(..) {
                    if g.0 <= real {
                        if nodes[g.1].alive && epochs[g.1] == g.3 {
                            fences[g.1].on_granted(g.2);
                        }
                    } else {
                        keep.push(g);
                    }
                }
                grants = keep;
                // Each data region: renew its lease from the others, or learn a newer epoch.
                for holder in 0..2 {
                    if !nodes[holder].alive {
                        continue;
                    }
                    let sent = nodes[holder].now(real);
                    for promiser in 0..3 {
                        if promiser == holder || !can(holder, promiser, &nodes, &link_up) {
                            continue;
                        }
                        if rng.chance(20) {
                            continue;
                        }
                        let pnow = nodes[promiser].now(real + rng.below(200));
                        let my_epoch = epochs[holder].clone();
                        match promisers[promiser].lease(names[holder], &my_epoch, pnow, true) {
                            LeaseReply::Granted => {
                                let delay = rng.below(LEASE);
                                grants.push((real + delay, holder, sent, my_epoch));
                            }
                            LeaseReply::Fenced(newer) => {
                                epochs[holder] = newer.clone();
                                promisers[holder].observe(&newer);
                                fences[holder].revoke();
                            }
                            LeaseReply::Refused(_) => {}
                        }
                        if promiser < 2 && holder != promiser {
                            if holder == 0 {
                                b_last_seen_a = nodes[1].now(real);
                            } else {
                                a_last_seen_b = nodes[0].now(real);
                            }
                            // The promiser region also learns newer epochs from the request.
                            if epochs[holder].number > epochs[promiser].number {
                                epochs[promiser] = epochs[holder].clone();
                                promisers[promiser].observe(&epochs[holder].clone());
                                fences[promiser].revoke();
                            }
                        }
                    }
                }
                // Automatic failover in either data region (b first, later a as failback).
                for cand in 0..2 {
                    if !nodes[cand].alive {
                        continue;
                    }
                    let now = nodes[cand].now(real);
                    let (last_seen, leader_since) = if cand == 1 {
                        (b_last_seen_a, b_leader_since)
                    } else {
                        (a_last_seen_b, a_leader_since)
                    };
                    let e = epochs[cand].clone();
                    let view = AutoView {
                        my_region: names[cand],
                        epoch: &e,
                        enabled: true,
                        primary_last_seen: last_seen,
                        leader_since,
                        grace_ms: GRACE,
                        lease_ms: LEASE,
                        sealed_until: sealed_until[cand],
                        promiser_sealed: promisers[cand].is_sealed(),
                        promised_until: promisers[cand].promised_until(),
                        witness_granted: granted[cand],
                        caps_allow: true,
                        now,
                    };
                    match plan_automatic(&view) {
                        AutoDecision::Wait => {
                            if sealed_until[cand].take().is_some() {
                                promisers[cand].unseal();
                                granted[cand] = false;
                            }
                        }
                        AutoDecision::SealUntil(t) => {
                            let until = promisers[cand].seal(now).max(t);
                            sealed_until[cand] = Some(until);
                        }
                        AutoDecision::RequestVote(next) => {
                            if can(cand, 2, &nodes, &link_up) {
                                let wnow = nodes[2].now(real);
                                if promisers[2].vote(&next, wnow) == VoteReply::Granted {
                                    granted[cand] = true;
                                }
                            }
                        }
                        AutoDecision::Promote(next) => {
                            promotions += 1;
                            epochs[cand] = next.clone();
                            promisers[cand].observe(&next);
                            sealed_until[cand] = None;
                            granted[cand] = false;
                            fences[cand].revoke();
                        }
                    }
                }
                // The invariant.
                let writable: Vec<usize> = (0..2)
                    .filter(|&r| {
                        nodes[r].alive
                            && fences[r]
                                .check(names[r], &epochs[r], nodes[r].now(real))
                                .is_ok()
                    })
                    .collect();
                assert!(
                    writable.len() <= 1,
                    "seed {seed}: two writable primaries at real time {real}: {:?} {:?}",
                    epochs,
                    promisers[2].epoch()
                );
            }
        }
        // The runs must exercise failovers, or the invariant proves nothing.
        assert!(promotions > 100, "only {promotions} promotions");
    }
}
