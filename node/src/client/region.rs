//! Judging region status samples: is a primary region writable, and were two regions ever
//! writable at once. Status answers taken "at the same time" are not one instant (each request
//! takes its own time), so two writable answers prove a split only when the windows in which each
//! region was certainly writable overlap.

use std::time::{Duration, Instant};

use serde_json::Value;

/// One node's answer to `GET /meridian/region`, with when it was asked and answered.
#[derive(Debug, Clone, Copy)]
pub struct WritableAnswer {
    /// `writable` in the answer.
    pub writable: bool,
    /// When the request was sent.
    pub asked: Instant,
    /// When the answer arrived.
    pub answered: Instant,
    /// `leaseRemainingMs`: the lease the node still held when it answered.
    pub lease_left: Option<Duration>,
}

impl WritableAnswer {
    /// Reads a region status answer.
    pub fn from_status(status: &Value, asked: Instant, answered: Instant) -> Self {
        Self {
            writable: status["writable"] == true,
            asked,
            answered,
            lease_left: status["leaseRemainingMs"]
                .as_u64()
                .map(Duration::from_millis),
        }
    }

    /// Until when the node was certainly still writable: it was at some instant between asking
    /// and answering, with `lease_left` to go (no renewal assumed). Without a lease to go by,
    /// the answer alone counts as writable from then on (the strict reading).
    fn surely_until(&self) -> Option<Instant> {
        if !self.writable {
            return None;
        }
        Some(match self.lease_left {
            Some(left) => self.asked + left,
            None => self.answered + Duration::from_secs(3600),
        })
    }
}

/// Whether two answers prove an instant at which both nodes took writes: both were certainly
/// writable from their answers on, until a common instant after the later answer.
pub fn surely_writable_together(a: &WritableAnswer, b: &WritableAnswer) -> bool {
    match (a.surely_until(), b.surely_until()) {
        (Some(au), Some(bu)) => a.answered.max(b.answered) < au.min(bu),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_writable_answers_count_only_when_their_certain_windows_overlap() {
        let t0 = Instant::now();
        let answer = |writable, answered_ms, left_ms: Option<u64>| WritableAnswer {
            writable,
            asked: t0,
            answered: t0 + Duration::from_millis(answered_ms),
            lease_left: left_ms.map(Duration::from_millis),
        };
        // Both still held a lease when the later answer came: two writable regions.
        assert!(surely_writable_together(
            &answer(true, 50, Some(500)),
            &answer(true, 60, Some(500))
        ));
        // The first lease ran out before the second answer: a hand-over, not a split.
        assert!(!surely_writable_together(
            &answer(true, 5, Some(10)),
            &answer(true, 60, Some(500))
        ));
        assert!(!surely_writable_together(
            &answer(true, 50, Some(500)),
            &answer(false, 60, None)
        ));
        // Without a lease to go by, two writable answers count (the strict reading).
        assert!(surely_writable_together(
            &answer(true, 50, None),
            &answer(true, 60, None)
        ));
        let status = serde_json::json!({"writable": true, "leaseRemainingMs": 250});
        let read = WritableAnswer::from_status(&status, t0, t0);
        assert_eq!(read.lease_left, Some(Duration::from_millis(250)));
        assert!(read.writable);
    }
}
