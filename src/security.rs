//! Who may onboard: claim proofs, allow/deny rules and flood limits.
//!
//! Checked by the dispatcher before any cloud call or token reply:
//! 1. claim proof — with `[security] claim_key` set, an announce must carry
//!    `claim = hex(HMAC-SHA256(claim_key, sensor_id))`, compared in constant time
//!    (`Mac::verify_slice`). A leaked claim lets an attacker onboard that one sensor
//!    id and no other; the same proof is needed to get a cached token back.
//! 2. allow/deny rules on sensor ids (`*` and `?` wildcards), brands and models;
//!    deny wins over allow.
//! 3. flood limits for announces that would cause cloud calls: a per-sensor
//!    cool-down and a global cap on new devices per hour (a token bucket: O(1) memory).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// tokio's clock: `tokio::time::pause` drives the limits in tests.
use tokio::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::announce::Announce;
use crate::config::{Config, Secret};

/// A refusal: the reply's `code` and a message for humans (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: &'static str,
    pub message: String,
    /// For `rate_limited`: when asking again can succeed.
    pub retry_after: Option<Duration>,
}

fn deny(code: &'static str, message: impl Into<String>) -> Denial {
    Denial {
        code,
        message: message.into(),
        retry_after: None,
    }
}

fn rate_limited(message: &str, retry_after: Duration) -> Denial {
    Denial {
        retry_after: Some(retry_after),
        ..deny("rate_limited", message)
    }
}

pub struct Gatekeeper {
    claim_key: Option<Secret>,
    allow_ids: Vec<String>,
    deny_ids: Vec<String>,
    allow_brands: Vec<String>,
    allow_models: Vec<String>,
    cooldown: Duration,
    limits: Mutex<Limits>,
}

struct Limits {
    /// When each recently admitted sensor was admitted (pruned as it grows).
    last_admitted: HashMap<String, Instant>,
    /// Token bucket of new devices: `tokens` left, refilled at `per_hour`/hour.
    tokens: f64,
    per_hour: f64,
    refilled: Instant,
}

/// Entries kept for the cool-down before old ones are pruned.
const COOLDOWN_MAP_PRUNE_AT: usize = 4096;

impl Gatekeeper {
    pub fn new(cfg: &Config) -> Gatekeeper {
        let s = &cfg.security;
        let per_hour = s.max_new_devices_per_hour as f64;
        Gatekeeper {
            claim_key: (!s.claim_key.is_empty()).then(|| s.claim_key.clone()),
            allow_ids: s.allow_sensor_ids.clone(),
            deny_ids: s.deny_sensor_ids.clone(),
            allow_brands: s.allow_brands.clone(),
            allow_models: s.allow_models.clone(),
            cooldown: Duration::from_secs(s.new_sensor_cooldown_s),
            limits: Mutex::new(Limits {
                last_admitted: HashMap::new(),
                tokens: per_hour,
                per_hour,
                refilled: Instant::now(),
            }),
        }
    }

    /// Whether this announce may proceed. `known`: the store already holds the sensor
    /// (its announce causes no cloud call, so the flood limits do not apply).
    pub fn check(&self, a: &Announce, known: bool) -> Result<(), Denial> {
        if let Some(key) = &self.claim_key {
            let Some(claim) = &a.claim else {
                return Err(deny("unauthorized", "announce carries no claim"));
            };
            if !verify_claim(key, &a.sensor_id, claim) {
                return Err(deny("unauthorized", "claim does not prove this sensor id"));
            }
        }
        if self
            .deny_ids
            .iter()
            .any(|p| wildcard_match(p, &a.sensor_id))
        {
            return Err(deny("denied", "sensor id is denied on this gateway"));
        }
        if !self.allow_ids.is_empty()
            && !self
                .allow_ids
                .iter()
                .any(|p| wildcard_match(p, &a.sensor_id))
        {
            return Err(deny("denied", "sensor id is not allowed on this gateway"));
        }
        if !self.allow_brands.is_empty() && !self.allow_brands.iter().any(|b| b == &a.spec.brand) {
            return Err(deny("denied", "brand is not allowed on this gateway"));
        }
        if !self.allow_models.is_empty() && !self.allow_models.iter().any(|m| m == &a.spec.model) {
            return Err(deny("denied", "model is not allowed on this gateway"));
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
            let elapsed = now.duration_since(l.refilled).as_secs_f64();
            l.tokens = (l.tokens + elapsed * l.per_hour / 3600.0).min(l.per_hour);
            l.refilled = now;
            if l.tokens < 1.0 {
                // Time until the bucket holds one whole token again.
                let secs = if l.per_hour > 0.0 {
                    ((1.0 - l.tokens) * 3600.0 / l.per_hour).ceil()
                } else {
                    3600.0
                };
                return Err(rate_limited(
                    "this gateway's limit of new devices per hour is reached; try again later",
                    Duration::from_secs_f64(secs.clamp(1.0, 3600.0)),
                ));
            }
        }
        Ok(())
    }

    /// Counts a sensor that was admitted for onboarding (cool-down and hourly cap).
    pub fn admitted(&self, sensor: &str) {
        let mut l = self.limits.lock().expect("never poisoned");
        let now = Instant::now();
        l.tokens -= 1.0;
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

/// The claim a sensor is given at manufacture: hex(HMAC-SHA256(claim_key, sensor_id)).
pub fn claim_for(key: &Secret, sensor_id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(sensor_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time check of a hex claim.
pub fn verify_claim(key: &Secret, sensor_id: &str, claim: &str) -> bool {
    let Ok(bytes) = hex::decode(claim.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(sensor_id.as_bytes());
    mac.verify_slice(&bytes).is_ok()
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

    fn cfg(extra: &str) -> Config {
        Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[security]\n{extra}"
        ))
        .unwrap()
    }

    fn ann(id: &str, claim: Option<String>) -> Announce {
        let mut a = crate::announce::parse(id, b"{}", 4096, "gw").unwrap();
        a.claim = claim;
        a
    }

    #[test]
    fn claim_matches_openssl_derivation() {
        // printf %s sensor-1 | openssl dgst -sha256 -hmac fleet-key
        let key = Secret::new("fleet-key");
        assert_eq!(
            claim_for(&key, "sensor-1"),
            "5d40dfe05fa572b8343e3d480ad8f9b53c89aad08e4e5512405ebc88682bf1d6"
        );
        assert!(verify_claim(&key, "sensor-1", &claim_for(&key, "sensor-1")));
        assert!(!verify_claim(
            &key,
            "sensor-2",
            &claim_for(&key, "sensor-1")
        ));
        assert!(!verify_claim(&key, "sensor-1", "zz"));
    }

    #[test]
    fn missing_or_wrong_claim_is_unauthorized() {
        let g = Gatekeeper::new(&cfg("claim_key = \"fleet\""));
        assert_eq!(
            g.check(&ann("s1", None), false).unwrap_err().code,
            "unauthorized"
        );
        let other = claim_for(&Secret::new("fleet"), "s2");
        assert_eq!(
            g.check(&ann("s1", Some(other)), true).unwrap_err().code,
            "unauthorized"
        );
        let good = claim_for(&Secret::new("fleet"), "s1");
        assert!(g.check(&ann("s1", Some(good)), false).is_ok());
    }

    #[test]
    fn deny_wins_over_allow() {
        let g = Gatekeeper::new(&cfg(
            "allow_sensor_ids = [\"temp-*\"]\ndeny_sensor_ids = [\"temp-bad?\"]",
        ));
        assert!(g.check(&ann("temp-1", None), false).is_ok());
        assert_eq!(
            g.check(&ann("temp-bad1", None), false).unwrap_err().code,
            "denied"
        );
        assert_eq!(
            g.check(&ann("hum-1", None), false).unwrap_err().code,
            "denied"
        );
    }

    #[test]
    fn brand_allow_list() {
        let g = Gatekeeper::new(&cfg("allow_brands = [\"Acme\"]"));
        assert_eq!(g.check(&ann("s", None), false).unwrap_err().code, "denied");
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
            "rate_limited"
        );
        assert!(
            g.check(&ann("c", None), true).is_ok(),
            "known sensors are not limited"
        );
        let g = Gatekeeper::new(&cfg("new_sensor_cooldown_s = 3600"));
        g.admitted("a");
        assert_eq!(
            g.check(&ann("a", None), false).unwrap_err().code,
            "rate_limited"
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
            "rate_limited"
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
