//! Who may onboard: announce proofs, allow/deny rules and flood limits.
//!
//! Checked by the dispatcher before any cloud call or token reply:
//! 1. proof — an announce carries `proof = hex(HMAC-SHA256(sensor_key,
//!    "onboardd-announce-v1"))` with `sensor_key = HMAC-SHA256(claim_key, sensor_id)`
//!    ([`crate::proof`]), compared in constant time. Missing (with
//!    `security.require_claim`, the default), non-hex or wrong: `unauthorized`. A
//!    valid proof also means the ok reply is sealed for that sensor, so a replayed
//!    proof gains nothing; the same proof is needed to get a cached token back.
//! 2. allow/deny rules on sensor ids (`*` and `?` wildcards), brands and models;
//!    deny wins over allow.
//! 3. flood limits for announces that would cause cloud calls: a per-sensor
//!    cool-down and a global cap on new devices per hour (a token bucket: O(1) memory),
//!    one for announced sensors and another for discovered devices, so a discovery
//!    publisher cannot spend the firmware sensors' share, nor the reverse.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// tokio's clock: `tokio::time::pause` drives the limits in tests.
use tokio::time::Instant;

use crate::announce::Announce;
use crate::config::{Config, Secret};
use crate::proof::SensorKey;
use crate::reply::ReplyCode;

/// A refusal: the reply's `code` and a message for humans (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: ReplyCode,
    pub message: String,
    /// For `rate_limited`: when asking again can succeed.
    pub retry_after: Option<Duration>,
}

fn deny(code: ReplyCode, message: impl Into<String>) -> Denial {
    Denial {
        code,
        message: message.into(),
        retry_after: None,
    }
}

fn rate_limited(message: &str, retry_after: Duration) -> Denial {
    Denial {
        retry_after: Some(retry_after),
        ..deny(ReplyCode::RateLimited, message)
    }
}

/// What an admitted announce proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// It carried its sensor's valid proof: its ok replies are sealed.
    Verified,
    /// It carried none (admitted only with `require_claim = false`).
    Absent,
}

pub struct Gatekeeper {
    /// The fleet claim key (configured or generated: never empty when running).
    claim_key: Secret,
    /// Announces without a proof are refused.
    require_claim: bool,
    allow_ids: Vec<String>,
    deny_ids: Vec<String>,
    allow_brands: Vec<String>,
    allow_models: Vec<String>,
    cooldown: Duration,
    limits: Mutex<Limits>,
}

/// Whose hourly cap a newcomer counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// A sensor that announced itself.
    Firmware,
    /// A device discovery found.
    Discovery,
}

struct Limits {
    /// When each recently admitted sensor was admitted (pruned as it grows).
    last_admitted: HashMap<String, Instant>,
    /// New announced sensors per hour.
    firmware: Bucket,
    /// New discovered devices per hour (`discovery.max_new_devices_per_hour`).
    discovered: Bucket,
}

impl Limits {
    fn bucket(&mut self, p: Cap) -> &mut Bucket {
        match p {
            Cap::Firmware => &mut self.firmware,
            Cap::Discovery => &mut self.discovered,
        }
    }
}

/// Token bucket of new devices: `tokens` left, refilled at `per_hour`/hour.
struct Bucket {
    tokens: f64,
    per_hour: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(per_hour: u32) -> Bucket {
        Bucket {
            tokens: per_hour as f64,
            per_hour: per_hour as f64,
            refilled: Instant::now(),
        }
    }

    /// Refills for the time passed; `Err(wait)` until one whole token is there.
    fn check(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_hour / 3600.0).min(self.per_hour);
        self.refilled = now;
        if self.tokens >= 1.0 {
            return Ok(());
        }
        let secs = if self.per_hour > 0.0 {
            ((1.0 - self.tokens) * 3600.0 / self.per_hour).ceil()
        } else {
            3600.0
        };
        Err(Duration::from_secs_f64(secs.clamp(1.0, 3600.0)))
    }
}

/// Entries kept for the cool-down before old ones are pruned.
const COOLDOWN_MAP_PRUNE_AT: usize = 4096;

impl Gatekeeper {
    pub fn new(cfg: &Config) -> Gatekeeper {
        let s = &cfg.security;
        Gatekeeper {
            claim_key: s.claim_key.clone(),
            require_claim: s.require_claim,
            allow_ids: s.allow_sensor_ids.clone(),
            deny_ids: s.deny_sensor_ids.clone(),
            allow_brands: s.allow_brands.clone(),
            allow_models: s.allow_models.clone(),
            cooldown: Duration::from_secs(s.new_sensor_cooldown_s),
            limits: Mutex::new(Limits {
                last_admitted: HashMap::new(),
                firmware: Bucket::new(s.max_new_devices_per_hour),
                discovered: Bucket::new(cfg.discovery.max_new_devices_per_hour),
            }),
        }
    }

    /// Whether this announce may proceed, and whether it proved its sensor id.
    /// `known`: the store already holds the sensor (its announce causes no cloud
    /// call, so the flood limits do not apply).
    pub fn check(&self, a: &Announce, known: bool) -> Result<Proof, Denial> {
        let proof = self.verify_proof(a)?;
        self.check_rules(a, known)?;
        Ok(proof)
    }

    /// The proof alone: valid, absent while allowed, or the refusal.
    pub fn verify_proof(&self, a: &Announce) -> Result<Proof, Denial> {
        Ok(match &a.proof {
            Some(p) => {
                if self.claim_key.is_empty()
                    || !SensorKey::derive(&self.claim_key, &a.sensor_id).verify_proof(p)
                {
                    return Err(deny(
                        ReplyCode::Unauthorized,
                        "proof does not prove this sensor id",
                    ));
                }
                Proof::Verified
            }
            None if self.require_claim => {
                return Err(deny(ReplyCode::Unauthorized, "announce carries no proof"));
            }
            None => Proof::Absent,
        })
    }

    /// The rules besides the proof: allow/deny lists, brand/model rules, the
    /// cool-down and the hourly cap. A discovered device (which can carry no proof)
    /// meets exactly these.
    pub fn check_rules(&self, a: &Announce, known: bool) -> Result<(), Denial> {
        self.check_rules_as(a, known, Cap::Firmware)
    }

    /// [`Gatekeeper::check_rules`] for a newcomer counted against `cap`.
    pub fn check_rules_as(&self, a: &Announce, known: bool, cap: Cap) -> Result<(), Denial> {
        if self
            .deny_ids
            .iter()
            .any(|p| wildcard_match(p, &a.sensor_id))
        {
            return Err(deny(
                ReplyCode::Denied,
                "sensor id is denied on this gateway",
            ));
        }
        if !self.allow_ids.is_empty()
            && !self
                .allow_ids
                .iter()
                .any(|p| wildcard_match(p, &a.sensor_id))
        {
            return Err(deny(
                ReplyCode::Denied,
                "sensor id is not allowed on this gateway",
            ));
        }
        if !self.allow_brands.is_empty() && !self.allow_brands.iter().any(|b| b == &a.spec.brand) {
            return Err(deny(
                ReplyCode::Denied,
                "brand is not allowed on this gateway",
            ));
        }
        if !self.allow_models.is_empty() && !self.allow_models.iter().any(|m| m == &a.spec.model) {
            return Err(deny(
                ReplyCode::Denied,
                "model is not allowed on this gateway",
            ));
        }
        if !known {
            let mut l = self.limits.lock().expect("never poisoned");
            let now = Instant::now();
            if let Some(t) = l.last_admitted.get(&a.sensor_id) {
                let since = now.duration_since(*t);
                if since < self.cooldown {
                    return Err(rate_limited(
                        "this sensor announced moments ago; wait before announcing again",
                        self.cooldown - since,
                    ));
                }
            }
            if let Err(wait) = l.bucket(cap).check(now) {
                let message = match cap {
                    Cap::Firmware => {
                        "this gateway's limit of new devices per hour is reached; try again later"
                    }
                    Cap::Discovery => {
                        "discovery.max_new_devices_per_hour is reached; try again later"
                    }
                };
                return Err(rate_limited(message, wait));
            }
        }
        Ok(())
    }

    /// Counts a sensor that was admitted for onboarding (cool-down and hourly cap).
    pub fn admitted(&self, sensor: &str) {
        self.admitted_as(sensor, Cap::Firmware)
    }

    /// [`Gatekeeper::admitted`] for a newcomer counted against `cap`.
    pub fn admitted_as(&self, sensor: &str, cap: Cap) {
        let mut l = self.limits.lock().expect("never poisoned");
        let now = Instant::now();
        l.bucket(cap).tokens -= 1.0;
        if l.last_admitted.len() >= COOLDOWN_MAP_PRUNE_AT {
            let cd = self.cooldown;
            l.last_admitted.retain(|_, t| now.duration_since(*t) < cd);
        }
        if l.last_admitted.len() >= COOLDOWN_MAP_PRUNE_AT {
            // Still full of live entries: the oldest goes, so the newest sensors are
            // always limited (a flood cannot switch the cool-down off).
            if let Some(oldest) = l
                .last_admitted
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                l.last_admitted.remove(&oldest);
            }
        }
        l.last_admitted.insert(sensor.to_string(), now);
    }

    /// The operator forgot this sensor to have it onboarded anew: its cool-down no
    /// longer applies.
    pub fn forgotten(&self, sensor: &str) {
        self.limits
            .lock()
            .expect("never poisoned")
            .last_admitted
            .remove(sensor);
    }
}

/// `*` any run of characters, `?` one character; everything else literal.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proofs optional, so the rule and limit tests need none.
    fn cfg(extra: &str) -> Config {
        Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[security]\nrequire_claim = false\n{extra}"
        ))
        .unwrap()
    }

    fn ann(id: &str, proof: Option<String>) -> Announce {
        let mut a = crate::announce::parse(id, b"{}", 4096, "gw").unwrap();
        a.proof = proof;
        a
    }

    /// A claim key strong enough for the config to accept.
    const FLEET: &str = "fleet-claim-key-of-at-least-32-chars";

    fn proof_of(claim_key: &str, id: &str) -> String {
        SensorKey::derive(&Secret::new(claim_key), id).proof()
    }

    #[test]
    fn by_default_a_missing_or_wrong_proof_is_unauthorized() {
        let c = Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[security]\nclaim_key = \"{FLEET}\""
        ))
        .unwrap();
        assert!(c.security.require_claim, "on by default");
        let g = Gatekeeper::new(&c);
        for (proof, known) in [
            (None, false),
            (None, true),
            (Some(proof_of(FLEET, "s2")), true),
            (Some(proof_of("other-fleet", "s1")), false),
            (Some("not hex".to_string()), false),
            (
                Some(SensorKey::derive(&Secret::new(FLEET), "s1").to_hex()),
                false,
            ),
        ] {
            assert_eq!(
                g.check(&ann("s1", proof.clone()), known).unwrap_err().code,
                ReplyCode::Unauthorized,
                "{proof:?}"
            );
        }
        assert_eq!(
            g.check(&ann("s1", Some(proof_of(FLEET, "s1"))), false),
            Ok(Proof::Verified)
        );
    }

    #[test]
    fn without_require_claim_a_proof_is_optional_but_still_checked() {
        let g = Gatekeeper::new(&cfg(&format!("claim_key = \"{FLEET}\"")));
        assert_eq!(g.check(&ann("s1", None), false), Ok(Proof::Absent));
        assert_eq!(
            g.check(&ann("s1", Some(proof_of(FLEET, "s1"))), false),
            Ok(Proof::Verified)
        );
        assert_eq!(
            g.check(&ann("s1", Some(proof_of(FLEET, "s2"))), false)
                .unwrap_err()
                .code,
            ReplyCode::Unauthorized
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let g = Gatekeeper::new(&cfg(
            "allow_sensor_ids = [\"temp-*\"]\ndeny_sensor_ids = [\"temp-bad?\"]",
        ));
        assert!(g.check(&ann("temp-1", None), false).is_ok());
        assert_eq!(
            g.check(&ann("temp-bad1", None), false).unwrap_err().code,
            ReplyCode::Denied
        );
        assert_eq!(
            g.check(&ann("hum-1", None), false).unwrap_err().code,
            ReplyCode::Denied
        );
    }

    #[test]
    fn brand_allow_list() {
        let g = Gatekeeper::new(&cfg("allow_brands = [\"Acme\"]"));
        assert_eq!(
            g.check(&ann("s", None), false).unwrap_err().code,
            ReplyCode::Denied
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hourly_cap_and_cooldown_rate_limit_new_sensors_only() {
        let g = Gatekeeper::new(&cfg(
            "max_new_devices_per_hour = 2\nnew_sensor_cooldown_s = 3600",
        ));
        for id in ["a", "b"] {
            assert!(g.check(&ann(id, None), false).is_ok());
            g.admitted(id);
        }
        assert_eq!(
            g.check(&ann("c", None), false).unwrap_err().code,
            ReplyCode::RateLimited
        );
        assert!(
            g.check(&ann("c", None), true).is_ok(),
            "known sensors are not limited"
        );
        let g = Gatekeeper::new(&cfg("new_sensor_cooldown_s = 3600"));
        g.admitted("a");
        assert_eq!(
            g.check(&ann("a", None), false).unwrap_err().code,
            ReplyCode::RateLimited
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_discovery_flood_cannot_spend_the_firmware_cap_nor_the_reverse() {
        let both_capped_at_two = "max_new_devices_per_hour = 2\nnew_sensor_cooldown_s = 0\n\
            [discovery]\nmax_new_devices_per_hour = 2";
        let (fw, disc) = (Cap::Firmware, Cap::Discovery);
        let admit = |g: &Gatekeeper, id: &str, p| {
            let r = g
                .check_rules_as(&ann(id, None), false, p)
                .map(|_| g.admitted_as(id, p));
            r.map_err(|d| d.code)
        };
        let g = Gatekeeper::new(&cfg(both_capped_at_two));
        for id in ["ha-1", "ha-2"] {
            assert_eq!(admit(&g, id, disc), Ok(()));
        }
        assert_eq!(admit(&g, "ha-3", disc), Err(ReplyCode::RateLimited));
        for id in ["fw-1", "fw-2"] {
            assert_eq!(admit(&g, id, fw), Ok(()), "discovery spent none of it");
        }
        assert_eq!(admit(&g, "fw-3", fw), Err(ReplyCode::RateLimited));

        let g = Gatekeeper::new(&cfg(both_capped_at_two));
        for id in ["fw-1", "fw-2"] {
            assert_eq!(admit(&g, id, fw), Ok(()));
        }
        assert_eq!(admit(&g, "fw-3", fw), Err(ReplyCode::RateLimited));
        for id in ["ha-1", "ha-2"] {
            assert_eq!(admit(&g, id, disc), Ok(()), "announces spent none of it");
        }
        let d = g
            .check_rules_as(&ann("ha-3", None), false, disc)
            .unwrap_err();
        assert!(
            d.message.contains("discovery.max_new_devices_per_hour"),
            "{}",
            d.message
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_denials_say_when_to_ask_again() {
        let g = Gatekeeper::new(&cfg("new_sensor_cooldown_s = 60"));
        g.admitted("a");
        tokio::time::advance(Duration::from_secs(20)).await;
        let d = g.check(&ann("a", None), false).unwrap_err();
        assert_eq!(d.retry_after, Some(Duration::from_secs(40)));
        tokio::time::advance(Duration::from_secs(40)).await;
        assert!(g.check(&ann("a", None), false).is_ok(), "cool-down over");

        let g = Gatekeeper::new(&cfg(
            "max_new_devices_per_hour = 1\nnew_sensor_cooldown_s = 0",
        ));
        g.admitted("x");
        let d = g.check(&ann("y", None), false).unwrap_err();
        assert_eq!(d.retry_after, Some(Duration::from_secs(3600)));
        tokio::time::advance(Duration::from_secs(1800)).await;
        let d = g.check(&ann("y", None), false).unwrap_err();
        assert_eq!(d.retry_after, Some(Duration::from_secs(1800)));
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert!(g.check(&ann("y", None), false).is_ok(), "bucket refilled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_sensor_is_not_held_by_its_cool_down() {
        let g = Gatekeeper::new(&cfg("new_sensor_cooldown_s = 3600"));
        g.admitted("a");
        assert!(g.check(&ann("a", None), false).is_err());
        g.forgotten("a");
        assert!(g.check(&ann("a", None), false).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cool_down_map_still_limits_the_newest_sensors() {
        let g = Gatekeeper::new(&cfg("new_sensor_cooldown_s = 3600"));
        for i in 0..COOLDOWN_MAP_PRUNE_AT + 10 {
            g.admitted(&format!("s{i}"));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let newest = format!("s{}", COOLDOWN_MAP_PRUNE_AT + 9);
        assert_eq!(
            g.check(&ann(&newest, None), false).unwrap_err().code,
            ReplyCode::RateLimited
        );
        assert!(
            g.check(&ann("s0", None), false).is_ok(),
            "the oldest entry made room"
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*c", "abbbc"));
        assert!(wildcard_match("a?c", "abc"));
        assert!(!wildcard_match("a?c", "abbc"));
        assert!(wildcard_match("*-x", "1-2-x"));
        assert!(!wildcard_match("temp-*", "hum-1"));
    }
}
