//! Wall-clock readings for the edges of the node (front-ends and background tasks). The domain
//! never reads the clock: the time travels inside each command.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Injected skew of this node's wall clock in ms (chaos runs: `clockSkewMs` in
/// `PUT /meridian/cluster/faults`); 0 otherwise. Leases and timeouts use the monotonic clock and
/// are unaffected by design; what reads the wall clock here (token expiry, enqueued times, C2D
/// expiry, retention, failover caps) sees the skewed time, as on a node whose clock is wrong.
static SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Sets the injected skew (ms; negative: behind).
pub fn set_skew_ms(ms: i64) {
    SKEW_MS.store(ms, Ordering::Relaxed);
}

/// The injected skew in ms.
pub fn skew_ms() -> i64 {
    SKEW_MS.load(Ordering::Relaxed)
}

/// Now, on this node's (possibly skewed) wall clock.
pub fn system_now() -> SystemTime {
    let skew = skew_ms();
    let now = SystemTime::now();
    let shifted = if skew >= 0 {
        now.checked_add(Duration::from_millis(skew.unsigned_abs()))
    } else {
        now.checked_sub(Duration::from_millis(skew.unsigned_abs()))
    };
    shifted.unwrap_or(now)
}

/// Now as a chrono UTC time (skewed like [`system_now`]).
pub fn utc_now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::<chrono::Utc>::from(system_now())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    system_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    system_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Now in Azure's timestamp format (ISO-8601, UTC, milliseconds).
///
/// Formatted at most once per millisecond per thread: every telemetry message is stamped with it,
/// and formatting cost ~1% of a node's CPU under load.
pub fn iso_now() -> String {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(i64, String)>> = const { std::cell::RefCell::new(None) };
    }
    let now = utc_now();
    let ms = now.timestamp_millis();
    LAST.with_borrow_mut(|last| match last {
        Some((at, text)) if *at == ms => text.clone(),
        _ => {
            let text = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            *last = Some((ms, text.clone()));
            text
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_now_is_the_current_millisecond_in_azure_format() {
        for _ in 0..3 {
            let before = utc_now().timestamp_millis();
            let text = iso_now();
            let after = utc_now().timestamp_millis();
            let parsed = chrono::DateTime::parse_from_rfc3339(&text).expect("RFC 3339");
            assert!(text.ends_with('Z') && text.len() == "2026-11-28T00:00:00.000Z".len());
            assert!(
                (before..=after).contains(&parsed.timestamp_millis()),
                "{text}"
            );
            // The next call in a later millisecond is formatted afresh, not the cached text.
            std::thread::sleep(Duration::from_millis(2));
            assert_ne!(iso_now(), text);
        }
    }
}
