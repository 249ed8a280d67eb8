//! Group commit of the bridge's spilled readings: the acker makes them durable at
//! most once per `bridge.spill_flush_ms`, so an uplink outage costs a few pages
//! shared by many readings instead of one flush per reading (SD-card wear).

use std::time::Duration;

use crate::store::{Store, StoreError};

/// Spilled readings waiting for a flush before this many were written: flushed at
/// once rather than at the pace.
const SPILL_BATCH: u64 = 256;

/// Group commit of spilled readings: at most one flush per `every`, so an outage
/// costs pages shared by many readings, unless a batch fills first.
pub(super) struct SpillPacer {
    every: Duration,
    last: Option<tokio::time::Instant>,
}

impl SpillPacer {
    pub(super) fn new(every: Duration) -> SpillPacer {
        SpillPacer { every, last: None }
    }

    pub(super) async fn durable(&mut self, store: &Store, seq: u64) -> Result<(), StoreError> {
        if store.is_durable(seq) {
            return Ok(());
        }
        if let Some(last) = self.last {
            let due = last + self.every;
            loop {
                let waiting = store.last_write().saturating_sub(store.flushed());
                if waiting >= SPILL_BATCH || tokio::time::Instant::now() >= due {
                    break;
                }
                // Looked at again within the pace, in case the batch fills.
                let step = (self.every / 8).max(Duration::from_millis(5));
                tokio::time::sleep_until(due.min(tokio::time::Instant::now() + step)).await;
            }
        }
        // Everything written so far rides along.
        store.durable(store.last_write().max(seq)).await?;
        self.last = Some(tokio::time::Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;

    fn store(dir: &std::path::Path) -> Store {
        Store::open(&StoreConfig {
            path: dir.join("db").display().to_string(),
            cache_capacity_bytes: 1 << 20,
            last_seen_flush_s: 600,
        })
        .expect("open the store")
        .0
    }

    fn spill(store: &Store) -> u64 {
        let tree = store.readings().expect("tree");
        tree.tree.insert(b"k", b"v".to_vec()).expect("insert");
        tree.wrote()
    }

    #[tokio::test]
    async fn spills_are_flushed_at_most_once_per_pace_unless_a_batch_fills() {
        tokio::time::pause();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let every = Duration::from_millis(500);
        let mut pacer = SpillPacer::new(every);
        let t0 = tokio::time::Instant::now();
        pacer.durable(&store, spill(&store)).await.expect("durable");
        // The next spill waits for the pace; what is durable already does not.
        let seq = spill(&store);
        pacer.durable(&store, seq).await.expect("durable");
        assert!(
            t0.elapsed() >= every,
            "flushed again after {:?}",
            t0.elapsed()
        );
        assert!(store.is_durable(seq));
        let t1 = tokio::time::Instant::now();
        pacer.durable(&store, seq).await.expect("durable");
        assert_eq!(t1.elapsed(), Duration::ZERO);
        // A full batch goes at once.
        let mut last = 0;
        for _ in 0..SPILL_BATCH {
            last = spill(&store);
        }
        let t2 = tokio::time::Instant::now();
        pacer.durable(&store, last).await.expect("durable");
        assert!(
            t2.elapsed() < every,
            "a full batch waited {:?}",
            t2.elapsed()
        );
    }
}
