//! Hardening against bad input and local access, apart from the claim protocol:
//! retained announces are ignored, MQTT 5 properties are bounded, a create Qubitro
//! rejected is not retried at every re-announce, the store is private without systemd, and the control socket serves only root and
//! the daemon's own user, tokens only when asked for. Against a real mosquitto and
//! the fake Qubitro.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use common::*;
use fake_qubitro::Endpoint;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Publishes a retained QoS 1 announce and returns once the broker acknowledged it.
fn publish_retained(port: u16, sensor: &str, payload: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-V", "5", "-h", "127.0.0.1", "-q", "1", "-r"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-t")
        .arg(format!("onboard/announce/{sensor}"))
        .arg("-m")
        .arg(payload)
        .output()
        .expect("run mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_announces_create_nothing_before_during_or_after_a_restart() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // Retained before onboardd ever subscribed (so before it had a key to sign with:
    // the broker never delivers it, which the log shows below).
    publish_retained(broker.port, "ret-before", r#"{"name":"old"}"#);
    let mut d = Daemon::start(&broker, &cloud, "");
    // Retained while it runs, signed as its sensor would: delivered to it live, with
    // the retain flag kept.
    let live = d.flashed().announce("ret-live", r#"{"name":"live"}"#);
    publish_retained(broker.port, "ret-live", &live);
    // An ordinary announce after both: once it is answered, the retained one before
    // it (same subscription, in order) has been seen and dropped.
    let mut s = d.sensor(broker.port, "plain-1").await;
    s.announce("{}").await;
    assert_opens_to_the_clouds_token(&cloud, &s.reply().await);
    d.log
        .wait_for("retained announce of sensor ret-live dropped");

    // A restart subscribes again: the broker still holds both retained messages.
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    d.spawn();
    d.wait_subscribed();
    let mut s2 = d.sensor(broker.port, "plain-2").await;
    s2.announce("{}").await;
    assert_opens_to_the_clouds_token(&cloud, &s2.reply().await);

    assert_eq!(
        cloud.count(Endpoint::Create),
        2,
        "only the two plain sensors"
    );
    for id in ["ret-before", "ret-live"] {
        assert!(cloud_devices_of(&cloud, id).is_empty(), "{id}");
        assert_eq!(d.state_of(id), None, "{id} is not recorded");
    }
    assert_eq!(
        d.log.count("retained announce of sensor ret-before"),
        0,
        "Retain Handling 2: the broker never even sends the old retained copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_mqtt5_properties_get_invalid_field_on_the_default_reply_topic() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "props-1").await;
    let within = |suffix: &str| format!("onboard/reply/props-1/{suffix}");

    let long_topic = within(&"t".repeat(256));
    assert!(long_topic.len() > 256);
    for (topic, corr, what) in [
        (long_topic.clone(), vec![1u8; 8], "response topic"),
        (within("ok"), vec![7u8; 65], "correlation data"),
    ] {
        let props = PublishProperties {
            response_topic: Some(topic),
            correlation_data: Some(Bytes::from(corr)),
            ..Default::default()
        };
        s.announce_with_props(r#"{"request_id":"big-props"}"#, props)
            .await;
        let (t, r, c) = s.next().await;
        assert_eq!(t, "onboard/reply/props-1", "{what}: the default topic");
        assert_eq!(c, None, "{what}: no correlation data echoed");
        assert_eq!(r["code"], "invalid_field", "{what}: {r}");
        assert_eq!(r["request_id"], "big-props", "{what}");
        assert!(r["message"].as_str().unwrap().contains(what), "{r}");
    }
    assert_eq!(cloud.count(Endpoint::Create), 0);
    assert_eq!(d.state_of("props-1"), None, "nothing stored");

    // At the limits: honoured.
    let at_limit = within(&"t".repeat(256 - within("").len()));
    assert_eq!(at_limit.len(), 256);
    let props = PublishProperties {
        response_topic: Some(at_limit.clone()),
        correlation_data: Some(Bytes::from(vec![9u8; 64])),
        ..Default::default()
    };
    s.announce_with_props("{}", props).await;
    let (t, r, c) = s.next().await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(t, at_limit);
    assert_eq!(c, Some(vec![9u8; 64]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_create_is_not_retried_for_the_same_announce_but_a_changed_one_is_tried_at_once()
{
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    cloud.push_faults(Endpoint::Create, vec![refused_fault("brand unknown")]);
    let mut s = d.sensor(broker.port, "rej-2").await;
    s.announce(r#"{"brand":"Nope","request_id":"a"}"#).await;
    let r = s.reply().await;
    assert_eq!(r["code"], "rejected_by_cloud", "{r}");
    assert_eq!(cloud.count(Endpoint::Create), 1);

    // The same spec again (another request id): refused from memory, no cloud call.
    for rid in ["b", "c"] {
        s.announce(&format!(r#"{{"brand":"Nope","request_id":"{rid}"}}"#))
            .await;
        let r = s.reply().await;
        assert_eq!(r["code"], "rejected_by_cloud", "{r}");
        assert_eq!(r["request_id"], rid);
        let after = r["retry_after_s"].as_u64().expect("retry_after_s");
        assert!((1..=30).contains(&after), "{r}");
        assert!(
            r["message"].as_str().unwrap().contains("brand unknown"),
            "{r}"
        );
    }
    assert_eq!(
        cloud.count(Endpoint::Create),
        1,
        "no create for the same spec"
    );

    // Corrected: tried at once.
    s.announce(r#"{"brand":"Acme"}"#).await;
    let r = s.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &r);
    assert_eq!(cloud.count(Endpoint::Create), 2);
}

/// Every path below `dir` with its mode (directories included).
fn modes_below(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        out.push((p.display().to_string(), meta.mode() & 0o777));
        if meta.is_dir() {
            out.extend(modes_below(&p));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_by_hand_under_umask_022_the_store_is_owner_only_and_loose_secret_files_are_named() {
    // What a shell gives by default; the daemon inherits it.
    // SAFETY: umask(2) cannot fail; the test's own files are not secret.
    unsafe { libc::umask(0o022) };
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("api-key");
    std::fs::write(&key_file, format!("{}\n", cloud.api_key())).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Run by hand, no systemd to make the state directory: the daemon makes its store
    // itself, so store.path names one that does not exist yet.
    let state = tempfile::tempdir().unwrap();
    let by_hand = state.path().join("by-hand");
    let d = Daemon::with_state(
        broker.port,
        &cloud,
        state.path(),
        &format!(
            "[qubitro]\napi_key_file = \"{}\"\n[store]\npath = \"{}\"",
            key_file.display(),
            by_hand.display()
        ),
        vec![],
    );
    d.wait_subscribed();
    let mut s = d.sensor(broker.port, "umask-1").await;
    s.announce("{}").await;
    assert_opens_to_the_clouds_token(&cloud, &s.reply().await);

    let store = d.store_path();
    assert_eq!(store, by_hand);
    let mode = std::fs::metadata(&store).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "the store directory");
    let below = modes_below(&store);
    assert!(!below.is_empty());
    for (path, mode) in &below {
        assert_eq!(mode & 0o077, 0, "{path} has mode {mode:o}");
    }
    let sock = std::fs::metadata(d.state_dir.join("onboardd.sock")).unwrap();
    assert_eq!(sock.mode() & 0o777, 0o600);
    d.log.wait_for(&format!(
        "qubitro.api_key_file: {} is readable by group or others (mode 644)",
        key_file.display()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_open_to_others_is_warned_about_with_the_fix() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let store = store_path(state.path());
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::with_state(broker.port, &cloud, state.path(), "", vec![]);
    d.wait_subscribed();
    d.log.wait_for(&format!(
        "the store {} is open to group or others (mode 755) and holds every device token: chmod 700 {}",
        store.display(),
        store.display()
    ));
}

/// One raw request line on the control socket, and its answer.
async fn control(socket: &Path, request: &str) -> Value {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    let mut lines = BufReader::new(r).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    serde_json::from_str(&line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_sends_tokens_only_when_asked_and_refuses_other_users() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "sock-1").await;
    s.announce("{}").await;
    let ok = s.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &ok);
    let token = ok.token().to_string();
    let socket = d.state_dir.join("onboardd.sock");

    let plain = control(&socket, r#"{"cmd":"list"}"#).await;
    assert_eq!(plain["devices"][0]["sensor_id"], "sock-1");
    assert!(!plain.to_string().contains(&token), "{plain}");
    let plain = control(&socket, r#"{"cmd":"show","sensor_id":"sock-1"}"#).await;
    assert!(!plain.to_string().contains(&token), "{plain}");
    let asked = control(&socket, r#"{"cmd":"list","with_tokens":true}"#).await;
    assert_eq!(asked["devices"][0]["device_token"], token.as_str());
    let asked = control(
        &socket,
        r#"{"cmd":"show","sensor_id":"sock-1","with_token":true}"#,
    )
    .await;
    assert_eq!(asked["device"]["device_token"], token.as_str());

    // Someone loosened the socket's mode: SO_PEERCRED still keeps uid 65534 out.
    std::fs::set_permissions(&d.state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let public = tempfile::tempdir().unwrap();
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = public.path().join("onboardd.toml");
    std::fs::copy(&d.config_path, &cfg).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(["devices", "export", "--include-tokens", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .output()
        .expect("run setpriv");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout} {stderr}");
    assert!(
        stderr.contains("the daemon refused this user: uid 65534 may not use the control socket"),
        "{stderr}"
    );
    assert!(!stdout.contains(&token) && !stderr.contains(&token));
    d.log.wait_for("control connection refused: uid 65534");
    // Root still may.
    let (code, out, err) = d.devices(&["export", "--include-tokens"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&token));
}
