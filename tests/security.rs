//! Security: allow/deny rules, flood limits, and no secret in any log. The announce
//! proof and the sealed token have their own file, tests/proof.rs.

mod common;

use common::*;
use fake_qubitro::Endpoint;
use harness::firmware;

const CLAIM_KEY: &str = "fleet-claim-key-0123456789abcdefghij";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rules_win_over_allow_rules_and_cost_no_cloud_call() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(
        &broker,
        &cloud,
        "[security]\nallow_sensor_ids = [\"farm-*\"]\ndeny_sensor_ids = [\"farm-x*\"]\nallow_brands = [\"Acme\", \"Custom\"]",
    );
    let mut denied = d.sensor(broker.port, "farm-x1").await;
    denied.announce("{}").await;
    assert_eq!(denied.reply().await["code"], "denied");
    let mut stranger = d.sensor(broker.port, "city-1").await;
    stranger.announce("{}").await;
    assert_eq!(stranger.reply().await["code"], "denied");
    let mut wrong_brand = d.sensor(broker.port, "farm-2").await;
    wrong_brand.announce(r#"{"brand":"Evil"}"#).await;
    assert_eq!(wrong_brand.reply().await["code"], "denied");
    assert_eq!(cloud.requests().len(), 0);
    wrong_brand.announce(r#"{"brand":"Acme"}"#).await;
    assert_opens_to_the_clouds_token(&cloud, &wrong_brand.reply().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hourly_cap_answers_rate_limited_and_known_sensors_still_get_their_token() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "[security]\nmax_new_devices_per_hour = 3");
    let mut all = d.fleet(broker.port).await;
    let mut tokens = Vec::new();
    for i in 0..3 {
        all.announce_on(&format!("onboard/announce/ok-{i}"), "{}")
            .await;
        let r = all.next().await.1;
        assert_eq!(r["status"], "ok", "{r}");
        assert_opens_to_the_clouds_token(&cloud, &r);
        tokens.push(r.token().to_string());
    }
    for i in 0..20 {
        all.announce_on(&format!("onboard/announce/flood-{i}"), "{}")
            .await;
        let r = all.next().await.1;
        assert_eq!(r["code"], "rate_limited", "{r}");
    }
    assert_eq!(cloud.count(Endpoint::Create), 3);
    all.announce_on("onboard/announce/ok-1", "{}").await;
    let r = all.next().await.1;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r.token(), tokens[1], "its token, from the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sensor_announcing_again_within_its_cooldown_is_rate_limited() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.push_faults(Endpoint::Create, vec![status_fault(400)]);
    let d = Daemon::start(&broker, &cloud, "[security]\nnew_sensor_cooldown_s = 3600");
    let mut s = d.sensor(broker.port, "eager").await;
    s.announce("{}").await;
    assert_eq!(s.reply().await["code"], "rejected_by_cloud");
    s.announce("{}").await;
    assert_eq!(s.reply().await["code"], "rate_limited");
    assert_eq!(cloud.count(Endpoint::Create), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_appears_in_the_output_even_at_trace_level() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.push_faults(Endpoint::Create, vec![status_fault(500)]);
    let mut d = Daemon::start(
        &broker,
        &cloud,
        &format!("[log]\nlevel = \"trace\"\n[security]\nrequire_claim = true\nclaim_key = \"{CLAIM_KEY}\""),
    );
    let mut secrets = vec![cloud.api_key(), CLAIM_KEY.to_string()];
    for i in 0..5 {
        let id = format!("secret-{i}");
        let key = firmware::sensor_key(CLAIM_KEY, &id);
        secrets.extend([hex::encode(key), hex::encode(firmware::seal_key(&key))]);
        // Flashed from the configured key (the daemon generates none).
        let mut s = Sensor::connect(broker.port, &id, &Flashed::new(CLAIM_KEY)).await;
        s.announce("{}").await;
        let ok = s.reply_with_status("ok").await;
        assert_opens_to_the_clouds_token(&cloud, &ok);
        // Re-announce: the cached path too.
        s.announce("{}").await;
        s.reply_with_status("ok").await;
    }
    secrets.extend(cloud.devices().into_iter().map(|d| d.token));
    // A bad proof: the refusal path.
    let mut s = Sensor::connect_unkeyed(broker.port, "secret-bad").await;
    s.announce_raw(r#"{"proof":"00"}"#).await;
    s.reply().await;
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    let out = d.log.text();
    assert!(
        out.contains("TRACE") || out.contains("trace"),
        "ran at trace level"
    );
    assert_eq!(secrets.len(), 2 + 5 * 2 + 5);
    for secret in secrets {
        assert!(!out.contains(&secret), "a secret leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_can_come_from_a_systemd_credential_file() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(
        creds.path().join("qubitro-api-key"),
        format!("{}\n", cloud.api_key()),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    // The config names the file relative to $CREDENTIALS_DIRECTORY and holds no key.
    let mut toml = config_toml(broker.port, &cloud, state.path(), "");
    toml = toml.replace(
        &format!("api_key = \"{}\"", cloud.api_key()),
        "api_key_file = \"qubitro-api-key\"",
    );
    assert!(!toml.contains(&cloud.api_key()));
    let d = Daemon::from_toml(
        state.path(),
        &toml,
        vec![(
            "CREDENTIALS_DIRECTORY".into(),
            creds.path().display().to_string(),
        )],
    );
    d.wait_subscribed();
    let mut s = d.sensor(broker.port, "cred-1").await;
    s.announce("{}").await;
    // Accepted with the key from the file.
    assert_opens_to_the_clouds_token(&cloud, &s.reply().await);
}

#[test]
fn a_config_file_with_a_secret_readable_by_others_draws_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_a_readable_secret(dir.path(), "QB_visible");
    let out = std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("readable by other users"), "{err}");
    assert!(
        !err.contains("QB_visible") && !String::from_utf8_lossy(&out.stdout).contains("QB_visible")
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("readable by other users"));
}
