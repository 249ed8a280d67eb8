//! The MQTT session with the local broker: what onboardd subscribes to survives every
//! reconnect whatever is queued, and a PUBACK is credited to the publish it answers.
//!
//! onboardd reaches the broker (and, where the test must hold a cloud call, the fake
//! Qubitro) through loopback proxies, so each test decides when bytes flow.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;

/// Waits until the broker's log holds `needle` (the broker logs on its own
/// stderr; there is no other event to await for what it received).
async fn broker_logged(broker: &Mosquitto, needle: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !broker.log().contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not log {needle:?} within {WAIT:?}:\n{}",
            broker.log()
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
    broker_logged(&broker, "Received PUBACK from onboardd-test").await;

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
