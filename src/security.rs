//! Who may onboard: announce proofs, allow/deny rules and flood limits.
//!
//! Checked by the dispatcher before any cloud call or token reply:
//! 1. proof — an announce is protocol v2's `{"body": B, "proof": P}`, `P` checked
//!    over `B`'s exact bytes under the sensor's key before `B` is read, and `B`
//!    carries a nonce ([`crate::proof::v2`]). Anything else (no proof, a v1 proof, a
//!    changed body, a bad nonce) is `unauthorized`, unless `security.require_claim =
//!    false` lets a plain announce (no `body`, no `proof`) through. Only a verified
//!    announce's replies carry a MAC, bound to its nonce.
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

use serde_json::Value;

use crate::announce::Announce;
use crate::config::{Config, Secret};
use crate::proof::v2::{AnnounceNonce, ExchangeKeys};
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

/// Who an announce showed it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticated {
    /// A protocol v2 announce whose proof verified: the body's exact text (what the
    /// announce parser reads) and its nonce (what every reply binds to).
    V2 { body: String, nonce: AnnounceNonce },
    /// A plain announce without `body` or `proof`: only with `require_claim = false`.
    Plain,
}

pub struct Gatekeeper {
    /// The fleet claim key (configured or generated: never empty when running).
    claim_key: Secret,
    /// Plain announces (no protocol v2 proof) are refused.
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

    /// Who `payload`, an announce on `sensor`'s topic, comes from: its proof is
    /// checked before its body is parsed. The refusal is `unauthorized` (its message
    /// names protocol v2), or `invalid_json` when the payload or the proved body is
    /// no JSON object; none of them earns a MAC'd reply.
    pub fn authenticate(&self, sensor: &str, payload: &[u8]) -> Result<Authenticated, Denial> {
        let blank = payload.iter().all(u8::is_ascii_whitespace);
        let outer = (!blank).then(|| serde_json::from_slice::<Value>(payload));
        let v2 = match &outer {
            Some(Ok(Value::Object(m))) => m.contains_key("body") || m.contains_key("proof"),
            Some(Err(_)) if self.require_claim => {
                return Err(deny(
                    ReplyCode::InvalidJson,
                    "payload is not JSON (protocol v2: {\"body\": string, \"proof\": string})",
                ));
            }
            _ => false,
        };
        if !v2 {
            if self.require_claim {
                return Err(deny(
                    ReplyCode::Unauthorized,
                    "announce carries no protocol v2 proof ({\"body\": string, \"proof\": string})",
                ));
            }
            return Ok(Authenticated::Plain);
        }
        if self.claim_key.is_empty() {
            return Err(deny(
                ReplyCode::Unauthorized,
                "this gateway has no claim key: no protocol v2 proof can verify",
            ));
        }
        let keys = ExchangeKeys::derive(&SensorKey::derive(&self.claim_key, sensor));
        match keys.verify_announce(payload) {
            Ok(v) => Ok(Authenticated::V2 {
                body: v.body,
                nonce: v.nonce,
            }),
            Err(e) => {
                let code = match e.code() {
                    "invalid_json" => ReplyCode::InvalidJson,
                    _ => ReplyCode::Unauthorized,
                };
                Err(deny(code, e.to_string()))
            }
        }
    }

    /// The rules besides the proof: allow/deny lists, brand/model rules, and for a
    /// sensor not `known` yet the cool-down and the hourly cap. A discovered device
    /// (which can carry no proof) meets exactly these.
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

    fn ann(id: &str) -> Announce {
        crate::announce::parse(id, b"{}", 4096, "gw").unwrap()
    }

    /// A claim key strong enough for the config to accept.
    const FLEET: &str = "fleet-claim-key-of-at-least-32-chars";
    const NONCE: &str = "00112233445566778899aabbccddeeff";

    fn keys(claim_key: &str, id: &str) -> ExchangeKeys {
        ExchangeKeys::derive(&SensorKey::derive(&Secret::new(claim_key), id))
    }

    fn v2(claim_key: &str, id: &str, body: &str) -> Vec<u8> {
        keys(claim_key, id).announce(body)
    }

    fn strict() -> Gatekeeper {
        let c = Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[security]\nclaim_key = \"{FLEET}\""
        ))
        .unwrap();
        assert!(c.security.require_claim, "on by default");
        Gatekeeper::new(&c)
    }

    #[test]
    fn by_default_only_a_verified_v2_announce_with_a_nonce_is_authenticated() {
        let g = strict();
        let body = format!(r#"{{"nonce":"{NONCE}"}}"#);
        assert_eq!(
            g.authenticate("s1", &v2(FLEET, "s1", &body)),
            Ok(Authenticated::V2 {
                body: body.clone(),
                nonce: AnnounceNonce::parse(NONCE).unwrap()
            })
        );
        // v1's constant proof: HMAC(sensor_key, "onboardd-announce-v1").
        let sensor_key = SensorKey::derive(&Secret::new(FLEET), "s1").to_hex();
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(
            &hex::decode(sensor_key).unwrap(),
        )
        .unwrap();
        hmac::Mac::update(&mut mac, b"onboardd-announce-v1");
        let v1_proof = hex::encode(hmac::Mac::finalize(mac).into_bytes());
        let refused: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"{}".to_vec(),
            br#"{"bridge":true}"#.to_vec(),
            format!(r#"{{"proof":"{v1_proof}","bridge":true}}"#).into_bytes(),
            v2(FLEET, "s2", &body),
            v2("another-fleet-claim-key-of-32-chars", "s1", &body),
            v2(FLEET, "s1", "{}"),
            v2(
                FLEET,
                "s1",
                r#"{"nonce":"00112233445566778899AABBCCDDEEFF"}"#,
            ),
        ];
        for payload in refused {
            let d = g.authenticate("s1", &payload).unwrap_err();
            assert_eq!(d.code, ReplyCode::Unauthorized, "{payload:?}");
            assert!(d.message.contains("protocol v2"), "{}", d.message);
        }
        assert_eq!(
            g.authenticate("s1", b"not json").unwrap_err().code,
            ReplyCode::InvalidJson
        );
    }

    #[test]
    fn without_require_claim_a_plain_announce_passes_but_a_v2_one_is_still_checked() {
        let g = Gatekeeper::new(&cfg(&format!("claim_key = \"{FLEET}\"")));
        assert_eq!(g.authenticate("s1", b"{}"), Ok(Authenticated::Plain));
        assert_eq!(g.authenticate("s1", b""), Ok(Authenticated::Plain));
        let body = format!(r#"{{"nonce":"{NONCE}"}}"#);
        assert!(matches!(
            g.authenticate("s1", &v2(FLEET, "s1", &body)),
            Ok(Authenticated::V2 { .. })
        ));
        assert_eq!(
            g.authenticate("s1", &v2(FLEET, "s2", &body))
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
        assert!(g.check_rules(&ann("temp-1"), false).is_ok());
        assert_eq!(
            g.check_rules(&ann("temp-bad1"), false).unwrap_err().code,
            ReplyCode::Denied
        );
        assert_eq!(
            g.check_rules(&ann("hum-1"), false).unwrap_err().code,
            ReplyCode::Denied
        );
    }

    #[test]
    fn brand_allow_list() {
        let g = Gatekeeper::new(&cfg("allow_brands = [\"Acme\"]"));
        assert_eq!(
            g.check_rules(&ann("s"), false).unwrap_err().code,
            ReplyCode::Denied
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hourly_cap_and_cooldown_rate_limit_new_sensors_only() {
        let g = Gatekeeper::new(&cfg(
            "max_new_devices_per_hour = 2\nnew_sensor_cooldown_s = 3600",
        ));
        for id in ["a", "b"] {
            assert!(g.check_rules(&ann(id), false).is_ok());
            g.admitted(id);
        }
        assert_eq!(
            g.check_rules(&ann("c"), false).unwrap_err().code,
            ReplyCode::RateLimited
        );
        assert!(
            g.check_rules(&ann("c"), true).is_ok(),
            "known sensors are not limited"
        );
        let g = Gatekeeper::new(&cfg("new_sensor_cooldown_s = 3600"));
        g.admitted("a");
        assert_eq!(
            g.check_rules(&ann("a"), false).unwrap_err().code,
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
                .check_rules_as(&ann(id), false, p)
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
        let d = g.check_rules_as(&ann("ha-3"), false, disc).unwrap_err();
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
        let d = g.check_rules(&ann("a"), false).unwrap_err();
        assert_eq!(d.retry_after, Some(Duration::from_secs(40)));
        tokio::time::advance(Duration::from_secs(40)).await;
        assert!(g.check_rules(&ann("a"), false).is_ok(), "cool-down over");

        let g = Gatekeeper::new(&cfg(
            "max_new_devices_per_hour = 1\nnew_sensor_cooldown_s = 0",
        ));
        g.admitted("x");
        let d = g.check_rules(&ann("y"), false).unwrap_err();
        assert_eq!(d.retry_after, Some(Duration::from_secs(3600)));
        tokio::time::advance(Duration::from_secs(1800)).await;
        let d = g.check_rules(&ann("y"), false).unwrap_err();
        assert_eq!(d.retry_after, Some(Duration::from_secs(1800)));
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert!(g.check_rules(&ann("y"), false).is_ok(), "bucket refilled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_sensor_is_not_held_by_its_cool_down() {
        let g = Gatekeeper::new(&cfg("new_sensor_cooldown_s = 3600"));
        g.admitted("a");
        assert!(g.check_rules(&ann("a"), false).is_err());
        g.forgotten("a");
        assert!(g.check_rules(&ann("a"), false).is_ok());
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
            g.check_rules(&ann(&newest), false).unwrap_err().code,
            ReplyCode::RateLimited
        );
        assert!(
            g.check_rules(&ann("s0"), false).is_ok(),
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
