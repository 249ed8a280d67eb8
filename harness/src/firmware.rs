//! What a sensor's firmware computes (README "Security", "The sensor side"), written
//! here from the protocol text alone with RustCrypto crates, never with onboardd's own
//! code: a test that checks onboardd's replies with these functions checks them
//! against the protocol, not against itself.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// `HMAC-SHA256(key = claim_key as UTF-8, msg = sensor_id)`: what is flashed into it.
pub fn sensor_key(claim_key: &str, sensor_id: &str) -> [u8; 32] {
    hmac_sha256(claim_key.as_bytes(), sensor_id.as_bytes())
}

/// `hex(HMAC-SHA256(key = sensor_key, msg = "onboardd-announce-v2\n" ‖ body))`: the
/// `proof` beside an announce body, over its exact bytes.
pub fn proof_v2(sensor_key: &[u8; 32], body: &str) -> String {
    let mut msg = b"onboardd-announce-v2\n".to_vec();
    msg.extend_from_slice(body.as_bytes());
    hex::encode(hmac_sha256(sensor_key, &msg))
}

/// The announce payload `{"body": body, "proof": proof_v2(body)}`.
pub fn announce_v2(sensor_key: &[u8; 32], body: &str) -> String {
    serde_json::json!({"body": body, "proof": proof_v2(sensor_key, body)}).to_string()
}

/// A fresh announce nonce: 16 random bytes as 32 lowercase hex characters.
pub fn fresh_nonce() -> String {
    let bytes: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    hex::encode(bytes)
}

/// `HMAC-SHA256(sensor_key, "onboardd-mac-v2")`: the key of every reply's MAC.
pub fn mac_key(sensor_key: &[u8; 32]) -> [u8; 32] {
    hmac_sha256(sensor_key, b"onboardd-mac-v2")
}

/// `HMAC-SHA256(sensor_key, "onboardd-seal-v2")`: the key the token is sealed under.
pub fn seal_key(sensor_key: &[u8; 32]) -> [u8; 32] {
    hmac_sha256(sensor_key, b"onboardd-seal-v2")
}

/// `hex(HMAC-SHA256(key = mac_key, msg = "onboardd-reply-v2\n" ‖ body))`, `mac_key =
/// HMAC-SHA256(sensor_key, "onboardd-mac-v2")`: the `mac` beside a reply body.
pub fn reply_mac(sensor_key: &[u8; 32], body: &str) -> String {
    let mut msg = b"onboardd-reply-v2\n".to_vec();
    msg.extend_from_slice(body.as_bytes());
    hex::encode(hmac_sha256(&mac_key(sensor_key), &msg))
}

/// The reply body of `payload` as a sensor holding `sensor_key` acts on it: exactly
/// `{"body": string, "mac": string}`, the mac verified (in constant time) over the
/// body's exact bytes before the body is read, and the body's `nonce` that of the
/// sensor's current announce. `Err` says why the sensor ignores it.
pub fn verify_reply(sensor_key: &[u8; 32], payload: &[u8], nonce: &str) -> Result<Value, String> {
    let shown = || String::from_utf8_lossy(payload).into_owned();
    let outer: Value =
        serde_json::from_slice(payload).map_err(|e| format!("not JSON ({e}): {}", shown()))?;
    let (Some(Value::String(body)), Some(Value::String(mac)), Some(2)) = (
        outer.get("body"),
        outer.get("mac"),
        outer.as_object().map(|o| o.len()),
    ) else {
        return Err(format!("not an authenticated (v2) reply: {}", shown()));
    };
    let tag = hex::decode(mac).map_err(|_| format!("a mac that is not hex: {}", shown()))?;
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key(sensor_key)).expect("any key");
    m.update(b"onboardd-reply-v2\n");
    m.update(body.as_bytes());
    m.verify_slice(&tag)
        .map_err(|_| format!("the mac does not verify: {}", shown()))?;
    let json: Value =
        serde_json::from_str(body).map_err(|e| format!("a body that is not JSON ({e}): {body}"))?;
    if json["nonce"] != nonce {
        return Err(format!(
            "answers another announce than the current one ({nonce}): {body}"
        ));
    }
    Ok(json)
}

/// Opens `device_token_sealed` = hex(gcm_nonce ‖ ciphertext ‖ tag): AES-256-GCM under
/// `seal_key = HMAC-SHA256(key = sensor_key, msg = "onboardd-seal-v2")`, additional data
/// `sensor_id + "/" + device_id + "/" + nonce`. `Err` says why it does not open.
pub fn unseal_v2(
    sensor_key: &[u8; 32],
    sensor_id: &str,
    device_id: &str,
    nonce: &str,
    sealed_hex: &str,
) -> Result<String, String> {
    let bytes = hex::decode(sealed_hex).map_err(|e| format!("not hex: {e}"))?;
    if bytes.len() < 12 + 16 {
        return Err(format!("{} bytes: too short", bytes.len()));
    }
    let (gcm_nonce, ct) = bytes.split_at(12);
    let cipher = Aes256Gcm::new_from_slice(&seal_key(sensor_key)).expect("a 32-byte key");
    let aad = format!("{sensor_id}/{device_id}/{nonce}");
    let plain = cipher
        .decrypt(
            Nonce::from_slice(gcm_nonce),
            Payload {
                msg: ct,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| {
            "AES-GCM refused it (wrong key, sensor, device id, nonce or damaged)".to_string()
        })?;
    String::from_utf8(plain).map_err(|e| format!("not UTF-8: {e}"))
}

/// The nonces of each flashed sensor's latest announces, by (claim key, sensor id), the
/// current one last: one sensor's memory, whichever [`Flashed`] (and clone) of its
/// gateway a test holds.
fn sent_nonces() -> &'static Mutex<SentNonces> {
    static NONCES: OnceLock<Mutex<SentNonces>> = OnceLock::new();
    NONCES.get_or_init(Mutex::default)
}

/// Nonces sent, by (claim key, sensor id), the current one last.
type SentNonces = HashMap<(String, String), Vec<String>>;

/// Announces of one sensor remembered for [`Flashed::open_reply_to_any`].
const NONCES_KEPT: usize = 64;

/// What a gateway's sensors were flashed with: each one's sensor key, derived from the
/// gateway's claim key (a factory station holds the claim key; one sensor holds only its
/// own key, and [`Flashed::key_of`] gives exactly that). Every announce a test sensor sends
/// is built by [`Flashed::announce`] and every reply it reads is checked by
/// [`Flashed::open_reply`]: when the protocol changes, these two functions (and the state
/// they keep here) are what changes, not the tests.
#[derive(Clone)]
pub struct Flashed {
    claim_key: String,
}

impl Flashed {
    pub fn new(claim_key: &str) -> Flashed {
        Flashed {
            claim_key: claim_key.to_owned(),
        }
    }

    /// The key flashed into `sensor_id`.
    pub fn key_of(&self, sensor_id: &str) -> [u8; 32] {
        sensor_key(&self.claim_key, sensor_id)
    }

    /// The announce payload `sensor_id` sends (protocol v2): `fields` (the announce as a
    /// JSON object, without nonce or proof: `{}`, `{"request_id":"x"}`) with a fresh
    /// nonce, which becomes the sensor's current one, as the body, and its proof beside
    /// it. Panics on anything but an object: a test that sends a malformed payload on
    /// purpose sends it raw.
    pub fn announce(&self, sensor_id: &str, fields: &str) -> String {
        let mut obj: serde_json::Map<String, Value> =
            serde_json::from_str(fields).unwrap_or_else(|e| {
                panic!(
                    "announce of {sensor_id}: {fields:?} is not a JSON object ({e}); send it raw"
                )
            });
        let nonce = fresh_nonce();
        obj.insert("nonce".into(), Value::String(nonce.clone()));
        self.remember(sensor_id, &nonce);
        announce_v2(&self.key_of(sensor_id), &Value::Object(obj).to_string())
    }

    /// The nonce of `sensor_id`'s current announce, if it announced.
    pub fn current_nonce(&self, sensor_id: &str) -> Option<String> {
        self.nonces_sent(sensor_id).pop()
    }

    /// The nonces of `sensor_id`'s latest announces (at most 64), the current one last.
    pub fn nonces_sent(&self, sensor_id: &str) -> Vec<String> {
        let key = (self.claim_key.clone(), sensor_id.to_owned());
        let all = sent_nonces().lock().expect("never poisoned");
        all.get(&key).cloned().unwrap_or_default()
    }

    fn remember(&self, sensor_id: &str, nonce: &str) {
        let key = (self.claim_key.clone(), sensor_id.to_owned());
        let mut all = sent_nonces().lock().expect("never poisoned");
        let sent = all.entry(key).or_default();
        if sent.len() == NONCES_KEPT {
            sent.remove(0);
        }
        sent.push(nonce.to_owned());
    }

    /// A reply `sensor_id` received, checked as its firmware checks it: an authenticated
    /// (v2) reply whose mac verifies and whose nonce is that of the sensor's current
    /// announce, and an `ok` that carries a token carries it sealed for this sensor and
    /// that announce (never in clear), opened here with its key. `Err` says why the sensor
    /// would not act on it.
    pub fn open_reply(&self, sensor_id: &str, payload: &[u8]) -> Result<Reply, String> {
        let nonce = self
            .current_nonce(sensor_id)
            .ok_or_else(|| format!("{sensor_id} has not announced: it expects no reply"))?;
        self.open_reply_for(sensor_id, &nonce, payload)
    }

    /// [`open_reply`](Self::open_reply) for any of the sensor's latest announces: for a
    /// client that stands for a whole fleet and counts a sensor that announced several
    /// times at once as answered by the answer to any of them (the sensor itself would act
    /// only on the answer to its latest, and announce again).
    pub fn open_reply_to_any(&self, sensor_id: &str, payload: &[u8]) -> Result<Reply, String> {
        let sent = self.nonces_sent(sensor_id);
        sent.iter()
            .rev()
            .find_map(|n| self.open_reply_for(sensor_id, n, payload).ok())
            .ok_or_else(|| match self.open_reply(sensor_id, payload) {
                Err(e) => e,
                Ok(_) => "opened on a second try".to_string(),
            })
    }

    /// [`open_reply`](Self::open_reply) for the announce with `nonce` rather than the
    /// current one: for a test that sends several announces at once and checks that
    /// each one is answered (a sensor acts only on the answer to its latest).
    pub fn open_reply_for(
        &self,
        sensor_id: &str,
        nonce: &str,
        payload: &[u8],
    ) -> Result<Reply, String> {
        let key = self.key_of(sensor_id);
        let json = verify_reply(&key, payload, nonce)?;
        if json["status"] != "ok" || json["bridged"] == true {
            return Ok(Reply { json, token: None });
        }
        if json.get("device_token").is_some() {
            return Err(format!(
                "a token in clear to a sensor holding a key: {json}"
            ));
        }
        let device = json["device_id"]
            .as_str()
            .ok_or_else(|| format!("an ok without device_id: {json}"))?;
        let sealed = json["device_token_sealed"]
            .as_str()
            .ok_or_else(|| format!("an ok without device_token_sealed: {json}"))?;
        let token = unseal_v2(&key, sensor_id, device, nonce, sealed)
            .map_err(|e| format!("the sealed token of {sensor_id} does not open: {e}: {json}"))?;
        Ok(Reply {
            json,
            token: Some(token),
        })
    }
}

/// A reply as a sensor reads it: its JSON (index it as the JSON: `r["status"]`; for an
/// authenticated reply, its body) and, for an `ok` read with the sensor's key, the device
/// token opened from its seal.
#[derive(Clone)]
pub struct Reply {
    pub json: Value,
    token: Option<String>,
}

impl Reply {
    /// A reply read without a key (an attacker, or a gateway with proofs off): the
    /// payload's JSON, or the body of an authenticated reply (anyone can read it; only
    /// the key holder can trust it).
    pub fn unkeyed(json: Value) -> Reply {
        let body = match (&json["body"], json.get("mac")) {
            (Value::String(body), Some(_)) => serde_json::from_str(body).ok(),
            _ => None,
        };
        Reply {
            json: body.unwrap_or(json),
            token: None,
        }
    }

    /// The token opened from `device_token_sealed` (panics, with the reply, when this is
    /// not an `ok` read with the sensor's key).
    pub fn token(&self) -> &str {
        self.token
            .as_deref()
            .unwrap_or_else(|| panic!("no opened token in {}", self.json))
    }

    pub fn opened_token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key)
    }
}

impl std::ops::Index<&str> for Reply {
    type Output = Value;
    fn index(&self, key: &str) -> &Value {
        &self.json[key]
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The opened token is a secret of the sensor: only the reply as sent is shown.
        self.json.fmt(f)
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reply({})", self.json)
    }
}

/// Where a daemon keeps the claim key it generated, in `store.path`.
pub const CLAIM_KEY_FILE: &str = "claim-key";

/// The claim key a daemon generated in its store (`{store.path}/claim-key`), checked
/// to be 64 lowercase hex characters and a newline.
pub fn generated_claim_key(store_path: &std::path::Path) -> String {
    let path = store_path.join(CLAIM_KEY_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the generated claim key {}: {e}", path.display()));
    let key = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{} does not end in a newline", path.display()));
    assert!(
        key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{} is not 64 lowercase hex characters",
        path.display()
    );
    key.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLAIM_KEY: &str = "onboardd-test-claim-key";

    /// The sensor key vector of README, computed by another implementation than onboardd's.
    #[test]
    fn the_readme_sensor_key_vector_holds_for_the_firmware_side() {
        assert_eq!(
            hex::encode(sensor_key(CLAIM_KEY, "temp-01")),
            "08ba7b76cba08df1355dd71fe8e313fcc797f6b0597c65ac9d3cc5d275bd749a"
        );
    }

    /// What onboardd would answer to `nonce`: `body` with that nonce, MAC'd.
    fn reply_to(key: &[u8; 32], body: Value, nonce: &str) -> Vec<u8> {
        let mut body = body;
        body["nonce"] = Value::String(nonce.to_owned());
        let text = body.to_string();
        serde_json::json!({"body": text, "mac": reply_mac(key, &text)})
            .to_string()
            .into_bytes()
    }

    fn seal(key: &[u8; 32], sensor: &str, device: &str, nonce: &str, token: &str) -> String {
        let cipher = Aes256Gcm::new_from_slice(&hmac_sha256(key, b"onboardd-seal-v2")).unwrap();
        let aad = format!("{sensor}/{device}/{nonce}");
        let gcm_nonce = [7u8; 12];
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&gcm_nonce),
                Payload {
                    msg: token.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .unwrap();
        hex::encode([&gcm_nonce[..], &ct].concat())
    }

    /// The one announce builder signs a body with a fresh nonce, and the one reply check
    /// acts only on a MAC'd reply to that nonce whose token opens for it.
    #[test]
    fn a_flashed_sensor_signs_its_announce_and_acts_only_on_an_authenticated_reply_to_it() {
        let f = Flashed::new("firmware-unit-test-claim-key");
        let id = "fw-unit-1";
        let key = f.key_of(id);
        let a: Value = serde_json::from_str(&f.announce(id, r#"{"request_id":"r"}"#)).unwrap();
        let body = a["body"].as_str().unwrap();
        assert_eq!(a["proof"], proof_v2(&key, body));
        let nonce = f.current_nonce(id).unwrap();
        let inner: Value = serde_json::from_str(body).unwrap();
        assert_eq!(inner, serde_json::json!({"request_id":"r","nonce":nonce}));

        let device = "6b1f3a9e-2c44-4d7a-9e0b-5f2d8c7a1e90";
        let ok = |nonce: &str| {
            let sealed = seal(&key, id, device, nonce, "qt_secret");
            serde_json::json!({"status":"ok","sensor_id":id,"device_id":device,
                "device_token_sealed":sealed,"broker":{"host":"h","port":1}})
        };
        let r = f
            .open_reply(id, &reply_to(&key, ok(&nonce), &nonce))
            .unwrap();
        assert_eq!(r.token(), "qt_secret");
        assert!(!format!("{r} {r:?}").contains("qt_secret"), "never shown");

        let old = reply_to(&key, ok(&nonce), &nonce);
        f.announce(id, "{}");
        assert!(
            f.open_reply(id, &old).is_err(),
            "a reply to an older announce"
        );
        let nonce = f.current_nonce(id).unwrap();
        let mut forged: Value =
            serde_json::from_slice(&reply_to(&key, ok(&nonce), &nonce)).unwrap();
        forged["body"] = Value::String(
            forged["body"]
                .as_str()
                .unwrap()
                .replace("\"host\":\"h\"", "\"host\":\"x\""),
        );
        assert!(f.open_reply(id, forged.to_string().as_bytes()).is_err());
        let unauthenticated = br#"{"status":"error","code":"unauthorized"}"#;
        assert!(f.open_reply(id, unauthenticated).is_err());
        let refused = serde_json::json!({"status":"error","code":"denied"});
        assert_eq!(
            f.open_reply(id, &reply_to(&key, refused, &nonce))
                .unwrap()
                .opened_token(),
            None
        );
        assert!(f
            .open_reply("fw-unit-2", &reply_to(&key, ok(&nonce), &nonce))
            .is_err());
        assert!(f.open_reply(id, b"not json").is_err());
    }
}
