//! Every sensor's last announce or reading time: kept in memory while the daemon
//! runs (shown at once by `devices show`), written in batches, and written at a
//! clean stop so that it survives a restart.

mod common;

use common::*;
use serde_json::{json, Value};

fn last_seen(d: &Daemon, sensor: &str) -> u64 {
    let (code, out, err) = d.devices(&["show", sensor]);
    assert_eq!(code, 0, "devices show {sensor}: {err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    v["last_seen_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no last_seen_ms: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_updates_last_seen_and_the_time_survives_a_clean_restart() {
    let mut rig = bridged().start().await;
    let before_announce = onboardd::clock::system_ms();
    let mut s = rig.sensor("seen-1").await;
    s.announce(r#"{"bridge":true}"#).await;
    let ok = s.reply_with_status("ok").await;
    let device = ok["device_id"].as_str().expect("a device id").to_string();
    let announced = last_seen(&rig.d, "seen-1");
    assert!(announced >= before_announce, "the announce counts");

    let before_reading = onboardd::clock::system_ms();
    s.publish("onboard/data/seen-1", br#"{"n":1}"#, false).await;
    assert_eq!(rig.obs.on_topic(&device, 1).await[0], json!({"n":1}));
    let read = last_seen(&rig.d, "seen-1");
    assert!(
        announced <= before_reading && read >= before_reading,
        "the reading moved it: {announced} then {read} (reading sent at {before_reading})"
    );
    let (code, list, _) = rig.d.devices(&["list", "--json"]);
    assert_eq!(code, 0);
    assert!(
        list.contains(&format!("\"last_seen_ms\": {read}")),
        "{list}"
    );
    let (code, export, _) = rig.d.devices(&["export"]);
    assert_eq!(code, 0);
    assert!(
        export.contains(&format!("\"last_seen_ms\":{read}")),
        "{export}"
    );

    // Written at the clean stop (the interval, 600 s, has not passed).
    assert_eq!(rig.d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    assert_eq!(
        last_seen(&rig.d, "seen-1"),
        read,
        "read from the store without the daemon"
    );
    rig.d.spawn();
    rig.d.wait_subscribed();
    assert_eq!(
        last_seen(&rig.d, "seen-1"),
        read,
        "and by the restarted daemon"
    );

    // Anyone on the broker can announce the id without its proof: that is no sign of
    // the sensor.
    let mut impostor = Sensor::connect_unkeyed(rig.broker.port, "seen-1").await;
    impostor.announce("{}").await;
    let refused = impostor.reply().await;
    assert_eq!(refused["status"], "error", "{refused}");
    assert_eq!(
        last_seen(&rig.d, "seen-1"),
        read,
        "a refused announce does not count"
    );
}
