//! README's protocol v2 test vectors, derived again from the spec text by
//! implementations that share no code with `src/`: RustCrypto here, Python's
//! `cryptography` in `tests/vectors/check_v2.py`. onboardd's own computation of the
//! same file is the unit test `proof::v2::tests::the_v2_test_vectors_hold`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn vectors_text() -> String {
    std::fs::read_to_string(dir().join("v2.json")).unwrap()
}

fn vectors() -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_str(&vectors_text()).unwrap()
}

fn get<'a>(v: &'a serde_json::Map<String, serde_json::Value>, name: &str) -> &'a str {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} is a string"))
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

#[test]
fn rustcrypto_derives_every_v2_vector_again_from_the_spec_text() {
    let v = vectors();
    let sensor_id = get(&v, "sensor_id");
    let sensor_key = hmac_sha256(get(&v, "claim_key").as_bytes(), &[sensor_id.as_bytes()]);
    assert_eq!(hex::encode(&sensor_key), get(&v, "sensor_key"));
    let mac_key = hmac_sha256(&sensor_key, &[b"onboardd-mac-v2"]);
    assert_eq!(hex::encode(&mac_key), get(&v, "mac_key"));
    let seal_key = hmac_sha256(&sensor_key, &[b"onboardd-seal-v2"]);
    assert_eq!(hex::encode(&seal_key), get(&v, "seal_key"));

    let body = get(&v, "announce_body");
    let proof = hmac_sha256(&sensor_key, &[b"onboardd-announce-v2\n", body.as_bytes()]);
    assert_eq!(hex::encode(proof), get(&v, "proof"));
    let announce: serde_json::Value = serde_json::from_str(body).unwrap();
    let nonce = announce["nonce"].as_str().unwrap();
    assert_eq!(nonce.len(), 32);
    assert!(nonce
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

    let aad = format!("{sensor_id}/{}/{nonce}", get(&v, "device_id"));
    let gcm_nonce = hex::decode(get(&v, "gcm_nonce")).unwrap();
    assert_eq!(gcm_nonce.len(), 12);
    let cipher = Aes256Gcm::new_from_slice(&seal_key).unwrap();
    let token = get(&v, "token").as_bytes();
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&gcm_nonce),
            Payload {
                msg: token,
                aad: aad.as_bytes(),
            },
        )
        .unwrap();
    let sealed_hex = format!("{}{}", get(&v, "gcm_nonce"), hex::encode(sealed));
    assert_eq!(sealed_hex, get(&v, "device_token_sealed"));

    let reply_body = get(&v, "reply_body");
    let reply: serde_json::Value = serde_json::from_str(reply_body).unwrap();
    assert_eq!(reply["device_token_sealed"], sealed_hex.as_str());
    assert_eq!(reply["nonce"], nonce);
    let reply_mac = hmac_sha256(&mac_key, &[b"onboardd-reply-v2\n", reply_body.as_bytes()]);
    assert_eq!(hex::encode(reply_mac), get(&v, "reply_mac"));
}

#[test]
fn python_cryptography_derives_every_v2_vector_again_from_the_spec_text() {
    let script = dir().join("check_v2.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/install-deps.sh test installs python3-cryptography)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(vectors_text().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "Python's cryptography is missing: scripts/install-deps.sh test installs python3-cryptography\n{stderr}"
    );
    assert!(out.status.success(), "{}: {stderr}", script.display());
    // It computed, and printed, every derived value: a script that checks nothing fails here.
    let got: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap();
    let v = vectors();
    for name in [
        "sensor_key",
        "mac_key",
        "seal_key",
        "proof",
        "device_token_sealed",
        "reply_mac",
    ] {
        assert_eq!(got.get(name), v.get(name), "{name}");
    }
}

#[test]
fn the_readme_states_every_v2_vector_under_its_heading() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let heading = "### Protocol v2 test vectors";
    let start = readme
        .find(heading)
        .expect("README has the v2 vectors section");
    let section = &readme[start..];
    let section = &section[..section[heading.len()..]
        .find("\n### ")
        .map_or(section.len(), |i| i + heading.len())];
    for (name, value) in vectors() {
        let value = value.as_str().unwrap();
        assert!(
            section.contains(&format!("`{value}`")),
            "README lacks {name} = {value}"
        );
    }
}
