//! Admission: the one place a new sensor becomes a record, whether its firmware
//! announced it or discovery found it.
//!
//! A newcomer meets the gateway's rules (allow and deny lists, brand and model),
//! its flood limits (cool-down per sensor, new devices per hour) and the memory of
//! specs Qubitro rejected moments ago; admitted, it is recorded `Pending` (bridged
//! when it asked to be, or was discovered) with a fresh generation. Everything it
//! reads or changes is in [`Admission`]'s fields.

use std::time::Duration;

use tokio::time::Instant;

use super::rejections::Rejections;
use crate::announce::Announce;
use crate::failpoint;
use crate::onboarding::{Provenance, Record};
use crate::reply::Route;
use crate::security::{Cap, Denial, Gatekeeper};
use crate::store::{Store, StoreError};

/// What admission needs, and nothing more.
#[derive(Clone, Copy)]
pub(super) struct Admission<'a> {
    pub(super) store: &'a Store,
    pub(super) gate: &'a Gatekeeper,
    pub(super) rejections: &'a Rejections,
}

/// Why a newcomer was not admitted.
#[derive(Debug)]
pub(super) enum Refusal {
    /// The gateway's rules or flood limits.
    Rules(Denial),
    /// Qubitro rejected this same spec moments ago: `left` until it is tried again.
    RejectedRecently { left: Duration, why: String },
}

/// An admitted newcomer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admitted {
    /// Recorded `Pending`: its onboarding task must start. Wait for `seq` before
    /// acknowledging what brought it.
    New { seq: u64 },
    /// Another writer recorded it first: nothing written; wait for everything
    /// written so far.
    Raced { seq: u64 },
}

impl Admission<'_> {
    /// Admits `ann` (whose proof, if any, the caller checked) as a new record.
    pub(super) fn admit(
        &self,
        ann: Announce,
        route: Route,
        provenance: Provenance,
        now: Instant,
        now_ms: u64,
    ) -> Result<Result<Admitted, Refusal>, StoreError> {
        let cap = match provenance {
            Provenance::Firmware => Cap::Firmware,
            Provenance::Discovered => Cap::Discovery,
        };
        if let Err(denied) = self.gate.check_rules_as(&ann, false, cap) {
            return Ok(Err(Refusal::Rules(denied)));
        }
        let sensor = ann.sensor_id.as_str();
        if let Some((left, why)) = self.rejections.check(sensor, &ann.spec, now) {
            return Ok(Err(Refusal::RejectedRecently { left, why }));
        }
        let generation = self.store.next_generation()?;
        let rec = Record::pending_from(provenance, ann.spec, route, generation, now_ms);
        // Bridged from the moment it is recorded: readings that arrive while its
        // device is being made are buffered.
        let bridged = ann.bridge || provenance == Provenance::Discovered;
        let rec = match bridged {
            true => rec.bridged(now_ms).unwrap_or(rec),
            false => rec,
        };
        Ok(Ok(match self.store.insert_new(sensor, &rec)? {
            Some(seq) => {
                failpoint::hit("after_pending_recorded");
                self.gate.admitted_as(sensor, cap);
                Admitted::New { seq }
            }
            None => Admitted::Raced {
                seq: self.store.last_write(),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::records::tests::store;
    use crate::onboarding::State;
    use crate::reply::ReplyCode;

    fn gate(security: &str) -> Gatekeeper {
        let cfg = Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[security]\nrequire_claim = false\n{security}"
        ))
        .unwrap();
        Gatekeeper::new(&cfg)
    }

    fn ann(id: &str, payload: &str) -> Announce {
        crate::announce::parse(id, payload.as_bytes(), 4096, "gw").unwrap()
    }

    /// Admission over a fresh store with `security` rules and no rejections.
    struct Fixture {
        store: Store,
        gate: Gatekeeper,
        rejections: Rejections,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(security: &str) -> Fixture {
            let (store, _dir) = store();
            Fixture {
                store,
                gate: gate(security),
                rejections: Rejections::default(),
                _dir,
            }
        }

        fn admission(&self) -> Admission<'_> {
            Admission {
                store: &self.store,
                gate: &self.gate,
                rejections: &self.rejections,
            }
        }
    }

    fn admit(a: &Admission<'_>, ann: Announce, p: Provenance) -> Result<Admitted, Refusal> {
        a.admit(ann, Route::default(), p, Instant::now(), 1_000)
            .unwrap()
    }

    fn code(r: Result<Admitted, Refusal>) -> ReplyCode {
        match r {
            Err(Refusal::Rules(d)) => d.code,
            other => panic!("not refused by a rule: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_admitted_newcomer_is_recorded_pending_with_its_provenance() {
        let f = Fixture::new("");
        let (a, store) = (f.admission(), &f.store);
        let got = admit(&a, ann("fw-1", "{}"), Provenance::Firmware);
        assert!(
            matches!(got, Ok(Admitted::New { seq }) if seq > 0),
            "{got:?}"
        );
        let rec = store.get("fw-1").unwrap().unwrap();
        assert_eq!(
            (rec.state, rec.provenance),
            (State::Pending, Provenance::Firmware)
        );
        assert!(!rec.bridged);
        let bridged = admit(&a, ann("fw-2", r#"{"bridge":true}"#), Provenance::Firmware);
        assert!(matches!(bridged, Ok(Admitted::New { .. })));
        assert!(store.get("fw-2").unwrap().unwrap().bridged);

        assert!(matches!(
            admit(&a, ann("ha-x", "{}"), Provenance::Discovered),
            Ok(Admitted::New { .. })
        ));
        let found = store.get("ha-x").unwrap().unwrap();
        assert_eq!(found.provenance, Provenance::Discovered);
        assert!(
            found.bridged,
            "a discovered device's readings are forwarded"
        );
    }

    #[tokio::test]
    async fn a_sensor_recorded_meanwhile_is_not_recorded_twice() {
        // Cool-down off, so the second admission meets the first one's record.
        let f = Fixture::new("new_sensor_cooldown_s = 0");
        let (a, store) = (f.admission(), &f.store);
        let first = admit(&a, ann("s", "{}"), Provenance::Firmware);
        assert!(matches!(first, Ok(Admitted::New { .. })));
        let rec = store.get("s").unwrap();
        let second = admit(&a, ann("s", r#"{"name":"Other"}"#), Provenance::Firmware);
        assert!(matches!(second, Ok(Admitted::Raced { .. })));
        assert_eq!(store.get("s").unwrap(), rec, "the first record stands");
    }

    #[tokio::test]
    async fn a_sensor_the_rules_deny_is_refused_and_not_recorded() {
        let f = Fixture::new("deny_sensor_ids = [\"bad-*\"]");
        let (a, store) = (f.admission(), &f.store);
        assert_eq!(
            code(admit(&a, ann("bad-1", "{}"), Provenance::Firmware)),
            ReplyCode::Denied
        );
        assert_eq!(
            code(admit(&a, ann("bad-2", "{}"), Provenance::Discovered)),
            ReplyCode::Denied,
            "discovered devices meet the same rules"
        );
        assert_eq!(store.get("bad-1").unwrap(), None);
        assert_eq!(store.get("bad-2").unwrap(), None);
    }

    #[tokio::test]
    async fn a_sensor_admitted_moments_ago_waits_out_its_cool_down() {
        let f = Fixture::new("new_sensor_cooldown_s = 3600");
        let (a, store) = (f.admission(), &f.store);
        assert!(matches!(
            admit(&a, ann("s", "{}"), Provenance::Firmware),
            Ok(Admitted::New { .. })
        ));
        // Forgotten (record gone) but not its cool-down.
        store.remove("s", None).unwrap();
        let again = admit(&a, ann("s", "{}"), Provenance::Firmware);
        match again {
            Err(Refusal::Rules(d)) => {
                assert_eq!(d.code, ReplyCode::RateLimited);
                assert!(d.retry_after.is_some());
            }
            other => panic!("not rate limited: {other:?}"),
        }
        assert_eq!(store.get("s").unwrap(), None);
    }

    #[tokio::test]
    async fn newcomers_past_the_hourly_cap_are_refused() {
        let f = Fixture::new("max_new_devices_per_hour = 2");
        let (a, store) = (f.admission(), &f.store);
        for id in ["a", "b"] {
            assert!(matches!(
                admit(&a, ann(id, "{}"), Provenance::Firmware),
                Ok(Admitted::New { .. })
            ));
        }
        assert_eq!(
            code(admit(&a, ann("c", "{}"), Provenance::Firmware)),
            ReplyCode::RateLimited
        );
        assert_eq!(store.get("c").unwrap(), None);
    }

    #[tokio::test]
    async fn a_spec_qubitro_rejected_moments_ago_is_refused_without_a_record() {
        let f = Fixture::new("");
        let (a, store, rejections) = (f.admission(), &f.store, &f.rejections);
        let bad = ann("s", "{}");
        rejections.record("s", &bad.spec, "HTTP 400: name", Instant::now());
        match admit(&a, bad, Provenance::Firmware) {
            Err(Refusal::RejectedRecently { left, why }) => {
                assert!(left > Duration::ZERO);
                assert!(why.contains("HTTP 400"), "{why}");
            }
            other => panic!("not refused from memory: {other:?}"),
        }
        assert_eq!(store.get("s").unwrap(), None);
        // A changed spec is tried at once.
        let changed = ann("s", r#"{"name":"Fixed"}"#);
        assert!(matches!(
            admit(&a, changed, Provenance::Firmware),
            Ok(Admitted::New { .. })
        ));
    }
}
