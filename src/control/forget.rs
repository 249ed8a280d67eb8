//! `devices forget [--delete-remote]`, all or nothing, the same whether the daemon
//! runs (its engine forgets) or not (the CLI's own store and Qubitro client).
//!
//! The Qubitro device is deleted first, and the sensor is forgotten only once
//! Qubitro confirmed it (or said the device was already gone). The other order
//! would leave, whenever Qubitro refuses, a device that is billed every hour and
//! that no gateway knows of any more. When the delete fails, nothing is forgotten
//! and the operator gets Qubitro's answer.

use crate::cloud::{Cloud, DeleteError, Deleted};
use crate::engine::{forget_stored, Engine};
use crate::onboarding::Record;
use crate::store::{Store, StoreError};

/// What became of the Qubitro device of a sensor that was forgotten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// The onboarding had not created one (pending, or still creating).
    NoDevice,
    /// Kept in Qubitro: no delete was asked for.
    Kept(String),
    /// Deleted by this command.
    Deleted(String),
    /// Qubitro no longer had it (404): gone, as asked.
    AlreadyGone(String),
    /// Created by the onboarding while the sensor was being forgotten (after the
    /// record was read, before it was removed), and Qubitro refused its delete.
    Left {
        device_id: String,
        refused: DeleteError,
    },
}

/// A sensor `forget` removed, and its Qubitro device.
#[derive(Debug)]
pub struct Forgotten {
    pub record: Record,
    pub remote: Remote,
}

/// Why nothing was forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// Qubitro did not delete the device: the sensor stays exactly as it was.
    #[error("{refused}; nothing was forgotten: {sensor} is kept as it was")]
    NotDeleted {
        sensor: String,
        refused: DeleteError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Forgets `sensor`; with `delete_with` (`--delete-remote`), deletes its Qubitro
/// device first. `engine`: the running daemon's, which also clears what it holds
/// in memory; without one, `store` is the CLI's own. `Ok(None)`: the sensor was
/// not known (its stray buffered readings are cleared all the same).
pub async fn forget(
    store: &Store,
    engine: Option<&Engine>,
    delete_with: Option<&Cloud>,
    sensor: &str,
) -> Result<Option<Forgotten>, ForgetError> {
    let before = store.get(sensor)?;
    let handled = before.as_ref().and_then(device_of);
    let mut remote = match (&handled, delete_with) {
        (None, _) => Remote::NoDevice,
        (Some(id), None) => Remote::Kept(id.clone()),
        (Some(id), Some(cloud)) => match cloud.delete(id).await {
            Ok(gone) => gone_as(gone, id),
            Err(refused) => {
                return Err(ForgetError::NotDeleted {
                    sensor: sensor.to_string(),
                    refused,
                })
            }
        },
    };
    let removed = match engine {
        Some(engine) => engine.forget(sensor).await?,
        None => forget_stored(store, None, sensor).await?,
    };
    let Some(record) = removed else {
        return Ok(None);
    };
    // Only the running daemon changes a record meanwhile: an onboarding that
    // finished between the read and the removal leaves a device not yet handled.
    let now = device_of(&record);
    if now != handled {
        remote = match (now, delete_with) {
            (None, _) => Remote::NoDevice,
            (Some(id), None) => Remote::Kept(id),
            (Some(id), Some(cloud)) => match cloud.delete(&id).await {
                Ok(gone) => gone_as(gone, &id),
                Err(refused) => Remote::Left {
                    device_id: id,
                    refused,
                },
            },
        };
    }
    Ok(Some(Forgotten { record, remote }))
}

fn device_of(rec: &Record) -> Option<String> {
    rec.credentials().map(|c| c.device_id.clone())
}

fn gone_as(gone: Deleted, id: &str) -> Remote {
    match gone {
        Deleted::Now => Remote::Deleted(id.to_string()),
        Deleted::AlreadyGone => Remote::AlreadyGone(id.to_string()),
    }
}

/// The operator's line for a forgotten sensor.
pub fn describe(sensor: &str, remote: &Remote) -> String {
    let forgotten = format!("{sensor} forgotten: it is onboarded anew on its next announce");
    match remote {
        Remote::NoDevice => format!("{forgotten}; it had no Qubitro device yet"),
        Remote::Kept(id) => format!(
            "{forgotten}; the Qubitro device {id} is KEPT (use --delete-remote to delete it). With lookup_before_create on, \
             the next announce adopts it again"
        ),
        Remote::Deleted(id) => format!("{forgotten}; Qubitro device {id} deleted"),
        Remote::AlreadyGone(id) => {
            format!("{forgotten}; Qubitro device {id} was already gone (Qubitro answered 404)")
        }
        Remote::Left { device_id, refused } => format!(
            "{forgotten}; but Qubitro device {device_id}, created while it was being forgotten, is NOT deleted: {refused}. \
             Delete it in Qubitro's portal"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QubitroConfig;
    use crate::engine::records::tests::store;
    use crate::onboarding::{Origin, State};
    use crate::reply::{Credentials, Route, Token};
    use fake_qubitro::{Endpoint, FakeOptions, FakeQubitro, Fault, NewDevice};

    async fn cloud_of(fake: &FakeQubitro) -> Cloud {
        crate::tls::install_ring_provider();
        let text = format!(
            "[qubitro]\nbase_url = \"{}\"\nproject_id = \"{}\"\napi_key = \"{}\"",
            fake.base_url(),
            fake.project_id(),
            fake.api_key()
        );
        let cfg = crate::config::Config::from_toml(&text).unwrap();
        let q: &QubitroConfig = &cfg.qubitro;
        Cloud::new(q).unwrap()
    }

    /// A delivered record of `sensor` for a device planted in the fake.
    fn delivered(store: &Store, fake: &FakeQubitro, sensor: &str) -> String {
        let device = fake.insert_device(NewDevice::named(sensor));
        let mut rec = Record::pending(crate::announce::test_spec(), Route::default(), 1, 1);
        rec.state = State::Delivered {
            credentials: Credentials {
                device_id: device.id.clone(),
                device_token: Token(device.token),
            },
            origin: Origin::Created,
        };
        store.insert_new(sensor, &rec).unwrap().unwrap();
        device.id
    }

    #[tokio::test]
    async fn the_device_is_deleted_before_the_sensor_is_forgotten() {
        let fake = FakeQubitro::start(FakeOptions::default()).await.unwrap();
        let cloud = cloud_of(&fake).await;
        let (store, _dir) = store();
        let id = delivered(&store, &fake, "s1");
        let done = forget(&store, None, Some(&cloud), "s1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.remote, Remote::Deleted(id));
        assert!(fake.devices().is_empty());
        assert_eq!(store.get("s1").unwrap(), None);
    }

    #[tokio::test]
    async fn a_refused_delete_leaves_the_record_as_it_was() {
        let fake = FakeQubitro::start(FakeOptions {
            delete_permission: false,
            ..FakeOptions::default()
        })
        .await
        .unwrap();
        let cloud = cloud_of(&fake).await;
        let (store, _dir) = store();
        let id = delivered(&store, &fake, "s1");
        let before = store.get("s1").unwrap();
        let err = forget(&store, None, Some(&cloud), "s1").await.unwrap_err();
        assert!(
            matches!(&err, ForgetError::NotDeleted { refused: DeleteError::Forbidden { device_id, .. }, .. } if *device_id == id),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("Delete permission") && text.contains("nothing was forgotten"),
            "{text}"
        );
        assert!(!text.contains(&fake.api_key()), "{text}");
        assert_eq!(store.get("s1").unwrap(), before);
        assert_eq!(fake.devices().len(), 1);
    }

    #[tokio::test]
    async fn qubitros_answer_is_passed_on_without_the_api_key_in_it() {
        let fake = FakeQubitro::start(FakeOptions::default()).await.unwrap();
        let cloud = cloud_of(&fake).await;
        let (store, _dir) = store();
        delivered(&store, &fake, "s1");
        let quoting = format!(
            r#"{{"message":"key {} is not valid here"}}"#,
            fake.api_key()
        );
        fake.push_faults(
            Endpoint::Delete,
            vec![Fault::Status {
                status: 401,
                retry_after: None,
                body: Some(quoting),
            }],
        );
        let err = forget(&store, None, Some(&cloud), "s1").await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("HTTP 401: key <redacted> is not valid here"),
            "{text}"
        );
        assert!(text.contains("check qubitro.api_key"), "{text}");
        assert!(!text.contains(&fake.api_key()), "{text}");
        assert!(store.get("s1").unwrap().is_some(), "nothing was forgotten");
    }

    #[tokio::test]
    async fn without_delete_remote_the_device_is_kept_and_no_call_is_made() {
        let fake = FakeQubitro::start(FakeOptions::default()).await.unwrap();
        let (store, _dir) = store();
        let id = delivered(&store, &fake, "s1");
        let done = forget(&store, None, None, "s1").await.unwrap().unwrap();
        assert_eq!(done.remote, Remote::Kept(id));
        assert!(fake.requests().is_empty());
        assert!(describe("s1", &done.remote).contains("KEPT"));
    }
}
