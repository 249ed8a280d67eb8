//! The credentials shortcut: the compact `creds` tree (sensor id → its device's
//! credentials and whether a proof made it), which answers a re-announce without
//! reading, and caching, the sensor's whole record.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::device::{Credentials, Token};
use crate::onboarding::Record;

/// What the compact `creds` tree tells of an onboarded sensor: enough to answer its
/// re-announce without reading (and caching) its whole record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortcut {
    pub creds: Credentials,
    /// Whether an authenticated announce made the record (a plain announce must not
    /// be answered then); `None` in shortcuts written before it was kept, where only
    /// the record can say.
    pub made_proven: Option<bool>,
}

/// A shortcut as stored: the credentials' own fields, so shortcuts written before
/// `proven` was kept read the same.
#[derive(Serialize, Deserialize)]
struct ShortcutWire {
    device_id: String,
    device_token: Token,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proven: Option<bool>,
}

/// The shortcut of `rec`, as stored; `None` for a record without credentials.
pub(super) fn encode(rec: &Record) -> Option<Vec<u8>> {
    let c = rec.credentials()?;
    let wire = ShortcutWire {
        device_id: c.device_id.clone(),
        device_token: c.device_token.clone(),
        proven: Some(rec.route.proven),
    };
    Some(serde_json::to_vec(&wire).expect("a shortcut always serializes"))
}

/// A stored shortcut; `None` when it cannot be read (the record then answers).
fn decode(bytes: &[u8]) -> Option<Shortcut> {
    serde_json::from_slice::<ShortcutWire>(bytes)
        .ok()
        .map(|w| Shortcut {
            creds: Credentials {
                device_id: w.device_id,
                device_token: w.device_token,
            },
            made_proven: w.proven,
        })
}

impl Store {
    /// Whether `sensor` has a credentials shortcut (onboarded): answers "known" from
    /// the compact tree, whose leaves are small, where [`knows`](Self::knows) would
    /// bring the leaf of its whole record into sled's cache.
    pub fn has_shortcut(&self, sensor: &str) -> Result<bool, StoreError> {
        Ok(self.creds.contains_key(sensor.as_bytes())?)
    }

    /// The credentials of an onboarded sensor, from the compact tree; `None` when
    /// the sensor is not (yet) onboarded or the shortcut is missing.
    pub fn credentials(&self, sensor: &str) -> Result<Option<Shortcut>, StoreError> {
        let Some(v) = self.creds.get(sensor.as_bytes())? else {
            return Ok(None);
        };
        Ok(decode(&v))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{cfg, created, pending};
    use super::*;

    #[tokio::test]
    async fn credentials_shortcut_follows_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        assert!(s.credentials("a").unwrap().is_none());
        s.update("a", |_| Some(created())).unwrap();
        assert_eq!(s.credentials("a").unwrap().unwrap().creds.device_id, "d");
        s.remove("a", None).unwrap();
        assert!(s.credentials("a").unwrap().is_none());
    }

    #[tokio::test]
    async fn the_shortcut_says_whether_a_proof_made_the_record_and_older_shortcuts_do_not_know() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("plain", &pending()).unwrap();
        s.update("plain", |_| Some(created())).unwrap();
        let mut proven = created();
        proven.route.proven = true;
        s.insert_new("proven", &pending()).unwrap();
        s.update("proven", |_| Some(proven.clone())).unwrap();
        let made = |k: &str| s.credentials(k).unwrap().unwrap().made_proven;
        assert_eq!(made("plain"), Some(false));
        assert_eq!(made("proven"), Some(true));
        // As written before the flag was kept: only the record can say.
        s.creds
            .insert("old", &br#"{"device_id":"d","device_token":"t"}"#[..])
            .unwrap();
        let old = s.credentials("old").unwrap().unwrap();
        assert_eq!((old.creds.device_id.as_str(), old.made_proven), ("d", None));
    }
}
