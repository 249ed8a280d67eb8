//! One sensor's onboarding as a persisted state machine.
//!
//! ```text
//!            creating()              created()               delivered()
//!  Pending ─────────────▶ Creating ─────────────▶ Created ─────────────▶ Delivered
//!     │                      ▲  │                   ▲
//!     │ retry_later()        └──┘ retry_later()     │ created(): a lookup found the
//!     └──────────────────────────────────────────────┘ device before any create
//! ```
//!
//! - `Pending`: the announce is durably recorded; no create was ever sent.
//! - `Creating`: a create may have been sent. Whatever `lookup_before_create` says,
//!   the next attempt looks the sensor up before it creates again.
//! - `Created`: Qubitro issued credentials; the broker has not acknowledged the ok
//!   reply yet, so it is published again on every new MQTT session.
//! - `Delivered`: the broker acknowledged the ok reply with reason Success.
//!
//! Every transition is one pure function here: it takes the record and the time and
//! returns the next record, or [`Invalid`] when the move is not allowed. The engine
//! does the I/O around them; nothing else builds a record. Forgetting a sensor is
//! not a state: its record is deleted, and the record's `generation` (unique per
//! onboarding) tells a late writer that the sensor it worked for is gone.

use serde::{Deserialize, Serialize};

use crate::announce::DeviceSpec;
use crate::device::{Credentials, Token};
use crate::reply::Route;

/// How a sensor's device came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// onboardd created it.
    Created,
    /// A lookup found it in Qubitro (made earlier, by another gateway or by hand).
    Adopted,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Created => "created",
            Origin::Adopted => "adopted",
        }
    }
}

/// Where a record came from, fixed at its creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    /// Our firmware announced it.
    #[default]
    Firmware,
    /// Discovery found it (Home Assistant or Tasmota): no firmware of ours listens
    /// for its replies.
    Discovered,
}

impl Provenance {
    /// For records written before provenance was stored: discovery alone sets a
    /// `discovered_by` entry together with a discovery sensor id (`ha-…`,
    /// `tasmota-…`; announces may not set `sensor_id` themselves).
    fn derive(spec: &DeviceSpec) -> Provenance {
        let by_discovery = spec.metadata.contains_key("discovered_by")
            && spec
                .metadata
                .get("sensor_id")
                .is_some_and(|id| crate::discovery::is_discovery_id(id));
        if by_discovery {
            Provenance::Discovered
        } else {
            Provenance::Firmware
        }
    }
}

/// Where a sensor is in its onboarding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "is", rename_all = "snake_case")]
pub enum State {
    Pending,
    Creating,
    Created {
        #[serde(flatten)]
        credentials: Credentials,
        origin: Origin,
    },
    Delivered {
        #[serde(flatten)]
        credentials: Credentials,
        origin: Origin,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Creating => "creating",
            State::Created { .. } => "created",
            State::Delivered { .. } => "delivered",
        }
    }

    /// Pending or Creating: an onboarding task must drive it.
    pub fn is_unfinished(&self) -> bool {
        matches!(self, State::Pending | State::Creating)
    }
}

/// A move the state machine does not allow (a bug in the caller, or a record that
/// changed under it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("onboarding state {from} cannot become {to}")]
pub struct Invalid {
    pub from: &'static str,
    pub to: &'static str,
}

/// The persisted record of one sensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "wire::Wire", into = "wire::Wire")]
pub struct Record {
    pub state: State,
    pub spec: DeviceSpec,
    /// Where to answer: the route of the announce that started the onboarding.
    pub route: Route,
    /// Unique per onboarding (a forgotten and re-announced sensor gets a new one), so
    /// a task that outlived a `forget` cannot write over the new onboarding.
    pub generation: u64,
    /// Cloud attempts that failed so far (drives the backoff).
    pub attempts: u32,
    /// Wall-clock ms before which no cloud call is made for this sensor. Capped when
    /// read back: a Pi without RTC may have booted with a wrong clock.
    pub next_attempt_ms: u64,
    pub first_seen_ms: u64,
    pub updated_ms: u64,
    /// Why the last attempt failed, for `devices show`.
    pub last_error: Option<String>,
    /// The gateway forwards this sensor's readings (it asked with `"bridge": true`):
    /// its replies never carry the token. Stays on until `devices forget`.
    pub bridged: bool,
    pub provenance: Provenance,
    /// A discovered device with no entity left: kept (with its Qubitro device),
    /// shown `retired`, its readings no longer forwarded, until an entity returns.
    pub retired: bool,
    /// The gateway whose device this is, when a lookup found it made by another
    /// (its `gateway_id` metadata; empty: none set). See [`owner`].
    pub owner: Option<String>,
    /// When the operator adopted the device on this gateway (`devices adopt`).
    pub adopted_ms: Option<u64>,
}

impl Record {
    /// A newly announced sensor.
    pub fn pending(spec: DeviceSpec, route: Route, generation: u64, now_ms: u64) -> Record {
        Record::pending_from(Provenance::Firmware, spec, route, generation, now_ms)
    }

    /// A new sensor, announced or discovered.
    pub fn pending_from(
        provenance: Provenance,
        spec: DeviceSpec,
        route: Route,
        generation: u64,
        now_ms: u64,
    ) -> Record {
        Record {
            provenance,
            retired: false,
            owner: None,
            adopted_ms: None,
            state: State::Pending,
            spec,
            route,
            generation,
            attempts: 0,
            next_attempt_ms: now_ms,
            first_seen_ms: now_ms,
            updated_ms: now_ms,
            last_error: None,
            bridged: false,
        }
    }

    /// The sensor asked the gateway to forward its readings: from now on, in any
    /// state, it is bridged (only `devices forget` turns that off). `None` when it
    /// already was (nothing to write).
    pub fn bridged(&self, now_ms: u64) -> Option<Record> {
        (!self.bridged).then(|| Record {
            bridged: true,
            updated_ms: now_ms,
            ..self.clone()
        })
    }

    /// A discovered device lost its last entity. Only discovery retires, and only
    /// what it found.
    pub fn retired(&self, now_ms: u64) -> Result<Record, Invalid> {
        if self.provenance != Provenance::Discovered {
            return Err(Invalid {
                from: "announced",
                to: "retired",
            });
        }
        Ok(Record {
            retired: true,
            updated_ms: now_ms,
            ..self.clone()
        })
    }

    /// A retired discovered device has an entity again.
    pub fn reactivated(&self, now_ms: u64) -> Record {
        Record {
            retired: false,
            updated_ms: now_ms,
            ..self.clone()
        }
    }

    /// The state shown to the operator (`devices list`): `retired` over the rest.
    pub fn shown_state(&self) -> &'static str {
        if self.retired {
            "retired"
        } else {
            self.state.name()
        }
    }

    /// Before a create is sent: from here on the sensor is looked up before any
    /// further create.
    pub fn creating(&self, now_ms: u64) -> Result<Record, Invalid> {
        self.expect_unfinished("creating")?;
        Ok(Record {
            state: State::Creating,
            updated_ms: now_ms,
            ..self.clone()
        })
    }

    /// Qubitro issued (or a lookup found) the sensor's device.
    pub fn created(
        &self,
        credentials: Credentials,
        origin: Origin,
        now_ms: u64,
    ) -> Result<Record, Invalid> {
        self.expect_unfinished("created")?;
        Ok(Record {
            state: State::Created {
                credentials,
                origin,
            },
            updated_ms: now_ms,
            last_error: None,
            ..self.clone()
        })
    }

    /// The broker acknowledged the ok reply with reason Success.
    pub fn delivered(&self, now_ms: u64) -> Result<Record, Invalid> {
        match &self.state {
            State::Created {
                credentials,
                origin,
            } => Ok(Record {
                state: State::Delivered {
                    credentials: credentials.clone(),
                    origin: *origin,
                },
                updated_ms: now_ms,
                ..self.clone()
            }),
            other => Err(Invalid {
                from: other.name(),
                to: "delivered",
            }),
        }
    }

    /// A cloud attempt did not finish: try again at `now_ms + wait_ms`. `failure`
    /// counts it for the backoff (a pause for the whole gateway does not).
    pub fn retry_later(
        &self,
        wait_ms: u64,
        reason: Option<String>,
        failure: bool,
        now_ms: u64,
    ) -> Result<Record, Invalid> {
        self.expect_unfinished("retried")?;
        Ok(Record {
            attempts: if failure {
                self.attempts.saturating_add(1)
            } else {
                self.attempts
            },
            next_attempt_ms: now_ms.saturating_add(wait_ms),
            updated_ms: now_ms,
            last_error: reason.or_else(|| self.last_error.clone()),
            ..self.clone()
        })
    }

    fn expect_unfinished(&self, to: &'static str) -> Result<(), Invalid> {
        if self.state.is_unfinished() {
            Ok(())
        } else {
            Err(Invalid {
                from: self.state.name(),
                to,
            })
        }
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        match &self.state {
            State::Created { credentials, .. } | State::Delivered { credentials, .. } => {
                Some(credentials)
            }
            _ => None,
        }
    }

    pub fn origin(&self) -> Option<Origin> {
        match &self.state {
            State::Created { origin, .. } | State::Delivered { origin, .. } => Some(*origin),
            _ => None,
        }
    }
}

pub mod owner;
mod wire;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeviceSpec {
        crate::announce::test_spec()
    }

    fn creds() -> Credentials {
        Credentials {
            device_id: "dev-1".into(),
            device_token: Token("tok$1".into()),
        }
    }

    fn pending() -> Record {
        Record::pending(spec(), Route::default(), 7, 1_000)
    }

    #[test]
    fn a_new_record_is_pending_with_no_attempts() {
        let r = pending();
        assert_eq!(r.state, State::Pending);
        assert_eq!((r.attempts, r.generation), (0, 7));
        assert_eq!((r.first_seen_ms, r.next_attempt_ms), (1_000, 1_000));
        assert!(r.credentials().is_none());
    }

    #[test]
    fn pending_and_creating_become_creating() {
        let c = pending().creating(2_000).unwrap();
        assert_eq!(c.state, State::Creating);
        assert_eq!(c.updated_ms, 2_000);
        assert_eq!(c.creating(3_000).unwrap().state, State::Creating);
    }

    #[test]
    fn created_and_delivered_cannot_go_back_to_creating() {
        let done = pending().created(creds(), Origin::Created, 2).unwrap();
        assert_eq!(
            done.creating(3),
            Err(Invalid {
                from: "created",
                to: "creating"
            })
        );
        let delivered = done.delivered(4).unwrap();
        assert!(delivered.creating(5).is_err());
        assert!(delivered.retry_later(1, None, true, 5).is_err());
    }

    #[test]
    fn created_keeps_credentials_and_origin_and_clears_the_error() {
        let failed = pending()
            .retry_later(500, Some("HTTP 503".into()), true, 2)
            .unwrap();
        for from in [failed.clone(), failed.creating(3).unwrap()] {
            let c = from.created(creds(), Origin::Adopted, 4).unwrap();
            assert_eq!(c.credentials(), Some(&creds()));
            assert_eq!(c.origin(), Some(Origin::Adopted));
            assert_eq!(c.state.name(), "created");
            assert_eq!(c.last_error, None);
            assert_eq!(c.attempts, 1, "history kept");
        }
    }

    #[test]
    fn created_twice_is_refused() {
        let c = pending().created(creds(), Origin::Created, 2).unwrap();
        assert!(c.created(creds(), Origin::Created, 3).is_err());
    }

    #[test]
    fn only_created_becomes_delivered() {
        let c = pending().created(creds(), Origin::Created, 2).unwrap();
        let d = c.delivered(3).unwrap();
        assert_eq!(d.state.name(), "delivered");
        assert_eq!(d.credentials(), Some(&creds()));
        assert!(d.delivered(4).is_err(), "delivered twice");
        assert!(pending().delivered(4).is_err());
        assert!(pending().creating(1).unwrap().delivered(4).is_err());
    }

    #[test]
    fn retry_later_counts_failures_and_saturates() {
        let r = pending()
            .retry_later(u64::MAX, Some("timed out".into()), true, 10)
            .unwrap();
        assert_eq!(r.attempts, 1);
        assert_eq!(r.next_attempt_ms, u64::MAX, "saturates, never wraps");
        assert_eq!(r.last_error.as_deref(), Some("timed out"));
        let paused = r.retry_later(100, None, false, 20).unwrap();
        assert_eq!(paused.attempts, 1, "a pause is not a failure");
        assert_eq!(paused.next_attempt_ms, 120);
        assert_eq!(
            paused.last_error.as_deref(),
            Some("timed out"),
            "kept when no new reason"
        );
        let mut maxed = pending();
        maxed.attempts = u32::MAX;
        assert_eq!(
            maxed.retry_later(1, None, true, 1).unwrap().attempts,
            u32::MAX
        );
    }

    #[test]
    fn bridged_is_sticky_in_every_state_and_survives_every_transition() {
        let b = pending().bridged(5).unwrap();
        assert!(b.bridged);
        assert_eq!(b.state, State::Pending);
        assert_eq!(b.bridged(6), None, "already bridged: nothing to write");
        let created = b
            .creating(7)
            .unwrap()
            .created(creds(), Origin::Created, 8)
            .unwrap();
        assert!(created.bridged);
        assert!(created.delivered(9).unwrap().bridged);
        let later = pending()
            .created(creds(), Origin::Adopted, 2)
            .unwrap()
            .bridged(3)
            .unwrap();
        assert!(later.bridged && later.credentials().is_some());
    }

    #[test]
    fn records_round_trip_through_their_stored_form() {
        let created = pending().created(creds(), Origin::Adopted, 2).unwrap();
        for r in [
            pending(),
            pending().bridged(2).unwrap(),
            pending().creating(2).unwrap(),
            created.clone(),
            created.delivered(3).unwrap(),
        ] {
            let bytes = serde_json::to_vec(&r).unwrap();
            let back: Record = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn records_of_the_previous_version_are_read_as_the_same_states() {
        let base = r#""spec":{"name":"n","description":"d","brand":"Custom","model":"Custom","tags":[],"metadata":{}},
            "attempts":2,"next_attempt_ms":5,"first_seen_ms":1,"updated_ms":3"#;
        let read = |phase: &str, extra: &str| -> Record {
            serde_json::from_str(&format!("{{\"phase\":{phase},{base}{extra}}}")).unwrap()
        };
        assert_eq!(read(r#"{"phase":"pending"}"#, "").state, State::Pending);
        assert_eq!(read(r#"{"phase":"creating"}"#, "").state, State::Creating);
        let undelivered = read(
            r#"{"phase":"created","device_id":"d1","device_token":"t1","delivered":false}"#,
            r#","origin":"adopted""#,
        );
        assert_eq!(undelivered.state.name(), "created");
        assert_eq!(undelivered.origin(), Some(Origin::Adopted));
        assert_eq!(undelivered.credentials().unwrap().device_id, "d1");
        let delivered = read(
            r#"{"phase":"created","device_id":"d1","device_token":"t1","delivered":true}"#,
            "",
        );
        assert_eq!(delivered.state.name(), "delivered");
        assert_eq!(delivered.origin(), Some(Origin::Created));
        assert_eq!(delivered.generation, 0);
    }

    #[test]
    fn a_record_without_state_or_with_empty_credentials_is_unreadable() {
        let base = r#""spec":{"name":"n","description":"d","brand":"Custom","model":"Custom","tags":[],"metadata":{}},
            "attempts":0,"next_attempt_ms":0,"first_seen_ms":0,"updated_ms":0"#;
        assert!(serde_json::from_str::<Record>(&format!("{{{base}}}")).is_err());
        let empty = format!(
            r#"{{"state":{{"is":"created","device_id":"","device_token":"t","origin":"created"}},{base}}}"#
        );
        assert!(serde_json::from_str::<Record>(&empty).is_err());
    }

    #[test]
    fn provenance_is_kept_and_older_records_derive_it_once_on_read() {
        let found = Record::pending_from(Provenance::Discovered, spec(), Route::default(), 1, 1);
        let back: Record = serde_json::from_slice(&serde_json::to_vec(&found).unwrap()).unwrap();
        assert_eq!(back.provenance, Provenance::Discovered);

        let old = |metadata: &str| -> Record {
            serde_json::from_str(&format!(
                r#"{{"state":{{"is":"pending"}},"spec":{{"name":"n","description":"d","brand":"Custom",
                "model":"Custom","tags":[],"metadata":{metadata}}},"attempts":0,"next_attempt_ms":0,
                "first_seen_ms":0,"updated_ms":0}}"#
            ))
            .unwrap()
        };
        let discovered = old(r#"{"discovered_by":"homeassistant","sensor_id":"ha-abc"}"#);
        assert_eq!(discovered.provenance, Provenance::Discovered);
        let firmware = old(r#"{"sensor_id":"ha-abc"}"#);
        assert_eq!(firmware.provenance, Provenance::Firmware);
        let claims_it = old(r#"{"discovered_by":"me","sensor_id":"cellar-1"}"#);
        assert_eq!(
            claims_it.provenance,
            Provenance::Firmware,
            "not a discovery id"
        );
        // Once read, it is written as it was derived.
        let again: Record =
            serde_json::from_slice(&serde_json::to_vec(&discovered).unwrap()).unwrap();
        assert_eq!(again.provenance, Provenance::Discovered);
    }

    #[test]
    fn only_a_discovered_record_retires_and_it_keeps_its_device() {
        let created = pending().created(creds(), Origin::Created, 2).unwrap();
        assert_eq!(
            created.retired(3),
            Err(Invalid {
                from: "announced",
                to: "retired"
            })
        );
        let found = Record::pending_from(Provenance::Discovered, spec(), Route::default(), 1, 1)
            .created(creds(), Origin::Created, 2)
            .unwrap();
        let retired = found.retired(3).unwrap();
        assert_eq!(retired.shown_state(), "retired");
        assert_eq!(retired.credentials(), Some(&creds()));
        let back: Record = serde_json::from_slice(&serde_json::to_vec(&retired).unwrap()).unwrap();
        assert_eq!(back, retired);
        let active = retired.reactivated(4);
        assert_eq!(active.shown_state(), "created");
        let text = serde_json::to_string(&active).unwrap();
        assert!(!text.contains("retired"), "{text}");
    }
}
