//! The MQTT session with the local broker: what onboardd subscribes to survives every
//! reconnect whatever is queued, and a PUBACK is credited to the publish it answers.
//!
//! onboardd reaches the broker (and, where the test must hold a cloud call, the fake
//! Qubitro) through loopback proxies, so each test decides when bytes flow.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use harness::qubitro_broker::QubitroBroker;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;

/// Waits until `cond` holds, for what has no event to await (the broker's log, a
/// record's state read through the CLI).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {WAIT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts onboardd on `port` with `extra` and its request channel shrunk to one
/// request (a failpoint knob), logging what it queues, and waits for its subscription.
fn start_with_one_request_slot(
    port: u16,
    cloud: &fake_qubitro::FakeQubitro,
    extra: &str,
) -> Daemon {
    let extra = merge_toml(
        extra,
        "[log]\nlevel = \"info,onboardd=debug,onboardd::mqtt=trace\"",
    );
    let d = Daemon::spawn_new(
        port,
        cloud,
        &extra,
        vec![("ONBOARDD_FAILPOINT_REQUEST_CHANNEL".into(), "1".into())],
    );
    d.wait_subscribed();
    d
}

/// Publishes once at QoS 0 from a client of its own, and returns once it is written:
/// nothing of it waits for an acknowledgement on onboardd's side.
async fn publish_qos0(port: u16, topic: &str, payload: &[u8], retain: bool) {
    let id = format!("qos0-{}", topic.replace('/', "-"));
    let (client, mut events) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 4);
    client
        .publish(topic, QoS::AtMostOnce, retain, payload.to_vec())
        .await
        .expect("queue the publish");
    client.disconnect().await.expect("queue the disconnect");
    let sent = async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => panic!("publishing on {topic}: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, sent)
        .await
        .unwrap_or_else(|_| panic!("publishing on {topic}: not sent within {WAIT:?}"));
}

/// The request channel holds one request (shrunk through the failpoint knob), so a
/// single reply queued during the outage fills it as a roll-out's worth would. The
/// broker comes back without onboardd's session: the subscription must be made
/// anyway, and a sensor that announces afterwards must be answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_back_without_our_session_while_replies_fill_the_request_channel_still_gets_our_subscription(
) {
    let mut broker = Mosquitto::builder().conf("log_type debug\n").start();
    let cloud = fake_cloud().await;
    let cloud_proxy = Proxy::start(cloud.addr().port());
    let broker_proxy = Proxy::start(broker.port);
    let extra = format!(
        "[qubitro]\nbase_url = \"http://127.0.0.1:{}\"\nrequest_timeout_ms = 60000\n\
         [mqtt]\nconnect_timeout_s = 60",
        cloud_proxy.port
    );
    let d = start_with_one_request_slot(broker_proxy.port, &cloud, &extra);

    // A sensor announces; its cloud call is held, and onboardd's ack of the announce
    // has reached the broker, so the channel is empty when the connection dies.
    cloud_proxy.stall();
    let early = d.sensor(broker.port, "early").await;
    early.announce("{}").await;
    d.log.wait_for_async("new sensor; onboarding early").await;
    until("the broker received onboardd's ack of the announce", || {
        broker.log().contains("Received PUBACK from onboardd-test")
    })
    .await;

    // The broker restarts without persistence while onboardd cannot reach it.
    broker_proxy.stall();
    broker.restart();
    broker_proxy.sever();
    d.log.wait_for_async("broker connection lost").await;

    // The held cloud call completes: its reply fills the request channel.
    cloud_proxy.resume();
    d.log
        .wait_for_async("queued a publish to onboard/reply/early")
        .await;

    broker_proxy.resume();
    d.log.wait_for_n_async("subscribed to announces", 2).await;
    let mut late = d.sensor(broker.port, "late").await;
    late.announce("{}").await;
    let ok = late.reply().await;
    assert_eq!(ok["status"], "ok", "{ok}");
    assert_eq!(ok["sensor_id"], "late", "{ok}");
}

/// A publish whose write fails leaves rumqttc's `Outgoing::Publish` event behind; it
/// must be credited to that publish, not to the next one. Here the write fails
/// because the reply is larger than the broker's Maximum Packet Size (250 bytes: an
/// ok reply is ~225, this error reply, which echoes a 128-character request id, ~285),
/// and the broker then restarts without persistence, so that reply is not sent
/// again. The reply to "denied" is refused by the ACL (PUBACK 0x87) before and after:
/// it must stay undelivered, while a later sensor's reply is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_publish_whose_write_failed_a_refused_reply_is_still_not_marked_delivered() {
    let acl = tempfile::NamedTempFile::new().expect("acl file");
    std::fs::write(
        acl.path(),
        "topic readwrite onboard/announce/#\ntopic readwrite onboard/gateway/#\n\
         topic readwrite onboard/stats/#\ntopic read onboard/reply/#\n\
         topic write onboard/reply/big/#\ntopic write onboard/reply/late/#\n",
    )
    .expect("write the acl");
    let mut broker = Mosquitto::builder()
        .conf("acl_file {dir}/acl\nmax_packet_size 250\n")
        .file(acl.path(), "acl")
        .start();
    let cloud = fake_cloud().await;
    let proxy = Proxy::start(broker.port);
    // Proofs off, and sensors without a key, on purpose: the packet-size trick needs
    // an ok reply (clear token, ~225 bytes) smaller than the oversized error reply
    // (~285); a sealed token alone makes an ok reply larger than that.
    let d = Daemon::spawn_new(
        proxy.port,
        &cloud,
        "[security]\nrequire_claim = false",
        vec![],
    );
    d.wait_subscribed();

    let denied = Sensor::connect_unkeyed(broker.port, "denied").await;
    denied.announce("{}").await;
    d.log
        .wait_for_async("the broker refused the reply to sensor denied")
        .await;
    assert_eq!(d.state_of("denied").as_deref(), Some("created"));

    // An announce whose error reply cannot be written: the connection is dropped.
    let big = Sensor::connect_unkeyed(broker.port, "big").await;
    big.announce(&format!(
        r#"{{"request_id":"{}","name":5}}"#,
        "r".repeat(128)
    ))
    .await;
    d.log.wait_for_async("broker connection lost").await;
    // The broker forgets every session, so the oversized reply is not resent.
    proxy.stall();
    broker.restart();
    proxy.sever();
    proxy.resume();

    // On the new session the refused reply goes out again and is refused again; a
    // new sensor's reply is delivered, and "denied" still is not.
    let mut late = Sensor::connect_unkeyed(broker.port, "late").await;
    until("subscribed on the broker's new session", || {
        d.log
            .all()
            .iter()
            .skip_while(|l| !l.contains("session_present=false"))
            .skip(1)
            .skip_while(|l| !l.contains("session_present=false"))
            .any(|l| l.contains("subscribed to announces"))
    })
    .await;
    late.announce("{}").await;
    assert_eq!(late.reply().await["status"], "ok");
    until("the reply to late is marked delivered", || {
        d.state_of("late").as_deref() == Some("delivered")
    })
    .await;
    assert_eq!(d.state_of("denied").as_deref(), Some("created"));
}

/// A state topic discovery starts following while the request channel is full is
/// subscribed as soon as there is room, not at the next reconnect. The broker grants
/// one message in flight (`max_inflight_messages 1`) and onboardd's packets are held
/// on their way to it: one error reply takes the slot, a second waits in the
/// request channel (shrunk to one request), which is then full when the discovery
/// config arrives. Everything the test publishes is QoS 0, so no acknowledgement of
/// onboardd's competes for that room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_topic_followed_while_the_request_channel_is_full_is_subscribed_without_a_reconnect(
) {
    let broker = Mosquitto::builder()
        .conf("max_inflight_messages 1\nlog_type debug\n")
        .start();
    let cloud = fake_cloud().await;
    let qubitro = QubitroBroker::start(&cloud);
    let mut obs = qubitro.observer().await;
    let proxy = Proxy::start(broker.port);
    let extra = format!("{}[discovery]\nhomeassistant = true", qubitro.daemon_toml());
    let d = start_with_one_request_slot(proxy.port, &cloud, &extra);
    // The status onboardd publishes on connecting must have reached the broker (its
    // PUBACK then comes back whatever is held): else it would keep the one slot.
    until("the broker received onboardd's status", || {
        broker.log().contains("Received PUBLISH from onboardd-test")
    })
    .await;

    proxy.stall_upstream();
    for sensor in ["a", "b"] {
        publish_qos0(
            broker.port,
            &format!("onboard/announce/{sensor}"),
            br#"{"name":5}"#,
            false,
        )
        .await;
        d.log
            .wait_for_async(&format!("queued a publish to onboard/reply/{sensor}"))
            .await;
    }
    let config = r#"{"device":{"identifiers":["zigbee2mqtt_0x00158d0001a2b3c4"],"name":"living_room"},
        "state_topic":"zigbee2mqtt/living_room","unique_id":"0x00158d0001a2b3c4_temperature_zigbee2mqtt",
        "unit_of_measurement":"°C","value_template":"{{ value_json.temperature }}"}"#;
    publish_qos0(
        broker.port,
        "homeassistant/sensor/0x00158d0001a2b3c4/temperature/config",
        config.as_bytes(),
        true,
    )
    .await;
    d.log
        .wait_for_async("cannot queue the subscription to zigbee2mqtt/living_room")
        .await;

    proxy.resume();
    d.log
        .wait_for_async("subscribed to followed state topics")
        .await;
    assert_eq!(d.log.count("connected to the broker"), 1, "no reconnect");
    let sensor = "ha-zigbee2mqtt_0x00158d0001a2b3c4";
    until("the discovered device is made", || {
        !cloud_devices_of(&cloud, sensor).is_empty()
    })
    .await;
    let device = cloud_devices_of(&cloud, sensor).remove(0);
    qubitro.wait_for_login(&device).await;
    publish_qos0(
        broker.port,
        "zigbee2mqtt/living_room",
        br#"{"temperature":21.5}"#,
        false,
    )
    .await;
    let got = obs.on_topic(&device.id, 1).await;
    assert_eq!(got[0], serde_json::json!({"temperature":21.5}));
}
