//! How many sensors are in each onboarding state, kept as every record changes so
//! that /metrics never reads the fleet (sled has no count: a tree's length is a scan).
//! Seeded at open without a scan of its own: from the counts an orderly stop writes
//! into its clean-stop mark, or from the scan an unclean stop makes anyway.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use crate::onboarding::State;

/// The states counted, in the order of [`Census::counts`].
pub const STATES: [&str; 4] = ["pending", "creating", "created", "delivered"];

/// Sensors per state. Signed: a change counted before its seed is read back can
/// never make a count wrap.
#[derive(Debug, Default)]
pub struct Census([AtomicI64; 4]);

fn slot(s: &State) -> usize {
    match s {
        State::Pending => 0,
        State::Creating => 1,
        State::Created { .. } => 2,
        State::Delivered { .. } => 3,
    }
}

impl Census {
    pub(super) fn added(&self, s: &State) {
        self.0[slot(s)].fetch_add(1, Relaxed);
    }

    pub(super) fn removed(&self, s: &State) {
        self.0[slot(s)].fetch_sub(1, Relaxed);
    }

    pub(super) fn moved(&self, from: &State, to: &State) {
        if slot(from) != slot(to) {
            self.removed(from);
            self.added(to);
        }
    }

    pub(super) fn seed(&self, counts: [u64; 4]) {
        for (c, n) in self.0.iter().zip(counts) {
            c.store(i64::try_from(n).unwrap_or(i64::MAX), Relaxed);
        }
    }

    /// Sensors per state, as [`STATES`] names them.
    pub fn counts(&self) -> [u64; 4] {
        self.0
            .each_ref()
            .map(|c| u64::try_from(c.load(Relaxed)).unwrap_or(0))
    }

    /// The line the clean-stop mark holds.
    pub(super) fn encode(&self) -> String {
        let parts: Vec<String> = STATES
            .iter()
            .zip(self.counts())
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        format!("sensors {}\n", parts.join(" "))
    }

    /// The counts of a clean-stop mark; `None` for a mark without them (written by an
    /// earlier version: the open then counts the records once).
    pub(super) fn decode(mark: &str) -> Option<[u64; 4]> {
        let rest = mark.trim().strip_prefix("sensors ")?;
        let mut counts = [None; 4];
        for part in rest.split(' ') {
            let (name, n) = part.split_once('=')?;
            let i = STATES.iter().position(|s| *s == name)?;
            counts[i] = Some(n.parse().ok()?);
        }
        let [a, b, c, d] = counts;
        Some([a?, b?, c?, d?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{cfg, created, pending};
    use crate::store::Store;

    #[test]
    fn a_transition_moves_one_sensor_between_states() {
        let c = Census::default();
        c.added(&State::Pending);
        c.added(&State::Pending);
        c.moved(&State::Pending, &created().state);
        assert_eq!(c.counts(), [1, 0, 1, 0]);
        c.moved(&State::Pending, &pending().state);
        assert_eq!(c.counts(), [1, 0, 1, 0], "a change within a state");
        c.removed(&created().state);
        assert_eq!(c.counts(), [1, 0, 0, 0]);
    }

    #[test]
    fn the_mark_round_trips_and_an_old_empty_mark_reads_as_unknown() {
        let c = Census::default();
        c.seed([3, 1, 4, 100_000]);
        assert_eq!(Census::decode(&c.encode()), Some([3, 1, 4, 100_000]));
        assert_eq!(Census::decode(""), None);
        assert_eq!(Census::decode("sensors pending=1 creating=2"), None);
        assert_eq!(
            Census::decode("sensors pending=x creating=0 created=0 delivered=0"),
            None
        );
    }

    // Multi-threaded: a closed store's flusher must get to run and let go of the
    // database while the next open retries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_counts_follow_every_change_and_survive_a_clean_and_an_unclean_stop() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(&cfg(dir.path())).unwrap();
            s.insert_new("a", &pending()).unwrap();
            s.insert_new("b", &pending()).unwrap();
            s.insert_new("c", &pending()).unwrap();
            s.update("a", |r| r.creating(2).ok()).unwrap();
            s.update("b", |_| Some(created())).unwrap();
            s.update("b", |r| r.delivered(3).ok()).unwrap();
            s.remove("c", None).unwrap();
            assert_eq!(s.sensors_by_state(), [0, 1, 0, 1]);
            s.close_cleanly().await.unwrap();
        }
        {
            let (s, _) = Store::open(&cfg(dir.path())).unwrap();
            assert_eq!(
                s.sensors_by_state(),
                [0, 1, 0, 1],
                "from the clean-stop mark"
            );
            s.insert_new("d", &pending()).unwrap();
            s.flush_all().await.unwrap();
            // Dropped without close_cleanly: an unclean stop.
        }
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        assert_eq!(
            s.sensors_by_state(),
            [1, 1, 0, 1],
            "from the reconciling scan"
        );
    }
}
