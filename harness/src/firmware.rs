//! What a sensor's firmware computes (README "Security", "The sensor side"), written
//! here from the protocol text alone with RustCrypto crates, never with onboardd's own
//! code: a test that checks onboardd's replies with these functions checks them
//! against the protocol, not against itself.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
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

/// The claim key a daemon generated in its store (`{store.path}/claim-key`), checked
/// to be 64 lowercase hex characters and a newline.
pub fn generated_claim_key(store_path: &std::path::Path) -> String {
    let path = store_path.join("claim-key");
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
}
