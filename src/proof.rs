//! The announce proof and the sealed token: onboardd's side of the sensor protocol.
//!
//! A broker may be open (anyone may subscribe to `#`), so nothing a sensor or onboardd
//! publishes may be worth stealing:
//! - the **sensor key** `HMAC-SHA256(key = claim_key, msg = sensor_id)` is flashed into
//!   the sensor and never sent anywhere;
//! - the **proof** `hex(HMAC-SHA256(key = sensor_key, msg = "onboardd-announce-v1"))`
//!   in an announce shows that the sender holds that key; seen and replayed, it can
//!   only start the onboarding its sensor wanted, whose reply the replayer cannot read;
//! - the **sealed token** `hex(nonce ‖ ciphertext ‖ tag)`: AES-256-GCM under
//!   `HMAC-SHA256(key = sensor_key, msg = "onboardd-reply-v1")`, a fresh random
//!   12-byte nonce per reply, additional data `sensor_id + "/" + device_id`, so a
//!   sealed token cannot be moved to another sensor or device id.
//!
//! HMAC comes from `hmac` + `sha2` (constant-time `verify_slice`); AES-GCM and the
//! random source from `ring`, which the TLS stack already links in (no second AES
//! implementation in the binary). README "Security" has the test vectors that the
//! unit tests below check. [`v2`] holds protocol v2's primitives (not served yet).

use std::fmt;

use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::Sha256;

use crate::config::Secret;

pub mod v2;

/// The message a sensor MACs with its key to prove it holds it.
pub const ANNOUNCE_CONTEXT: &[u8] = b"onboardd-announce-v1";
/// The message that derives the reply-sealing key from the sensor key.
pub const REPLY_CONTEXT: &[u8] = b"onboardd-reply-v1";
/// Bytes of a sensor key, a proof and the sealing key (SHA-256 output).
pub const KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], msg: &[u8]) -> [u8; KEY_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// One sensor's key: what is flashed into it at manufacture. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SensorKey([u8; KEY_LEN]);

impl fmt::Debug for SensorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SensorKey(<redacted>)")
    }
}

/// A sealed token that does not open: wrong key, sensor, device id, or damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the sealed token does not open with this sensor key, sensor id and device id")]
pub struct CannotOpen;

impl SensorKey {
    /// `HMAC-SHA256(key = claim_key as UTF-8 bytes, msg = sensor_id)`.
    pub fn derive(claim_key: &Secret, sensor_id: &str) -> SensorKey {
        SensorKey(hmac(claim_key.expose().as_bytes(), sensor_id.as_bytes()))
    }

    /// From the 64 hex characters `onboardd claim` prints.
    pub fn from_hex(text: &str) -> Option<SensorKey> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(SensorKey(bytes.try_into().ok()?))
    }

    /// 64 lowercase hex characters: how people see it (`onboardd claim`).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The `proof` an announce of this sensor carries.
    pub fn proof(&self) -> String {
        hex::encode(hmac(&self.0, ANNOUNCE_CONTEXT))
    }

    /// Whether `proof` (hex) is this sensor's proof, compared in constant time.
    pub fn verify_proof(&self, proof: &str) -> bool {
        let Ok(bytes) = hex::decode(proof) else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(ANNOUNCE_CONTEXT);
        mac.verify_slice(&bytes).is_ok()
    }

    fn reply_key_bytes(&self) -> [u8; KEY_LEN] {
        hmac(&self.0, REPLY_CONTEXT)
    }

    fn reply_key(&self) -> LessSafeKey {
        let k = self.reply_key_bytes();
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("a 32-byte AES-256 key"))
    }

    /// `hex(nonce ‖ ciphertext ‖ tag)` of `token` with a fresh random nonce.
    pub fn seal(&self, sensor_id: &str, device_id: &str, token: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the kernel's random source works (getrandom or /dev/urandom)");
        self.seal_with_nonce(sensor_id, device_id, token, nonce)
    }

    /// [`seal`](Self::seal) with a given nonce: only for test vectors. A nonce used
    /// twice under one key reveals the tokens; every reply takes a fresh one.
    pub fn seal_with_nonce(
        &self,
        sensor_id: &str,
        device_id: &str,
        token: &str,
        nonce: [u8; NONCE_LEN],
    ) -> String {
        let aad = format!("{sensor_id}/{device_id}");
        let mut sealed = token.as_bytes().to_vec();
        self.reply_key()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut sealed,
            )
            .expect("a token is far below AES-GCM's length limit");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        hex::encode(out)
    }

    /// What a sensor does with `device_token_sealed`: the token, if it opens.
    pub fn open(
        &self,
        sensor_id: &str,
        device_id: &str,
        sealed_hex: &str,
    ) -> Result<String, CannotOpen> {
        let bytes = hex::decode(sealed_hex).map_err(|_| CannotOpen)?;
        if bytes.len() < NONCE_LEN {
            return Err(CannotOpen);
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CannotOpen)?;
        let aad = format!("{sensor_id}/{device_id}");
        let mut buf = rest.to_vec();
        let plain = self
            .reply_key()
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| CannotOpen)?;
        String::from_utf8(plain.to_vec()).map_err(|_| CannotOpen)
    }
}

/// A new random claim key: 32 bytes, as 64 lowercase hex characters.
pub fn generate_claim_key() -> Secret {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .expect("the kernel's random source works (getrandom or /dev/urandom)");
    Secret::new(hex::encode(key))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// README's test vectors ("Security" → "Test vectors"), checked there with
    /// `openssl dgst -mac HMAC` and Python's `cryptography` AESGCM.
    pub(crate) const CLAIM_KEY: &str = "onboardd-test-claim-key";
    pub(crate) const SENSOR_ID: &str = "temp-01";
    pub(crate) const DEVICE_ID: &str = "6b1f3a9e-2c44-4d7a-9e0b-5f2d8c7a1e90";
    pub(crate) const TOKEN: &str = "qt_3Xv9Lq2ZpR7mKc1Y";
    pub(crate) const NONCE: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    const SENSOR_KEY: &str = "08ba7b76cba08df1355dd71fe8e313fcc797f6b0597c65ac9d3cc5d275bd749a";
    const PROOF: &str = "222303d0266fce6cae96e834c84ee22f9ef450d7bbf39bfce21216b67dccff44";
    const REPLY_KEY: &str = "c90f053558495809805015cdabcd9885b34d782c3bd3a55e898cb2ba1ed1ae01";
    const SEALED: &str = "000102030405060708090a0bfe7fec654af977876beeb3527de104272610558b73c981ad24263fafc27a34d83246d4";

    fn key() -> SensorKey {
        SensorKey::derive(&Secret::new(CLAIM_KEY), SENSOR_ID)
    }

    #[test]
    fn the_readme_test_vectors_hold() {
        let k = key();
        assert_eq!(k.to_hex(), SENSOR_KEY);
        assert_eq!(k.proof(), PROOF);
        assert_eq!(hex::encode(k.reply_key_bytes()), REPLY_KEY);
        assert_eq!(
            k.seal_with_nonce(SENSOR_ID, DEVICE_ID, TOKEN, NONCE),
            SEALED
        );
        assert_eq!(k.open(SENSOR_ID, DEVICE_ID, SEALED).unwrap(), TOKEN);
    }

    #[test]
    fn a_proof_verifies_only_for_its_own_sensor_and_in_hex() {
        let k = key();
        assert!(k.verify_proof(&k.proof()));
        assert!(k.verify_proof(&k.proof().to_uppercase()), "hex of any case");
        let other = SensorKey::derive(&Secret::new(CLAIM_KEY), "temp-02");
        assert!(!other.verify_proof(&k.proof()));
        assert!(!k.verify_proof("not hex"));
        assert!(!k.verify_proof(""));
        assert!(!k.verify_proof(&k.proof()[..62]), "a truncated proof");
        // The old `claim` (the sensor key itself) is no proof.
        assert!(!k.verify_proof(&k.to_hex()));
    }

    #[test]
    fn a_sealed_token_opens_only_for_its_sensor_and_device_id() {
        let k = key();
        let sealed = k.seal(SENSOR_ID, DEVICE_ID, TOKEN);
        assert_ne!(sealed, k.seal(SENSOR_ID, DEVICE_ID, TOKEN), "fresh nonces");
        assert!(!sealed.contains(&hex::encode(TOKEN)));
        assert_eq!(k.open(SENSOR_ID, DEVICE_ID, &sealed).unwrap(), TOKEN);
        assert_eq!(k.open(SENSOR_ID, "other-device", &sealed), Err(CannotOpen));
        assert_eq!(k.open("temp-02", DEVICE_ID, &sealed), Err(CannotOpen));
        let other = SensorKey::derive(&Secret::new(CLAIM_KEY), "temp-02");
        assert_eq!(other.open(SENSOR_ID, DEVICE_ID, &sealed), Err(CannotOpen));
        let mut damaged = sealed.into_bytes();
        let last = damaged.len() - 1;
        damaged[last] = if damaged[last] == b'0' { b'1' } else { b'0' };
        let damaged = String::from_utf8(damaged).unwrap();
        assert_eq!(k.open(SENSOR_ID, DEVICE_ID, &damaged), Err(CannotOpen));
        assert_eq!(k.open(SENSOR_ID, DEVICE_ID, "00"), Err(CannotOpen));
    }

    #[test]
    fn a_sensor_key_round_trips_through_hex_and_never_shows_in_debug() {
        let k = key();
        assert_eq!(SensorKey::from_hex(&k.to_hex()), Some(k.clone()));
        assert_eq!(SensorKey::from_hex("00"), None);
        assert!(!format!("{k:?}").contains(&k.to_hex()));
    }

    #[test]
    fn generated_claim_keys_are_64_hex_and_differ() {
        let a = generate_claim_key();
        assert_eq!(a.expose().len(), 64);
        assert!(a
            .expose()
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(a, generate_claim_key());
    }
}
