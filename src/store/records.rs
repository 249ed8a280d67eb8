//! Sensor records and their indexes: the one place a record is read, created,
//! changed (compare-and-swap) or removed.

use super::census::Census;
use super::{decode, encode, shortcut, Store, StoreError};
use crate::onboarding::{Record, State};

impl Store {
    pub fn get(&self, sensor: &str) -> Result<Option<Record>, StoreError> {
        match self.sensors.get(sensor.as_bytes())? {
            Some(v) => self.decode_or_quarantine(sensor.as_bytes(), &v),
            None => Ok(None),
        }
    }

    /// A number never handed out before in this database (survives restarts): the
    /// `generation` of a new onboarding.
    pub fn next_generation(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// A record that cannot be decoded is moved to the quarantine tree and treated
    /// as unknown: the lookup before create then adopts the sensor's device. Failing
    /// instead would make systemd restart into the same failure forever.
    fn decode_or_quarantine(&self, key: &[u8], bytes: &[u8]) -> Result<Option<Record>, StoreError> {
        match decode(key, bytes) {
            Ok(rec) => Ok(Some(rec)),
            Err(e) => {
                tracing::error!(
                    error = %e,
                    concat!(
                        "UNREADABLE RECORD moved to quarantine; ",
                        "the sensor is re-adopted from Qubitro on its next announce"
                    )
                );
                self.quarantine.insert(key, bytes)?;
                self.creds.remove(key)?;
                self.sensors.remove(key)?;
                self.pending.remove(key)?;
                self.undelivered.remove(key)?;
                self.bridged.remove(key)?;
                self.wrote();
                Ok(None)
            }
        }
    }

    /// The index entries `rec` needs, added once its swap has won: a swap that lost
    /// (another writer changed the record first) leaves no entry for a state that
    /// was never stored. The write's sequence number is taken after them, so a
    /// caller that waits for it to be durable has the record and its entries on
    /// disk together.
    fn index_add(&self, key: &[u8], rec: &Record) -> Result<(), StoreError> {
        match rec.state {
            State::Pending | State::Creating => {
                self.pending.insert(key, &[1u8])?;
            }
            State::Created { .. } => {
                self.undelivered.insert(key, &[1u8])?;
            }
            State::Delivered { .. } => {}
        }
        if rec.bridged {
            self.bridged.insert(key, &[1u8])?;
        }
        Ok(())
    }

    /// Then stale index entries go, and the credentials shortcut is
    /// written (a crash before it leaves a record without the shortcut, and the full
    /// record still answers).
    fn index_rest(&self, key: &[u8], rec: &Record) -> Result<(), StoreError> {
        if !rec.state.is_unfinished() {
            self.pending.remove(key)?;
        }
        if !matches!(rec.state, State::Created { .. }) {
            self.undelivered.remove(key)?;
        }
        if !rec.bridged {
            self.bridged.remove(key)?;
        }
        if let Some(shortcut) = shortcut::encode(rec) {
            self.creds.insert(key, shortcut)?;
        }
        Ok(())
    }

    /// Adds every index entry a record needs and lacks; returns how many. A record is
    /// written before its index entries (so a lost compare-and-swap leaves none), which
    /// leaves a window: a crash between the two keeps the record without its entry,
    /// and a `Created` sensor missing from `undelivered` would never be sent its reply
    /// again. Run at the first open after a stop that was not clean (see
    /// [`Store::close_cleanly`]), so a normal start reads no record. Entries that are
    /// already there are not written again (an SD card counts every write).
    pub(super) fn reconcile_indexes(&self) -> Result<usize, StoreError> {
        let mut added = 0;
        let census = Census::default();
        for item in self.sensors.iter() {
            let (key, bytes) = item?;
            let Some(rec) = self.decode_or_quarantine(&key, &bytes)? else {
                continue;
            };
            census.added(&rec.state);
            let needed = [
                (&self.pending, rec.state.is_unfinished()),
                (
                    &self.undelivered,
                    matches!(rec.state, State::Created { .. }),
                ),
                (&self.bridged, rec.bridged),
            ];
            for (index, wanted) in needed {
                if wanted && !index.contains_key(&key)? {
                    index.insert(&key, &[1u8])?;
                    added += 1;
                }
            }
        }
        if added > 0 {
            self.wrote();
        }
        self.census.seed(census.counts());
        Ok(added)
    }

    /// Counts the records per state: at the first open after an orderly stop of a
    /// version that did not keep the counts in its mark (once).
    pub(super) fn count_states(&self) -> Result<(), StoreError> {
        let census = Census::default();
        for item in self.scan() {
            census.added(&item?.1.state);
        }
        self.census.seed(census.counts());
        Ok(())
    }

    /// Sensors whose onboarding is unfinished (Pending or Creating).
    pub fn unfinished(&self) -> Result<Vec<(String, Record)>, StoreError> {
        self.indexed(&self.pending, |r| r.state.is_unfinished())
    }

    /// Sensors whose ok reply the broker has not acknowledged (Created).
    pub fn undelivered(&self) -> Result<Vec<(String, Record)>, StoreError> {
        self.indexed(&self.undelivered, |r| {
            matches!(r.state, State::Created { .. })
        })
    }

    /// Bridged sensors, with their records.
    pub fn bridged(&self) -> Result<Vec<(String, Record)>, StoreError> {
        self.indexed(&self.bridged, |r| r.bridged)
    }

    /// Whether the sensor is bridged (an index read, not a record read).
    pub fn is_bridged(&self, sensor: &str) -> Result<bool, StoreError> {
        Ok(self.bridged.contains_key(sensor.as_bytes())?)
    }

    /// Whether the sensor's ok reply still waits for the broker's acknowledgement
    /// (an index read, not a record read).
    /// Whether a record of `sensor` exists (no decoding).
    pub fn knows(&self, sensor: &str) -> Result<bool, StoreError> {
        Ok(self.sensors.contains_key(sensor.as_bytes())?)
    }

    pub fn is_undelivered(&self, sensor: &str) -> Result<bool, StoreError> {
        Ok(self.undelivered.contains_key(sensor.as_bytes())?)
    }

    fn indexed(
        &self,
        index: &sled::Tree,
        wanted: impl Fn(&Record) -> bool,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        let mut out = Vec::new();
        for item in index.iter() {
            let (k, _) = item?;
            let sensor = String::from_utf8_lossy(&k).into_owned();
            match self.get(&sensor)? {
                Some(rec) if wanted(&rec) => out.push((sensor, rec)),
                _ => {
                    index.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    /// Records a new sensor unless one is already recorded. `Some(seq)` when inserted.
    pub fn insert_new(&self, sensor: &str, rec: &Record) -> Result<Option<u64>, StoreError> {
        let key = sensor.as_bytes();
        let swapped = self
            .sensors
            .compare_and_swap(key, None::<&[u8]>, Some(encode(rec)))?;
        match swapped {
            Ok(()) => {
                self.census.added(&rec.state);
                self.index_add(key, rec)?;
                self.index_rest(key, rec)?;
                Ok(Some(self.wrote()))
            }
            Err(_) => Ok(None),
        }
    }

    /// The one way a stored record changes: compare-and-swap against the bytes
    /// that `next` was shown, retried if another writer got there first. `next`
    /// returns the new record, or `None` to leave it as it is (a record of another
    /// generation, a transition that no longer applies). Nothing is written when
    /// the sensor is unknown. Returns the new record and its write's sequence number.
    pub fn update(
        &self,
        sensor: &str,
        mut next: impl FnMut(&Record) -> Option<Record>,
    ) -> Result<Option<(Record, u64)>, StoreError> {
        let key = sensor.as_bytes();
        loop {
            let Some(old) = self.sensors.get(key)? else {
                return Ok(None);
            };
            let Some(current) = self.decode_or_quarantine(key, &old)? else {
                return Ok(None);
            };
            let Some(new) = next(&current) else {
                return Ok(None);
            };
            if self
                .sensors
                .compare_and_swap(key, Some(&old), Some(encode(&new)))?
                .is_ok()
            {
                self.census.moved(&current.state, &new.state);
                self.index_add(key, &new)?;
                self.index_rest(key, &new)?;
                let seq = self.wrote();
                return Ok(Some((new, seq)));
            }
        }
    }

    /// Deletes a sensor's record (forget, or a create Qubitro rejected). With
    /// `generation`, only that onboarding is deleted, not a newer one.
    pub fn remove(
        &self,
        sensor: &str,
        generation: Option<u64>,
    ) -> Result<Option<Record>, StoreError> {
        let key = sensor.as_bytes();
        loop {
            let Some(old) = self.sensors.get(key)? else {
                return Ok(None);
            };
            let rec = decode(key, &old).ok();
            if let (Some(g), Some(r)) = (generation, &rec) {
                if r.generation != g {
                    return Ok(None);
                }
            }
            // The shortcut first: it must never outlive the record.
            self.creds.remove(key)?;
            if self
                .sensors
                .compare_and_swap(key, Some(&old), None::<&[u8]>)?
                .is_ok()
            {
                if let Some(r) = &rec {
                    self.census.removed(&r.state);
                }
                self.pending.remove(key)?;
                self.undelivered.remove(key)?;
                self.bridged.remove(key)?;
                self.wrote();
                return Ok(rec);
            }
        }
    }

    /// Whether any sensor was ever recorded here and is still known (readable or
    /// quarantined): what tells a store in use from a fresh one.
    pub fn holds_records(&self) -> Result<bool, StoreError> {
        Ok(self.sensors.first()?.is_some() || self.quarantine.first()?.is_some())
    }

    /// Reads every record (sled has no count): for tests, never for a hot path.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.sensors.len()
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.sensors.is_empty()
    }

    /// Readable records in sensor-id order from just after `after` (the start when
    /// None): a page of a listing reads only its own records.
    pub fn scan_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<(String, Record), StoreError>> + '_ {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, |a| Excluded(a.as_bytes().to_vec()));
        self.sensors
            .range::<Vec<u8>, _>((from, Unbounded))
            .filter_map(|item| {
                let (k, v) = match item {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(e.into())),
                };
                match self.decode_or_quarantine(&k, &v) {
                    Ok(Some(rec)) => Some(Ok((String::from_utf8_lossy(&k).into_owned(), rec))),
                    Ok(None) => None,
                    Err(e) => Some(Err(e)),
                }
            })
    }

    /// Unfinished sensors (Pending or Creating), at most `max`, from the index alone.
    pub fn unfinished_first(&self, max: usize) -> Result<Vec<(String, Record)>, StoreError> {
        let mut out = Vec::new();
        for item in self.pending.iter() {
            let (k, _) = item?;
            let sensor = String::from_utf8_lossy(&k).into_owned();
            if let Some(rec) = self.get(&sensor)?.filter(|r| r.state.is_unfinished()) {
                out.push((sensor, rec));
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// All readable records in sensor-id order (unreadable ones are quarantined).
    pub fn scan(&self) -> impl Iterator<Item = Result<(String, Record), StoreError>> + '_ {
        self.scan_after(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::encode;
    use super::super::test_support::{cfg, created, pending};
    use super::*;

    #[tokio::test]
    async fn insert_new_refuses_a_second_record() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let rec = pending();
        let seq = s.insert_new("a", &rec).unwrap().unwrap();
        assert!(s.insert_new("a", &rec).unwrap().is_none());
        s.durable(seq).await.unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().state, State::Pending);
    }

    // Multi-threaded: a closed store's flusher must get to run and let go of the
    // database while the next open retries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_written_without_its_index_entries_gets_them_at_the_open_after_an_unclean_stop(
    ) {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(&cfg(dir.path())).unwrap();
            // A crash between a record's write and its index entries' writes.
            s.sensors.insert("owed", encode(&created())).unwrap();
            s.sensors
                .insert("new", encode(&pending().bridged(2).unwrap()))
                .unwrap();
            s.flush_all().await.unwrap();
            assert!(s.undelivered().unwrap().is_empty());
        }
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let names = |v: Vec<(String, Record)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            names(s.undelivered().unwrap()),
            ["owed"],
            "its reply is owed again"
        );
        assert_eq!(
            names(s.unfinished().unwrap()),
            ["new"],
            "its onboarding resumes"
        );
        assert_eq!(names(s.bridged().unwrap()), ["new"]);
    }

    // Multi-threaded: a closed store's flusher must get to run and let go of the
    // database while the next open retries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_clean_close_the_next_open_reads_no_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(&cfg(dir.path())).unwrap();
            s.insert_new("a", &pending()).unwrap();
            // Written behind the indexes' back after the insert: a clean close
            // promises no such gap, so the next open must not go looking for one.
            s.sensors.insert("gap", encode(&created())).unwrap();
            s.close_cleanly().await.unwrap();
        }
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        assert!(
            s.undelivered().unwrap().is_empty(),
            "no scan after a clean close"
        );
        drop(s);
        // That open took the mark: a crash now would be followed by a scan.
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        assert_eq!(s.undelivered().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_lost_compare_and_swap_leaves_no_index_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        let mut calls = 0;
        let r = s
            .update("a", |current| {
                calls += 1;
                if calls > 1 {
                    return None;
                }
                // Another writer gets there first, so this swap loses.
                let other = current.retry_later(1, None, true, 1).unwrap();
                s.sensors.insert("a", encode(&other)).unwrap();
                Some(created().bridged(3).unwrap())
            })
            .unwrap();
        assert!(r.is_none());
        assert_eq!(calls, 2, "the lost swap was retried against the new record");
        assert!(
            !s.is_undelivered("a").unwrap(),
            "undelivered entry of a lost swap"
        );
        assert!(!s.is_bridged("a").unwrap(), "bridged entry of a lost swap");
    }

    #[tokio::test]
    async fn a_refused_insert_leaves_no_index_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        assert!(s
            .insert_new("a", &created().bridged(3).unwrap())
            .unwrap()
            .is_none());
        assert!(!s.is_undelivered("a").unwrap());
        assert!(!s.is_bridged("a").unwrap());
    }

    #[tokio::test]
    async fn update_changes_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        assert!(s.update("a", |_| None).unwrap().is_none());
        let (r, _) = s
            .update("a", |r| r.retry_later(5, None, true, 9).ok())
            .unwrap()
            .unwrap();
        assert_eq!(r.attempts, 1);
        assert_eq!(s.get("a").unwrap().unwrap(), r);
        assert!(s.update("missing", |r| Some(r.clone())).unwrap().is_none());
    }

    #[tokio::test]
    async fn the_bridged_index_follows_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        s.insert_new("b", &pending().bridged(1).unwrap()).unwrap();
        assert!(!s.is_bridged("a").unwrap());
        assert!(s.is_bridged("b").unwrap());
        s.update("a", |r| r.bridged(2)).unwrap();
        let names: Vec<String> = s.bridged().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["a", "b"]);
        s.remove("a", None).unwrap();
        assert!(!s.is_bridged("a").unwrap());
    }

    #[tokio::test]
    async fn remove_with_a_generation_spares_a_newer_onboarding() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        assert!(s.remove("a", Some(99)).unwrap().is_none());
        assert!(s.get("a").unwrap().is_some());
        assert!(s.remove("a", Some(1)).unwrap().is_some());
        assert!(s.get("a").unwrap().is_none());
        assert!(s.remove("a", None).unwrap().is_none());
    }

    #[tokio::test]
    async fn generations_are_never_handed_out_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let a = s.next_generation().unwrap();
        let b = s.next_generation().unwrap();
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn indexes_follow_the_phase() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        s.insert_new("b", &pending()).unwrap();
        assert_eq!(s.unfinished().unwrap().len(), 2);
        s.update("a", |_| Some(created())).unwrap();
        let names = |v: Vec<(String, Record)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(names(s.unfinished().unwrap()), vec!["b"]);
        assert_eq!(names(s.undelivered().unwrap()), vec!["a"]);
        assert!(s.is_undelivered("a").unwrap());
        s.update("a", |r| r.delivered(3).ok()).unwrap();
        assert!(s.undelivered().unwrap().is_empty());
        assert!(!s.is_undelivered("a").unwrap());
        s.remove("b", None).unwrap();
        assert!(s.unfinished().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_unreadable_record_is_quarantined_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.sensors.insert(b"bad", b"{not json").unwrap();
        assert!(s.get("bad").unwrap().is_none());
        assert_eq!(s.quarantine.len(), 1);
        assert!(s.is_empty());
    }
}
