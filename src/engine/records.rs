//! The only door through which a stored record changes once it exists.
//!
//! Every change is one [`Transition`] of the state machine in
//! [`crate::onboarding`], applied as a compare-and-swap on the record of the
//! generation its caller saw: when the operator forgot the sensor meanwhile (or
//! forgot it and it was onboarded anew), nothing is written, so `forget` always
//! wins. A move the state machine refuses means the record changed under its
//! writer; it is logged here, the same way for every caller, and nothing is written.

use crate::device::Credentials;
use crate::onboarding::{Invalid, Origin, Record, State};
use crate::store::{Store, StoreError};

/// One change to a sensor's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// A create is about to be sent.
    Creating,
    /// Qubitro issued (or a lookup found) the device.
    Created {
        credentials: Credentials,
        origin: Origin,
        /// Another gateway's device (see [`crate::onboarding::owner`]); `None`: ours.
        owner: Option<String>,
    },
    /// The operator adopted the device on this gateway: it bridges it from now on.
    Adopted,
    /// The broker acknowledged the ok reply with reason Success.
    Delivered,
    /// An attempt did not finish: try again later.
    RetryLater {
        wait_ms: u64,
        reason: Option<String>,
        /// Counts for the backoff (a gateway-wide pause does not).
        failure: bool,
    },
    /// Its readings are forwarded from now on (sticky until forget).
    Bridged,
    /// A discovered device with no entity left.
    Retired,
    /// A retired discovered device has an entity again.
    Reactivated,
}

impl Transition {
    /// The word for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Transition::Creating => "creating",
            Transition::Created { .. } => "created",
            Transition::Adopted => "adopted",
            Transition::Delivered => "delivered",
            Transition::RetryLater { .. } => "retried",
            Transition::Bridged => "bridged",
            Transition::Retired => "retired",
            Transition::Reactivated => "reactivated",
        }
    }

    /// Whether the record already is where this transition leads: a repeat (the
    /// broker acknowledging a reply published twice, a second bridged announce) is
    /// not an illegal move, only nothing to write.
    fn already(&self, rec: &Record) -> bool {
        match self {
            Transition::Delivered => matches!(rec.state, State::Delivered { .. }),
            Transition::Bridged => rec.bridged,
            Transition::Adopted => rec.adopted_ms.is_some(),
            Transition::Retired => rec.retired,
            Transition::Reactivated => !rec.retired,
            _ => false,
        }
    }

    /// The pure step of the state machine.
    pub fn next(&self, rec: &Record, now_ms: u64) -> Result<Record, Invalid> {
        match self {
            Transition::Creating => rec.creating(now_ms),
            Transition::Created {
                credentials,
                origin,
                owner,
            } => Ok(rec
                .created(credentials.clone(), *origin, now_ms)?
                .owned_by(owner.clone())),
            Transition::Adopted => Ok(rec.adopted(now_ms)),
            Transition::Delivered => rec.delivered(now_ms),
            Transition::RetryLater {
                wait_ms,
                reason,
                failure,
            } => rec.retry_later(*wait_ms, reason.clone(), *failure, now_ms),
            Transition::Bridged => Ok(rec.bridged(now_ms).unwrap_or_else(|| rec.clone())),
            Transition::Retired => rec.retired(now_ms),
            Transition::Reactivated => Ok(rec.reactivated(now_ms)),
        }
    }
}

/// What applying a transition did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Written: the new record, and its write's sequence number for
    /// [`Store::durable`].
    Written(Record, u64),
    /// The record already was there (nothing written).
    Already(Record),
    /// No record of that generation: forgotten meanwhile (nothing written).
    Gone,
    /// The state machine refused the move (logged; nothing written).
    Refused(Invalid),
}

impl Applied {
    /// The new record and its write, when one happened.
    pub fn written(self) -> Option<(Record, u64)> {
        match self {
            Applied::Written(rec, seq) => Some((rec, seq)),
            _ => None,
        }
    }
}

/// Applies `t` to the sensor's record of `generation`.
pub fn apply(
    store: &Store,
    sensor: &str,
    generation: u64,
    t: &Transition,
    now_ms: u64,
) -> Result<Applied, StoreError> {
    let mut outcome = Applied::Gone;
    let written = store.update(sensor, |current| {
        outcome = Applied::Gone;
        if current.generation != generation {
            return None;
        }
        if t.already(current) {
            outcome = Applied::Already(current.clone());
            return None;
        }
        match t.next(current, now_ms) {
            Ok(next) => Some(next),
            Err(e) => {
                outcome = Applied::Refused(e);
                None
            }
        }
    })?;
    if let Some((rec, seq)) = written {
        return Ok(Applied::Written(rec, seq));
    }
    if let Applied::Refused(e) = &outcome {
        tracing::error!(
            sensor_id = sensor,
            transition = t.name(),
            error = %e,
            "record of sensor {sensor} not changed: {e}"
        );
    }
    Ok(outcome)
}

/// Applies `t` to whichever onboarding of the sensor is stored now: for changes
/// that belong to the sensor rather than to one onboarding (bridged, retired).
/// `Gone` when the sensor is not known.
pub fn apply_to_current(
    store: &Store,
    sensor: &str,
    t: &Transition,
    now_ms: u64,
) -> Result<Applied, StoreError> {
    match store.get(sensor)? {
        Some(rec) => apply(store, sensor, rec.generation, t, now_ms),
        None => Ok(Applied::Gone),
    }
}

/// `devices adopt`, with the daemon running or not: the adoption is durable and
/// logged before this returns. `Gone`: the sensor is not known here.
pub async fn adopt(store: &Store, sensor: &str, now_ms: u64) -> Result<Applied, StoreError> {
    let applied = apply_to_current(store, sensor, &Transition::Adopted, now_ms)?;
    if let Applied::Written(rec, seq) = &applied {
        store.durable(*seq).await?;
        let owner = rec
            .owner
            .as_deref()
            .map_or("this gateway".into(), crate::onboarding::owner::describe);
        tracing::info!(sensor_id = sensor, made_by = %owner,
            "sensor {sensor} adopted by the operator: this gateway bridges its device (made by {owner})");
    }
    Ok(applied)
}

/// Deletes the sensor's record of `generation` (a create Qubitro rejected: the
/// corrected announce starts afresh). False when it was forgotten meanwhile.
pub fn abandon(store: &Store, sensor: &str, generation: u64) -> Result<bool, StoreError> {
    Ok(store.remove(sensor, Some(generation))?.is_some())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use crate::device::Token;
    use crate::reply::Route;

    /// A store in a fresh directory (kept alive by the returned guard).
    pub(crate) fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            path: dir.path().join("db").to_string_lossy().into_owned(),
            cache_capacity_bytes: 1 << 20,
            last_seen_flush_s: 600,
        };
        (Store::open(&cfg).unwrap().0, dir)
    }

    fn creds() -> Credentials {
        Credentials {
            device_id: "dev-1".into(),
            device_token: Token("tok".into()),
        }
    }

    fn created() -> Transition {
        Transition::Created {
            credentials: creds(),
            origin: Origin::Created,
            owner: None,
        }
    }

    fn pending(store: &Store, sensor: &str, generation: u64) -> Record {
        let rec = Record::pending(
            crate::announce::test_spec(),
            Route::default(),
            generation,
            1,
        );
        store.insert_new(sensor, &rec).unwrap().unwrap();
        rec
    }

    #[tokio::test]
    async fn each_transition_is_written_with_a_sequence_number_to_wait_for() {
        let (store, _dir) = store();
        pending(&store, "s", 4);
        let Applied::Written(rec, seq) = apply(&store, "s", 4, &Transition::Creating, 2).unwrap()
        else {
            panic!("not written")
        };
        assert_eq!((rec.state, seq > 0), (State::Creating, true));
        let applied = apply(&store, "s", 4, &created(), 3).unwrap();
        assert!(matches!(applied, Applied::Written(..)));
        assert_eq!(
            store.get("s").unwrap().unwrap().credentials(),
            Some(&creds())
        );
        store.durable(seq).await.unwrap();
    }

    #[tokio::test]
    async fn an_illegal_move_is_refused_and_writes_nothing() {
        let (store, _dir) = store();
        let before = pending(&store, "s", 4);
        let applied = apply(&store, "s", 4, &Transition::Delivered, 2).unwrap();
        assert_eq!(
            applied,
            Applied::Refused(Invalid {
                from: "pending",
                to: "delivered"
            })
        );
        assert_eq!(store.get("s").unwrap(), Some(before));
    }

    #[tokio::test]
    async fn a_record_of_another_generation_is_left_alone() {
        let (store, _dir) = store();
        // Forgotten and onboarded anew: a task of the old onboarding writes nothing.
        let newer = pending(&store, "s", 9);
        assert_eq!(apply(&store, "s", 4, &created(), 2).unwrap(), Applied::Gone);
        assert_eq!(store.get("s").unwrap(), Some(newer));
        assert!(
            !abandon(&store, "s", 4).unwrap(),
            "not the old onboarding's to delete"
        );
        assert!(abandon(&store, "s", 9).unwrap());
        assert_eq!(
            apply(&store, "s", 9, &Transition::Creating, 3).unwrap(),
            Applied::Gone
        );
    }

    #[tokio::test]
    async fn a_repeated_delivery_or_bridging_is_nothing_to_write_not_an_error() {
        let (store, _dir) = store();
        pending(&store, "s", 4);
        apply(&store, "s", 4, &created(), 2).unwrap();
        assert!(matches!(
            apply(&store, "s", 4, &Transition::Delivered, 3).unwrap(),
            Applied::Written(..)
        ));
        let again = apply(&store, "s", 4, &Transition::Delivered, 4).unwrap();
        assert!(
            matches!(again, Applied::Already(ref r) if r.updated_ms == 3),
            "{again:?}"
        );
        let bridged = apply(&store, "s", 4, &Transition::Bridged, 5).unwrap();
        assert!(matches!(bridged, Applied::Written(ref r, _) if r.bridged));
        assert!(matches!(
            apply(&store, "s", 4, &Transition::Bridged, 6).unwrap(),
            Applied::Already(_)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_that_loses_the_compare_and_swap_applies_its_move_to_the_winners_record() {
        let (store, _dir) = store();
        pending(&store, "s", 4);
        let retry = Transition::RetryLater {
            wait_ms: 1,
            reason: None,
            failure: true,
        };
        // Racing writers: each lost swap is retried on the record that won, so no
        // counted failure is lost.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (store, retry) = (store.clone(), retry.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        assert!(matches!(
                            apply(&store, "s", 4, &retry, 2).unwrap(),
                            Applied::Written(..)
                        ));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.get("s").unwrap().unwrap().attempts, 200);
    }
}
