//! `devices forget`: the one way a sensor's onboarding is undone, the same whether
//! the daemon runs (through [`super::Engine::forget`], which also clears what it
//! holds in memory) or not (the CLI opens the store itself).
//!
//! Everything stored for the onboarding goes together: its record, the readings
//! the bridge still buffers for it and discovery's mark that it was retired. A
//! reading left behind would otherwise be forwarded to whatever device a later
//! onboarding of the same id gets. A discovered device also goes on the ignore
//! list, since its retained config would bring it back at the next subscribe.

use crate::bridge::buffer::{Buffer, Limits};
use crate::bridge::Bridge;
use crate::onboarding::{Provenance, Record};
use crate::store::{Ignored, Store, StoreError};

/// Removes the sensor's record, buffered readings and discovery mark, and waits
/// until that is on disk. `bridge`: the running daemon's bridge, which also closes
/// the sensor's uplink; without one the buffer is opened here. Returns the record
/// that was removed (`None`: the sensor was not known).
pub async fn forget_stored(
    store: &Store,
    bridge: Option<&Bridge>,
    sensor: &str,
) -> Result<Option<Record>, StoreError> {
    let old = store.remove(sensor, None)?;
    match bridge {
        Some(bridge) => {
            bridge.forget(sensor)?;
        }
        None => {
            // Bounds only matter when appending; this buffer only removes.
            let unbounded = Limits {
                max_per_sensor: u64::MAX,
                max_bytes: u64::MAX,
            };
            Buffer::open(store, unbounded)?.remove_through(sensor, u64::MAX)?;
        }
    }
    // A discovered device's config stays retained on the broker and would onboard
    // it again at the next subscribe: it goes on the ignore list instead.
    if let Some(rec) = old
        .as_ref()
        .filter(|r| r.provenance == Provenance::Discovered)
    {
        store.ignore(&Ignored {
            sensor_id: sensor.to_string(),
            since_ms: crate::clock::system_ms(),
            name: rec.spec.name.clone(),
        })?;
    }
    store.forget_last_seen(sensor)?;
    let discovery = store.discovery_tree()?;
    if discovery.remove_retired_mark(sensor)? {
        discovery.wrote();
    }
    store.flush_all().await?;
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::records::tests::store;
    use crate::reply::Route;

    fn buffer_of(store: &Store) -> Buffer {
        let limits = Limits {
            max_per_sensor: 100,
            max_bytes: 1 << 20,
        };
        Buffer::open(store, limits).unwrap()
    }

    #[tokio::test]
    async fn forget_removes_the_record_its_buffered_readings_and_its_retired_mark() {
        let (store, _dir) = store();
        let rec = Record::pending(crate::announce::test_spec(), Route::default(), 1, 1);
        for sensor in ["gone", "kept"] {
            store.insert_new(sensor, &rec).unwrap().unwrap();
            let buffer = buffer_of(&store);
            buffer.append(sensor, br#"{"n":1}"#).unwrap();
            buffer.append(sensor, br#"{"n":2}"#).unwrap();
            store
                .discovery_tree()
                .unwrap()
                .mark_retired_as_before(sensor)
                .unwrap();
        }

        assert_eq!(
            forget_stored(&store, None, "gone").await.unwrap(),
            Some(rec.clone())
        );

        assert_eq!(store.get("gone").unwrap(), None);
        let buffer = buffer_of(&store);
        assert_eq!(
            buffer.count("gone"),
            0,
            "no reading left for a later onboarding"
        );
        let marks = store.discovery_tree().unwrap().retired_marks().unwrap();
        assert_eq!(marks, vec!["kept".to_string()]);
        assert_eq!(
            store.get("kept").unwrap(),
            Some(rec),
            "other sensors untouched"
        );
        assert_eq!(buffer.count("kept"), 2);
    }

    #[tokio::test]
    async fn forgetting_an_unknown_sensor_finds_nothing_and_still_clears_its_readings() {
        let (store, _dir) = store();
        buffer_of(&store).append("stray", b"{}").unwrap();
        assert_eq!(forget_stored(&store, None, "stray").await.unwrap(), None);
        assert_eq!(buffer_of(&store).count("stray"), 0);
    }
}
