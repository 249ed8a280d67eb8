//! A bridged device Qubitro refuses is paused, not given up: through the daemon,
//! `onboardd devices show` says why and when it is retried, and `onboardd devices
//! resume` retries it at once over the control socket.

mod common;

use common::*;
use harness::qubitro_broker::QubitroBroker;
use serde_json::{json, Value};

/// `devices show SENSOR` as JSON.
fn show(d: &Daemon, sensor: &str) -> Value {
    let (code, out, err) = d.devices(&["show", sensor]);
    assert_eq!(code, 0, "devices show {sensor}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("devices show {sensor}: {e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_resume_retries_a_paused_device_at_once_and_its_readings_go_out() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // The stand-in learns the devices of another cloud: every device this daemon
    // makes is refused until its login is added below.
    let elsewhere = fake_cloud().await;
    let qubitro = QubitroBroker::start(&elsewhere);
    let mut obs = qubitro.observer().await;
    // The first retry would come after 5 to 10 minutes: only a resume is quick.
    let d = Daemon::start(
        &broker,
        &cloud,
        &format!(
            "[qubitro]\nbroker_host = \"127.0.0.1\"\nbroker_port = {}\nbroker_tls = false\n\
             [bridge]\nreconnect_max_ms = 600000\n",
            qubitro.port()
        ),
    );
    let mut s = Sensor::connect(broker.port, "br-p").await;
    s.announce(r#"{"bridge":true,"name":"Paused"}"#).await;
    s.reply_with_status("ok").await;
    let device = cloud_devices_of(&cloud, "br-p").remove(0);
    s.publish("onboard/data/br-p", br#"{"n":1}"#, false).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    let shown = loop {
        let shown = show(&d, "br-p");
        if shown["bridge"]["state"] == "paused" {
            break shown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not paused within {WAIT:?}: {shown}; log:\n{}",
            d.log.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let bridge = &shown["bridge"];
    assert!(
        bridge["reason"]
            .as_str()
            .is_some_and(|r| r.contains("login refused")),
        "{shown}"
    );
    let retry_in = bridge["next_retry_in_s"].as_u64().expect("next_retry_in_s");
    assert!((240..=600).contains(&retry_in), "{shown}");
    assert_eq!(bridge["buffered"], 1, "{shown}");
    assert!(
        d.log.text().contains("BRIDGE PAUSED"),
        "the pause is said loudly; log:\n{}",
        d.log.text()
    );

    qubitro
        .add_writer(&device.id, &device.token, &device.id)
        .await;
    let (code, out, err) = d.devices(&["resume", "br-p"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumed"), "{out}");
    assert_eq!(obs.on_topic(&device.id, 1).await, vec![json!({"n":1})]);

    let (code, out, _) = d.devices(&["resume", "no-such-sensor"]);
    assert_eq!(code, 1, "{out}");
}
