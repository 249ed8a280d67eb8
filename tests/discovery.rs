//! Zero-firmware onboarding through the daemon: devices that describe themselves
//! with Home Assistant or Tasmota discovery on a real mosquitto become exactly one
//! bridged Qubitro device each (fake cloud), and their state messages reach the
//! stand-in Qubitro broker as flat readings under the device's own login.

mod common;

use std::time::Duration;

use common::*;
use fake_qubitro::{FakeDevice, FakeQubitro};
use harness::qubitro_broker::QubitroBroker;
use serde_json::{json, Value};

/// Discovery on (both sources); [`bridged`] points the bridge at the stand-in broker.
const DISCOVERY: &str = "[discovery]\nhomeassistant = true\ntasmota = true\n";

const Z2M_IEEE: &str = "0x00158d0001a2b3c4";
const Z2M_ID: &str = "ha-zigbee2mqtt_0x00158d0001a2b3c4";

/// One Zigbee2MQTT entity config (what `lib/extension/homeassistant.ts` sends).
fn z2m_config(object: &str, unit: &str) -> (String, String) {
    let topic = format!("homeassistant/sensor/{Z2M_IEEE}/{object}/config");
    let body = json!({
        "availability": [{"topic": "zigbee2mqtt/bridge/state", "value_template": "{{ value_json.state }}"}],
        "device": {
            "identifiers": [format!("zigbee2mqtt_{Z2M_IEEE}")],
            "manufacturer": "Aqara",
            "model": "Temperature and humidity sensor (WSDCGQ11LM)",
            "model_id": "WSDCGQ11LM",
            "name": "living_room",
            "via_device": "zigbee2mqtt_bridge_0x00124b0022334455"
        },
        "object_id": format!("living_room_{object}"),
        "origin": {"name": "Zigbee2MQTT", "sw": "1.40.2"},
        "state_class": "measurement",
        "state_topic": "zigbee2mqtt/living_room",
        "unique_id": format!("{Z2M_IEEE}_{object}_zigbee2mqtt"),
        "unit_of_measurement": unit,
        "value_template": format!("{{{{ value_json.{object} }}}}")
    });
    (topic, body.to_string())
}

async fn publish_z2m(s: &Sensor) {
    for (object, unit) in [("temperature", "°C"), ("humidity", "%"), ("battery", "%")] {
        let (t, b) = z2m_config(object, unit);
        s.publish(&t, b.as_bytes(), true).await;
    }
    // Its bridge device: skipped by discovery.skip_identifiers.
    s.publish("homeassistant/binary_sensor/1221051039810110150109113116116_0x00124b0022334455/connection_state/config",
        concat!(
            r#"{"device":{"identifiers":["zigbee2mqtt_bridge_0x00124b0022334455"],"name":"Zigbee2MQTT Bridge"},"#,
            r#""state_topic":"zigbee2mqtt/bridge/state","value_template":"{{ value_json.state }}"}"#,
        ).as_bytes(),
        true,
    )
    .await;
}

/// Waits until the fake cloud holds a device for `sensor` and its bridge is up.
async fn device_of(cloud: &FakeQubitro, qubitro: &QubitroBroker, sensor: &str) -> FakeDevice {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(d) = cloud_devices_of(cloud, sensor).pop() {
            qubitro.wait_for_login(&d).await;
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no device for {sensor} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zigbee2mqtt_sensor_becomes_one_device_and_its_readings_reach_qubitro_keyed_by_entity() {
    let mut rig = bridged_daemon(DISCOVERY).await;
    let z2m = Sensor::connect_as(rig.broker.port, "z2m", "zigbee2mqtt/none", None, None).await;

    publish_z2m(&z2m).await;
    let device = device_of(&rig.cloud, &rig.qubitro, Z2M_ID).await;
    assert_eq!(device.name, "living_room");
    assert_eq!(device.brand, "Aqara");
    assert_eq!(device.model, "Temperature and humidity sensor (WSDCGQ11LM)");
    assert_eq!(device.tags, vec!["homeassistant".to_string()]);
    assert_eq!(device.metadata["discovered_by"], "homeassistant");
    assert_eq!(
        device.metadata["discovery_id"],
        format!("zigbee2mqtt_{Z2M_IEEE}")
    );
    assert_eq!(device.metadata["sensor_id"], Z2M_ID);
    assert!(device.metadata.contains_key("gateway_id"));

    z2m.publish(
        "zigbee2mqtt/living_room",
        br#"{"temperature":21.5,"humidity":45,"battery":100,"linkquality":120,"voltage":3005}"#,
        false,
    )
    .await;
    let got = rig.obs.on_topic(&device.id, 1).await;
    assert_eq!(
        got[0],
        json!({"temperature":21.5,"humidity":45,"battery":100})
    );

    // Exactly one device for the three entities; none for the bridge device.
    assert_eq!(rig.cloud.devices().len(), 1, "{:?}", rig.cloud.devices());
    // Complete without a reply (no onboardd firmware listens for one).
    assert_eq!(rig.d.state_of(Z2M_ID).as_deref(), Some("delivered"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esphome_plain_values_a_device_based_config_and_tasmota_telemetry_are_forwarded_flat() {
    let mut rig = bridged_daemon(DISCOVERY).await;
    let p = Sensor::connect_as(rig.broker.port, "pub", "nothing/here", None, None).await;

    // ESPHome, abbreviated keys, plain values.
    for (object, unit) in [("temperature", "°C"), ("humidity", "%")] {
        let body = json!({
            "dev_cla": object, "unit_of_meas": unit, "stat_cla": "measurement",
            "name": object, "stat_t": format!("garden-node/sensor/{object}/state"),
            "avty_t": "garden-node/status", "uniq_id": format!("ESPsensor{object}"),
            "dev": {"ids": "240ac4aabbcc", "name": "garden-node", "sw": "esphome v2024.10.0",
                    "mdl": "esp32dev", "mf": "Espressif", "cns": [["mac", "24:0a:c4:aa:bb:cc"]]}
        });
        p.publish(
            &format!("homeassistant/sensor/garden-node/{object}/config"),
            body.to_string().as_bytes(),
            true,
        )
        .await;
    }
    // A device-based config with a shared state topic under `~`.
    let kitchen = concat!(
        r#"{"dev":{"ids":["ea334450945afc"],"name":"Kitchen","mf":"Bla electronics","mdl":"xya"},"#,
        r#""o":{"name":"bla2mqtt"},"~":"kitchen/sensors","stat_t":"~/state","cmps":{"t1":{"p":"sensor","#,
        r#""val_tpl":"{{ value_json.temperature | round(1) }}","uniq_id":"k_t"},"h1":{"p":"sensor","#,
        r#""val_tpl":"{{ value_json['humidity'] }}","uniq_id":"k_h"},"lamp":{"p":"light","#,
        r#""cmd_t":"~/lamp/set"}}}"#,
    );
    p.publish(
        "homeassistant/device/kitchen01/config",
        kitchen.as_bytes(),
        true,
    )
    .await;
    // Tasmota's own discovery.
    let tasmota = concat!(
        r#"{"ip":"192.168.1.50","dn":"Greenhouse","hn":"tasmota-A1B2C3-0707","mac":"DC4F22A1B2C3","#,
        r#""md":"Sonoff TH","sw":"13.2.0","t":"tasmota_A1B2C3","ft":"%prefix%/%topic%/","tp":["cmnd","#,
        r#""stat","tele"],"ver":1}"#,
    );
    p.publish(
        "tasmota/discovery/DC4F22A1B2C3/config",
        tasmota.as_bytes(),
        true,
    )
    .await;

    let esp = device_of(&rig.cloud, &rig.qubitro, "ha-240ac4aabbcc").await;
    assert_eq!(
        (esp.brand.as_str(), esp.model.as_str()),
        ("Espressif", "esp32dev")
    );
    let k = device_of(&rig.cloud, &rig.qubitro, "ha-ea334450945afc").await;
    assert_eq!(
        (k.name.as_str(), k.brand.as_str()),
        ("Kitchen", "Bla electronics")
    );
    let t = device_of(&rig.cloud, &rig.qubitro, "tasmota-DC4F22A1B2C3").await;
    assert_eq!(
        (t.name.as_str(), t.brand.as_str(), t.model.as_str()),
        ("Greenhouse", "Tasmota", "Sonoff TH")
    );
    assert_eq!(t.tags, vec!["tasmota".to_string()]);
    assert_eq!(t.metadata["discovered_by"], "tasmota");
    assert_eq!(t.metadata["discovery_id"], "DC4F22A1B2C3");
    assert_eq!(rig.cloud.devices().len(), 3);

    p.publish("garden-node/sensor/temperature/state", b"21.4", false)
        .await;
    assert_eq!(
        rig.obs.on_topic(&esp.id, 1).await[0],
        json!({"temperature":21.4})
    );
    p.publish(
        "kitchen/sensors/state",
        br#"{"temperature":21.46,"humidity":40,"other":1}"#,
        false,
    )
    .await;
    assert_eq!(
        rig.obs.on_topic(&k.id, 1).await[0],
        json!({"temperature":21.5,"humidity":40})
    );
    p.publish("tele/tasmota_A1B2C3/SENSOR",
        br#"{"Time":"2017-02-12T16:11:12","DHT22":{"Temperature":23.9,"Humidity":34.1},"TempUnit":"C"}"#,
        false,
    )
    .await;
    assert_eq!(
        rig.obs.on_topic(&t.id, 1).await[0],
        json!({"DHT22_Temperature":23.9,"DHT22_Humidity":34.1,"TempUnit":"C"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_every_entity_stops_forwarding_retires_the_device_and_a_restart_creates_nothing_new(
) {
    let mut rig = bridged().persistent_broker().extra(DISCOVERY).start().await;
    let z2m = Sensor::connect_as(rig.broker.port, "z2m", "zigbee2mqtt/none", None, None).await;
    publish_z2m(&z2m).await;
    let device = device_of(&rig.cloud, &rig.qubitro, Z2M_ID).await;

    // A restart re-reads every retained config: nothing is created twice, and the
    // readings still flow.
    rig.d.signal_and_wait(libc::SIGTERM);
    rig.d.spawn();
    rig.d.wait_subscribed();
    z2m.publish(
        "zigbee2mqtt/living_room",
        br#"{"temperature":20,"humidity":50,"battery":99}"#,
        false,
    )
    .await;
    assert_eq!(
        rig.obs.on_topic(&device.id, 1).await[0],
        json!({"temperature":20,"humidity":50,"battery":99})
    );
    // Re-published configs (Zigbee2MQTT does so when Home Assistant comes online).
    publish_z2m(&z2m).await;
    z2m.publish("zigbee2mqtt/living_room", br#"{"temperature":19}"#, false)
        .await;
    assert_eq!(
        rig.obs.on_topic(&device.id, 1).await[0],
        json!({"temperature":19})
    );
    assert_eq!(rig.cloud.devices().len(), 1, "{:?}", rig.cloud.devices());

    // One entity removed: its key is no longer forwarded.
    let (t_topic, t_body) = z2m_config("temperature", "°C");
    z2m.publish(&t_topic, b"", true).await;
    z2m.publish(
        "zigbee2mqtt/living_room",
        br#"{"temperature":18,"humidity":51}"#,
        false,
    )
    .await;
    assert_eq!(
        rig.obs.on_topic(&device.id, 1).await[0],
        json!({"humidity":51})
    );

    // All removed: retired, nothing forwarded, the device kept.
    for object in ["humidity", "battery"] {
        z2m.publish(&z2m_config(object, "%").0, b"", true).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, out, _) = rig.d.devices(&["list", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let retired = v
            .as_array()
            .or_else(|| v["devices"].as_array())
            .into_iter()
            .flatten()
            .any(|r| r["sensor_id"] == Z2M_ID && r["state"] == "retired");
        if retired {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not retired: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    z2m.publish(
        "zigbee2mqtt/living_room",
        br#"{"temperature":17,"humidity":52}"#,
        false,
    )
    .await;
    let late: Vec<_> = rig
        .obs
        .drain_for(Duration::from_millis(800))
        .await
        .into_iter()
        .filter(|(t, _)| t == &device.id)
        .collect();
    assert!(late.is_empty(), "forwarded after removal: {late:?}");

    // The config comes back: the same device revives.
    z2m.publish(&t_topic, t_body.as_bytes(), true).await;
    z2m.publish(
        "zigbee2mqtt/living_room",
        br#"{"temperature":16,"humidity":53}"#,
        false,
    )
    .await;
    assert_eq!(
        rig.obs.on_topic(&device.id, 1).await[0],
        json!({"temperature":16})
    );
    assert_eq!(rig.cloud.devices().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_configs_are_skipped_with_a_warning_and_the_daemon_keeps_serving() {
    // Packets up to 2 MiB reach onboardd, so its own limit is what skips the 1 MiB
    // config (with the default 64 KiB the broker never delivers it at all).
    let rig = bridged()
        .extra(DISCOVERY)
        .extra("[mqtt]\nmax_packet_bytes = 2097152")
        .start()
        .await;
    let p = Sensor::connect_as(rig.broker.port, "pub", "nothing/here", None, None).await;

    p.publish("homeassistant/sensor/bad/json/config", b"{not json", false)
        .await;
    rig.d.log.wait_for("config is not valid JSON");
    p.publish(
        "homeassistant/sensor/bad/nostate/config",
        br#"{"dev":{"ids":"nostate"},"uniq_id":"x"}"#,
        false,
    )
    .await;
    rig.d.log.wait_for("has no state topic");
    let huge = format!(
        r#"{{"stat_t":"x","dev":{{"ids":"big"}},"pad":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), huge).unwrap();
    let out = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &rig.broker.port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args(["-t", "homeassistant/sensor/bad/huge/config", "-f"])
        .arg(file.path())
        .output()
        .expect("run mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
    rig.d.log.wait_for("more than discovery.max_config_bytes");
    assert!(rig.cloud.devices().is_empty(), "{:?}", rig.cloud.devices());

    // Still serving announces; discovery ids are not for firmware.
    let mut s = rig.sensor("plain-1").await;
    s.announce(r#"{"name":"Plain"}"#).await;
    assert_opens_to_the_clouds_token(&rig.cloud, &s.reply_with_status("ok").await);
    let mut squatter = rig.sensor("ha-zigbee2mqtt_x").await;
    squatter.announce(r#"{"name":"Squat"}"#).await;
    let r = squatter.reply_with_status("error").await;
    assert_eq!(r["code"], "invalid_field", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_discovery_off_discovery_topics_are_ignored_and_ha_ids_are_ordinary_sensors() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let z2m = Sensor::connect_as(broker.port, "z2m", "zigbee2mqtt/none", None, None).await;
    publish_z2m(&z2m).await;
    let mut s = d.sensor(broker.port, "ha-firmware").await;
    s.announce(r#"{"name":"Firmware"}"#).await;
    let ok = s.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &ok);
    let names: Vec<String> = cloud.devices().into_iter().map(|d| d.name).collect();
    assert_eq!(names, vec!["Firmware".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_whose_state_topic_is_an_announce_topic_creates_nothing_and_that_sensor_is_still_answered(
) {
    let rig = bridged_daemon(DISCOVERY).await;
    let p = Sensor::connect_as(rig.broker.port, "pub", "nothing/here", None, None).await;

    // Retained: re-read at every subscribe, so it would capture `x` for good.
    p.publish(
        "homeassistant/sensor/capture/t/config",
        br#"{"stat_t":"onboard/announce/x","dev":{"ids":"capture"}}"#,
        true,
    )
    .await;
    rig.d
        .log
        .wait_for("state topic \"onboard/announce/x\" is under onboardd's own topic");
    let mut x = rig.sensor("x").await;
    x.announce(r#"{"name":"X"}"#).await;
    assert_opens_to_the_clouds_token(&rig.cloud, &x.reply_with_status("ok").await);
    let names: Vec<String> = rig.cloud.devices().into_iter().map(|d| d.name).collect();
    assert_eq!(names, vec!["X".to_string()], "nothing made from the config");
}

/// A minimal Home Assistant config of device `id` with one entity.
async fn publish_device(p: &Sensor, id: &str) {
    let body = format!(r#"{{"stat_t":"state/{id}","dev":{{"ids":"{id}"}}}}"#);
    p.publish(
        &format!("homeassistant/sensor/{id}/t/config"),
        body.as_bytes(),
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_of_devices_past_discovery_max_devices_are_skipped_with_a_warning() {
    let rig = bridged()
        .extra(DISCOVERY)
        .extra("[discovery]\nmax_devices = 2")
        .start()
        .await;
    let p = Sensor::connect_as(rig.broker.port, "pub", "nothing/here", None, None).await;
    for id in ["dev1", "dev2", "dev3"] {
        publish_device(&p, id).await;
    }
    rig.d
        .log
        .wait_for("homeassistant/sensor/dev3/t/config: skipped: discovery.max_devices = 2");
    device_of(&rig.cloud, &rig.qubitro, "ha-dev1").await;
    device_of(&rig.cloud, &rig.qubitro, "ha-dev2").await;
    assert!(cloud_devices_of(&rig.cloud, "ha-dev3").is_empty());
    // A device already known still takes new entities.
    p.publish(
        "homeassistant/sensor/dev1/u/config",
        br#"{"stat_t":"state/dev1b","dev":{"ids":"dev1"}}"#,
        true,
    )
    .await;
    publish_device(&p, "dev4").await;
    rig.d
        .log
        .wait_for("homeassistant/sensor/dev4/t/config: skipped");
    assert_eq!(
        rig.d
            .log
            .count("homeassistant/sensor/dev1/u/config: skipped"),
        0
    );
    assert_eq!(rig.cloud.devices().len(), 2, "{:?}", rig.cloud.devices());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_flood_cannot_spend_the_firmware_sensors_hourly_cap() {
    let rig = bridged()
        .extra(DISCOVERY)
        .extra(
            "[discovery]\nmax_new_devices_per_hour = 1\n[security]\nmax_new_devices_per_hour = 1",
        )
        .start()
        .await;
    let p = Sensor::connect_as(rig.broker.port, "pub", "nothing/here", None, None).await;
    for id in ["flood1", "flood2"] {
        publish_device(&p, id).await;
    }
    rig.d
        .log
        .wait_for("discovered device ha-flood2 not onboarded");
    assert!(cloud_devices_of(&rig.cloud, "ha-flood2").is_empty());
    let mut s = rig.sensor("fw-1").await;
    s.announce(r#"{"name":"Firmware"}"#).await;
    assert_opens_to_the_clouds_token(&rig.cloud, &s.reply_with_status("ok").await);
}
