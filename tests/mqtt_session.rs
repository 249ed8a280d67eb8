//! The MQTT session with the local broker: what onboardd subscribes to survives every
//! reconnect whatever is queued, and a PUBACK is credited to the publish it answers.
//!
//! onboardd reaches the broker (and, where the test must hold a cloud call, the fake
//! Qubitro) through loopback proxies, so each test decides when bytes flow.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;

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
         [mqtt]\nconnect_timeout_s = 60\n\
         [log]\nlevel = \"info,onboardd=debug,onboardd::mqtt=trace\"",
        cloud_proxy.port
    );
    let d = Daemon::spawn_new(
        broker_proxy.port,
        &cloud,
        &extra,
        vec![("ONBOARDD_FAILPOINT_REQUEST_CHANNEL".into(), "1".into())],
    );
    d.wait_subscribed();

    // A sensor announces; its cloud call is held, and onboardd's ack of the announce
    // has reached the broker, so the channel is empty when the connection dies.
    cloud_proxy.stall();
    let early = Sensor::connect(broker.port, "early").await;
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
    let mut late = Sensor::connect(broker.port, "late").await;
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
    let d = Daemon::spawn_new(proxy.port, &cloud, "", vec![]);
    d.wait_subscribed();

    let denied = Sensor::connect(broker.port, "denied").await;
    denied.announce("{}").await;
    d.log
        .wait_for_async("the broker refused the reply to sensor denied")
        .await;
    assert_eq!(d.state_of("denied").as_deref(), Some("created"));

    // An announce whose error reply cannot be written: the connection is dropped.
    let big = Sensor::connect(broker.port, "big").await;
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
    let mut late = Sensor::connect(broker.port, "late").await;
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
