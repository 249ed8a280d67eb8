//! `devices forget`: the one way a sensor's onboarding is undone, the same whether
//! the daemon runs (through [`super::Engine::forget`], which also clears what it
//! holds in memory) or not (the CLI opens the store itself).
//!
//! Everything stored for the onboarding goes together: its record, the readings
//! the bridge still buffers for it and discovery's mark that it was retired. A
//! reading left behind would otherwise be forwarded to whatever device a later
//! onboarding of the same id gets.

use crate::bridge::buffer::{Buffer, Limits};
use crate::bridge::Bridge;
use crate::onboarding::Record;
use crate::store::{Store, StoreError};

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
    let discovery = store.discovery_tree()?;
    if discovery.remove_retired_mark(sensor)? {
        discovery.wrote();
    }
    store.flush_all().await?;
    Ok(old)
}
