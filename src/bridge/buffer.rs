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

use std::collections::HashMap;
use std::sync::Mutex;

use crate::store::{ReadingsTree, Store, StoreError};

/// Per-sensor bookkeeping, kept in RAM (one entry per sensor with readings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    count: u64,
    bytes: u64,
    /// Id of the oldest buffered reading.
    oldest: u64,
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
        for item in tree.tree.iter() {
            let (k, v) = item?;
            let Some((sensor, id)) = split_key(&k) else {
                // Not ours (cannot happen short of corruption): leave it be.
                continue;
            };
            let t = tallies.per.entry(sensor.to_string()).or_insert(Tally {
                oldest: id,
                ..Tally::default()
            });
            let size = stored(k.len(), v.len());
            t.count += 1;
            t.bytes += size;
            t.oldest = t.oldest.min(id);
            tallies.bytes += size;
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
        let t = tallies.per.entry(sensor.to_string()).or_insert(Tally {
            oldest: id,
            ..Tally::default()
        });
        t.count += 1;
        t.bytes += size;
        t.oldest = t.oldest.min(id);
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

    pub fn store(&self) -> &Store {
        self.tree.store()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;

    fn open_store(dir: &std::path::Path) -> Store {
        Store::open(&StoreConfig {
            path: dir.join("db").display().to_string(),
            cache_capacity_bytes: 1 << 20,
            last_seen_flush_s: 600,
        })
        .expect("open the store")
        .0
    }

    const WIDE: Limits = Limits {
        max_per_sensor: 10_000,
        max_bytes: 64 << 20,
    };

    fn ids(v: &[(u64, Vec<u8>)]) -> Vec<String> {
        v.iter()
            .map(|(_, b)| String::from_utf8(b.clone()).expect("utf8"))
            .collect()
    }

    #[tokio::test]
    async fn readings_come_back_in_arrival_order_per_sensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let buf = Buffer::open(&store, WIDE).expect("open");
        for i in 0..5 {
            buf.append("a", format!("a{i}").as_bytes()).expect("append");
            buf.append("a1", format!("x{i}").as_bytes())
                .expect("append");
        }
        let got = buf.oldest("a", None, 3).expect("read");
        assert_eq!(ids(&got), ["a0", "a1", "a2"]);
        let rest = buf.oldest("a", Some(got[2].0), 10).expect("read");
        assert_eq!(ids(&rest), ["a3", "a4"]);
        // "a" is a prefix of "a1" as a string, not as a key.
        assert_eq!(buf.count("a"), 5);
        assert_eq!(ids(&buf.oldest("a1", None, 1).expect("read")), ["x0"]);
        assert_eq!(buf.totals().readings, 10);
    }

    #[tokio::test]
    async fn remove_through_takes_acknowledged_readings_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let buf = Buffer::open(&store, WIDE).expect("open");
        let ids_: Vec<u64> = (0..4)
            .map(|i| buf.append("s", format!("r{i}").as_bytes()).expect("a").id)
            .collect();
        buf.append("t", b"other").expect("append");
        assert_eq!(buf.remove_through("s", ids_[1]).expect("remove"), 2);
        assert_eq!(buf.remove_through("s", ids_[1]).expect("again"), 0);
        assert_eq!(ids(&buf.oldest("s", None, 10).expect("read")), ["r2", "r3"]);
        assert_eq!(buf.count("s"), 2);
        assert_eq!(buf.count("t"), 1);
        // Keys of one-letter sensors are 10 bytes.
        assert_eq!(buf.totals().bytes, 2 * (10 + 2) + (10 + 5));
    }

    #[tokio::test]
    async fn readings_survive_a_flush_and_reopen_and_new_ones_queue_after_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = open_store(dir.path());
            let buf = Buffer::open(&store, WIDE).expect("open");
            let mut last = 0;
            for i in 0..100 {
                last = buf.append("s", format!("r{i}").as_bytes()).expect("a").seq;
            }
            store.durable(last).await.expect("flushed");
        }
        // The flusher stops when the last clone goes; give the lock a moment.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let store = open_store(dir.path());
        let buf = Buffer::open(&store, WIDE).expect("reopen");
        assert_eq!(buf.count("s"), 100);
        assert_eq!(buf.totals().readings, 100);
        buf.append("s", b"after").expect("append");
        let all = buf.oldest("s", None, 1000).expect("read");
        assert_eq!(all.len(), 101);
        assert_eq!(ids(&all[..2]), ["r0", "r1"]);
        assert_eq!(ids(&all[100..]), ["after"]);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[tokio::test]
    async fn the_per_sensor_bound_drops_that_sensors_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let buf = Buffer::open(
            &store,
            Limits {
                max_per_sensor: 3,
                max_bytes: 1 << 20,
            },
        )
        .expect("open");
        buf.append("other", b"o").expect("append");
        let mut dropped = 0;
        for i in 0..5 {
            dropped += buf
                .append("s", format!("r{i}").as_bytes())
                .expect("a")
                .dropped;
        }
        assert_eq!(dropped, 2);
        assert_eq!(
            ids(&buf.oldest("s", None, 10).expect("read")),
            ["r2", "r3", "r4"]
        );
        assert_eq!(buf.count("other"), 1);
    }

    #[tokio::test]
    async fn the_total_bound_drops_the_oldest_of_all_sensors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let buf = Buffer::open(
            &store,
            Limits {
                max_per_sensor: 100,
                max_bytes: 60,
            },
        )
        .expect("open");
        // Each takes 20 bytes as stored: a 10-byte key and a 10-byte record.
        buf.append("a", b"aaaaaaaaaa").expect("append"); // 20, oldest
        buf.append("b", b"bbbbbbbbbb").expect("append"); // 40
        buf.append("a", b"AAAAAAAAAA").expect("append"); // 60
        let r = buf.append("c", b"cccccccccc").expect("append");
        assert_eq!(r.dropped, 1);
        assert_eq!(
            ids(&buf.oldest("a", None, 10).expect("read")),
            ["AAAAAAAAAA"]
        );
        assert_eq!(buf.count("b"), 1);
        assert_eq!(buf.count("c"), 1);
        assert_eq!(buf.totals().bytes, 60);
    }

    #[tokio::test]
    async fn past_the_total_bound_the_sensor_with_the_most_buffered_loses_its_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let buf = Buffer::open(
            &store,
            Limits {
                max_per_sensor: 100,
                max_bytes: 100,
            },
        )
        .expect("open");
        // 20 bytes each as stored: the quiet sensor's one reading is the oldest.
        buf.append("q", b"qqqqqqqqqq").expect("append");
        for i in 0..10 {
            buf.append("c", format!("chatty-{i:03}").as_bytes())
                .expect("append");
        }
        assert_eq!(
            ids(&buf.oldest("q", None, 10).expect("read")),
            ["qqqqqqqqqq"]
        );
        assert_eq!(
            ids(&buf.oldest("c", None, 10).expect("read")),
            ["chatty-006", "chatty-007", "chatty-008", "chatty-009"]
        );
        assert_eq!(buf.totals().bytes, 100);
    }

    #[tokio::test]
    async fn the_total_bound_counts_each_readings_key_as_well_as_its_payload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sensor = "a-sensor-with-a-long-id"; // 23 bytes: its keys are 32
        {
            let store = open_store(dir.path());
            // Room for two readings of 10 bytes as stored (32 + 10 each), not ten.
            let limits = Limits {
                max_per_sensor: 100,
                max_bytes: 100,
            };
            let buf = Buffer::open(&store, limits).expect("open");
            assert_eq!(buf.append(sensor, b"0123456789").expect("a").dropped, 0);
            assert_eq!(buf.append(sensor, b"1123456789").expect("a").dropped, 0);
            let third = buf.append(sensor, b"2123456789").expect("a");
            assert_eq!(third.dropped, 1);
            assert_eq!(buf.totals().bytes, 2 * 42);
            store.durable(third.seq).await.expect("flushed");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Counted the same way when the buffer is opened again.
        let store = open_store(dir.path());
        let buf = Buffer::open(&store, WIDE).expect("reopen");
        assert_eq!(buf.totals().bytes, 2 * 42);
        buf.remove_through(sensor, u64::MAX).expect("remove");
        assert_eq!(buf.totals().bytes, 0);
    }

    #[test]
    fn keys_split_back_into_sensor_and_id() {
        assert_eq!(split_key(&key("temp-01", 42)), Some(("temp-01", 42)));
        assert_eq!(split_key(b"short"), None);
    }
}
