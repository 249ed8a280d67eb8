//! Forgetting a discovered device puts it on the ignore list: its config stays
//! retained on the broker and is read again at every reconnect and every start,
//! and without the list each of those would onboard it (and bill it) again.
//! `devices unignore` lifts it, and discovery onboards it at once. A firmware
//! sensor that is forgotten is not ignored: it is onboarded again when it announces.
//! With `discovery.delete_retired_after_s`, a device retired that long is deleted
//! from Qubitro and forgotten without the operator, and not ignored.

mod common;

use std::time::Duration;

use common::*;
use fake_qubitro::{FakeDevice, FakeQubitro};
use serde_json::{json, Value};

/// Home Assistant discovery on; [`bridged`] points the bridge at the stand-in broker.
const HA: &str = "[discovery]\nhomeassistant = true\n";

fn config_topic(ident: &str) -> String {
    format!("homeassistant/sensor/{ident}/t/config")
}

/// A retained Home Assistant config of one entity of device `ident`.
async fn publish_config(port: u16, ident: &str) {
    let c = Sensor::connect_as(port, &format!("pub-{ident}"), "lx/none", None, None).await;
    let topic = config_topic(ident);
    let body = json!({
        "device": {"identifiers": [ident], "name": format!("Room {ident}")},
        "state_topic": format!("lx/{ident}"),
        "unique_id": format!("{ident}_t"),
        "unit_of_measurement": "°C",
        "value_template": "{{ value_json.t }}"
    });
    c.publish(&topic, body.to_string().as_bytes(), true).await;
}

/// Polls until `f` holds (at most [`WAIT`]).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cloud device discovery made for identifier `ident`, once it is delivered.
async fn discovered(cloud: &FakeQubitro, d: &Daemon, ident: &str) -> FakeDevice {
    let of = || {
        cloud
            .devices()
            .into_iter()
            .find(|dev| dev.metadata.get("discovery_id").map(String::as_str) == Some(ident))
    };
    until(&format!("a device for {ident}"), || of().is_some()).await;
    let dev = of().expect("found above");
    let sensor = dev.metadata["sensor_id"].clone();
    until(&format!("{sensor} delivered"), || {
        d.state_of(&sensor).as_deref() == Some("delivered")
    })
    .await;
    dev
}

fn ignored(d: &Daemon) -> Vec<String> {
    let (code, out, err) = d.devices(&["list", "--ignored", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|i| i["sensor_id"].as_str().expect("an id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_discovered_device_stays_away_across_a_reconnect_and_a_restart_and_returns_after_unignore(
) {
    let mut rig = bridged().persistent_broker().extra(HA).start().await;
    publish_config(rig.broker.port, "lx1").await;
    let first = discovered(&rig.cloud, &rig.d, "lx1").await;
    let sensor = first.metadata["sensor_id"].clone();

    let (code, out, err) = rig.d.devices(&["forget", &sensor, "--delete-remote"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(rig.cloud.devices().is_empty(), "deleted in Qubitro");
    assert_eq!(ignored(&rig.d), vec![sensor.clone()]);
    let (code, table, _) = rig.d.devices(&["list", "--ignored"]);
    assert_eq!(code, 0);
    assert!(
        table.contains(&sensor) && table.contains("Room lx1"),
        "{table}"
    );

    // The broker restarts with the config still retained: the daemon reconnects and
    // reads it again. Another device's config, published after, is read after it
    // (one session, in order): once that one is recorded, lx1's was handled.
    rig.broker.restart_clean();
    publish_config(rig.broker.port, "lx2").await;
    discovered(&rig.cloud, &rig.d, "lx2").await;
    assert_eq!(
        rig.d.state_of(&sensor),
        None,
        "not onboarded again at the reconnect"
    );
    assert_eq!(cloud_devices_of(&rig.cloud, &sensor).len(), 0);

    // A restart reads every retained config again, and says once that it skips it.
    assert_eq!(rig.d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    rig.d.spawn();
    rig.d
        .log
        .wait_for(&format!("discovered device {sensor} is on the ignore list"));
    assert_eq!(
        rig.d.state_of(&sensor),
        None,
        "not onboarded again at the restart"
    );
    assert_eq!(cloud_devices_of(&rig.cloud, &sensor).len(), 0);
    assert_eq!(
        ignored(&rig.d),
        vec![sensor.clone()],
        "the list survives the restart"
    );

    let (code, out, err) = rig.d.devices(&["unignore", &sensor]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("onboards it now"), "{out}");
    let back = discovered(&rig.cloud, &rig.d, "lx1").await;
    assert_ne!(back.id, first.id, "a new device");
    assert!(ignored(&rig.d).is_empty());
    let (code, _, err) = rig.d.devices(&["unignore", &sensor]);
    assert_eq!(code, 1, "no longer on the list: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_firmware_sensor_is_not_ignored_and_is_onboarded_again_when_it_announces() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "fw-1").await;
    s.announce("{}").await;
    let first = s.reply_with_status("ok").await;

    let (code, out, err) = d.devices(&["forget", "fw-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        ignored(&d).is_empty(),
        "firmware sensors never go on the list"
    );
    s.announce("{}").await;
    let again = s.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &again);
    assert_eq!(d.state_of("fw-1").as_deref(), Some("delivered"), "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_retired_longer_than_delete_retired_after_s_is_deleted_and_forgotten_but_not_ignored(
) {
    let rig = bridged()
        .extra(HA)
        .extra("[discovery]\ndelete_retired_after_s = 1")
        .start()
        .await;
    publish_config(rig.broker.port, "rt1").await;
    publish_config(rig.broker.port, "rt2").await;
    let retiring = discovered(&rig.cloud, &rig.d, "rt1").await;
    let kept = discovered(&rig.cloud, &rig.d, "rt2").await;
    let sensor = retiring.metadata["sensor_id"].clone();

    // Its only entity's config is removed: retired, then deleted a second later.
    let c = Sensor::connect_as(rig.broker.port, "pub-rm", "lx/none", None, None).await;
    c.publish(&config_topic("rt1"), b"", true).await;
    until("the retired device deleted from Qubitro", || {
        cloud_devices_of(&rig.cloud, &sensor).is_empty()
    })
    .await;
    until("the retired device forgotten", || {
        rig.d.state_of(&sensor).is_none()
    })
    .await;
    let left: Vec<String> = rig.cloud.devices().into_iter().map(|dev| dev.id).collect();
    assert_eq!(left, vec![kept.id], "the active device is kept");
    assert!(
        ignored(&rig.d).is_empty(),
        "not ignored: its config may come back"
    );

    publish_config(rig.broker.port, "rt1").await;
    let back = discovered(&rig.cloud, &rig.d, "rt1").await;
    assert_ne!(
        back.id, retiring.id,
        "onboarded anew when its config came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_and_unignored_with_the_daemon_stopped_a_device_stays_away_until_unignored_and_returns_at_the_next_start(
) {
    let mut rig = bridged().persistent_broker().extra(HA).start().await;
    publish_config(rig.broker.port, "off1").await;
    let first = discovered(&rig.cloud, &rig.d, "off1").await;
    let sensor = first.metadata["sensor_id"].clone();

    assert_eq!(rig.d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    let (code, out, err) = rig.d.devices(&["forget", &sensor]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(ignored(&rig.d), vec![sensor.clone()], "read from the store");
    rig.d.spawn();
    rig.d
        .log
        .wait_for(&format!("discovered device {sensor} is on the ignore list"));
    assert_eq!(rig.d.state_of(&sensor), None);

    assert_eq!(rig.d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    let (code, out, err) = rig.d.devices(&["unignore", &sensor]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("next start"), "says when: {out}");
    rig.d.spawn();
    rig.d.wait_subscribed();
    until(&format!("{sensor} onboarded again"), || {
        rig.d.state_of(&sensor).as_deref() == Some("delivered")
    })
    .await;
    // Forgotten without --delete-remote: the lookup adopts the device it kept.
    assert_eq!(cloud_devices_of(&rig.cloud, &sensor).len(), 1);
}
