//! One bridge per device: Qubitro's broker takes client id = device id, so two
//! gateways forwarding one device's readings knock each other offline for ever. A
//! gateway bridges a device whose `gateway_id` metadata is its own, or one adopted on
//! it with `onboardd devices adopt`; until then the readings of a device another
//! gateway made stay buffered (never forwarded), `devices show` names the owner, and
//! the stats count it. The other gateway's device is planted in the fake Qubitro, as
//! a lookup finds it when a sensor moves to a new gateway.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use fake_qubitro::{FakeDevice, FakeQubitro, NewDevice};
use harness::qubitro_broker::QubitroBroker;
use serde_json::{json, Value};

/// A device of `sensor` made by gateway `gw` (with a login on the stand-in broker).
fn planted(cloud: &FakeQubitro, sensor: &str, gw: &str) -> FakeDevice {
    let mut d = NewDevice::named(format!("{sensor} on {gw}"));
    d.metadata = BTreeMap::from([
        ("sensor_id".to_string(), sensor.to_string()),
        ("gateway_id".to_string(), gw.to_string()),
    ]);
    cloud.insert_device(d)
}

/// `devices show SENSOR` as JSON.
fn show(d: &Daemon, sensor: &str) -> Value {
    let (code, out, err) = d.devices(&["show", sensor]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("show prints JSON")
}

/// Waits until the bridge holds `n` readings of `sensor` in its buffer.
async fn wait_buffered(d: &Daemon, sensor: &str, n: u64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let shown = show(d, sensor);
        if shown["bridge"]["buffered"] == n {
            return shown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {n} buffered: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a stats message whose `owned_by_other_gateways` is `n`.
async fn wait_owned_elsewhere(stats: &mut Sensor, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, v, _) = stats.next().await;
        if v["owned_by_other_gateways"] == n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {n}: {v}");
    }
}

async fn publish_readings(s: &Sensor, topic: &str, n: std::ops::Range<u64>) {
    for i in n {
        s.publish(topic, format!(r#"{{"n":{i}}}"#).as_bytes(), false)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_a_device_another_gateway_owns_stay_buffered_until_devices_adopt_then_reach_qubitro(
) {
    let mut rig = bridged()
        .stats()
        .extra("gateway_id = \"gw-new\"\n")
        .start()
        .await;
    // Planted before the sensor first announces, as when it moves to this gateway.
    let theirs = planted(&rig.cloud, "mv-1", "gw-old");
    rig.qubitro.wait_for_login(&theirs).await;

    let mut s = rig.sensor("mv-1").await;
    s.announce(r#"{"bridge":true,"name":"Moved"}"#).await;
    let ok = s.reply_with_status("ok").await;
    assert_eq!(
        ok["device_id"],
        theirs.id.as_str(),
        "the lookup found the old gateway's device"
    );
    assert_eq!(
        cloud_devices_of(&rig.cloud, "mv-1").len(),
        1,
        "no second device"
    );

    publish_readings(&s, "onboard/data/mv-1", 0..3).await;
    let shown = wait_buffered(&rig.d, "mv-1", 3).await;
    assert_eq!(shown["owned_by"], "gw-old", "{shown}");
    assert_eq!(
        shown["bridge"]["device_id"],
        Value::Null,
        "the bridge never got its login: {shown}"
    );
    assert!(shown.get("adopted_ms").is_none(), "{shown}");
    wait_owned_elsewhere(rig.stats(), 1).await;
    assert!(
        rig.obs
            .drain_for(Duration::from_millis(500))
            .await
            .is_empty(),
        "nothing reached Qubitro under the other gateway's device"
    );

    let (code, out, err) = rig.d.devices(&["adopt", "mv-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("adopted") && out.contains("gw-old"), "{out}");
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(rig.obs.on_topic(&theirs.id, 1).await);
    }
    assert_eq!(got, [json!({"n":0}), json!({"n":1}), json!({"n":2})]);
    let shown = show(&rig.d, "mv-1");
    assert!(shown.get("owned_by").is_none(), "{shown}");
    assert!(shown["adopted_ms"].is_u64(), "recorded: {shown}");
    wait_owned_elsewhere(rig.stats(), 0).await;
    let (code, again, _) = rig.d.devices(&["adopt", "mv-1"]);
    assert_eq!(code, 0);
    assert!(again.contains("already"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_adopted_while_the_daemon_is_stopped_is_bridged_from_its_next_start() {
    let mut rig = bridged_daemon("gateway_id = \"gw-new\"\n").await;
    let theirs = planted(&rig.cloud, "mv-2", "gw-old");
    rig.qubitro.wait_for_login(&theirs).await;

    let mut s = rig.sensor("mv-2").await;
    s.announce(r#"{"bridge":true}"#).await;
    assert_eq!(
        s.reply_with_status("ok").await["device_id"],
        theirs.id.as_str()
    );
    publish_readings(&s, "onboard/data/mv-2", 0..2).await;
    wait_buffered(&rig.d, "mv-2", 2).await;
    rig.d.signal_and_wait(libc::SIGTERM);

    let (code, out, err) = rig.d.devices(&["adopt", "mv-2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("next start"), "{out}");
    let (code, out, _) = rig.d.devices(&["adopt", "nobody"]);
    assert_eq!(code, 1, "an unknown sensor: {out}");

    rig.d.spawn();
    rig.d.wait_subscribed();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(rig.obs.on_topic(&theirs.id, 1).await);
    }
    assert_eq!(
        got,
        [json!({"n":0}), json!({"n":1})],
        "kept buffered across the stop"
    );
    assert!(show(&rig.d, "mv-2")["adopted_ms"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_that_loses_a_create_race_serves_the_winners_device_but_does_not_bridge_it() {
    let cloud = FakeQubitro::start(fake_qubitro::FakeOptions {
        created_at_field: true,
        ..fake_qubitro::FakeOptions::default()
    })
    .await
    .expect("start the fake Qubitro");
    let qubitro = QubitroBroker::start(&cloud);
    let (broker_a, broker_b) = (Mosquitto::start(), Mosquitto::start());
    let extra = |gw: &str| format!("gateway_id = \"{gw}\"\n{}", qubitro.daemon_toml());
    let a = Daemon::start(&broker_a, &cloud, &extra("gw-a"));
    let b = Daemon::start(&broker_b, &cloud, &extra("gw-b"));
    let mut at_a = a.sensor(broker_a.port, "race-br").await;
    let mut at_b = b.sensor(broker_b.port, "race-br").await;

    cloud.hold_creates();
    at_a.announce(r#"{"bridge":true}"#).await;
    at_b.announce(r#"{"bridge":true}"#).await;
    wait_for_cloud_requests(&cloud, fake_qubitro::Endpoint::Create, 2).await;
    cloud.release_creates();
    let ok_a = at_a.reply_with_status("ok").await;
    let ok_b = at_b.reply_with_status("ok").await;
    assert_eq!(
        ok_a["device_id"], ok_b["device_id"],
        "both serve one device"
    );

    let left = cloud_devices_of(&cloud, "race-br");
    assert_eq!(left.len(), 1, "{left:?}");
    let winner = left[0].metadata["gateway_id"].clone();
    let (won, lost) = if winner == "gw-a" { (&a, &b) } else { (&b, &a) };
    assert!(show(won, "race-br").get("owned_by").is_none());
    assert_eq!(show(lost, "race-br")["owned_by"], winner.as_str());
}
