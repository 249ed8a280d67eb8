//! The ignore list: discovered devices the operator forgot. Their discovery configs
//! stay retained on the broker and are read again at every subscribe and every
//! start, so without this list a forgotten device would be onboarded again (and
//! billed again) at the next reconnect. Firmware sensors never go on it: they come
//! back only when they announce, which is the operator's intent.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

const TREE: &str = "ignored";

/// One ignored device, as stored and as `devices list --ignored` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ignored {
    pub sensor_id: String,
    /// When it was forgotten (wall-clock ms).
    pub since_ms: u64,
    /// Its name when it was forgotten, so the operator recognises it.
    #[serde(default)]
    pub name: String,
}

impl Store {
    fn ignored_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(TREE)?)
    }

    /// Puts `entry` on the list; returns the write's sequence number.
    pub fn ignore(&self, entry: &Ignored) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(entry).expect("plain data always serialises");
        self.ignored_tree()?
            .insert(entry.sensor_id.as_bytes(), bytes)?;
        Ok(self.wrote())
    }

    /// Lifts `sensor` from the list: the write's sequence number, `None` when it
    /// was not on it.
    pub fn unignore(&self, sensor: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .ignored_tree()?
            .remove(sensor.as_bytes())?
            .map(|_| self.wrote()))
    }

    pub fn is_ignored(&self, sensor: &str) -> Result<bool, StoreError> {
        Ok(self.ignored_tree()?.contains_key(sensor.as_bytes())?)
    }

    /// Every ignored device, in sensor-id order (an unreadable entry is shown
    /// with what its key says).
    pub fn ignored(&self) -> Result<Vec<Ignored>, StoreError> {
        let mut out = Vec::new();
        for item in self.ignored_tree()?.iter() {
            let (k, v) = item?;
            let sensor_id = String::from_utf8_lossy(&k).into_owned();
            out.push(serde_json::from_slice(&v).unwrap_or(Ignored {
                sensor_id,
                since_ms: 0,
                name: String::new(),
            }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::cfg;

    #[tokio::test]
    async fn an_ignored_device_is_listed_until_it_is_unignored() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&cfg(dir.path())).unwrap();
        let entry = Ignored {
            sensor_id: "ha-x".into(),
            since_ms: 5,
            name: "Cellar".into(),
        };
        store.ignore(&entry).unwrap();
        assert!(store.is_ignored("ha-x").unwrap());
        assert!(!store.is_ignored("ha-y").unwrap());
        assert_eq!(store.ignored().unwrap(), vec![entry]);
        assert!(store.unignore("ha-x").unwrap().is_some());
        assert!(store.unignore("ha-x").unwrap().is_none(), "only once");
        assert!(!store.is_ignored("ha-x").unwrap());
        assert!(store.ignored().unwrap().is_empty());
    }
}
