//! The sensor key and the fleet claim key: the roots of the sensor protocol's crypto.
//!
//! A broker may be open (anyone may subscribe to `#`), so nothing a sensor or onboardd
//! publishes may be worth stealing. The **sensor key** `HMAC-SHA256(key = claim_key,
//! msg = sensor_id)` is flashed into the sensor and never sent anywhere; every
//! announce proof, reply MAC and sealed token of protocol v2 ([`v2`]) derives from it.
//!
//! HMAC comes from `hmac` + `sha2` (constant-time `verify_slice`); AES-GCM and the
//! random source from `ring`, which the TLS stack already links in (no second AES
//! implementation in the binary). README "Security" has the test vectors that the
//! unit tests check.

use std::fmt;

use hmac::{Hmac, Mac};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::Sha256;

use crate::config::Secret;

pub mod v2;

/// Bytes of a sensor key and of the keys derived from it (SHA-256 output).
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
mod tests {
    use super::*;

    /// README's test vector ("Security" → "Test vectors"), checked there with
    /// `openssl dgst -mac HMAC`.
    #[test]
    fn the_readme_sensor_key_vector_holds() {
        let k = SensorKey::derive(&Secret::new("onboardd-test-claim-key"), "temp-01");
        assert_eq!(
            k.to_hex(),
            "08ba7b76cba08df1355dd71fe8e313fcc797f6b0597c65ac9d3cc5d275bd749a"
        );
    }

    #[test]
    fn a_sensor_key_round_trips_through_hex_and_never_shows_in_debug() {
        let k = SensorKey::derive(&Secret::new("onboardd-test-claim-key"), "temp-01");
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
