//! The side trees other modules keep in the sensor database (the bridge's
//! readings, discovery's state), so their writes join the same group commit.

use super::{Store, StoreError};

// The telemetry bridge's reading buffer (`bridge::buffer`) lives in this same
// database, so that the one flusher above covers it too: a reading and an
// onboarding acknowledged in the same moment share one fsync, and there is no
// second flusher competing for the SD card.

/// The bridge's tree in this database, and the way its writes join the group
/// commit ([`Store::durable`]).
#[derive(Clone)]
pub struct ReadingsTree {
    pub tree: sled::Tree,
    store: Store,
}

const SPILL_TREE: &str = "bridge_spill";

impl Store {
    /// The bridge's spill buffer tree (created on first use): readings gathered
    /// into one value per group commit.
    pub fn spill(&self) -> Result<ReadingsTree, StoreError> {
        Ok(ReadingsTree {
            tree: self.db.open_tree(SPILL_TREE)?,
            store: self.clone(),
        })
    }

    /// Drops the spill buffer tree and opens a new, empty one: freeing its pages
    /// costs sled far less than removing big values one by one. Not flushed, like
    /// any removal of forwarded readings.
    pub fn spill_emptied(&self) -> Result<ReadingsTree, StoreError> {
        self.db.drop_tree(SPILL_TREE)?;
        self.wrote();
        self.spill()
    }

    /// The reading buffer tree of earlier versions, one key per reading: read once
    /// and emptied into [`Store::spill`] when the buffer opens.
    pub fn readings(&self) -> Result<ReadingsTree, StoreError> {
        Ok(ReadingsTree {
            tree: self.db.open_tree("bridge_readings")?,
            store: self.clone(),
        })
    }
}

/// Key prefix of the discovery tree's retired markers (see [`Store::discovery`]).
pub const RETIRED_PREFIX: &str = "r/";

impl Store {
    /// Zero-firmware onboarding's state (`engine::discovered`): devices, config
    /// topics and retired markers, as JSON, in this database so its writes join the
    /// same group commit as the records they lead to.
    pub fn discovery(&self) -> Result<ReadingsTree, StoreError> {
        Ok(ReadingsTree {
            tree: self.db.open_tree("discovery")?,
            store: self.clone(),
        })
    }

    /// Sensors discovery made whose entities are all gone (`devices list` shows
    /// them `retired`); readable without the daemon.
    pub fn retired_discovered(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let tree = self.db.open_tree("discovery")?;
        let mut out = std::collections::BTreeSet::new();
        for item in tree.scan_prefix(RETIRED_PREFIX) {
            let (k, _) = item?;
            if let Some(id) = std::str::from_utf8(&k)
                .ok()
                .and_then(|k| k.strip_prefix(RETIRED_PREFIX))
            {
                out.insert(id.to_string());
            }
        }
        Ok(out)
    }
}

impl ReadingsTree {
    /// Records that a write to the tree happened; `durable(seq)` then covers it.
    pub fn wrote(&self) -> u64 {
        self.store.wrote()
    }

    /// A number never handed out before in this database, also after a kill -9
    /// (sled skips ahead on recovery): orders readings across restarts.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.store.db.generate_id()?)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}
