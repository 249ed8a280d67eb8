//! The bridge's bounds through the daemon: past the total buffer bound the sensor
//! holding the most loses its own oldest readings, so a chatty sensor cannot evict
//! a quiet one's while Qubitro's broker (a stand-in mosquitto) is away.

mod common;

use common::*;
use serde_json::{json, Value};

/// Reads the daemon's stats until `done` holds for one of them.
async fn stats_until(stats: &mut Sensor, done: impl Fn(&Value) -> bool) -> Value {
    let read = async {
        loop {
            let (_, payload, _) = stats.next_raw().await;
            let v: Value = serde_json::from_slice(&payload).expect("stats are JSON");
            if done(&v) {
                return v;
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the stats to get there")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_sensor_cannot_evict_a_quiet_sensors_buffered_readings() {
    // Room for about ten of the chatty sensor's readings (the harness's bridge config
    // puts the rate limit out of the way).
    let mut rig = bridged()
        .stats()
        .extra("[bridge]\nmax_buffer_bytes = 1200\n")
        .start()
        .await;
    let mut quiet = rig.sensor("br-quiet").await;
    let mut chatty = rig.sensor("br-chatty").await;
    for s in [&mut quiet, &mut chatty] {
        s.announce(r#"{"bridge":true}"#).await;
        s.reply_with_status("ok").await;
    }
    let quiet_device = cloud_devices_of(&rig.cloud, "br-quiet").remove(0);
    let chatty_device = cloud_devices_of(&rig.cloud, "br-chatty").remove(0);
    rig.qubitro.wait_for_login(&quiet_device).await;
    rig.qubitro.wait_for_login(&chatty_device).await;

    rig.qubitro.stop();
    // The quiet sensor's one reading is the oldest of all.
    quiet
        .publish("onboard/data/br-quiet", br#"{"n":0}"#, false)
        .await;
    let pad = "x".repeat(80);
    let sent = 40;
    for n in 0..sent {
        let reading = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        chatty
            .publish("onboard/data/br-chatty", reading.as_bytes(), false)
            .await;
    }
    // Every reading taken: buffered, or dropped for room.
    let v = stats_until(rig.stats(), |v| {
        v["bridge_buffered"].as_u64().unwrap_or(0) + v["bridge_dropped"].as_u64().unwrap_or(0)
            == sent + 1
    })
    .await;
    assert!(
        v["bridge_dropped"].as_u64().unwrap() > 0,
        "the bound was reached: {v}"
    );

    rig.qubitro.start_again();
    // Both devices' readings arrive interleaved: take them as they come.
    let (mut quiet_got, mut newest) = (None, None);
    while quiet_got.is_none() || newest.is_none() {
        let (topic, payload) = rig.obs.next().await;
        let v: Value = serde_json::from_slice(&payload).expect("a JSON reading");
        if topic == quiet_device.id {
            quiet_got = Some(v);
        } else if topic == chatty_device.id && v["n"] == sent - 1 {
            newest = Some(v);
        }
    }
    assert_eq!(
        quiet_got,
        Some(json!({"n":0})),
        "the quiet sensor's reading survived"
    );
    assert_eq!(
        newest.unwrap()["pad"],
        pad.as_str(),
        "the chatty sensor kept its newest"
    );
}
