//! The sensor protocol, v2 (README "Security"): an announce proves its sensor id over
//! its exact body and nonce, every answer to it carries a MAC bound to that nonce, and
//! the token goes out sealed for that sensor and that exchange alone. Run against a real (anonymous)
//! mosquitto with the shipped `[security]` defaults — proofs required, no key
//! configured, so the daemon generates one — except where a test says otherwise.
//! The sensor side (`harness::firmware`) is written from the README with RustCrypto
//! crates, never with onboardd's code.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::*;
use harness::firmware;

/// onboardd with the shipped security defaults on `state` (kept across restarts).
fn daemon_with_default_security(
    broker: &Mosquitto,
    cloud: &fake_qubitro::FakeQubitro,
    state: &Path,
    env: Vec<(String, String)>,
) -> Daemon {
    bin();
    let toml = config_toml(broker.port, cloud, state, "");
    assert!(!toml.contains("require_claim") && !toml.contains("claim_key"));
    Daemon::from_toml(state, &toml, env)
}

/// The key the daemon generated, as the sensor would have it flashed.
fn sensor_key_from_store(state: &Path, sensor: &str) -> [u8; 32] {
    firmware::sensor_key(&firmware::generated_claim_key(&store_path(state)), sensor)
}

/// What the sensors of the daemon on `state` were flashed with.
fn flashed_from_store(state: &Path) -> Flashed {
    Flashed::new(&firmware::generated_claim_key(&store_path(state)))
}

/// The next reply as it was published, checked to be an unauthenticated one (v1 form,
/// no `mac`): its JSON.
async fn unauthenticated_reply(s: &mut Sensor) -> serde_json::Value {
    let (topic, payload, _) = s.next_raw().await;
    let v: serde_json::Value = serde_json::from_slice(&payload)
        .unwrap_or_else(|_| panic!("not JSON on {topic}: {}", String::from_utf8_lossy(&payload)));
    assert!(
        v.get("mac").is_none() && v.get("body").is_none(),
        "a MAC'd reply: {v}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_an_announce_without_a_valid_v2_proof_is_unauthorized_without_a_mac_and_creates_nothing(
) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let d = daemon_with_default_security(&broker, &cloud, state.path(), vec![]);
    d.wait_subscribed();
    let key = sensor_key_from_store(state.path(), "plain-1");
    let flashed = flashed_from_store(state.path());
    let mut s = Sensor::connect_unkeyed(broker.port, "plain-1").await;

    // v1's constant proof, HMAC(sensor_key, "onboardd-announce-v1"), as its sensors sent it.
    let v1_proof = {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(&key).unwrap();
        mac.update(b"onboardd-announce-v1");
        hex::encode(mac.finalize().into_bytes())
    };
    let body = r#"{"nonce":"00112233445566778899aabbccddeeff"}"#;
    for (what, payload) in [
        ("no proof", "{}".to_string()),
        ("an empty payload", String::new()),
        (
            // What a sensor of the oldest protocol sent: its HMAC as `claim`.
            "only the old claim",
            format!(r#"{{"claim":"{}"}}"#, hex::encode(key)),
        ),
        ("a v1 proof", format!(r#"{{"proof":"{v1_proof}"}}"#)),
        (
            "a v1 proof beside a body",
            serde_json::json!({"body": body, "proof": v1_proof}).to_string(),
        ),
        ("a non-hex proof", r#"{"proof":"not hex"}"#.to_string()),
        ("another sensor's proof", flashed.announce("plain-2", "{}")),
        (
            "a body without a nonce",
            firmware::announce_v2(&key, r#"{"name":"x"}"#),
        ),
        (
            "the sensor key as proof",
            serde_json::json!({"body": body, "proof": hex::encode(key)}).to_string(),
        ),
    ] {
        s.announce_raw(&payload).await;
        let r = unauthenticated_reply(&mut s).await;
        assert_eq!(
            (r["status"].as_str(), r["code"].as_str()),
            (Some("error"), Some("unauthorized")),
            "{what}: {r}"
        );
        assert!(
            r["message"].as_str().unwrap().contains("protocol v2"),
            "{what}: {r}"
        );
        assert!(r.get("device_token").is_none() && r.get("device_token_sealed").is_none());
    }
    assert_eq!(cloud.requests().len(), 0, "no cloud call without a proof");
    assert_eq!(d.state_of("plain-1"), None, "nothing recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_v2_proof_every_reply_is_maced_for_its_announce_and_the_token_unseals_to_the_clouds_token(
) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let d = daemon_with_default_security(&broker, &cloud, state.path(), vec![]);
    d.wait_subscribed();
    let mut s = d.sensor(broker.port, "sealed-1").await;

    // `reply_with_status` reads each reply as the firmware does: MAC and nonce checked,
    // the token opened for this announce.
    s.announce(r#"{"request_id":"boot-1"}"#).await;
    let ok = s.reply_with_status("ok").await;
    assert_eq!(ok["request_id"], "boot-1");
    let nonce = d.flashed().current_nonce("sealed-1").unwrap();
    assert_eq!(ok["nonce"], nonce.as_str());
    let devices = cloud.devices();
    assert_eq!(devices.len(), 1);
    assert_opens_to_the_clouds_token(&cloud, &ok);
    // Bound to the sensor: another sensor's key does not open it.
    let other = sensor_key_from_store(state.path(), "sealed-2");
    let sealed = ok["device_token_sealed"].as_str().unwrap();
    assert!(firmware::unseal_v2(&other, "sealed-1", &devices[0].id, &nonce, sealed).is_err());

    // Known sensor, answered from the store: sealed for the new announce's nonce.
    s.announce("{}").await;
    let again = s.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &again);
    assert_ne!(again["nonce"], ok["nonce"]);
    // And without a proof, a known sensor gets nothing it would act on.
    s.announce_raw("{}").await;
    assert_eq!(unauthenticated_reply(&mut s).await["code"], "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_claim_key_is_private_64_hex_and_a_newline_and_kept_across_restarts() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let mut d = daemon_with_default_security(&broker, &cloud, state.path(), vec![]);
    d.wait_subscribed();
    d.log.wait_for("generated this gateway's claim key");
    let path = store_path(state.path()).join("claim-key");
    let key = firmware::generated_claim_key(&store_path(state.path()));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "claim-key mode {mode:o}");
    assert!(!d.log.text().contains(&key), "the key is never logged");

    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    d.spawn();
    d.wait_subscribed();
    assert_eq!(
        firmware::generated_claim_key(&store_path(state.path())),
        key
    );
    assert!(!d.log.text().contains("generated this gateway's claim key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboardd_claim_prints_the_sensor_key_and_without_a_key_says_how_to_get_one_creating_nothing(
) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    // As an operator's shell or a factory station would have it: no API key.
    let toml = config_toml(broker.port, &cloud, state.path(), "").replace(
        &format!("api_key = \"{}\"", cloud.api_key()),
        "api_key = \"\"",
    );
    let config = state.path().join("claim.toml");
    std::fs::write(&config, toml).unwrap();
    let claim = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .arg("claim")
            .args(args)
            .env_remove("ONBOARDD_CLAIM_KEY_FILE")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config_arg = config.to_str().unwrap();

    let (code, out, err) = claim(&["--config", config_arg, "temp-01"]);
    assert_ne!(code, Some(0));
    assert_eq!(out, "");
    assert!(
        err.contains("no claim key yet") && err.contains("Start the daemon once"),
        "{err}"
    );
    assert!(err.contains("claim_key_file"), "{err}");
    let store = store_path(state.path());
    assert!(
        std::fs::read_dir(&store).unwrap().next().is_none(),
        "created nothing"
    );

    let d = daemon_with_default_security(&broker, &cloud, state.path(), vec![]);
    d.wait_subscribed();
    let generated = firmware::generated_claim_key(&store);
    let expected = format!(
        "{}\n",
        hex::encode(firmware::sensor_key(&generated, "temp-01"))
    );
    let (code, out, err) = claim(&["--config", config_arg, "temp-01"]);
    assert_eq!((code, out.as_str()), (Some(0), expected.as_str()), "{err}");
    let key_file = store.join("claim-key");
    let (code, out, _) = claim(&["--key-file", key_file.to_str().unwrap(), "temp-01"]);
    assert_eq!((code, out.as_str()), (Some(0), expected.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_require_claim_a_warning_names_it_and_plain_announces_get_clear_tokens_but_never_for_a_v2_sensor(
) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let warning = "security.require_claim = false";
    // What this test is about: proofs optional.
    let mut d = Daemon::with_state(
        broker.port,
        &cloud,
        state.path(),
        "[security]\nrequire_claim = false",
        vec![],
    );
    d.wait_subscribed();
    d.log.wait_for(warning);

    let mut plain = Sensor::connect_unkeyed(broker.port, "open-1").await;
    plain.announce("{}").await;
    let ok = plain.reply_with_status("ok").await;
    let token = &cloud.devices()[0].token;
    assert_eq!(ok["device_token"], token.as_str(), "in clear, as asked");
    assert!(ok.get("device_token_sealed").is_none());

    let flashed = flashed_from_store(state.path());
    let mut proven = Sensor::connect(broker.port, "proven-1", &flashed).await;
    proven.announce("{}").await;
    assert_opens_to_the_clouds_token(&cloud, &proven.reply_with_status("ok").await);

    let mut wrong = Sensor::connect_unkeyed(broker.port, "wrong-1").await;
    wrong.announce(&flashed.announce("proven-1", "{}")).await;
    assert_eq!(
        unauthenticated_reply(&mut wrong).await["code"],
        "unauthorized"
    );
    assert!(cloud_devices_of(&cloud, "wrong-1").is_empty());

    // A sensor onboarded with a proof is never answered a plain announce: proofs off
    // must not hand its token to whoever names it.
    proven.announce_raw("{}").await;
    let r = unauthenticated_reply(&mut proven).await;
    assert_eq!(r["code"], "unauthorized", "{r}");
    assert!(!r
        .to_string()
        .contains(&cloud_devices_of(&cloud, "proven-1")[0].token));

    // At every start.
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    d.spawn();
    d.wait_subscribed();
    d.log.wait_for(warning);
}

/// Everything published on the broker while `scenario` runs, as a client subscribed
/// to `#` sees it: (topic, payload).
async fn everything_published(spy: &mut Sensor) -> Vec<(String, String)> {
    spy.announce_on("spy/end", "end").await;
    let mut seen = Vec::new();
    loop {
        let (topic, payload, _) = spy.next_raw().await;
        if topic == "spy/end" {
            return seen;
        }
        seen.push((topic, String::from_utf8_lossy(&payload).into_owned()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs failpoints: cargo test --workspace --features failpoints"
)]
async fn a_client_subscribed_to_everything_never_sees_a_token_or_a_sensor_key() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // The first create fails: the sensor waits, and announces again meanwhile.
    cloud.push_faults(fake_qubitro::Endpoint::Create, vec![status_fault(500)]);
    let state = tempfile::tempdir().unwrap();
    let mut d = daemon_with_default_security(&broker, &cloud, state.path(), vec![]);
    d.wait_subscribed();
    let mut spy = Sensor::connect_as(broker.port, "spy", "#", None, None).await;

    // A new sensor: pending, a second announce waiting with it, then ok to both, each
    // MAC'd for its own announce (read here as the two announces' sensor would).
    let flashed = flashed_from_store(state.path());
    let key = flashed.key_of("watched-1");
    let mut s = Sensor::connect_unkeyed(broker.port, "watched-1").await;
    s.announce(&flashed.announce("watched-1", r#"{"request_id":"r1"}"#))
        .await;
    let first = flashed.current_nonce("watched-1").unwrap();
    let (_, pending, _) = s.next_raw().await;
    let pending = firmware::verify_reply(&key, &pending, &first).unwrap();
    assert_eq!(pending["status"], "pending");
    s.announce(&flashed.announce("watched-1", r#"{"request_id":"r2"}"#))
        .await;
    let second = flashed.current_nonce("watched-1").unwrap();
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let (_, payload, _) = s.next_raw().await;
        let (r, nonce) = match firmware::verify_reply(&key, &payload, &first) {
            Ok(r) => (r, &first),
            Err(_) => (
                firmware::verify_reply(&key, &payload, &second).unwrap(),
                &second,
            ),
        };
        if r["status"] == "ok" {
            let device = cloud_devices_of(&cloud, "watched-1").remove(0);
            let sealed = r["device_token_sealed"].as_str().unwrap();
            let token = firmware::unseal_v2(&key, "watched-1", &device.id, nonce, sealed).unwrap();
            assert_eq!(token, device.token);
            answered.push(r["request_id"].as_str().unwrap().to_string());
        }
    }
    answered.sort();
    assert_eq!(answered, ["r1", "r2"], "the waiting route was answered too");
    // A re-announce, answered from the store, for its own nonce.
    s.announce(&flashed.announce("watched-1", "{}")).await;
    let third = flashed.current_nonce("watched-1").unwrap();
    let (_, payload, _) = s.next_raw().await;
    assert_eq!(
        firmware::verify_reply(&key, &payload, &third).unwrap()["status"],
        "ok"
    );

    // A restart with a reply still owed: killed once `Created` is on disk, before the
    // reply left; the next start publishes it again from the store.
    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));
    d.set_env(onboardd::failpoint::ENV, "after_created_recorded");
    d.spawn();
    d.wait_subscribed();
    let key2 = flashed.key_of("watched-2");
    let mut s2 = Sensor::connect(broker.port, "watched-2", &flashed).await;
    s2.announce_acked("{}").await;
    d.wait_exit_async().await;
    d.clear_env();
    d.spawn();
    let ok = s2.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &ok);
    assert!(
        d.log.text().contains("publishing again"),
        "the reply came from the republish: {}",
        d.log.text()
    );

    let seen = everything_published(&mut spy).await;
    let claim_key = firmware::generated_claim_key(&store_path(state.path()));
    let mut secrets = vec![claim_key, hex::encode(key), hex::encode(key2)];
    secrets.extend(cloud.devices().into_iter().map(|d| d.token));
    for (topic, payload) in &seen {
        for secret in &secrets {
            assert!(
                !payload.contains(secret.as_str()),
                "a secret crossed the broker on {topic}: {payload}"
            );
        }
    }
    let sealed_replies = seen
        .iter()
        .filter(|(t, p)| t.starts_with("onboard/reply/") && p.contains("device_token_sealed"))
        .count();
    assert!(sealed_replies >= 4, "the spy saw the replies: {seen:?}");
    assert!(seen.iter().any(|(t, _)| t == "onboard/announce/watched-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_moved_aside_keeps_the_claim_key_the_sensors_hold() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let db = store_path(state.path());
    // A key made earlier (sensors were flashed with keys from it), then sled's files
    // turned unreadable.
    let key_text = "7f".repeat(32);
    std::fs::write(db.join("claim-key"), format!("{key_text}\n")).unwrap();
    std::fs::set_permissions(db.join("claim-key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(db.join("conf"), b"\xff\xfe not a sled config").unwrap();
    std::fs::write(db.join("db"), vec![0xA5; 8192]).unwrap();

    let d = daemon_with_default_security(&broker, &cloud, state.path(), vec![]);
    d.log.wait_for_async("DATABASE UNREADABLE").await;
    d.wait_subscribed();
    assert_eq!(firmware::generated_claim_key(&db), key_text);
    let mut s = Sensor::connect(broker.port, "kept-1", &Flashed::new(&key_text)).await;
    s.announce("{}").await;
    let ok = s.reply_with_status("ok").await;
    assert_eq!(ok.token(), cloud_devices_of(&cloud, "kept-1")[0].token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs failpoints: cargo test --workspace --features failpoints"
)]
async fn a_reply_owed_to_a_plain_announce_is_never_published_once_proofs_are_required_and_a_v2_announce_gets_it_sealed(
) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    // Proofs off (what this test starts from): an announce without one, and the daemon
    // dies before its reply left.
    let mut d = Daemon::with_state(
        broker.port,
        &cloud,
        state.path(),
        "[security]\nrequire_claim = false",
        vec![(
            onboardd::failpoint::ENV.into(),
            "after_created_recorded".into(),
        )],
    );
    d.wait_subscribed();
    let mut s = Sensor::connect_unkeyed(broker.port, "legacy-1").await;
    s.announce_acked("{}").await;
    d.wait_exit_async().await;

    // Proofs on: the reply owed to that plain announce would carry the token in clear;
    // it stays unpublished, and the sensor's first v2 announce is answered, sealed.
    let mut spy = Sensor::connect_as(broker.port, "spy", "#", None, None).await;
    let mut d = daemon_with_default_security(&broker, &cloud, state.path(), vec![]);
    d.wait_subscribed();
    let mut flashed = d.sensor(broker.port, "legacy-1").await;
    flashed.announce("{}").await;
    assert_opens_to_the_clouds_token(&cloud, &flashed.reply_with_status("ok").await);
    assert_eq!(cloud_devices_of(&cloud, "legacy-1").len(), 1);
    let token = cloud_devices_of(&cloud, "legacy-1").remove(0).token;
    let seen = everything_published(&mut spy).await;
    assert!(
        seen.iter().all(|(_, p)| !p.contains(&token)),
        "the token crossed the broker in clear: {seen:?}"
    );
    assert!(seen
        .iter()
        .any(|(t, p)| t == "onboard/reply/legacy-1" && p.contains("\"mac\"")));
    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));
}

/// What every test's daemon runs with (the harness's default config): the shipped
/// `[security]` and a state directory laid out as systemd's `StateDirectory=` with
/// `DynamicUser=` lays out `/var/lib/onboardd`, a symlink to a private directory. The
/// daemon works through the symlink, running and stopped, and never replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_symlinked_state_directory_a_flashed_sensor_is_onboarded_and_an_unsigned_one_is_not(
) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let store = d.store_path();
    let is_link = |p: &Path| {
        std::fs::symlink_metadata(p)
            .unwrap()
            .file_type()
            .is_symlink()
    };
    assert!(is_link(&store), "{} is a symlink", store.display());
    let private = std::fs::canonicalize(&store).unwrap();
    assert!(
        private.join(firmware::CLAIM_KEY_FILE).is_file(),
        "the key is generated behind the symlink"
    );

    let mut unsigned = Sensor::connect_unkeyed(broker.port, "unsigned-1").await;
    unsigned.announce("{}").await;
    assert_eq!(unsigned.reply().await["code"], "unauthorized");
    let mut flashed = d.sensor(broker.port, "flashed-1").await;
    flashed.announce("{}").await;
    assert_opens_to_the_clouds_token(&cloud, &flashed.reply().await);
    assert_eq!(cloud.devices().len(), 1, "nothing for the unsigned one");

    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));
    let (code, table, err) = d.devices(&["list"]);
    assert_eq!(
        code, 0,
        "the CLI opens the store through the symlink: {err}"
    );
    assert!(table.contains("flashed-1"), "{table}");
    assert!(is_link(&store), "still the symlink systemd made");
}
