//! The rate-limit policy on its own: which events of one log statement pass in a
//! window, and when a summary of the dropped ones is due. Pure, with `now` passed
//! in, so it is tested without a subscriber or a clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Counts events per key (a log statement) in fixed windows and decides which pass.
///
/// Pure bookkeeping with the time passed in, so the policy is testable without a
/// subscriber or a clock.
#[derive(Debug)]
pub struct Summariser<K> {
    /// Events let through per key and window.
    burst: u32,
    /// Window length; a key's window starts at its first event after the previous one ended.
    window: Duration,
    /// Only keys seen in a live window (expired ones are dropped at the next sweep),
    /// so memory is bounded by the number of log statements that fired recently.
    entries: HashMap<K, Entry>,
    /// Sweeping every key on every event would be wasted work during a flood.
    next_sweep: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    passed: u32,
    suppressed: u64,
}

/// What [`Summariser::check`] says about one event.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict<K> {
    /// Whether the event itself should be written.
    pub pass: bool,
    /// Summaries that are due now, to be written before the event.
    pub summaries: Vec<Summary<K>>,
}

/// "K events from `key` were dropped between `since` and now".
#[derive(Debug, PartialEq, Eq)]
pub struct Summary<K> {
    pub key: K,
    pub suppressed: u64,
    /// Time from the start of the window that suppressed them to the summary.
    pub over: Duration,
}

impl<K: Eq + Hash + Clone> Summariser<K> {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            entries: HashMap::new(),
            next_sweep: None,
        }
    }

    /// Records one event for `key` at `now`.
    pub fn check(&mut self, key: K, now: Instant) -> Verdict<K> {
        let mut summaries = Vec::new();
        let window = self.window;

        let entry = self.entries.entry(key.clone()).or_insert(Entry {
            window_start: now,
            passed: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(entry.window_start) >= window {
            if entry.suppressed > 0 {
                summaries.push(Summary {
                    key: key.clone(),
                    suppressed: entry.suppressed,
                    over: now.saturating_duration_since(entry.window_start),
                });
            }
            *entry = Entry {
                window_start: now,
                passed: 0,
                suppressed: 0,
            };
        }
        let pass = if entry.passed < self.burst {
            entry.passed += 1;
            true
        } else {
            entry.suppressed += 1;
            false
        };

        // Without this sweep a flood that simply stops would never be summarised
        // (its own key never fires again). Any later event, from anywhere, flushes it.
        if self.next_sweep.is_none_or(|t| now >= t) {
            self.next_sweep = Some(now + window.min(Duration::from_secs(1)));
            self.entries.retain(|k, e| {
                let expired = now.saturating_duration_since(e.window_start) >= window;
                if expired && e.suppressed > 0 {
                    summaries.push(Summary {
                        key: k.clone(),
                        suppressed: e.suppressed,
                        over: now.saturating_duration_since(e.window_start),
                    });
                }
                !expired
            });
        }
        Verdict { pass, summaries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn lets_the_first_burst_through_then_suppresses_the_rest_of_the_window() {
        let t0 = Instant::now();
        let mut s = Summariser::new(3, Duration::from_secs(10));
        let passed: Vec<bool> = (0..10).map(|i| s.check("a", at(t0, i)).pass).collect();
        assert_eq!(
            passed,
            [true, true, true, false, false, false, false, false, false, false]
        );
    }

    #[test]
    fn summarises_the_suppressed_count_when_the_next_window_starts() {
        let t0 = Instant::now();
        let mut s = Summariser::new(2, Duration::from_secs(10));
        for i in 0..1000 {
            assert!(s.check("a", at(t0, i)).summaries.is_empty());
        }
        let v = s.check("a", at(t0, 10_000));
        assert!(v.pass, "the first event of a new window is written");
        assert_eq!(
            v.summaries,
            vec![Summary {
                key: "a",
                suppressed: 998,
                over: Duration::from_secs(10)
            }]
        );
        // The count was reset with the window.
        let v = s.check("a", at(t0, 10_001));
        assert!(v.pass && v.summaries.is_empty());
    }

    #[test]
    fn keys_are_limited_independently() {
        let t0 = Instant::now();
        let mut s = Summariser::new(1, Duration::from_secs(10));
        assert!(s.check("a", t0).pass);
        assert!(!s.check("a", t0).pass);
        assert!(
            s.check("b", t0).pass,
            "a flood from one statement must not mute another"
        );
    }

    #[test]
    fn a_flood_that_stops_is_summarised_by_any_later_event() {
        let t0 = Instant::now();
        let mut s = Summariser::new(1, Duration::from_secs(10));
        for i in 0..5 {
            s.check("flood", at(t0, i));
        }
        let v = s.check("other", at(t0, 12_000));
        assert!(v.pass);
        assert_eq!(
            v.summaries,
            vec![Summary {
                key: "flood",
                suppressed: 4,
                over: Duration::from_secs(12)
            }]
        );
        // Summarised once only, and the expired key is forgotten.
        assert!(s.check("other", at(t0, 14_000)).summaries.is_empty());
        assert!(!s.entries.contains_key("flood"));
    }

    #[test]
    fn a_quiet_statement_is_never_summarised() {
        let t0 = Instant::now();
        let mut s = Summariser::new(5, Duration::from_secs(10));
        for i in 0..50 {
            // One event every 2 s: never more than 5 per window.
            let v = s.check("slow", at(t0, i * 2_000));
            assert!(v.pass && v.summaries.is_empty(), "event {i}");
        }
    }

    #[test]
    fn memory_is_bounded_by_recently_active_statements() {
        let t0 = Instant::now();
        let mut s = Summariser::new(5, Duration::from_secs(1));
        for i in 0..1000u64 {
            s.check(i, at(t0, i * 100));
        }
        assert!(s.entries.len() <= 20, "{} entries kept", s.entries.len());
    }
}
