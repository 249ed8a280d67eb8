//! The durable store-and-forward buffer: readings of bridged sensors that Qubitro
//! could not take in time, in sled, in the same database (and under the same
//! flusher) as the onboarding records ([`Store::spill`]).
//!
//! The readings spilled between two flushes are held in memory and written as one
//! value (a batch, [`super::spill_batch`]) just before the flush that makes them
//! durable: a group commit of an outage writes one key, not one per reading, since
//! sled rewrites a whole leaf every few changes to it. A reading Qubitro took is not
//! removed from its batch: the sensor's watermark moves past it, and a batch goes
//! once no sensor has a reading left in it or before it. The watermark is written
//! when the sensor's buffer empties or every [`SAVE_EVERY`] removals; a crash loses
//! at most the moves since then, and those readings are sent again (at least once).
//!
//! Memory does not grow with the buffer: RAM holds one small counter entry and one
//! watermark per sensor with buffered readings (rebuilt by one scan at open), the
//! batch not yet written (at most [`SEAL_BYTES`]) and whatever batch the uplink
//! reads. Past a bound (`bridge.max_buffered_messages` per sensor,
//! `bridge.max_buffer_bytes` in total, counting each reading as a key of its own
//! and its record would take: its sensor id, 9 bytes and its payload, so that many
//! small readings of a long sensor id cannot hold several times the bound) the
//! oldest readings are dropped and counted: the oldest of that sensor for the first
//! bound, for the second the oldest of the sensor holding the most bytes (one
//! sensor cannot evict everyone else's readings). Those two bounds alone decide
//! which readings are dropped. The batches on disk also hold readings that are
//! gone (forwarded or dropped) while a slower sensor's older reading keeps their
//! batch: once those exceed `bridge.max_buffer_bytes`, the oldest batches are
//! rewritten with only the readings still buffered, which keep their ids, so the
//! batches stay within twice the bound (plus the batch being gathered) and one
//! stuck sensor keeps no gone reading on disk for ever.
//!
//! For the age of the oldest buffered reading (/metrics) RAM also keeps, per sensor,
//! when its readings arrived, one mark per second at most and 64 at most (older marks
//! are thinned out), so the age is exact to a second for an outage of a minute and
//! never understated; readings found at open count from the open.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::spill_batch as disk;
use crate::store::{BeforeFlush, ReadingsTree, Store, StoreError};
use tally::Tally;
#[cfg(test)]
use tally::MAX_MARKS;

/// The batch not yet written goes to sled (not flushed) once it holds this many
/// bytes, so memory stays small whatever the flush pace.
const SEAL_BYTES: usize = 64 * 1024;

/// A batch gathered for longer goes to sled at the next append even if no flush
/// asked for it, so that sled's own background flush (every second) covers spilled
/// readings nobody waits for (QoS 0) within about two seconds.
const SEAL_AGE: Duration = Duration::from_secs(1);

/// Removals after which a sensor's watermark is written even though its buffer is
/// not empty yet: what a crash can make the uplink send again.
const SAVE_EVERY: u64 = 64;

/// A sensor's watermark: its readings up to `through` are gone.
#[derive(Debug, Clone, Copy)]
struct Mark {
    through: u64,
    /// Moved since it was last written.
    dirty: bool,
    /// Some value of it is on disk (to remove once no batch needs it).
    on_disk: bool,
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
    inner: Arc<Inner>,
}

/// What the store's flusher holds (weakly) to write the pending batch first.
struct Inner {
    store: Store,
    limits: Limits,
    /// Serialises mutations so the tallies match the tree; held only for a few
    /// sled operations, never across an await.
    state: Mutex<State>,
}

struct State {
    /// Replaced by a new, empty one each time the buffer drains (see `save`).
    tree: ReadingsTree,
    per: HashMap<String, Tally>,
    /// Sum of the tallies' bytes (so an append does not sum them).
    bytes: u64,
    marks: HashMap<String, Mark>,
    pending: Pending,
    /// Bytes of the batches written: more than `bytes` once acknowledged readings
    /// wait in a batch a slower sensor still needs, and bounded like it.
    disk: u64,
}

/// The readings spilled since the last flush: the next batch.
#[derive(Default)]
struct Pending {
    /// Its batch number, taken at its first reading.
    no: Option<u64>,
    /// When its first reading came.
    since: Option<Instant>,
    readings: Vec<(String, Vec<u8>)>,
    bytes: usize,
}

/// The bytes one reading counts for in the bounds: the key and record it would
/// take on its own (sensor id, a separator and a u64 id; the payload).
fn stored(sensor: &str, payload_len: usize) -> u64 {
    (sensor.len() + 9 + payload_len) as u64
}

impl Buffer {
    /// Opens the buffer in `store`'s database and counts what it holds (one scan).
    pub fn open(store: &Store, limits: Limits) -> Result<Buffer, StoreError> {
        let tree = store.spill()?;
        disk::migrate(store, &tree)?;
        let opened = Instant::now();
        let mut st = State {
            tree,
            per: HashMap::new(),
            bytes: 0,
            marks: HashMap::new(),
            pending: Pending::default(),
            disk: 0,
        };
        for item in st.tree.tree.range(disk::mark_key("")..) {
            let (k, v) = item?;
            let (Some(sensor), Ok(through)) = (disk::mark_sensor(&k), <[u8; 8]>::try_from(&*v))
            else {
                continue;
            };
            let mark = Mark {
                through: u64::from_be_bytes(through),
                dirty: false,
                on_disk: true,
            };
            st.marks.insert(sensor.to_string(), mark);
        }
        let batches = st
            .tree
            .tree
            .range(disk::batch_key(0)..=disk::batch_key(u64::MAX));
        for item in batches {
            let (k, v) = item?;
            let Some(no) = disk::batch_no(&k) else {
                continue;
            };
            st.disk += v.len() as u64;
            for (id, sensor, payload) in disk::decode(no, &v) {
                if st.marks.get(sensor).is_some_and(|m| id <= m.through) {
                    continue;
                }
                st.count_in(sensor, id, stored(sensor, payload.len()), opened);
            }
        }
        for t in st.per.values_mut() {
            t.arrivals = VecDeque::from([(t.oldest, opened)]);
        }
        let inner = Arc::new(Inner {
            store: store.clone(),
            limits: Limits {
                max_per_sensor: limits.max_per_sensor.max(1),
                max_bytes: limits.max_bytes.max(1),
            },
            state: Mutex::new(st),
        });
        let weak: Weak<dyn BeforeFlush> = Arc::downgrade(&inner) as Weak<dyn BeforeFlush>;
        store.before_flush(weak);
        Ok(Buffer { inner })
    }

    /// Appends a reading of `sensor`, dropping the oldest readings past a bound.
    /// Wait for `store.durable(appended.seq)` before acknowledging the reading.
    pub fn append(&self, sensor: &str, reading: &[u8]) -> Result<Appended, StoreError> {
        self.inner.append(sensor, reading)
    }

    /// Up to `n` readings of `sensor` in arrival order, starting after id `after`
    /// (`None`: from the oldest). Only this batch is held in memory.
    pub fn oldest(
        &self,
        sensor: &str,
        after: Option<u64>,
        n: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let st = self.inner.lock();
        let Some(t) = st.per.get(sensor) else {
            return Ok(Vec::new());
        };
        let from = match after {
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(id) => (id + 1).max(t.oldest),
            None => t.oldest,
        };
        let mut out = Vec::with_capacity(n.min(64));
        if n > 0 {
            self.inner.scan(&st, sensor, from, |id, payload| {
                out.push((id, payload.to_vec()));
                out.len() < n
            })?;
        }
        Ok(out)
    }

    /// Removes the readings of `sensor` up to and including id `through` (after
    /// Qubitro acknowledged them). Returns how many were removed; readings already
    /// dropped by a bound are simply not there.
    pub fn remove_through(&self, sensor: &str, through: u64) -> Result<u64, StoreError> {
        let mut st = self.inner.lock();
        let Some((oldest, newest, count, bytes)) = st
            .per
            .get(sensor)
            .map(|t| (t.oldest, t.newest, t.count, t.bytes))
        else {
            return Ok(0);
        };
        if through < oldest {
            return Ok(0);
        }
        if through >= newest {
            self.inner
                .gone(&mut st, sensor, newest, count, bytes, None)?;
            return Ok(count);
        }
        let (mut n, mut bytes, mut last, mut next) = (0, 0, oldest, None);
        self.inner.scan(&st, sensor, oldest, |id, payload| {
            if id > through {
                next = Some(id);
                return false;
            }
            (n, bytes, last) = (n + 1, bytes + stored(sensor, payload.len()), id);
            true
        })?;
        if n > 0 {
            self.inner.gone(&mut st, sensor, last, n, bytes, next)?;
        }
        Ok(n)
    }

    /// Readings buffered for `sensor`.
    pub fn count(&self, sensor: &str) -> u64 {
        self.inner.lock().per.get(sensor).map_or(0, |t| t.count)
    }

    /// Sensors that have buffered readings.
    pub fn sensors(&self) -> Vec<String> {
        self.inner.lock().per.keys().cloned().collect()
    }

    pub fn totals(&self) -> Totals {
        let st = self.inner.lock();
        Totals {
            readings: st.per.values().map(|t| t.count).sum(),
            bytes: st.bytes,
            sensors: st.per.len() as u64,
        }
    }

    /// How long the oldest buffered reading (of any sensor) has waited; `None` when
    /// nothing is buffered.
    pub fn oldest_age(&self) -> Option<Duration> {
        self.oldest_since().map(|since| since.elapsed())
    }

    /// When the oldest buffered reading (of any sensor) arrived, to a second.
    fn oldest_since(&self) -> Option<Instant> {
        let st = self.inner.lock();
        st.per
            .values()
            .filter_map(|t| t.arrivals.front().map(|(_, at)| *at))
            .min()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }
}

impl Drop for Buffer {
    /// What was spilled since the last flush goes to sled (not flushed), as each
    /// reading did when it had a key of its own: a buffer opened for one change
    /// (`devices forget` without the daemon) loses nothing when it goes.
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Err(e) = self.inner.seal(&mut st) {
            tracing::error!(error = %e, "bridge buffer: writing the spilled readings failed: {e}");
        }
    }
}

impl State {
    /// Counts reading `id` of `sensor`, arrived `now`, in (the newest so far).
    fn count_in(&mut self, sensor: &str, id: u64, size: u64, now: Instant) {
        let t = self
            .per
            .entry(sensor.to_string())
            .or_insert_with(|| Tally::new(id, now));
        t.count += 1;
        t.bytes += size;
        t.newest = id;
        t.arrived(id, now);
        self.bytes += size;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding it leaves plain counters: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, sensor: &str, reading: &[u8]) -> Result<Appended, StoreError> {
        let size = stored(sensor, reading.len());
        let mut st = self.lock();
        let mut dropped = 0;
        // Room for this sensor.
        while st
            .per
            .get(sensor)
            .is_some_and(|t| t.count >= self.limits.max_per_sensor)
        {
            if !self.drop_oldest(&mut st, sensor)? {
                break;
            }
            dropped += 1;
        }
        // Room in total: the sensor holding the most loses its oldest first, so a
        // chatty sensor (or one whose device is refused) cannot evict everyone
        // else's readings.
        while st.bytes + size > self.limits.max_bytes {
            let Some(victim) = st
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
            if !self.drop_oldest(&mut st, &victim)? {
                break;
            }
            dropped += 1;
        }
        // Room on disk: readings Qubitro took (or a bound dropped) stay in their
        // batch while a slower sensor's older reading keeps it. Past the live
        // readings plus `max_bytes` of such gone ones, the batches nothing needs go,
        // then the oldest batches are rewritten without their gone readings. No
        // reading is dropped for it: which readings stay is the two bounds above.
        if st.disk > st.bytes.saturating_add(self.limits.max_bytes) {
            self.save(&mut st)?;
            let target = st.bytes.saturating_add(self.limits.max_bytes / 2);
            if st.disk > target {
                self.compact(&mut st, target)?;
            }
        }
        let old = st.pending.since.is_some_and(|t| t.elapsed() >= SEAL_AGE);
        if old || st.pending.readings.len() >= disk::MAX_READINGS {
            self.seal(&mut st)?;
        }
        let no = match st.pending.no {
            Some(no) => no,
            None => {
                let no = st.tree.next_id()?;
                st.pending.since = Some(Instant::now());
                *st.pending.no.insert(no)
            }
        };
        let id = disk::reading_id(no, st.pending.readings.len());
        st.pending.bytes += sensor.len() + reading.len() + 6;
        st.pending
            .readings
            .push((sensor.to_string(), reading.to_vec()));
        st.count_in(sensor, id, size, Instant::now());
        // Taken while the reading is pending: a flush that covers `seq` asks for
        // the pending batch first (`before_flush`).
        let seq = st.tree.wrote();
        if st.pending.bytes >= SEAL_BYTES {
            self.seal(&mut st)?;
        }
        Ok(Appended { id, seq, dropped })
    }

    /// Writes the pending batch to sled (not flushed).
    fn seal(&self, st: &mut State) -> Result<(), StoreError> {
        let Some(no) = st.pending.no.take() else {
            return Ok(());
        };
        st.pending.since = None;
        let mut value = Vec::with_capacity(st.pending.bytes);
        for (sensor, payload) in st.pending.readings.drain(..) {
            // Readings removed while pending are written all the same: a
            // reading's id is its position in the batch.
            disk::encode(&mut value, &sensor, &payload);
        }
        st.pending.bytes = 0;
        st.disk += value.len() as u64;
        st.tree.tree.insert(disk::batch_key(no), value)?;
        Ok(())
    }

    /// Calls `f` with `sensor`'s readings from id `from` on, in order, while it
    /// returns true: the written batches, then the pending one.
    fn scan(
        &self,
        st: &State,
        sensor: &str,
        from: u64,
        mut f: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let mark = st.marks.get(sensor).map(|m| m.through);
        let live = |id: u64| id >= from && mark.is_none_or(|m| id > m);
        let last = st
            .per
            .get(sensor)
            .map_or(u64::MAX, |t| disk::batch_of(t.newest));
        let batches = disk::batch_key(disk::batch_of(from))..=disk::batch_key(last);
        for item in st.tree.tree.range(batches) {
            let (k, v) = item?;
            let Some(no) = disk::batch_no(&k) else {
                continue;
            };
            for (id, s, payload) in disk::decode(no, &v) {
                if s == sensor && live(id) && !f(id, payload) {
                    return Ok(());
                }
            }
        }
        if let Some(no) = st.pending.no.filter(|no| *no <= last) {
            for (i, (s, payload)) in st.pending.readings.iter().enumerate() {
                let id = disk::reading_id(no, i);
                if s == sensor && live(id) && !f(id, payload) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Removes the oldest reading of `sensor`; false when it has none.
    fn drop_oldest(&self, st: &mut State, sensor: &str) -> Result<bool, StoreError> {
        let Some((oldest, held)) = st.per.get(sensor).map(|t| (t.oldest, t.bytes)) else {
            return Ok(false);
        };
        let mut first: Option<(u64, u64)> = None;
        let mut next = None;
        self.scan(st, sensor, oldest, |id, payload| match first {
            None => {
                first = Some((id, stored(sensor, payload.len())));
                true
            }
            Some(_) => {
                next = Some(id);
                false
            }
        })?;
        let Some((id, bytes)) = first else {
            // Tallies out of step with the tree (cannot happen): start it over.
            st.per.remove(sensor);
            st.bytes = st.bytes.saturating_sub(held);
            return Ok(false);
        };
        self.gone(st, sensor, id, 1, bytes, next)?;
        Ok(true)
    }

    /// `n` readings of `sensor` (`bytes` as stored) up to id `through` left the
    /// buffer; `next` is the oldest one left.
    fn gone(
        &self,
        st: &mut State,
        sensor: &str,
        through: u64,
        n: u64,
        bytes: u64,
        next: Option<u64>,
    ) -> Result<(), StoreError> {
        let mark = st.marks.entry(sensor.to_string()).or_insert(Mark {
            through,
            dirty: true,
            on_disk: false,
        });
        if through > mark.through {
            (mark.through, mark.dirty) = (through, true);
        }
        st.bytes = st.bytes.saturating_sub(bytes);
        let Some(t) = st.per.get_mut(sensor) else {
            return Ok(());
        };
        t.count = t.count.saturating_sub(n);
        t.bytes = t.bytes.saturating_sub(bytes);
        t.unsaved += n;
        match next {
            Some(next) if t.count > 0 => {
                t.oldest = next;
                t.prune();
                if t.unsaved >= SAVE_EVERY {
                    self.save(st)?;
                }
            }
            _ => {
                st.per.remove(sensor);
                self.save(st)?;
            }
        }
        Ok(())
    }
}

#[path = "buffer_save.rs"]
mod save;

#[path = "buffer_tally.rs"]
mod tally;

#[cfg(test)]
#[path = "buffer_tests.rs"]
mod tests;
