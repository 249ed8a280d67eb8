//! Protocol v2's crypto: every announce and every reply authenticated and bound to
//! one exchange by the announce's nonce (the primitives the daemon serves them with).
//!
//! v1's proof is a constant: replayed, it re-runs any announce of its sensor with any
//! fields, and a sealed `ok` can be republished with another broker host. v2 closes
//! both:
//! - **keys**: from the sensor key, `mac_key = HMAC-SHA256(sensor_key, "onboardd-mac-v2")`
//!   and `seal_key = HMAC-SHA256(sensor_key, "onboardd-seal-v2")`;
//! - **announce** `{"body": B, "proof": P}`, `B` a JSON string holding the announce
//!   object with a `nonce` of 32 lowercase hex characters, and
//!   `P = hex(HMAC-SHA256(sensor_key, "onboardd-announce-v2\n" ‖ B))` over `B`'s exact
//!   bytes, so nobody canonicalises JSON; `P` is checked before `B` is parsed;
//! - **reply** `{"body": R, "mac": M}`, `R` the reply object plus the announce's
//!   `nonce`, `M = hex(HMAC-SHA256(mac_key, "onboardd-reply-v2\n" ‖ R))`;
//! - **sealed token**: AES-256-GCM under `seal_key`, a fresh 12-byte GCM nonce, additional
//!   data `sensor_id + "/" + device_id + "/" + nonce`, as `hex(gcm_nonce ‖ ciphertext ‖ tag)`.
//!
//! Only an announce that passes [`verify_announce`] may be answered with
//! [`authenticated_reply`]; every [`AnnounceError`] is answered in v1 form without a
//! MAC, so copying a sensor's nonce into a forged announce earns nothing it would act
//! on. README "Protocol v2 test vectors" has the vectors the unit tests below check.

use std::fmt;

use hmac::Mac;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{hmac, HmacSha256, SensorKey, KEY_LEN};

/// Derives the reply MAC key from the sensor key.
pub const MAC_KEY_CONTEXT: &[u8] = b"onboardd-mac-v2";
/// Derives the token sealing key from the sensor key.
pub const SEAL_KEY_CONTEXT: &[u8] = b"onboardd-seal-v2";
/// Prefixed to the announce body before its proof is computed.
pub const ANNOUNCE_PREFIX: &[u8] = b"onboardd-announce-v2\n";
/// Prefixed to the reply body before its MAC is computed.
pub const REPLY_PREFIX: &[u8] = b"onboardd-reply-v2\n";
/// Characters of an announce nonce: 16 random bytes in lowercase hex.
pub const NONCE_HEX_LEN: usize = 32;

/// The two keys of one sensor's v2 exchanges. `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct ExchangeKeys {
    sensor: [u8; KEY_LEN],
    mac: [u8; KEY_LEN],
    seal: [u8; KEY_LEN],
}

impl fmt::Debug for ExchangeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExchangeKeys(<redacted>)")
    }
}

/// An announce nonce that follows the rule: exactly 32 lowercase hex characters.
/// Stored with the route that answers it, as its text; a stored text that breaks
/// the rule does not read back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AnnounceNonce(String);

impl TryFrom<String> for AnnounceNonce {
    type Error = BadNonce;
    fn try_from(text: String) -> Result<AnnounceNonce, BadNonce> {
        AnnounceNonce::parse(&text).ok_or(BadNonce)
    }
}

impl From<AnnounceNonce> for String {
    fn from(nonce: AnnounceNonce) -> String {
        nonce.0
    }
}

/// A text that is not 32 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an announce nonce is 32 lowercase hex characters")]
pub struct BadNonce;

/// Why an announce is not an authenticated v2 announce. None of these earns a MAC'd
/// reply: without a verified proof and a valid nonce there is no exchange to bind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    #[error("the announce is not JSON")]
    NotJson,
    #[error("not a protocol v2 announce: expected {{\"body\": string, \"proof\": string}} and nothing else")]
    NotV2,
    #[error("the proof does not verify under protocol v2 (a v1 proof, a changed body or another sensor's key)")]
    WrongProof,
    #[error("the announce body (protocol v2) is not a JSON object")]
    BodyNotObject,
    #[error("the announce nonce (protocol v2) must be 32 lowercase hex characters")]
    BadNonce,
}

impl AnnounceError {
    /// The reply's error code: the outer payload not parsing is `invalid_json`, as
    /// in v1; anything that does not prove the sensor, `unauthorized`; a proved body
    /// that is not an object, `invalid_json`.
    pub fn code(&self) -> &'static str {
        match self {
            AnnounceError::NotJson | AnnounceError::BodyNotObject => "invalid_json",
            AnnounceError::NotV2 | AnnounceError::WrongProof | AnnounceError::BadNonce => {
                "unauthorized"
            }
        }
    }
}

/// Why a reply is not an authenticated v2 answer to the sensor's current announce:
/// the sensor logs it and acts on nothing in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("the reply is not JSON")]
    NotJson,
    #[error(
        "not a protocol v2 reply: expected {{\"body\": string, \"mac\": string}} and nothing else"
    )]
    NotV2,
    #[error("the reply's mac does not verify under protocol v2")]
    WrongMac,
    #[error("the reply body (protocol v2) is not a JSON object")]
    BodyNotObject,
    #[error("the reply answers another announce (its nonce is not the current one)")]
    OtherExchange,
}

/// A reply to authenticate that does not serialize to a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a protocol v2 reply body must be a JSON object")]
pub struct NotAnObject;

/// A sealed token that does not open: wrong key, sensor, device id, nonce, or damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the sealed token does not open with this sensor's key for this sensor id, device id and nonce"
)]
pub struct CannotOpen;

/// An announce whose proof verified, with its body's exact text, that text parsed,
/// and its nonce.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedAnnounce {
    /// `B` as proved: what the announce parser reads.
    pub body: String,
    /// `B` parsed, for callers that need more than the nonce.
    pub object: Map<String, Value>,
    pub nonce: AnnounceNonce,
}

impl AnnounceNonce {
    /// The nonce if `text` follows the rule.
    pub fn parse(text: &str) -> Option<AnnounceNonce> {
        let ok = text.len() == NONCE_HEX_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| AnnounceNonce(text.to_string()))
    }

    /// A fresh nonce for a sensor's next announce: 16 random bytes.
    pub fn generate() -> AnnounceNonce {
        let mut bytes = [0u8; NONCE_HEX_LEN / 2];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the kernel's random source works (getrandom or /dev/urandom)");
        AnnounceNonce(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ExchangeKeys {
    /// `mac_key` and `seal_key` of `sensor_key`.
    pub fn derive(sensor_key: &SensorKey) -> ExchangeKeys {
        ExchangeKeys {
            sensor: sensor_key.0,
            mac: hmac(&sensor_key.0, MAC_KEY_CONTEXT),
            seal: hmac(&sensor_key.0, SEAL_KEY_CONTEXT),
        }
    }

    /// `P` for the body text `body`: what a sensor puts beside it.
    pub fn announce_proof(&self, body: &str) -> String {
        hex::encode(
            prefixed_mac(&self.sensor, ANNOUNCE_PREFIX, body)
                .finalize()
                .into_bytes(),
        )
    }

    /// A whole announce payload for `body` (the sensor side, and tests).
    pub fn announce(&self, body: &str) -> Vec<u8> {
        envelope(body, "proof", &self.announce_proof(body))
    }

    /// Checks the proof over the body's exact bytes (in constant time) before the
    /// body is parsed, then the nonce rule.
    pub fn verify_announce(&self, payload: &[u8]) -> Result<VerifiedAnnounce, AnnounceError> {
        let (body, proof) = split_envelope(payload, "proof").map_err(|e| match e {
            EnvelopeError::NotJson => AnnounceError::NotJson,
            EnvelopeError::Shape => AnnounceError::NotV2,
        })?;
        if !verify(&self.sensor, ANNOUNCE_PREFIX, &body, &proof) {
            return Err(AnnounceError::WrongProof);
        }
        let object = parse_object(&body).ok_or(AnnounceError::BodyNotObject)?;
        let nonce = object
            .get("nonce")
            .and_then(Value::as_str)
            .and_then(AnnounceNonce::parse)
            .ok_or(AnnounceError::BadNonce)?;
        Ok(VerifiedAnnounce {
            body,
            object,
            nonce,
        })
    }

    /// `M` for the reply body text `body`.
    pub fn reply_mac(&self, body: &str) -> String {
        hex::encode(
            prefixed_mac(&self.mac, REPLY_PREFIX, body)
                .finalize()
                .into_bytes(),
        )
    }

    /// The payload `{"body": R, "mac": M}` answering the announce with `nonce`:
    /// `R` is `reply` (an object) with that nonce added.
    pub fn authenticated_reply<T: Serialize>(
        &self,
        reply: &T,
        nonce: &AnnounceNonce,
    ) -> Result<Vec<u8>, NotAnObject> {
        let Ok(Value::Object(mut object)) = serde_json::to_value(reply) else {
            return Err(NotAnObject);
        };
        object.insert("nonce".into(), Value::String(nonce.0.clone()));
        let body = Value::Object(object).to_string();
        Ok(envelope(&body, "mac", &self.reply_mac(&body)))
    }

    /// The sensor side: the reply object, if its MAC verifies (before its body is
    /// parsed) and it answers the announce with `current`.
    pub fn verify_reply(
        &self,
        payload: &[u8],
        current: &AnnounceNonce,
    ) -> Result<Map<String, Value>, ReplyError> {
        let (body, mac) = split_envelope(payload, "mac").map_err(|e| match e {
            EnvelopeError::NotJson => ReplyError::NotJson,
            EnvelopeError::Shape => ReplyError::NotV2,
        })?;
        if !verify(&self.mac, REPLY_PREFIX, &body, &mac) {
            return Err(ReplyError::WrongMac);
        }
        let object = parse_object(&body).ok_or(ReplyError::BodyNotObject)?;
        if object.get("nonce").and_then(Value::as_str) != Some(current.as_str()) {
            return Err(ReplyError::OtherExchange);
        }
        Ok(object)
    }

    /// `device_token_sealed` for the exchange with `nonce`, under a fresh GCM nonce.
    pub fn seal_token(
        &self,
        sensor_id: &str,
        device_id: &str,
        nonce: &AnnounceNonce,
        token: &str,
    ) -> String {
        let mut gcm_nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut gcm_nonce)
            .expect("the kernel's random source works (getrandom or /dev/urandom)");
        self.seal_token_with_gcm_nonce(sensor_id, device_id, nonce, token, gcm_nonce)
    }

    /// [`seal_token`](Self::seal_token) with a given GCM nonce: only for test vectors.
    /// A GCM nonce used twice under one key reveals the tokens.
    pub fn seal_token_with_gcm_nonce(
        &self,
        sensor_id: &str,
        device_id: &str,
        nonce: &AnnounceNonce,
        token: &str,
        gcm_nonce: [u8; NONCE_LEN],
    ) -> String {
        let aad = seal_aad(sensor_id, device_id, nonce.as_str());
        let mut sealed = token.as_bytes().to_vec();
        self.seal_key()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(gcm_nonce),
                Aad::from(aad.as_bytes()),
                &mut sealed,
            )
            .expect("a token is far below AES-GCM's length limit");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&gcm_nonce);
        out.extend_from_slice(&sealed);
        hex::encode(out)
    }

    /// The sensor side: the token in `sealed_hex`, if it opens for exactly this
    /// sensor id, device id and nonce.
    pub fn open_token(
        &self,
        sensor_id: &str,
        device_id: &str,
        nonce: &AnnounceNonce,
        sealed_hex: &str,
    ) -> Result<String, CannotOpen> {
        let bytes = hex::decode(sealed_hex).map_err(|_| CannotOpen)?;
        if bytes.len() < NONCE_LEN {
            return Err(CannotOpen);
        }
        let (gcm_nonce, rest) = bytes.split_at(NONCE_LEN);
        let gcm_nonce = Nonce::try_assume_unique_for_key(gcm_nonce).map_err(|_| CannotOpen)?;
        let aad = seal_aad(sensor_id, device_id, nonce.as_str());
        let mut buf = rest.to_vec();
        let plain = self
            .seal_key()
            .open_in_place(gcm_nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| CannotOpen)?;
        String::from_utf8(plain.to_vec()).map_err(|_| CannotOpen)
    }

    fn seal_key(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.seal).expect("a 32-byte AES-256 key"))
    }
}

fn seal_aad(sensor_id: &str, device_id: &str, nonce: &str) -> String {
    format!("{sensor_id}/{device_id}/{nonce}")
}

fn prefixed_mac(key: &[u8], prefix: &[u8], body: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(prefix);
    mac.update(body.as_bytes());
    mac
}

/// Whether `tag_hex` is the MAC of `prefix ‖ body`, compared in constant time.
fn verify(key: &[u8], prefix: &[u8], body: &str, tag_hex: &str) -> bool {
    let Ok(tag) = hex::decode(tag_hex) else {
        return false;
    };
    prefixed_mac(key, prefix, body).verify_slice(&tag).is_ok()
}

fn envelope(body: &str, tag_name: &str, tag: &str) -> Vec<u8> {
    let mut object = Map::new();
    object.insert("body".into(), Value::String(body.to_string()));
    object.insert(tag_name.into(), Value::String(tag.to_string()));
    Value::Object(object).to_string().into_bytes()
}

enum EnvelopeError {
    NotJson,
    Shape,
}

/// `body` and the tag named `tag_name` of `{"body": string, tag_name: string}`; any
/// other member is refused, so nothing unauthenticated rides beside the body.
fn split_envelope(payload: &[u8], tag_name: &str) -> Result<(String, String), EnvelopeError> {
    let Ok(value) = serde_json::from_slice::<Value>(payload) else {
        return Err(EnvelopeError::NotJson);
    };
    let Value::Object(mut object) = value else {
        return Err(EnvelopeError::Shape);
    };
    if object.len() != 2 {
        return Err(EnvelopeError::Shape);
    }
    match (object.remove("body"), object.remove(tag_name)) {
        (Some(Value::String(body)), Some(Value::String(tag))) => Ok((body, tag)),
        _ => Err(EnvelopeError::Shape),
    }
}

fn parse_object(body: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(object)) => Some(object),
        _ => None,
    }
}

#[cfg(test)]
#[path = "v2_tests.rs"]
mod tests;
