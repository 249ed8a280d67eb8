//! `devices forget` takes everything of a sensor's onboarding with it, whether the
//! daemon runs (the engine forgets) or not (the CLI opens the store itself): the
//! record, and the readings the bridge still held for it, so a later onboarding of
//! the same id starts clean and never forwards readings of the one forgotten.

mod common;

use common::*;
use serde_json::{json, Value};

/// Readings the daemon holds for `sensor` per `devices show` (0 when it shows none).
fn buffered(d: &Daemon, sensor: &str) -> u64 {
    let (code, out, err) = d.devices(&["show", sensor]);
    assert_eq!(code, 0, "devices show {sensor}: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["bridge"]["buffered"].as_u64().unwrap_or(0)
}

/// Onboards a bridged sensor, buffers one reading of it while Qubitro's broker is
/// away, forgets it (with the daemon stopped when `offline`), onboards it again and
/// checks that the first reading Qubitro then gets is the new onboarding's own.
async fn a_reading_buffered_before_the_forget_never_reaches_qubitro(sensor: &str, offline: bool) {
    let mut rig = bridged().start().await;
    let data = format!("onboard/data/{sensor}");
    let mut s = rig.sensor(sensor).await;
    s.announce(r#"{"bridge":true}"#).await;
    s.reply_with_status("ok").await;

    // Qubitro's broker is away: the reading stays in the gateway's buffer.
    rig.qubitro.stop();
    s.publish(&data, br#"{"n":1}"#, false).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while buffered(&rig.d, sensor) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reading was never buffered; log:\n{}",
            rig.d.log.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    if offline {
        assert_eq!(rig.d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    }
    let (code, msg, err) = rig.d.devices(&["forget", sensor]);
    assert_eq!(code, 0, "{msg}{err}");
    if offline {
        rig.d.spawn();
        rig.d.wait_subscribed();
    }

    rig.qubitro.start_again();
    s.announce(r#"{"bridge":true}"#).await;
    let ok = s.reply_with_status("ok").await;
    let device = ok["device_id"].as_str().expect("a device id").to_string();
    s.publish(&data, br#"{"n":2}"#, false).await;
    assert_eq!(
        rig.obs.on_topic(&device, 1).await[0],
        json!({"n":2}),
        "the first reading forwarded after the forget is the new onboarding's own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_sensor_while_the_daemon_is_stopped_drops_its_buffered_readings() {
    a_reading_buffered_before_the_forget_never_reaches_qubitro("lf-off", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_sensor_while_the_daemon_runs_drops_its_buffered_readings() {
    a_reading_buffered_before_the_forget_never_reaches_qubitro("lf-on", false).await;
}
