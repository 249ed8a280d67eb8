//! The buffer's writes of what RAM decided: watermarks that moved, batches no
//! sensor needs any more (and the whole tree once drained), batches rewritten
//! without the readings that are gone, and the pending batch before each flush of
//! the store.

use super::{disk, Inner, State};
use crate::store::{BeforeFlush, StoreError};

impl Inner {
    /// Writes the watermarks that moved, and removes the batches no sensor has a
    /// reading in or after (with the watermarks only they needed). Not flushed: a
    /// removal lost in a crash only means readings are sent again.
    pub(super) fn save(&self, st: &mut State) -> Result<(), StoreError> {
        let pending = st.pending.no.filter(|_| !st.pending.readings.is_empty());
        let floor = st
            .per
            .values()
            .map(|t| disk::batch_of(t.oldest))
            .chain(pending)
            .min()
            .unwrap_or(u64::MAX);
        if floor == u64::MAX {
            // Nothing left: the tree goes whole. Removing its batches one by one
            // would make sled rewrite each leaf, values and all, on its way out.
            if !st.tree.tree.is_empty() {
                st.tree = self.store.spill_emptied()?;
            }
            st.marks.clear();
            st.disk = 0;
            return Ok(());
        }
        // One operation at a time, in this order, not a sled batch: sled writes its
        // log buffer out before and after every batch (pages, on an SD card), and a
        // crash keeps a prefix of these operations, each prefix consistent: the
        // watermarks are there before the batches that needed them go.
        let tree = &st.tree.tree;
        let mut wrote = false;
        let mut unneeded = Vec::new();
        for (sensor, m) in st.marks.iter_mut() {
            if disk::batch_of(m.through) < floor {
                unneeded.push(sensor.clone());
            } else if m.dirty {
                tree.insert(disk::mark_key(sensor), &m.through.to_be_bytes())?;
                (m.dirty, m.on_disk, wrote) = (false, true, true);
            }
        }
        let gone = disk::batch_key(0)..disk::batch_key(floor);
        for item in tree.range(gone) {
            let (k, v) = item?;
            st.disk = st.disk.saturating_sub(v.len() as u64);
            tree.remove(k)?;
            wrote = true;
        }
        for sensor in unneeded {
            if st.marks.remove(&sensor).is_some_and(|m| m.on_disk) {
                tree.remove(disk::mark_key(&sensor))?;
                wrote = true;
            }
        }
        for t in st.per.values_mut() {
            t.unsaved = 0;
        }
        if wrote {
            st.tree.wrote();
        }
        Ok(())
    }
}

impl Inner {
    /// Rewrites the written batches, oldest first, without the readings that are
    /// gone (a removed batch when none is left) until their bytes are at most
    /// `target`. A reading's id stays its position, so the uplink's reads and
    /// removals and the watermarks mean the same before and after. Not flushed: a
    /// crash keeps the old value or the new one, and the new one lacks only
    /// readings that are gone.
    pub(super) fn compact(&self, st: &mut State, target: u64) -> Result<(), StoreError> {
        let tree = st.tree.tree.clone();
        let mut wrote = false;
        for item in tree.range(disk::batch_key(0)..=disk::batch_key(u64::MAX)) {
            if st.disk <= target {
                break;
            }
            let (k, v) = item?;
            let Some(no) = disk::batch_no(&k) else {
                continue;
            };
            let live = |id: u64, sensor: &str| st.per.get(sensor).is_some_and(|t| id >= t.oldest);
            let Some(kept) = disk::compacted(no, &v, live) else {
                continue;
            };
            st.disk = st.disk.saturating_sub(v.len() as u64) + kept.len() as u64;
            if kept.is_empty() {
                tree.remove(k)?;
            } else {
                tree.insert(k, kept)?;
            }
            wrote = true;
        }
        if wrote {
            st.tree.wrote();
        }
        Ok(())
    }
}

impl BeforeFlush for Inner {
    fn before_flush(&self) -> Result<(), StoreError> {
        let mut st = self.lock();
        self.seal(&mut st)?;
        if st.marks.values().any(|m| m.dirty) {
            self.save(&mut st)?;
        }
        Ok(())
    }
}
