//! "Open broker, said out loud": one anonymous connection tells an open broker from a
//! closed one, against a real mosquitto either way, and an unreachable broker is
//! neither; the daemon says so in its log, its systemd STATUS and its stats.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;
use onboardd::config::Config;
use onboardd::open_broker::{probe, Anonymous};
use serde_json::Value;

const WITHIN: Duration = Duration::from_secs(10);

/// The `[mqtt]` section of a config pointing at 127.0.0.1:`port`, with a login set,
/// which the probe must not use.
fn mqtt(port: u16) -> onboardd::config::MqttConfig {
    let toml = format!(
        "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nusername = \"onboardd\"\npassword = \"s3cret\""
    );
    Config::from_toml(&toml).unwrap().mqtt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_allows_anonymous_clients_is_reported_open() {
    let broker = Mosquitto::start_with("listener {port} 127.0.0.1\nallow_anonymous true\n");
    assert_eq!(probe(&mqtt(broker.port), WITHIN).await, Anonymous::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_refuses_anonymous_clients_is_reported_closed_and_the_probe_never_uses_onboardds_login(
) {
    let broker = closed_broker(&[("onboardd", "s3cret")]);
    // onboardd's login is accepted: had the probe used it, it would have got in.
    let login = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-u",
            "onboardd",
            "-P",
            "s3cret",
            "-t",
            "t",
            "-m",
            "x",
            "-p",
        ])
        .arg(broker.port.to_string())
        .output()
        .expect("mosquitto_pub runs");
    assert!(login.status.success(), "{login:?}");
    let outcome = probe(&mqtt(broker.port), WITHIN).await;
    assert!(
        matches!(&outcome, Anonymous::Refused { reason } if reason.contains("NotAuthorized")),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_does_not_answer_is_neither_open_nor_closed() {
    let outcome = probe(&mqtt(free_port()), WITHIN).await;
    assert!(matches!(outcome, Anonymous::Unknown { .. }), "{outcome:?}");
}

/// A mosquitto that refuses anonymous clients and knows `users` (name, password).
fn closed_broker(users: &[(&str, &str)]) -> Mosquitto {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, "").unwrap();
    for (user, password) in users {
        let out = std::process::Command::new("mosquitto_passwd")
            .args(["-b", passwd.to_str().unwrap(), user, password])
            .output()
            .expect("mosquitto_passwd runs (scripts/install-deps.sh test installs mosquitto)");
        assert!(out.status.success(), "{out:?}");
    }
    Mosquitto::builder()
        .file(&passwd, "passwd")
        .conf("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {dir}/passwd\n")
        .start()
}

/// The first `open_broker` the daemon's stats say other than `null` (unknown: the
/// probe has not answered yet).
async fn open_broker_in_stats(obs: &mut Sensor) -> Value {
    let read = async {
        loop {
            let (_, payload, _) = obs.next_raw().await;
            let stats: Value = serde_json::from_slice(&payload).expect("stats are JSON");
            assert!(stats.get("open_broker").is_some(), "{stats}");
            if !stats["open_broker"].is_null() {
                return stats["open_broker"].clone();
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("stats saying whether the broker is open")
}

const STATS: &str = "[log]\nstats_interval_s = 1";
const STATS_TOPIC: &str = "onboard/gateway/gw-test/stats";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_on_an_anonymous_broker_warns_says_open_broker_in_its_status_and_flags_its_stats()
{
    let broker = Mosquitto::start_with("listener {port} 127.0.0.1\nallow_anonymous true\n");
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let notify_path = state.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let env = vec![(
        "NOTIFY_SOCKET".to_string(),
        notify_path.to_string_lossy().into_owned(),
    )];
    let mut obs = Sensor::connect_as(broker.port, "obs", STATS_TOPIC, None, None).await;
    let d = Daemon::with_state(broker.port, &cloud, state.path(), STATS, env);

    d.log.wait_for("open broker: 127.0.0.1:");
    let warning = d
        .log
        .all()
        .into_iter()
        .find(|l| l.contains("open broker:"))
        .unwrap();
    for allowed in [
        "take over onboardd's session",
        "write any bridged sensor's readings",
        "publish discovery configs",
    ] {
        assert!(warning.contains(allowed), "{warning}");
    }
    assert_eq!(open_broker_in_stats(&mut obs).await, Value::Bool(true));
    let status = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 1024];
        loop {
            let n = notify
                .recv(&mut buf)
                .expect("a STATUS= line saying open broker");
            let line = String::from_utf8_lossy(&buf[..n]).into_owned();
            if line.contains("STATUS=") && line.contains("open broker") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    assert!(status.contains("broker connected"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_on_a_broker_with_a_password_file_does_not_warn_and_its_stats_say_closed() {
    let broker = closed_broker(&[("onboardd", "s3cret"), ("observer", "watching")]);
    let cloud = fake_cloud().await;
    let mut obs = Sensor::connect_as(
        broker.port,
        "obs",
        STATS_TOPIC,
        Some(("observer", "watching")),
        None,
    )
    .await;
    let toml = format!("{STATS}\n[mqtt]\nusername = \"onboardd\"\npassword = \"s3cret\"");
    let d = Daemon::start(&broker, &cloud, &toml);
    assert_eq!(open_broker_in_stats(&mut obs).await, Value::Bool(false));
    assert_eq!(d.log.count("open broker"), 0, "{}", d.log.text());
}
