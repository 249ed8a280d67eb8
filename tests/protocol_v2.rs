//! Protocol v2 against an attacker on an open broker (README "Security"): a real
//! anonymous mosquitto, on which the attacker subscribes to everything it likes and
//! publishes whatever it captured or forged. The sensor side is `harness::firmware`,
//! written from the protocol text with RustCrypto crates; every check of what the
//! record became goes through `onboardd devices show` or the fake Qubitro, never a
//! counter.

mod common;

use common::*;
use serde_json::{json, Value};

/// An attacker on the open broker, subscribed to one sensor's announces and replies.
async fn attacker(port: u16, sensor: &str) -> Sensor {
    Sensor::connect_as(port, "attacker", &format!("onboard/+/{sensor}"), None, None).await
}

/// The next message on `topic` the attacker sees (others skipped): its payload.
async fn next_on(attacker: &mut Sensor, topic: &str) -> Vec<u8> {
    loop {
        let (t, payload, _) = attacker.next_raw().await;
        if t == topic {
            return payload;
        }
    }
}

/// A payload's JSON.
fn json_of(payload: &[u8]) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(payload)))
}

/// The attacker's view of an unauthenticated reply: v1 form, no MAC; its JSON.
fn unauthenticated(payload: &[u8]) -> Value {
    let v = json_of(payload);
    assert!(
        v.get("mac").is_none() && v.get("body").is_none(),
        "a MAC'd reply to a forged announce: {v}"
    );
    v
}

/// `devices show` of `sensor` as JSON.
fn shown(d: &Daemon, sensor: &str) -> Value {
    let (code, out, err) = d.devices(&["show", sensor]);
    assert_eq!(code, 0, "devices show {sensor}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The sensor's announce as the attacker captured it: `(body, proof)`.
fn captured(payload: &[u8]) -> (String, String) {
    let v = json_of(payload);
    (
        v["body"].as_str().expect("a v2 body").to_owned(),
        v["proof"].as_str().expect("a v2 proof").to_owned(),
    )
}

const ANNOUNCE: &str = "onboard/announce/temp-01";
const REPLY: &str = "onboard/reply/temp-01";

/// A daemon (the shipped defaults plus `extra`), an attacker watching `temp-01`, and
/// `temp-01` onboarded by announcing `fields`, with what the attacker captured of it.
struct Scene {
    broker: Mosquitto,
    cloud: fake_qubitro::FakeQubitro,
    d: Daemon,
    eve: Sensor,
    s: Sensor,
    /// The sensor's ok, as it read it.
    ok: Reply,
    /// Its announce and the ok, as they crossed the broker.
    announce: Vec<u8>,
    reply: Vec<u8>,
}

async fn onboarded(extra: &str, fields: &str) -> Scene {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, extra);
    let mut eve = attacker(broker.port, "temp-01").await;
    let mut s = d.sensor(broker.port, "temp-01").await;
    s.announce(fields).await;
    let ok = s.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &ok);
    let announce = next_on(&mut eve, ANNOUNCE).await;
    // The one reply to a new sensor's announce: its ok.
    let reply = next_on(&mut eve, REPLY).await;
    Scene {
        broker,
        cloud,
        d,
        eve,
        s,
        ok,
        announce,
        reply,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_proof_replayed_with_bridge_changed_is_unauthorized_and_the_record_is_unchanged()
{
    let Scene {
        broker: _broker,
        cloud,
        d,
        mut eve,
        mut s,
        announce,
        ..
    } = onboarded("", r#"{"name":"Greenhouse"}"#).await;
    let (body, proof) = captured(&announce);
    let before = shown(&d, "temp-01");
    assert_ne!(before["bridged"], true, "{before}");

    // The body edited, the captured proof beside it: re-signing needs the key.
    let edited = body.replacen('{', r#"{"bridge":true,"name":"Evil","#, 1);
    let forged = json!({"body": edited, "proof": proof}).to_string();
    eve.publish(ANNOUNCE, forged.as_bytes(), false).await;
    let r = unauthenticated(&next_on(&mut eve, REPLY).await);
    assert_eq!(
        (r["status"].as_str(), r["code"].as_str()),
        (Some("error"), Some("unauthorized")),
        "{r}"
    );
    assert!(
        r["message"].as_str().unwrap().contains("protocol v2"),
        "{r}"
    );

    assert_eq!(shown(&d, "temp-01"), before, "the record is unchanged");
    let devices = cloud.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].name, "Greenhouse");
    // And the sensor still gets its own token, not bridged.
    s.announce("{}").await;
    let ok = s.reply_with_status("ok").await;
    assert!(ok.get("bridged").is_none(), "{ok}");
    assert_opens_to_the_clouds_token(&cloud, &ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_proof_with_bridge_true_is_unauthorized_and_bridges_nothing() {
    let Scene {
        broker: _broker,
        d,
        mut eve,
        s: _s,
        ..
    } = onboarded("", "{}").await;
    let before = shown(&d, "temp-01");

    // v1's constant proof, HMAC(sensor_key, "onboardd-announce-v1"): as the issue's
    // attacker replayed it (computed here with the key, which is more than they had).
    let key = d.flashed().key_of("temp-01");
    let v1_proof = {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(&key).unwrap();
        mac.update(b"onboardd-announce-v1");
        hex::encode(mac.finalize().into_bytes())
    };
    let v1 = json!({"proof": v1_proof, "bridge": true}).to_string();
    eve.publish(ANNOUNCE, v1.as_bytes(), false).await;
    let r = unauthenticated(&next_on(&mut eve, REPLY).await);
    assert_eq!(r["code"], "unauthorized", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("protocol v2"),
        "{r}"
    );
    assert_eq!(shown(&d, "temp-01"), before, "the record is unchanged");
    assert_ne!(shown(&d, "temp-01")["bridged"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_announce_replayed_whole_is_answered_from_the_record_without_a_second_device_or_spending_the_cap(
) {
    // Room for two new devices an hour: a replay counted even once would leave none
    // for the second sensor.
    let extra = "[security]\nmax_new_devices_per_hour = 2";
    let Scene {
        broker,
        cloud,
        d,
        mut eve,
        ok,
        announce,
        s: _s,
        ..
    } = onboarded(extra, r#"{"request_id":"boot"}"#).await;
    let before = shown(&d, "temp-01");

    for _ in 0..3 {
        eve.publish(ANNOUNCE, &announce, false).await;
        let payload = next_on(&mut eve, REPLY).await;
        let replayed = json_of(
            json_of(&payload)["body"]
                .as_str()
                .expect("MAC'd")
                .as_bytes(),
        );
        assert_eq!(replayed["status"], "ok", "{replayed}");
        assert_eq!(
            replayed["device_id"], ok["device_id"],
            "answered from the record"
        );
        assert_eq!(
            replayed["nonce"], ok["nonce"],
            "bound to the captured announce"
        );
    }
    assert_eq!(
        cloud_devices_of(&cloud, "temp-01").len(),
        1,
        "no second device"
    );
    assert_eq!(shown(&d, "temp-01"), before, "the record is unchanged");

    let mut other = d.sensor(broker.port, "temp-02").await;
    other.announce("{}").await;
    let ok2 = other.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &ok2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_announce_carrying_the_sensors_current_nonce_gets_a_reply_without_a_mac_that_the_sensor_ignores(
) {
    let Scene {
        broker: _broker,
        cloud,
        d,
        mut eve,
        announce,
        s: _s,
        ..
    } = onboarded("", "{}").await;
    let (body, proof) = captured(&announce);
    let nonce = json_of(body.as_bytes())["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(d.flashed().current_nonce("temp-01"), Some(nonce.clone()));

    let forged_body = json!({"nonce": nonce, "bridge": true}).to_string();
    for forged in [
        json!({"body": forged_body, "proof": proof}),
        json!({"body": forged_body, "proof": "00".repeat(32)}),
    ] {
        eve.publish(ANNOUNCE, forged.to_string().as_bytes(), false)
            .await;
        let payload = next_on(&mut eve, REPLY).await;
        let r = unauthenticated(&payload);
        assert_eq!(r["code"], "unauthorized", "{r}");
        let ignored = d.flashed().open_reply("temp-01", &payload);
        assert!(ignored.is_err(), "the sensor would act on {r}");
    }
    assert_ne!(
        shown(&d, "temp-01")["bridged"],
        true,
        "the forgeries changed nothing"
    );
    assert_eq!(cloud_devices_of(&cloud, "temp-01").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_old_sealed_ok_or_one_with_another_broker_does_not_verify_for_the_sensors_new_announce(
) {
    let Scene {
        broker: _broker,
        cloud,
        d,
        mut eve,
        mut s,
        reply: old_ok,
        ..
    } = onboarded("", "{}").await;
    let flashed = d.flashed();
    assert!(
        flashed.open_reply("temp-01", &old_ok).is_ok(),
        "genuine for its announce"
    );

    // The sensor announces again (a reboot): the old ok answers another exchange.
    s.announce("{}").await;
    let fresh = s.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &fresh);
    let err = flashed.open_reply("temp-01", &old_ok).unwrap_err();
    assert!(err.contains("another announce"), "{err}");

    // The old ok with the new nonce or another broker host written into its body: the
    // MAC no longer verifies.
    let v = json_of(&old_ok);
    let old_body = v["body"].as_str().unwrap();
    let old_nonce = json_of(old_body.as_bytes())["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    let current = flashed.current_nonce("temp-01").unwrap();
    let mut elsewhere = json_of(old_body.as_bytes());
    elsewhere["broker"]["host"] = json!("mqtt.attacker.example");
    for edited in [
        old_body.replace(&old_nonce, &current),
        elsewhere.to_string(),
    ] {
        let forged = json!({"body": edited, "mac": v["mac"]}).to_string();
        eve.publish(REPLY, forged.as_bytes(), true).await;
        // The forgery as it crossed the broker (the sensor's own replies may come first).
        let echoed = loop {
            let payload = next_on(&mut eve, REPLY).await;
            if payload == forged.as_bytes() {
                break payload;
            }
        };
        let err = flashed.open_reply("temp-01", &echoed).unwrap_err();
        assert!(
            err.contains("mac does not verify") || err.contains("another announce"),
            "{err}"
        );
    }
    // The retained forgery stays noise for the sensor, which still holds its token.
    assert_eq!(fresh.token(), cloud_devices_of(&cloud, "temp-01")[0].token);
    eve.publish(REPLY, b"", true).await;
}
