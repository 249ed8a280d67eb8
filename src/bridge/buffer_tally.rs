//! What the spill buffer keeps in RAM per sensor with buffered readings: counts,
//! the oldest and newest ids, and when its readings arrived (for the age of the
//! oldest buffered reading).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Per-sensor bookkeeping, kept in RAM (one entry per sensor with readings).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Tally {
    pub(super) count: u64,
    pub(super) bytes: u64,
    /// Id of the oldest buffered reading.
    pub(super) oldest: u64,
    /// Id of the newest: a scan for this sensor stops past its batch.
    pub(super) newest: u64,
    /// Removals since the watermark was last written.
    pub(super) unsaved: u64,
    /// `(first id, when it arrived)`: the readings from that id on (up to the next
    /// mark) arrived at or after that time. The front covers the oldest reading.
    pub(super) arrivals: VecDeque<(u64, Instant)>,
}

/// Arrival marks kept per sensor before they are thinned out.
pub(super) const MAX_MARKS: usize = 64;
/// Readings arriving within this of the last mark share it.
const MARK_EVERY: Duration = Duration::from_secs(1);

impl Tally {
    pub(super) fn new(oldest: u64, now: Instant) -> Tally {
        Tally {
            oldest,
            arrivals: VecDeque::from([(oldest, now)]),
            ..Tally::default()
        }
    }

    /// Notes that reading `id` arrived `now`.
    pub(super) fn arrived(&mut self, id: u64, now: Instant) {
        if self
            .arrivals
            .back()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) < MARK_EVERY)
        {
            return;
        }
        self.arrivals.push_back((id, now));
        if self.arrivals.len() > MAX_MARKS {
            // Drop every other mark after the first: a dropped mark's readings fall
            // under the earlier one, so the age can only be overstated.
            let mut i = 0;
            self.arrivals.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
    }

    /// Drops the marks wholly before the oldest reading still buffered.
    pub(super) fn prune(&mut self) {
        while self
            .arrivals
            .get(1)
            .is_some_and(|(id, _)| *id <= self.oldest)
        {
            self.arrivals.pop_front();
        }
    }
}
