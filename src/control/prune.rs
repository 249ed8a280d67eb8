//! `devices prune --not-seen-for DURATION [--delete-remote] [--dry-run]`: forgets
//! every sensor silent for longer than DURATION, each exactly as `devices forget`
//! would (with `--delete-remote`: its Qubitro device deleted first, and that sensor
//! kept when Qubitro refuses). The choice is a pure function of the records, their
//! last-seen times and `now`, so it is tested without waiting.

use std::time::Duration;

use super::forget::{describe, forget, Remote};
use super::Response;
use crate::cloud::Cloud;
use crate::engine::Engine;
use crate::store::{Store, StoreError};

/// Reads `30d`, `12h`, `15m`, `90s` (one number, one unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit (30d, 12h, 15m, 90s)"))?;
    let per = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => {
            return Err(format!(
                "{text:?}: the unit must be d, h, m or s (30d, 12h, 15m, 90s)"
            ))
        }
    };
    n.checked_mul(per)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// One known sensor as prune weighs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub sensor: String,
    /// When it was last heard from; a record written before last-seen times were
    /// kept falls back to its last change.
    pub last_ms: u64,
}

/// The sensors silent for longer than `not_seen_for` at `now_ms`, oldest first.
pub fn silent(mut seen: Vec<Seen>, now_ms: u64, not_seen_for: Duration) -> Vec<Seen> {
    let limit = u64::try_from(not_seen_for.as_millis()).unwrap_or(u64::MAX);
    seen.retain(|s| now_ms.saturating_sub(s.last_ms) > limit);
    seen.sort_by(|a, b| (a.last_ms, &a.sensor).cmp(&(b.last_ms, &b.sensor)));
    seen
}

fn weigh(store: &Store) -> Result<Vec<Seen>, StoreError> {
    let mut out = Vec::new();
    for item in store.scan() {
        let (sensor, rec) = item?;
        let last_ms = store.last_seen(&sensor)?.unwrap_or(rec.updated_ms);
        out.push(Seen { sensor, last_ms });
    }
    Ok(out)
}

/// Runs a prune against `store` (the daemon's, with its `engine`, or the CLI's).
pub async fn prune(
    store: &Store,
    engine: Option<&Engine>,
    delete_with: Option<&Cloud>,
    not_seen_for: Duration,
    dry_run: bool,
) -> Response {
    let now_ms = crate::clock::system_ms();
    let chosen = match weigh(store) {
        Ok(seen) => silent(seen, now_ms, not_seen_for),
        Err(e) => {
            return Response::Error {
                message: e.to_string(),
            }
        }
    };
    let mut lines = Vec::new();
    let mut failed = 0;
    for s in chosen {
        let ago = ago(now_ms.saturating_sub(s.last_ms));
        if dry_run {
            lines.push(format!(
                "{}: last seen {ago} ago; would be forgotten (dry run)",
                s.sensor
            ));
            continue;
        }
        // Heard from since the list was made: no longer silent.
        let again = store
            .last_seen(&s.sensor)
            .ok()
            .flatten()
            .unwrap_or(s.last_ms);
        if now_ms.saturating_sub(again)
            <= u64::try_from(not_seen_for.as_millis()).unwrap_or(u64::MAX)
        {
            lines.push(format!("{}: heard from meanwhile; kept", s.sensor));
            continue;
        }
        match forget(store, engine, delete_with, &s.sensor).await {
            Ok(Some(done)) => {
                if matches!(done.remote, Remote::Left { .. }) {
                    failed += 1;
                }
                lines.push(format!(
                    "last seen {ago} ago: {}",
                    describe(&s.sensor, &done.remote)
                ));
            }
            Ok(None) => lines.push(format!("{}: forgotten meanwhile", s.sensor)),
            Err(e) => {
                failed += 1;
                lines.push(format!("{}: NOT pruned: {e}", s.sensor));
            }
        }
    }
    Response::Pruned { lines, failed }
}

/// `3d 4h`, `5h 2m`, `12m`, `40s`: the two largest units.
pub fn ago(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_in_days_hours_minutes_and_seconds() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        for bad in ["", "30", "d", "3x", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_sensors_silent_for_longer_than_the_duration_are_chosen_oldest_first() {
        let seen = |sensor: &str, last_ms| Seen {
            sensor: sensor.into(),
            last_ms,
        };
        let now = 1_000_000;
        let all = vec![
            seen("recent", now - 1_000),
            seen("exactly", now - 90_000),
            seen("old", now - 90_001),
            seen("older", now - 500_000),
            seen("future", now + 5_000),
        ];
        let chosen = silent(all, now, Duration::from_secs(90));
        assert_eq!(
            chosen,
            vec![seen("older", now - 500_000), seen("old", now - 90_001)]
        );
    }

    #[test]
    fn ages_are_shown_in_their_two_largest_units() {
        assert_eq!(ago(40_000), "40s");
        assert_eq!(ago(12 * 60_000), "12m");
        assert_eq!(ago((5 * 3_600 + 2 * 60) * 1000), "5h 2m");
        assert_eq!(ago((3 * 86_400 + 4 * 3_600 + 7) * 1000), "3d 4h");
    }
}
