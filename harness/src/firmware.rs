//! What a sensor's firmware computes (README "Security", "The sensor side"), written
//! here from the protocol text alone with RustCrypto crates, never with onboardd's own
//! code: a test that checks onboardd's replies with these functions checks them
//! against the protocol, not against itself.

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

/// The announce's `proof`: `hex(HMAC-SHA256(key = sensor_key, msg = "onboardd-announce-v1"))`.
pub fn proof(sensor_key: &[u8; 32]) -> String {
    hex::encode(hmac_sha256(sensor_key, b"onboardd-announce-v1"))
}

/// An announce payload `{"proof": …}` plus `fields` (a JSON object's inner text, or "").
pub fn announce_with_proof(sensor_key: &[u8; 32], fields: &str) -> String {
    let sep = if fields.trim().is_empty() { "" } else { "," };
    format!(r#"{{"proof":"{}"{sep}{fields}}}"#, proof(sensor_key))
}

/// Opens `device_token_sealed` = hex(nonce ‖ ciphertext ‖ tag): AES-256-GCM under
/// `HMAC-SHA256(key = sensor_key, msg = "onboardd-reply-v1")`, additional data
/// `sensor_id + "/" + device_id`. `Err` says why it does not open.
pub fn unseal(
    sensor_key: &[u8; 32],
    sensor_id: &str,
    device_id: &str,
    sealed_hex: &str,
) -> Result<String, String> {
    let bytes = hex::decode(sealed_hex).map_err(|e| format!("not hex: {e}"))?;
    if bytes.len() < 12 + 16 {
        return Err(format!("{} bytes: too short", bytes.len()));
    }
    let (nonce, ct) = bytes.split_at(12);
    let reply_key = hmac_sha256(sensor_key, b"onboardd-reply-v1");
    let cipher = Aes256Gcm::new_from_slice(&reply_key).expect("a 32-byte key");
    let aad = format!("{sensor_id}/{device_id}");
    let plain = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| "AES-GCM refused it (wrong key, sensor, device id or damaged)".to_string())?;
    String::from_utf8(plain).map_err(|e| format!("not UTF-8: {e}"))
}

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

    /// The announce payload `sensor_id` sends: `fields` (the announce as a JSON object,
    /// without any proof: `{}`, `{"request_id":"x"}`) signed with its key. Panics on
    /// anything but an object: a test that sends a malformed payload on purpose sends it raw.
    pub fn announce(&self, sensor_id: &str, fields: &str) -> String {
        let mut obj: serde_json::Map<String, Value> =
            serde_json::from_str(fields).unwrap_or_else(|e| {
                panic!(
                    "announce of {sensor_id}: {fields:?} is not a JSON object ({e}); send it raw"
                )
            });
        obj.insert(
            "proof".into(),
            Value::String(proof(&self.key_of(sensor_id))),
        );
        Value::Object(obj).to_string()
    }

    /// A reply `sensor_id` received, checked as its firmware checks it: JSON, and an `ok`
    /// that carries a token carries it sealed for this sensor (never in clear), opened
    /// here with its key. `Err` says why the sensor would not act on it.
    pub fn open_reply(&self, sensor_id: &str, payload: &[u8]) -> Result<Reply, String> {
        let json: Value = serde_json::from_slice(payload)
            .map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(payload)))?;
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
        let token = unseal(&self.key_of(sensor_id), sensor_id, device, sealed)
            .map_err(|e| format!("the sealed token of {sensor_id} does not open: {e}: {json}"))?;
        Ok(Reply {
            json,
            token: Some(token),
        })
    }
}

/// A reply as a sensor reads it: its JSON (index it as the JSON: `r["status"]`) and, for
/// an `ok` read with the sensor's key, the device token opened from its seal.
#[derive(Clone)]
pub struct Reply {
    pub json: Value,
    token: Option<String>,
}

impl Reply {
    /// A reply read without a key (an attacker, or a gateway with proofs off).
    pub fn unkeyed(json: Value) -> Reply {
        Reply { json, token: None }
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

    /// README's test vectors, computed here by another implementation than onboardd's.
    #[test]
    fn the_readme_test_vectors_hold_for_the_firmware_side() {
        let k = sensor_key("onboardd-test-claim-key", "temp-01");
        assert_eq!(
            hex::encode(k),
            "08ba7b76cba08df1355dd71fe8e313fcc797f6b0597c65ac9d3cc5d275bd749a"
        );
        assert_eq!(
            proof(&k),
            "222303d0266fce6cae96e834c84ee22f9ef450d7bbf39bfce21216b67dccff44"
        );
        let sealed = "000102030405060708090a0bfe7fec654af977876beeb3527de104272610558b73c981ad24263fafc27a34d83246d4";
        let device = "6b1f3a9e-2c44-4d7a-9e0b-5f2d8c7a1e90";
        assert_eq!(
            unseal(&k, "temp-01", device, sealed).unwrap(),
            "qt_3Xv9Lq2ZpR7mKc1Y"
        );
        assert!(unseal(&k, "temp-02", device, sealed).is_err());
    }

    /// The one announce builder signs, and the one reply check opens only a sealed `ok`
    /// for this sensor (README's vectors again).
    #[test]
    fn a_flashed_sensor_signs_its_announce_and_acts_only_on_a_sealed_ok_of_its_own() {
        let f = Flashed::new("onboardd-test-claim-key");
        let a: Value =
            serde_json::from_str(&f.announce("temp-01", r#"{"request_id":"r"}"#)).unwrap();
        assert_eq!(
            a,
            serde_json::json!({"request_id":"r",
                "proof":"222303d0266fce6cae96e834c84ee22f9ef450d7bbf39bfce21216b67dccff44"})
        );
        let device = "6b1f3a9e-2c44-4d7a-9e0b-5f2d8c7a1e90";
        let sealed = "000102030405060708090a0bfe7fec654af977876beeb3527de104272610558b73c981ad24263fafc27a34d83246d4";
        let ok = serde_json::json!({"status":"ok","sensor_id":"temp-01","device_id":device,
            "device_token_sealed":sealed})
        .to_string();
        let r = f.open_reply("temp-01", ok.as_bytes()).unwrap();
        assert_eq!(r.token(), "qt_3Xv9Lq2ZpR7mKc1Y");
        assert!(
            !format!("{r} {r:?}").contains("qt_3Xv9Lq2ZpR7mKc1Y"),
            "never shown"
        );
        assert!(
            f.open_reply("temp-02", ok.as_bytes()).is_err(),
            "another sensor's"
        );
        let clear = serde_json::json!({"status":"ok","sensor_id":"temp-01","device_id":device,
            "device_token":"qt_x"})
        .to_string();
        assert!(
            f.open_reply("temp-01", clear.as_bytes()).is_err(),
            "a clear token"
        );
        let refused = br#"{"status":"error","code":"unauthorized"}"#;
        assert_eq!(
            f.open_reply("temp-01", refused).unwrap().opened_token(),
            None
        );
        assert!(f.open_reply("temp-01", b"not json").is_err());
    }
}
