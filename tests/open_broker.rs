//! "Open broker, said out loud": one anonymous connection tells an open broker from a
//! closed one, against a real mosquitto either way, and an unreachable broker is
//! neither. (Not wired into the daemon yet: see the module doc of `open_broker`.)

mod common;

use std::time::Duration;

use common::*;
use onboardd::config::Config;
use onboardd::open_broker::{probe, Anonymous};

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
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, "").unwrap();
    let out = std::process::Command::new("mosquitto_passwd")
        .args(["-b", passwd.to_str().unwrap(), "onboardd", "s3cret"])
        .output()
        .expect("mosquitto_passwd runs (scripts/install-deps.sh test installs mosquitto)");
    assert!(out.status.success(), "{out:?}");
    let broker = Mosquitto::builder()
        .file(&passwd, "passwd")
        .conf("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {dir}/passwd\n")
        .start();
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
