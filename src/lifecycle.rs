//! The end of a discovered device's life without the operator: with
//! `discovery.delete_retired_after_s` set, a device retired (every entity gone from
//! its discovery config) for that long is deleted from Qubitro, which bills it every
//! hour, and forgotten, exactly as `devices forget --delete-remote` would. It is not
//! put on the ignore list: should its config come back, it is onboarded anew.
//!
//! On top of [`crate::engine`] and [`crate::control`]: it uses the operator's own
//! forget, so the delete comes first and a refused one forgets nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::control::forget::{describe, forget, Remote};
use crate::engine::Engine;
use crate::onboarding::{Provenance, Record};
use crate::store::StoreError;

/// How often retired devices are looked at, at most: a device is deleted within
/// this much of its due time.
const MAX_PERIOD: Duration = Duration::from_secs(60);

/// Whether `rec` is a discovered device retired for longer than `after` at
/// `now_ms`. A retired record changes no more, so its last change is when it
/// retired.
pub fn due(rec: &Record, now_ms: u64, after: Duration) -> bool {
    let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    rec.retired
        && rec.provenance == Provenance::Discovered
        && rec.credentials().is_some()
        && now_ms.saturating_sub(rec.updated_ms) >= after_ms
}

/// Starts the task when `after_s` is not 0; it ends at `stop`.
pub fn spawn_reaper(
    after_s: u64,
    engine: Arc<Engine>,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    if after_s == 0 {
        return None;
    }
    let after = Duration::from_secs(after_s);
    let period = after.min(MAX_PERIOD);
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = reap(&engine, after).await {
                tracing::error!(error = %e, "deleting retired discovered devices failed: {e}");
            }
        }
    }))
}

async fn reap(engine: &Engine, after: Duration) -> Result<(), StoreError> {
    let store = engine.store();
    let now_ms = crate::clock::system_ms();
    let mut due_now = Vec::new();
    for item in store.scan() {
        let (sensor, rec) = item?;
        if due(&rec, now_ms, after) {
            due_now.push(sensor);
        }
    }
    for sensor in due_now {
        match forget(store, Some(engine), Some(engine.cloud()), &sensor).await {
            Ok(Some(done)) => {
                if let Some(seq) = store.unignore(&sensor)? {
                    store.durable(seq).await?;
                }
                let line = describe(&sensor, &done.remote);
                if matches!(done.remote, Remote::Left { .. }) {
                    tracing::warn!(sensor_id = %sensor, "retired for {}s: {line}", after.as_secs());
                } else {
                    tracing::info!(sensor_id = %sensor, "retired for {}s: {line}", after.as_secs());
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                sensor_id = %sensor,
                "retired discovered device {sensor} not deleted: {e}; tried again later"
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Credentials, Token};
    use crate::onboarding::Origin;
    use crate::reply::Route;

    fn discovered(retired_at: u64) -> Record {
        let rec = Record::pending_from(
            Provenance::Discovered,
            crate::announce::test_spec(),
            Route::default(),
            1,
            1,
        );
        let creds = Credentials {
            device_id: "d".into(),
            device_token: Token("t".into()),
        };
        rec.created(creds, Origin::Created, 2)
            .unwrap()
            .retired(retired_at)
            .unwrap()
    }

    #[test]
    fn only_a_discovered_device_retired_for_long_enough_is_due() {
        let after = Duration::from_secs(60);
        let rec = discovered(1_000);
        assert!(!due(&rec, 60_999, after), "not yet");
        assert!(due(&rec, 61_000, after));
        assert!(
            !due(&rec.reactivated(2_000), 1_000_000, after),
            "active again"
        );
        let mut firmware = rec.clone();
        firmware.provenance = Provenance::Firmware;
        assert!(!due(&firmware, 1_000_000, after));
    }
}
