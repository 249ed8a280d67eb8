//! When each sensor was last heard from (an announce or a reading), for `devices
//! list`/`show`/`export` and `devices prune`.
//!
//! Kept in memory and written to the store at most once per `store.last_seen_flush_s`
//! (and at a clean stop), all sensors in one batch: one write per reading would
//! wear an SD card out for a value nobody needs to the second. A kill -9 loses at
//! most one interval, which only makes a sensor look silent a little longer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{Store, StoreError};

const TREE: &str = "last_seen";

/// The default of `store.last_seen_flush_s`.
pub const DEFAULT_FLUSH: Duration = Duration::from_secs(600);

/// Times seen since the last write, and when the next write is due.
#[derive(Debug)]
pub(super) struct LastSeen {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// sensor → wall-clock ms, not yet written.
    unwritten: HashMap<String, u64>,
    /// sensor → the nonce of its last answered announce, packed: a replay of that
    /// announce (anyone can capture and resend it whole) is no sign of life, or a
    /// sensor long gone could be kept from `devices prune` by an attacker.
    last_nonce: HashMap<String, u128>,
    /// Monotonic time, so a wall clock set at boot (a Pi without RTC) cannot
    /// delay the write for days or make it happen at every reading.
    next_write: Option<Instant>,
    every: Duration,
    /// Batches written (tests count them).
    batches: u64,
}

impl LastSeen {
    pub(super) fn new() -> LastSeen {
        LastSeen {
            inner: Mutex::new(Inner {
                unwritten: HashMap::new(),
                last_nonce: HashMap::new(),
                next_write: None,
                every: DEFAULT_FLUSH,
                batches: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("the last-seen lock is never poisoned")
    }
}

fn encode(ms: u64) -> [u8; 8] {
    ms.to_be_bytes()
}

fn decode(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

impl Store {
    fn last_seen_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(TREE)?)
    }

    /// How often last-seen times are written (`store.last_seen_flush_s`).
    pub(super) fn set_last_seen_every(&self, every: Duration) {
        self.last_seen.lock().every = every;
    }

    /// An answered announce of `sensor` with protocol v2 `nonce` (`None`: a plain
    /// announce, proofs off): seen, unless it repeats the sensor's last answered
    /// announce (returns `false` then, and changes nothing).
    pub fn saw_announce(
        &self,
        sensor: &str,
        nonce: Option<&str>,
        wall_ms: u64,
        now: Instant,
    ) -> Result<bool, StoreError> {
        if let Some(packed) = nonce.and_then(|n| u128::from_str_radix(n, 16).ok()) {
            let mut seen = self.last_seen.lock();
            if seen.last_nonce.get(sensor) == Some(&packed) {
                return Ok(false);
            }
            seen.last_nonce.insert(sensor.to_string(), packed);
        }
        self.saw(sensor, wall_ms, now)?;
        Ok(true)
    }

    /// `sensor` was heard from at `wall_ms`. Writes every time kept in memory when
    /// the interval since the last write (monotonic `now`) has passed.
    pub fn saw(&self, sensor: &str, wall_ms: u64, now: Instant) -> Result<(), StoreError> {
        let due = {
            let mut seen = self.last_seen.lock();
            seen.unwritten.insert(sensor.to_string(), wall_ms);
            let every = seen.every;
            let next = *seen.next_write.get_or_insert(now + every);
            if now < next {
                return Ok(());
            }
            seen.next_write = Some(now + every);
            std::mem::take(&mut seen.unwritten)
        };
        self.write_seen(due)
    }

    fn write_seen(&self, times: HashMap<String, u64>) -> Result<(), StoreError> {
        if times.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (sensor, ms) in &times {
            batch.insert(sensor.as_bytes(), &encode(*ms));
        }
        self.last_seen_tree()?.apply_batch(batch)?;
        self.last_seen.lock().batches += 1;
        self.wrote();
        Ok(())
    }

    /// At a clean stop: writes each time kept in memory that the store does not
    /// hold to within the interval. The store's value is never staler than the
    /// interval while the daemon runs; keeping that promise across the stop needs
    /// no write for a sensor written recently, so that restarts (and the re-announces
    /// they bring) cost the SD card nothing.
    pub fn write_last_seen(&self) -> Result<(), StoreError> {
        let (times, every) = {
            let mut seen = self.last_seen.lock();
            (std::mem::take(&mut seen.unwritten), seen.every)
        };
        let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let tree = self.last_seen_tree()?;
        let mut stale = HashMap::new();
        for (sensor, ms) in times {
            let stored = tree.get(sensor.as_bytes())?.and_then(|v| decode(&v));
            if stored.is_none_or(|at| ms.saturating_sub(at) >= every_ms) {
                stale.insert(sensor, ms);
            }
        }
        self.write_seen(stale)
    }

    /// When `sensor` was last heard from: memory first, then the store.
    pub fn last_seen(&self, sensor: &str) -> Result<Option<u64>, StoreError> {
        if let Some(ms) = self.last_seen.lock().unwritten.get(sensor) {
            return Ok(Some(*ms));
        }
        Ok(self
            .last_seen_tree()?
            .get(sensor.as_bytes())?
            .and_then(|v| decode(&v)))
    }

    /// A forgotten sensor's time goes with it.
    pub fn forget_last_seen(&self, sensor: &str) -> Result<(), StoreError> {
        {
            let mut seen = self.last_seen.lock();
            seen.unwritten.remove(sensor);
            seen.last_nonce.remove(sensor);
        }
        if self.last_seen_tree()?.remove(sensor.as_bytes())?.is_some() {
            self.wrote();
        }
        Ok(())
    }

    /// Batches of last-seen times written so far by this process.
    pub fn last_seen_batches(&self) -> u64 {
        self.last_seen.lock().batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::cfg;

    #[tokio::test(start_paused = true)]
    async fn a_repeat_of_the_last_answered_announce_is_no_sign_of_life_but_a_new_nonce_is() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&cfg(dir.path())).unwrap();
        let t0 = Instant::now();
        let (first, second) = (
            "00112233445566778899aabbccddeeff",
            "ffeeddccbbaa99887766554433221100",
        );
        assert!(store.saw_announce("s1", Some(first), 1_000, t0).unwrap());
        assert!(
            !store.saw_announce("s1", Some(first), 2_000, t0).unwrap(),
            "a replay"
        );
        assert_eq!(store.last_seen("s1").unwrap(), Some(1_000));
        assert!(store.saw_announce("s1", Some(second), 3_000, t0).unwrap());
        assert_eq!(store.last_seen("s1").unwrap(), Some(3_000));
        assert!(
            store.saw_announce("s1", None, 4_000, t0).unwrap(),
            "plain announces (proofs off) count"
        );
        store.forget_last_seen("s1").unwrap();
        assert!(
            store.saw_announce("s1", Some(second), 5_000, t0).unwrap(),
            "forgotten with the sensor"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_readings_within_the_interval_cost_no_write_and_the_next_one_after_it_one() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&cfg(dir.path())).unwrap();
        store.set_last_seen_every(Duration::from_secs(600));
        let t0 = Instant::now();
        for i in 0..1000u64 {
            store.saw("s1", 1_000 + i, t0).unwrap();
        }
        assert_eq!(store.last_seen_batches(), 0, "no write per reading");
        assert_eq!(
            store.last_seen("s1").unwrap(),
            Some(1_999),
            "memory answers"
        );
        assert_eq!(store.last_seen_tree().unwrap().len(), 0);

        store
            .saw("s2", 5_000, t0 + Duration::from_secs(600))
            .unwrap();
        assert_eq!(store.last_seen_batches(), 1, "one batch for every sensor");
        let tree = store.last_seen_tree().unwrap();
        assert_eq!(
            tree.get("s1").unwrap().and_then(|v| decode(&v)),
            Some(1_999)
        );
        assert_eq!(
            tree.get("s2").unwrap().and_then(|v| decode(&v)),
            Some(5_000)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_clean_stop_writes_only_times_the_store_does_not_hold_to_within_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&cfg(dir.path())).unwrap();
        store.set_last_seen_every(Duration::from_secs(600));
        let t0 = Instant::now();
        store.saw("a", 1_000, t0).unwrap();
        store.saw("b", 1_000, t0).unwrap();
        store.write_last_seen().unwrap();
        assert_eq!(
            store.last_seen_batches(),
            1,
            "never written before: written"
        );
        store.saw("a", 1_000 + 599_999, t0).unwrap();
        store.write_last_seen().unwrap();
        assert_eq!(
            store.last_seen_batches(),
            1,
            "the store holds it to within the interval"
        );
        assert_eq!(
            store.last_seen("a").unwrap(),
            Some(1_000),
            "off by less than the interval"
        );
        store.saw("b", 1_000 + 600_000, t0).unwrap();
        store.write_last_seen().unwrap();
        assert_eq!(store.last_seen_batches(), 2);
        assert_eq!(store.last_seen("b").unwrap(), Some(601_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn times_kept_in_memory_are_written_at_a_clean_stop_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(&cfg(dir.path())).unwrap();
            store.saw("s1", 42, Instant::now()).unwrap();
            store.saw("gone", 43, Instant::now()).unwrap();
            store.forget_last_seen("gone").unwrap();
            store.close_cleanly().await.unwrap();
        }
        let (store, _) = Store::open(&cfg(dir.path())).unwrap();
        assert_eq!(store.last_seen("s1").unwrap(), Some(42));
        assert_eq!(store.last_seen("gone").unwrap(), None);
    }
}
