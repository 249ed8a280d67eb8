//! The durable store-and-forward buffer: readings of bridged sensors waiting for
//! Qubitro's PUBACK, in sled, in the same database (and under the same flusher) as
//! the onboarding records ([`Store::readings`]).
//!
//! One tree; a key is `sensor id ‖ 0x00 ‖ id (u64, big endian)`, where the id comes
//! from sled's generator, which only grows, also across a kill -9 (sled skips ahead
//! on recovery). So a prefix scan of one sensor yields its readings in arrival order,
//! and a restart continues after them. 0x00 never occurs in a sensor id, so one
//! sensor's prefix never covers another's.
//!
//! Memory does not grow with the buffer: RAM holds one small counter entry per
//! sensor with buffered readings (count, bytes, oldest id) — rebuilt by one scan at
//! open — and whatever batch the uplink reads. Past a bound
//! (`bridge.max_buffered_messages` per sensor, `bridge.max_buffer_bytes` in total,
//! counting each reading as stored: its key and its record, so that many small
//! readings of a long sensor id cannot hold several times the bound) the oldest
//! readings are dropped and counted: the oldest of that sensor for the first bound,
//! for the second the oldest of the sensor holding the most bytes (one sensor cannot
//! evict everyone else's readings).
//!
//! For the age of the oldest buffered reading (/metrics) RAM also keeps, per sensor,
//! when its readings arrived, one mark per second at most and 64 at most (older marks
//! are thinned out), so the age is exact to a second for an outage of a minute and
//! never understated; readings found at open count from the open.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::{ReadingsTree, Store, StoreError};

/// Per-sensor bookkeeping, kept in RAM (one entry per sensor with readings).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tally {
    count: u64,
    bytes: u64,
    /// Id of the oldest buffered reading.
    oldest: u64,
    /// `(first id, when it arrived)`: the readings from that id on (up to the next
    /// mark) arrived at or after that time. The front covers the oldest reading.
    arrivals: VecDeque<(u64, Instant)>,
}

/// Arrival marks kept per sensor before they are thinned out.
const MAX_MARKS: usize = 64;
/// Readings arriving within this of the last mark share it.
const MARK_EVERY: Duration = Duration::from_secs(1);

impl Tally {
    fn new(oldest: u64, now: Instant) -> Tally {
        Tally {
            oldest,
            arrivals: VecDeque::from([(oldest, now)]),
            ..Tally::default()
        }
    }

    /// Notes that reading `id` arrived `now`.
    fn arrived(&mut self, id: u64, now: Instant) {
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
    fn prune(&mut self) {
        while self
            .arrivals
            .get(1)
            .is_some_and(|(id, _)| *id <= self.oldest)
        {
            self.arrivals.pop_front();
        }
    }
}

/// Totals, for stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub readings: u64,
    /// As stored: keys and records.
    pub bytes: u64,
    pub sensors: u64,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The reading's id (its position in the sensor's queue).
    pub id: u64,
    /// The write's sequence number: `store.durable(seq)` before acknowledging.
    pub seq: u64,
    /// Older readings dropped to stay within the bounds.
    pub dropped: u64,
}

/// The bounds of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_per_sensor: u64,
    pub max_bytes: u64,
}

/// The buffer. One per daemon; share it behind an `Arc`.
pub struct Buffer {
    tree: ReadingsTree,
    limits: Limits,
    /// Serialises mutations so the tallies match the tree; held only for a few
    /// sled operations, never across an await.
    tallies: Mutex<Tallies>,
}

/// The per-sensor tallies and their byte total (so an append does not sum them).
#[derive(Default)]
struct Tallies {
    per: HashMap<String, Tally>,
    bytes: u64,
}

/// The bytes one reading takes in the tree: its key and its record.
fn stored(key_len: usize, record_len: usize) -> u64 {
    (key_len + record_len) as u64
}

fn key(sensor: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(sensor.len() + 9);
    k.extend_from_slice(sensor.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn split_key(k: &[u8]) -> Option<(&str, u64)> {
    let (head, tail) = k.split_at_checked(k.len().checked_sub(9)?)?;
    if tail[0] != 0 {
        return None;
    }
    let id = u64::from_be_bytes(tail[1..].try_into().ok()?);
    Some((std::str::from_utf8(head).ok()?, id))
}

fn prefix(sensor: &str) -> Vec<u8> {
    let mut p = sensor.as_bytes().to_vec();
    p.push(0);
    p
}

impl Buffer {
    /// Opens the buffer in `store`'s database and counts what it holds (one scan).
    pub fn open(store: &Store, limits: Limits) -> Result<Buffer, StoreError> {
        let tree = store.readings()?;
        let mut tallies = Tallies::default();
        let opened = Instant::now();
        for item in tree.tree.iter() {
            let (k, v) = item?;
            let Some((sensor, id)) = split_key(&k) else {
                // Not ours (cannot happen short of corruption): leave it be.
                continue;
            };
            let t = tallies
                .per
                .entry(sensor.to_string())
                .or_insert_with(|| Tally::new(id, opened));
            let size = stored(k.len(), v.len());
            t.count += 1;
            t.bytes += size;
            t.oldest = t.oldest.min(id);
            tallies.bytes += size;
        }
        for t in tallies.per.values_mut() {
            t.arrivals = VecDeque::from([(t.oldest, opened)]);
        }
        Ok(Buffer {
            tree,
            limits: Limits {
                max_per_sensor: limits.max_per_sensor.max(1),
                max_bytes: limits.max_bytes.max(1),
            },
            tallies: Mutex::new(tallies),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tallies> {
        // A panic elsewhere while holding it leaves plain counters: still usable.
        self.tallies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a reading of `sensor`, dropping the oldest readings past a bound.
    /// Wait for `store.durable(appended.seq)` before acknowledging the reading.
    pub fn append(&self, sensor: &str, reading: &[u8]) -> Result<Appended, StoreError> {
        let size = stored(prefix(sensor).len() + 8, reading.len());
        let mut tallies = self.lock();
        let mut dropped = 0;
        // Room for this sensor.
        while tallies
            .per
            .get(sensor)
            .is_some_and(|t| t.count >= self.limits.max_per_sensor)
        {
            if !self.drop_oldest(&mut tallies, sensor)? {
                break;
            }
            dropped += 1;
        }
        // Room in total: the sensor holding the most loses its oldest first, so a
        // chatty sensor (or one whose device is refused) cannot evict everyone
        // else's readings.
        loop {
            if tallies.bytes + size <= self.limits.max_bytes {
                break;
            }
            let Some(victim) = tallies
                .per
                .iter()
                .filter(|(_, t)| t.count > 0)
                .max_by_key(|(s, t)| {
                    (
                        t.bytes,
                        std::cmp::Reverse(t.oldest),
                        std::cmp::Reverse(s.as_str()),
                    )
                })
                .map(|(s, _)| s.clone())
            else {
                break;
            };
            if !self.drop_oldest(&mut tallies, &victim)? {
                break;
            }
            dropped += 1;
        }
        let id = self.tree.next_id()?;
        self.tree.tree.insert(key(sensor, id), reading)?;
        let now = Instant::now();
        let t = tallies
            .per
            .entry(sensor.to_string())
            .or_insert_with(|| Tally::new(id, now));
        t.count += 1;
        t.bytes += size;
        t.oldest = t.oldest.min(id);
        t.arrived(id, now);
        tallies.bytes += size;
        Ok(Appended {
            id,
            seq: self.tree.wrote(),
            dropped,
        })
    }

    /// Removes the oldest reading of `sensor`; false when it has none.
    fn drop_oldest(&self, tallies: &mut Tallies, sensor: &str) -> Result<bool, StoreError> {
        let Some((k, v)) = self
            .tree
            .tree
            .scan_prefix(prefix(sensor))
            .next()
            .transpose()?
        else {
            if let Some(t) = tallies.per.remove(sensor) {
                tallies.bytes = tallies.bytes.saturating_sub(t.bytes);
            }
            return Ok(false);
        };
        self.tree.tree.remove(&k)?;
        self.tree.wrote();
        self.forget(tallies, sensor, stored(k.len(), v.len()));
        Ok(true)
    }

    /// Updates the tally after one reading of `sensor` left the tree.
    fn forget(&self, tallies: &mut Tallies, sensor: &str, bytes: u64) {
        let Some(t) = tallies.per.get_mut(sensor) else {
            return;
        };
        t.count = t.count.saturating_sub(1);
        t.bytes = t.bytes.saturating_sub(bytes);
        tallies.bytes = tallies.bytes.saturating_sub(bytes);
        if t.count == 0 {
            tallies.per.remove(sensor);
            return;
        }
        // The new oldest: one key read.
        if let Some(Ok((k, _))) = self.tree.tree.scan_prefix(prefix(sensor)).next() {
            if let Some((_, id)) = split_key(&k) {
                t.oldest = id;
                t.prune();
            }
        }
    }

    /// Up to `n` readings of `sensor` in arrival order, starting after id `after`
    /// (`None`: from the oldest). Only this batch is held in memory.
    pub fn oldest(
        &self,
        sensor: &str,
        after: Option<u64>,
        n: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let start = match after {
            Some(id) if id == u64::MAX => return Ok(Vec::new()),
            Some(id) => key(sensor, id + 1),
            None => key(sensor, 0),
        };
        let end = key(sensor, u64::MAX);
        let mut out = Vec::with_capacity(n.min(64));
        for item in self.tree.tree.range(start..=end).take(n) {
            let (k, v) = item?;
            if let Some((_, id)) = split_key(&k) {
                out.push((id, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Removes the readings of `sensor` up to and including id `through` (after
    /// Qubitro acknowledged them). Returns how many were removed; readings already
    /// dropped by a bound are simply not there.
    pub fn remove_through(&self, sensor: &str, through: u64) -> Result<u64, StoreError> {
        let mut tallies = self.lock();
        let keys: Vec<(sled::IVec, usize)> = self
            .tree
            .tree
            .range(key(sensor, 0)..=key(sensor, through))
            .map(|item| item.map(|(k, v)| (k, v.len())))
            .collect::<Result<_, _>>()?;
        let mut removed = 0;
        for (k, len) in keys {
            if self.tree.tree.remove(&k)?.is_some() {
                removed += 1;
                self.forget(&mut tallies, sensor, stored(k.len(), len));
            }
        }
        if removed > 0 {
            // Not waited for: a removal lost in a crash only means the reading
            // is sent again (at least once), and the next flush covers it.
            self.tree.wrote();
        }
        Ok(removed)
    }

    /// Readings buffered for `sensor`.
    pub fn count(&self, sensor: &str) -> u64 {
        self.lock().per.get(sensor).map_or(0, |t| t.count)
    }

    /// Sensors that have buffered readings.
    pub fn sensors(&self) -> Vec<String> {
        self.lock().per.keys().cloned().collect()
    }

    pub fn totals(&self) -> Totals {
        let tallies = self.lock();
        Totals {
            readings: tallies.per.values().map(|t| t.count).sum(),
            bytes: tallies.bytes,
            sensors: tallies.per.len() as u64,
        }
    }

    /// How long the oldest buffered reading (of any sensor) has waited; `None` when
    /// nothing is buffered.
    pub fn oldest_age(&self) -> Option<Duration> {
        self.oldest_since().map(|since| since.elapsed())
    }

    /// When the oldest buffered reading (of any sensor) arrived, to a second.
    fn oldest_since(&self) -> Option<Instant> {
        let tallies = self.lock();
        tallies
            .per
            .values()
            .filter_map(|t| t.arrivals.front().map(|(_, at)| *at))
            .min()
    }

    pub fn store(&self) -> &Store {
        self.tree.store()
    }
}

#[cfg(test)]
#[path = "buffer_tests.rs"]
mod tests;
