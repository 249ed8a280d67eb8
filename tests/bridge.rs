//! The telemetry bridge through the daemon: a sensor announces with `"bridge": true`,
//! publishes readings on the local broker, and they reach Qubitro's broker (a second
//! mosquitto standing in for it, with one login per device the fake cloud made)
//! flattened, under the device's own login, in order, across outages and a kill -9.
//! Checked where Qubitro would see it (an observer on the stand-in broker) and where
//! anyone on the local broker could look (a client subscribed to `#`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use harness::qubitro_broker::Observer;
use serde_json::{json, Value};

/// The `n` fields of the readings of `device` the observer receives until each of
/// `wanted` was seen. At least once: a reading recorded (or sent) but not yet
/// acknowledged when something died may come twice, and is skipped here.
async fn first_arrivals(
    obs: &mut Observer,
    device: &str,
    wanted: std::ops::Range<u64>,
) -> Vec<u64> {
    let mut seen = HashSet::new();
    let mut first = Vec::new();
    while !wanted.clone().all(|v| seen.contains(&v)) {
        let got = obs.on_topic(device, 1).await;
        let v = got[0]["n"].as_u64().expect("a reading with n");
        if wanted.contains(&v) && seen.insert(v) {
            first.push(v);
        }
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_sensor_never_gets_its_token_and_its_readings_reach_qubitro_flattened_under_its_own_login(
) {
    let mut rig = bridged().start().await;
    // Anyone on the local broker: sees every topic.
    let mut snoop = Sensor::connect_as(rig.broker.port, "snoop", "#", None, None).await;

    let mut s = rig.sensor("br-1").await;
    let ok = onboard_bridged(&mut s).await;
    let device = cloud_devices_of(&rig.cloud, "br-1").remove(0);
    assert_eq!(ok["bridged"], true, "{ok}");
    assert_eq!(ok["device_id"], device.id.as_str());
    assert_eq!(ok["data_topic"], "onboard/data/br-1");
    assert!(ok.get("device_token").is_none() && ok.get("device_token_sealed").is_none());

    s.publish(
        "onboard/data/br-1",
        br#"{"env":{"hum":40,"temp":21.5},"ok":true}"#,
        false,
    )
    .await;
    let got = rig.obs.on_topic(&device.id, 1).await;
    assert_eq!(got[0], json!({"env_hum":40,"env_temp":21.5,"ok":true}));

    // Bridged stays on: an announce without `bridge` still gets no token.
    s.announce(r#"{"request_id":"again"}"#).await;
    let again = s.reply_with_status("ok").await;
    assert_eq!(again["bridged"], true, "{again}");
    assert!(again.get("device_token").is_none() && again.get("device_token_sealed").is_none());
    let (code, shown, err) = rig.d.devices(&["show", "br-1"]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["bridged"], true, "{shown}");
    assert_eq!(shown["bridge"]["device_id"], device.id.as_str(), "{shown}");

    // Nothing on the local broker ever carried the token.
    let mut everything = Vec::new();
    while let Some((topic, payload, _)) = snoop.next_raw_within(Duration::from_millis(300)).await {
        everything.push((topic, String::from_utf8_lossy(&payload).into_owned()));
    }
    assert!(!everything.is_empty(), "the snoop saw the traffic");
    for (topic, payload) in &everything {
        assert!(
            !payload.contains(&device.token),
            "the token crossed the local broker on {topic}: {payload}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_sent_during_an_uplink_outage_and_across_a_kill_9_all_arrive_in_order() {
    let mut rig = bridged().persistent_broker().start().await;
    let mut s = Sensor::connect_persistent(rig.broker.port, "br-out", &rig.d.flashed()).await;
    onboard_bridged(&mut s).await;
    let device = cloud_devices_of(&rig.cloud, "br-out").remove(0);
    s.publish("onboard/data/br-out", br#"{"n":0}"#, false).await;
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0], json!({"n":0}));

    // Qubitro's broker goes away; readings keep coming.
    rig.qubitro.stop();
    let total = 300;
    for n in 1..150 {
        s.publish(
            "onboard/data/br-out",
            format!(r#"{{"n":{n}}}"#).as_bytes(),
            false,
        )
        .await;
    }
    // onboardd dies mid-stream; the local broker keeps what it has not acknowledged.
    rig.d.kill9();
    for n in 150..total {
        s.publish(
            "onboard/data/br-out",
            format!(r#"{{"n":{n}}}"#).as_bytes(),
            false,
        )
        .await;
    }
    rig.d.spawn();
    rig.d.wait_subscribed();
    rig.qubitro.start_again();

    // Every one arrives, and in order: none before every earlier one did.
    let first = first_arrivals(&mut rig.obs, &device.id, 1..total).await;
    let expected: Vec<u64> = (1..total).collect();
    assert_eq!(first, expected, "first arrivals in sending order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_readings_and_readings_of_sensors_that_are_not_bridged_are_dropped_and_counted() {
    let mut rig = bridged().stats().start().await;
    let mut s = rig.sensor("br-bad").await;
    onboard_bridged(&mut s).await;
    let device = cloud_devices_of(&rig.cloud, "br-bad").remove(0);
    let mut plain = rig.sensor("not-bridged").await;
    plain.announce("{}").await;
    assert_opens_to_the_clouds_token(&rig.cloud, &plain.reply_with_status("ok").await);

    let topic = "onboard/data/br-bad";
    let bad: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        b"[1,2]".to_vec(),
        b"{}".to_vec(),
        Vec::new(),
        br#"{"a_b":1,"a":{"b":2}}"#.to_vec(),
        format!(r#"{{"big":"{}"}}"#, "x".repeat(5000)).into_bytes(),
    ];
    for payload in &bad {
        s.publish(topic, payload, false).await;
    }
    s.publish(topic, br#"{"retained":1}"#, true).await;
    plain
        .publish("onboard/data/not-bridged", br#"{"stray":1}"#, false)
        .await;
    // An array is left out, the rest goes on.
    s.publish(topic, br#"{"list":[1,2],"good":1}"#, false).await;

    // The first reading that reaches Qubitro is the good one: none of the bad came.
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0], json!({"good":1}));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, v, _) = rig.stats().next().await;
        if v["bridge_refused"].as_u64().unwrap_or(0) >= 8 {
            assert_eq!(v["bridged_devices"], 1, "{v}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refused readings not counted: {v}; log:\n{}",
            rig.d.log.text()
        );
    }
    // And the daemon keeps serving.
    s.publish(topic, br#"{"after":1}"#, false).await;
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0], json!({"after":1}));
}
