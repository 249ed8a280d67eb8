//! Unit tests of protocol v2's primitives (a file beside `v2.rs` so that one stays short).

use super::*;
use crate::config::Secret;

const CLAIM_KEY: &str = "onboardd-v2-unit-test-claim-key-0123456789";
const SENSOR_ID: &str = "temp-01";
const DEVICE_ID: &str = "6b1f3a9e-2c44-4d7a-9e0b-5f2d8c7a1e90";
const TOKEN: &str = "qt_3Xv9Lq2ZpR7mKc1Y";
const NONCE: &str = "00112233445566778899aabbccddeeff";

fn sensor_key(sensor_id: &str) -> SensorKey {
    SensorKey::derive(&Secret::new(CLAIM_KEY), sensor_id)
}

fn keys() -> ExchangeKeys {
    ExchangeKeys::derive(&sensor_key(SENSOR_ID))
}

fn body(nonce: &str) -> String {
    format!(r#"{{"name":"Greenhouse","bridge":false,"nonce":"{nonce}"}}"#)
}

/// v1's constant proof, which no v2 announce may carry.
fn v1_proof(key: &SensorKey) -> String {
    hex::encode(hmac(&key.0, b"onboardd-announce-v1"))
}

fn nonce() -> AnnounceNonce {
    AnnounceNonce::parse(NONCE).unwrap()
}

#[test]
fn an_announce_round_trips_with_its_exact_body_and_nonce() {
    let k = keys();
    let b = body(NONCE);
    let verified = k.verify_announce(&k.announce(&b)).unwrap();
    assert_eq!(verified.body, b);
    assert_eq!(verified.nonce, nonce());
    assert_eq!(verified.object["name"], "Greenhouse");
}

#[test]
fn the_proof_covers_the_body_bytes_as_sent_not_their_json_meaning() {
    let k = keys();
    // The same JSON object written with other spacing is another body.
    let spaced = format!(r#"{{"name": "Greenhouse","bridge":false,"nonce":"{NONCE}"}}"#);
    let payload = envelope(&spaced, "proof", &k.announce_proof(&body(NONCE)));
    assert_eq!(k.verify_announce(&payload), Err(AnnounceError::WrongProof));
}

#[test]
fn a_changed_body_byte_fails_the_proof() {
    let k = keys();
    let b = body(NONCE);
    let proof = k.announce_proof(&b);
    let flipped = b.replace("\"bridge\":false", "\"bridge\":true ");
    assert_eq!(flipped.len(), b.len());
    for changed in [flipped, b.replacen('G', "H", 1), format!("{b} ")] {
        let payload = envelope(&changed, "proof", &proof);
        assert_eq!(
            k.verify_announce(&payload),
            Err(AnnounceError::WrongProof),
            "{changed}"
        );
    }
}

#[test]
fn a_v1_proof_or_a_v1_payload_is_not_a_v2_announce() {
    let key = sensor_key(SENSOR_ID);
    let k = ExchangeKeys::derive(&key);
    let with_v1_proof = envelope(&body(NONCE), "proof", &v1_proof(&key));
    assert_eq!(
        k.verify_announce(&with_v1_proof),
        Err(AnnounceError::WrongProof)
    );
    let v1 = format!(r#"{{"proof":"{}","bridge":true}}"#, v1_proof(&key));
    let err = k.verify_announce(v1.as_bytes()).unwrap_err();
    assert_eq!(err, AnnounceError::NotV2);
    assert_eq!(err.code(), "unauthorized");
    assert!(err.to_string().contains("protocol v2"), "{err}");
}

#[test]
fn another_sensors_proof_fails() {
    let other = ExchangeKeys::derive(&sensor_key("temp-02"));
    let payload = other.announce(&body(NONCE));
    assert_eq!(
        keys().verify_announce(&payload),
        Err(AnnounceError::WrongProof)
    );
}

#[test]
fn an_envelope_that_is_not_exactly_body_and_proof_is_refused() {
    let k = keys();
    let b = body(NONCE);
    let p = k.announce_proof(&b);
    let extra = format!(
        r#"{{"body":{},"proof":"{p}","bridge":true}}"#,
        Value::String(b.clone())
    );
    let as_object = format!(r#"{{"body":{b},"proof":"{p}"}}"#);
    for payload in [extra.as_str(), as_object.as_str(), "[]", r#"{"body":"x"}"#] {
        assert_eq!(
            k.verify_announce(payload.as_bytes()),
            Err(AnnounceError::NotV2),
            "{payload}"
        );
    }
    let err = k.verify_announce(b"{").unwrap_err();
    assert_eq!(
        (err.clone(), err.code()),
        (AnnounceError::NotJson, "invalid_json")
    );
}

#[test]
fn a_proved_body_without_a_good_nonce_is_unauthorized() {
    let k = keys();
    let upper = NONCE.to_uppercase();
    let short = &NONCE[..30];
    let long = format!("{NONCE}00");
    let not_hex = format!("{}zz", &NONCE[..30]);
    for bad in [upper.as_str(), short, long.as_str(), not_hex.as_str(), ""] {
        let err = k.verify_announce(&k.announce(&body(bad))).unwrap_err();
        assert_eq!(
            (err.clone(), err.code()),
            (AnnounceError::BadNonce, "unauthorized"),
            "{bad}"
        );
    }
    let no_nonce = r#"{"name":"Greenhouse"}"#;
    assert_eq!(
        k.verify_announce(&k.announce(no_nonce)),
        Err(AnnounceError::BadNonce)
    );
    let number = r#"{"nonce":1}"#;
    assert_eq!(
        k.verify_announce(&k.announce(number)),
        Err(AnnounceError::BadNonce)
    );
    let err = k.verify_announce(&k.announce("[1]")).unwrap_err();
    assert_eq!(
        (err.clone(), err.code()),
        (AnnounceError::BodyNotObject, "invalid_json")
    );
}

#[test]
fn generated_nonces_follow_the_rule_and_differ() {
    let a = AnnounceNonce::generate();
    assert_eq!(AnnounceNonce::parse(a.as_str()), Some(a.clone()));
    assert_ne!(a, AnnounceNonce::generate());
}

#[test]
fn a_reply_round_trips_for_its_own_exchange_only() {
    let k = keys();
    let reply =
        serde_json::json!({"status": "pending", "sensor_id": SENSOR_ID, "retry_after_s": 5});
    let payload = k.authenticated_reply(&reply, &nonce()).unwrap();
    let object = k.verify_reply(&payload, &nonce()).unwrap();
    assert_eq!(object["status"], "pending");
    assert_eq!(object["nonce"], NONCE);

    let later = AnnounceNonce::generate();
    assert_eq!(
        k.verify_reply(&payload, &later),
        Err(ReplyError::OtherExchange)
    );
    let other = ExchangeKeys::derive(&sensor_key("temp-02"));
    assert_eq!(
        other.verify_reply(&payload, &nonce()),
        Err(ReplyError::WrongMac)
    );
    assert_eq!(k.authenticated_reply(&"text", &nonce()), Err(NotAnObject));
}

#[test]
fn a_reply_with_a_changed_body_or_without_mac_is_noise() {
    let k = keys();
    let reply =
        serde_json::json!({"status": "ok", "broker": {"host": "broker.qubitro.com", "port": 8883}});
    let payload = k.authenticated_reply(&reply, &nonce()).unwrap();
    let text = String::from_utf8(payload).unwrap();
    let forged = text.replace("broker.qubitro.com", "mqtt.attacker.example");
    assert_eq!(
        k.verify_reply(forged.as_bytes(), &nonce()),
        Err(ReplyError::WrongMac)
    );
    // A v1-form reply (what an unauthenticated announce gets) carries no mac.
    let v1 =
        serde_json::json!({"status": "error", "code": "unauthorized", "nonce": NONCE}).to_string();
    assert_eq!(
        k.verify_reply(v1.as_bytes(), &nonce()),
        Err(ReplyError::NotV2)
    );
    assert_eq!(k.verify_reply(b"nope", &nonce()), Err(ReplyError::NotJson));
    // The announce proof is not a reply MAC: the keys differ.
    let b = serde_json::json!({"status": "ok", "nonce": NONCE}).to_string();
    let as_reply = envelope(&b, "mac", &k.announce_proof(&b));
    assert_eq!(
        k.verify_reply(&as_reply, &nonce()),
        Err(ReplyError::WrongMac)
    );
}

#[test]
fn a_sealed_token_opens_only_for_its_sensor_device_and_nonce() {
    let k = keys();
    let n = nonce();
    let sealed = k.seal_token(SENSOR_ID, DEVICE_ID, &n, TOKEN);
    assert_ne!(
        sealed,
        k.seal_token(SENSOR_ID, DEVICE_ID, &n, TOKEN),
        "fresh GCM nonces"
    );
    assert!(!sealed.contains(&hex::encode(TOKEN)));
    assert_eq!(
        k.open_token(SENSOR_ID, DEVICE_ID, &n, &sealed).unwrap(),
        TOKEN
    );
    let later = AnnounceNonce::generate();
    assert_eq!(
        k.open_token("temp-02", DEVICE_ID, &n, &sealed),
        Err(CannotOpen)
    );
    assert_eq!(
        k.open_token(SENSOR_ID, "other-device", &n, &sealed),
        Err(CannotOpen)
    );
    assert_eq!(
        k.open_token(SENSOR_ID, DEVICE_ID, &later, &sealed),
        Err(CannotOpen)
    );
    let other = ExchangeKeys::derive(&sensor_key("temp-02"));
    assert_eq!(
        other.open_token(SENSOR_ID, DEVICE_ID, &n, &sealed),
        Err(CannotOpen)
    );
    assert_eq!(
        k.open_token(SENSOR_ID, DEVICE_ID, &n, "00"),
        Err(CannotOpen)
    );
    assert_eq!(
        k.open_token(SENSOR_ID, DEVICE_ID, &n, "zz"),
        Err(CannotOpen)
    );
}

#[test]
fn exchange_keys_differ_and_never_show_in_debug() {
    let k = keys();
    let shown = format!("{k:?}");
    for secret in [
        hex::encode(k.sensor),
        hex::encode(k.mac),
        hex::encode(k.seal),
    ] {
        assert!(!shown.contains(&secret));
    }
    assert_ne!(k.mac, k.seal);
    assert_ne!(k.mac, k.sensor);
}

/// `tests/vectors/v2.json`, which README states and two implementations outside
/// `src/` derive again (`tests/protocol_v2_vectors.rs`).
#[test]
fn the_v2_test_vectors_hold() {
    let v: serde_json::Map<String, Value> =
        serde_json::from_str(include_str!("../../tests/vectors/v2.json")).unwrap();
    let get = |name: &str| v[name].as_str().unwrap().to_string();
    let sensor_id = get("sensor_id");
    let key = SensorKey::derive(&Secret::new(get("claim_key")), &sensor_id);
    assert_eq!(key.to_hex(), get("sensor_key"));
    let k = ExchangeKeys::derive(&key);
    assert_eq!(hex::encode(k.mac), get("mac_key"));
    assert_eq!(hex::encode(k.seal), get("seal_key"));

    let body = get("announce_body");
    assert_eq!(k.announce_proof(&body), get("proof"));
    let announce = envelope(&body, "proof", &get("proof"));
    let verified = k.verify_announce(&announce).unwrap();
    assert_eq!(verified.body, body);

    let gcm_nonce: [u8; 12] = hex::decode(get("gcm_nonce")).unwrap().try_into().unwrap();
    let sealed = k.seal_token_with_gcm_nonce(
        &sensor_id,
        &get("device_id"),
        &verified.nonce,
        &get("token"),
        gcm_nonce,
    );
    assert_eq!(sealed, get("device_token_sealed"));
    assert_eq!(
        k.open_token(&sensor_id, &get("device_id"), &verified.nonce, &sealed)
            .unwrap(),
        get("token")
    );

    let reply_body = get("reply_body");
    assert_eq!(k.reply_mac(&reply_body), get("reply_mac"));
    let reply = envelope(&reply_body, "mac", &get("reply_mac"));
    let object = k.verify_reply(&reply, &verified.nonce).unwrap();
    assert_eq!(object["device_token_sealed"], sealed.as_str());
}
