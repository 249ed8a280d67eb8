//! Hostile conditions: a broker that keeps sessions and stalls, a broker that refuses
//! replies, clouds that answer oddly, late or not at all, an operator who forgets a
//! sensor mid-create. Outcomes are checked where the user sees them: what each
//! sensor's own MQTT client received, what the cloud holds, what `devices show` says.

mod common;

use std::time::Duration;

use common::*;
use fake_qubitro::{
    CredentialsAt, Endpoint, FakeOptions, FakeQubitro, Fault, ListShape, NewDevice,
};
use harness::proxy::Proxy;

async fn cloud_with(opts: FakeOptions) -> FakeQubitro {
    FakeQubitro::start(opts).await.expect("start the fake")
}

/// Polls an observable condition until it holds (bounded by [`WAIT`]).
async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until `devices show` reports `state` for the sensor.
async fn wait_for_state(d: &Daemon, sensor: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = d.state_of(sensor);
        if now.as_deref() == Some(state) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sensor} never reached {state:?} (last: {now:?}); log:\n{}",
            d.log.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_beyond_the_receive_maximum_reach_every_sensor_across_a_stalled_broker_restart_with_the_session_kept(
) {
    // mosquitto grants 20 in-flight QoS 1 messages per client; 150 replies, 20 ms each
    // way through a proxy, so many are unacknowledged when the broker stalls and
    // restarts with our session kept (rumqttc then resends what it had pending).
    let mut broker = Mosquitto::start_persistent();
    let proxy = Proxy::start(broker.port);
    proxy.set_latency(Duration::from_millis(20));
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::with_state(proxy.port, &cloud, state.path(), "", vec![]);
    d.wait_subscribed();

    let n = 150;
    let mut sensors = Vec::new();
    for i in 0..n {
        sensors.push(
            Sensor::connect_persistent(broker.port, &format!("burst-{i}"), &d.flashed()).await,
        );
    }
    for s in &sensors {
        s.announce("{}").await;
    }
    // A third of the devices exist: replies are flowing through the slow link.
    wait_for_cloud_requests(&cloud, Endpoint::Create, n / 3).await;
    proxy.stall();
    // Every device is made while the link to the broker is stuck: the rest of the
    // replies pile up in onboardd and in the stalled connection.
    wait_for_cloud_requests(&cloud, Endpoint::Create, n).await;
    broker.restart_clean();
    proxy.resume();
    proxy.sever();

    for s in &mut sensors {
        let ok = s.reply_with_status("ok").await;
        let mine = cloud_devices_of(&cloud, &s.id);
        assert_eq!(mine.len(), 1, "{}: exactly one device", s.id);
        assert_eq!(ok["device_id"], mine[0].id.as_str(), "{}", s.id);
        assert_eq!(ok.token(), mine[0].token.as_str(), "{}", s.id);
    }
    assert_eq!(cloud.devices().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_the_broker_refuses_is_not_counted_as_delivered_and_goes_out_on_the_next_session() {
    // Anonymous clients (the daemon and the sensors) may read every reply topic but
    // write only the reply topic of "fine-1": the broker answers the other replies
    // with PUBACK 0x87 (not authorized).
    let acl = |writable: &str| {
        format!(
            "topic readwrite onboard/announce/#\ntopic readwrite onboard/gateway/#\n\
             topic readwrite onboard/stats/#\ntopic read onboard/reply/#\ntopic write {writable}\n"
        )
    };
    let acl_src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(acl_src.path(), acl("onboard/reply/fine-1/#")).unwrap();
    let mut broker = Mosquitto::builder()
        .conf("acl_file {dir}/acl\n")
        .file(acl_src.path(), "acl")
        .persistent()
        .start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");

    let mut fine = Sensor::connect_persistent(broker.port, "fine-1", &d.flashed()).await;
    fine.announce("{}").await;
    assert_opens_to_the_clouds_token(&cloud, &fine.reply().await);
    wait_for_state(&d, "fine-1", "delivered").await;

    let mut refused = Sensor::connect_persistent(broker.port, "refused-1", &d.flashed()).await;
    refused.announce("{}").await;
    d.log
        .wait_for_async("the broker refused the reply to sensor refused-1")
        .await;
    assert_eq!(d.state_of("refused-1").as_deref(), Some("created"));
    assert!(refused.silent_for(Duration::from_millis(300)).await);

    // The operator fixes the ACL and restarts the broker and onboardd: on its new
    // session the undelivered reply goes out again, without a new announce.
    let mut d = d;
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    // In place: the copy keeps the owner and mode the broker's user needs.
    std::fs::write(broker.dir().join("acl"), acl("onboard/reply/#")).unwrap();
    broker.restart_clean();
    // The sensor is back before onboardd (mosquitto 2.0.11 acknowledged, then never
    // sent, a reply queued for a session it had just restored from disk).
    wait_until(|| broker.log().contains("as persistent-sensor-refused-1")).await;
    d.spawn();
    let ok = refused.reply_with_status("ok").await;
    assert_eq!(
        ok["device_id"],
        cloud_devices_of(&cloud, "refused-1")[0].id.as_str()
    );
    assert_opens_to_the_clouds_token(&cloud, &ok);
    wait_for_state(&d, "refused-1", "delivered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_down_and_the_cloud_hanging_exits_0_within_10_seconds() {
    let mut broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "[qubitro]\nmax_in_flight = 4");
    let mut d = d;
    let sensors = {
        let mut v = Vec::new();
        for i in 0..30 {
            v.push(d.sensor(broker.port, &format!("stuck-{i}")).await);
        }
        v
    };
    // Lookups fail fast for a while (every failure queues a pending reply), then
    // every request hangs.
    cloud.push_faults(
        Endpoint::List,
        (0..600)
            .map(|_| status_fault(503))
            .chain((0..100).map(|_| Fault::Hang))
            .collect(),
    );
    for s in &sensors {
        s.announce("{}").await;
    }
    wait_for_cloud_requests(&cloud, Endpoint::List, 30).await;
    broker.kill();
    // With the broker gone, pending replies pile up in the MQTT request queue until
    // it is full, and the cloud now hangs.
    wait_for_cloud_requests(&cloud, Endpoint::List, 610).await;
    let status = d
        .signal_and_wait_within(libc::SIGTERM, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log.text()));
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_during_an_in_flight_create_wins_and_the_sensor_is_onboarded_anew_at_once() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // The create is made at once but answered only after a while.
    cloud.push_faults(Endpoint::Create, vec![Fault::Delay(Duration::from_secs(2))]);
    let d = Daemon::start(
        &broker,
        &cloud,
        "[security]\nnew_sensor_cooldown_s = 3600\n[qubitro]\nrequest_timeout_ms = 10000",
    );
    let mut s = d.sensor(broker.port, "forget-me").await;
    s.announce("{}").await;
    wait_for_cloud_requests(&cloud, Endpoint::Create, 1).await;
    let (code, msg, err) = d.devices(&["forget", "forget-me"]);
    assert_eq!(code, 0, "{msg}{err}");
    // The late answer finds the record gone and writes nothing back.
    d.log
        .wait_for_async("was forgotten while its device was being made")
        .await;
    assert_eq!(d.state_of("forget-me"), None, "forget wins");

    // Onboarded anew at once: the cool-down is cleared, and the device that the
    // late create made is adopted, not duplicated.
    s.announce(r#"{"request_id":"again"}"#).await;
    let ok = s.reply_with_status("ok").await;
    assert_eq!(ok["request_id"], "again");
    assert_eq!(cloud.devices().len(), 1);
    assert_opens_to_the_clouds_token(&cloud, &ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_any_duration_is_clamped_and_the_daemon_keeps_serving() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.push_faults(Endpoint::List, vec![retry_after_fault(429, u64::MAX)]);
    let d = Daemon::start(&broker, &cloud, "[qubitro]\nretry_max_ms = 2000");
    let mut s = d.sensor(broker.port, "huge-ra").await;
    s.announce("{}").await;
    let pending = s.reply().await;
    assert_eq!(pending["status"], "pending", "{pending}");
    assert!(
        pending["retry_after_s"].as_u64().unwrap() <= 2,
        "clamped to retry_max_ms: {pending}"
    );
    let ok = s.reply_with_status("ok").await;
    assert_eq!(ok["device_id"], cloud.devices()[0].id.as_str());
    assert_opens_to_the_clouds_token(&cloud, &ok);
    assert!(d.log.count("panicked") == 0, "{}", d.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_on_the_get_after_a_create_keeps_the_sensor_and_its_one_device() {
    let broker = Mosquitto::start();
    // The create answers only the new id; the credentials need a GET, which the
    // API does not see yet (read-after-write lag) the first two times.
    let cloud = cloud_with(FakeOptions {
        credentials_at: CredentialsAt::Absent,
        ..FakeOptions::default()
    })
    .await;
    cloud.push_faults(Endpoint::Get, vec![Fault::NotFound, Fault::NotFound]);
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "lagging").await;
    s.announce("{}").await;
    let mut seen = Vec::new();
    let ok = loop {
        let r = s.reply().await;
        if r["status"] == "ok" {
            break r;
        }
        seen.push(r);
    };
    assert!(
        seen.iter().all(|r| r["status"] == "pending"),
        "never rejected: {seen:?}"
    );
    assert_eq!(
        cloud.devices().len(),
        1,
        "the device was adopted, not made again"
    );
    assert_eq!(ok["device_id"], cloud.devices()[0].id.as_str());
    assert_eq!(ok.token(), cloud.devices()[0].token.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_announces_beyond_the_internal_queue_are_all_answered() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // The smallest queues the config allows, and a broker window far larger.
    let d = Daemon::start(
        &broker,
        &cloud,
        "[mqtt]\nreceive_maximum = 10\n[announce]\nqueue_capacity = 10",
    );
    let mut sensors = Vec::new();
    for i in 0..100 {
        sensors.push(d.sensor(broker.port, &format!("flood-{i}")).await);
    }
    for s in &sensors {
        s.announce("{}").await;
    }
    for s in &mut sensors {
        let ok = s.reply_with_status("ok").await;
        assert_eq!(ok["sensor_id"], s.id.as_str());
        assert_opens_to_the_clouds_token(&cloud, &ok);
    }
    assert_eq!(cloud.devices().len(), 100);
    assert_eq!(d.log.count("announce left unacknowledged"), 0);
}

/// A device made earlier for `sensor` (by another gateway, or before a lost database).
fn plant(cloud: &FakeQubitro, sensor: &str, name: &str) -> fake_qubitro::FakeDevice {
    let mut d = NewDevice::named(name);
    d.metadata.insert("sensor_id".into(), sensor.into());
    cloud.insert_device(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_answer_that_cannot_be_read_creates_nothing_until_it_can() {
    for shape in [
        ListShape::Unrecognised,
        ListShape::NoMetadata,
        ListShape::SensorIdUnderOtherKey,
    ] {
        let broker = Mosquitto::start();
        let cloud = fake_cloud().await;
        let existing = plant(&cloud, "odd-1", "made elsewhere");
        cloud.set_list_shape(shape);
        let d = Daemon::start(&broker, &cloud, "");
        let mut s = d.sensor(broker.port, "odd-1").await;
        s.announce("{}").await;
        // Told to wait, again and again, while the answer stays unreadable.
        for _ in 0..2 {
            let r = s.reply().await;
            assert_eq!(r["status"], "pending", "{shape:?}: {r}");
        }
        wait_for_cloud_requests(&cloud, Endpoint::List, 2).await;
        assert_eq!(
            cloud.count(Endpoint::Create),
            0,
            "{shape:?}: an unreadable lookup is never 'not found'; log:\n{}",
            d.log.text()
        );
        // Once the lookup is readable, the device made elsewhere is adopted.
        cloud.set_list_shape(ListShape::Standard);
        let ok = s.reply_with_status("ok").await;
        assert_eq!(ok["device_id"], existing.id.as_str(), "{shape:?}");
        assert_eq!(ok.token(), existing.token.as_str(), "{shape:?}");
        assert_eq!(cloud.devices().len(), 1, "{shape:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_under_devices_or_items_adopts_the_existing_device() {
    for shape in [ListShape::DevicesKey, ListShape::ItemsKey] {
        let broker = Mosquitto::start();
        let cloud = fake_cloud().await;
        let existing = plant(&cloud, "keyed-1", "made elsewhere");
        cloud.set_list_shape(shape);
        let d = Daemon::start(&broker, &cloud, "");
        let mut s = d.sensor(broker.port, "keyed-1").await;
        s.announce("{}").await;
        let ok = s.reply_with_status("ok").await;
        assert_eq!(ok["device_id"], existing.id.as_str(), "{shape:?}");
        assert_opens_to_the_clouds_token(&cloud, &ok);
        assert_eq!(cloud.count(Endpoint::Create), 0, "{shape:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paginated_lookup_is_followed_to_the_page_that_holds_the_device() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // Seven devices of other sensors, listed first; the server ignores the filter
    // and pages by two, so ours is on page four.
    let existing = plant(&cloud, "paged-1", "ours");
    for i in 0..7 {
        plant(&cloud, &format!("other-{i}"), "not ours");
    }
    cloud.set_list_ignores_filter(true);
    cloud.set_list_newest_first(true);
    cloud.set_list_page_size(Some(2));
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "paged-1").await;
    s.announce("{}").await;
    let ok = s.reply_with_status("ok").await;
    assert_eq!(ok["device_id"], existing.id.as_str());
    assert_opens_to_the_clouds_token(&cloud, &ok);
    assert_eq!(cloud.count(Endpoint::Create), 0);
    assert!(
        cloud.count(Endpoint::List) >= 4,
        "every page was read: {}",
        cloud.count(Endpoint::List)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_matching_devices_adopt_the_oldest_whatever_the_list_order() {
    for created_at in [true, false] {
        let broker = Mosquitto::start();
        let cloud = fake_cloud().await;
        let planted: Vec<_> = (0..3)
            .map(|i| plant(&cloud, "twice-1", &format!("copy {i}")))
            .collect();
        cloud.set_created_at_field(created_at);
        cloud.set_list_newest_first(true);
        let d = Daemon::start(&broker, &cloud, "");
        let mut s = d.sensor(broker.port, "twice-1").await;
        s.announce("{}").await;
        let ok = s.reply_with_status("ok").await;
        // With creation times: the first one made. Without: the smallest id, the
        // same choice on every gateway and after every restart.
        let expected = if created_at {
            planted[0].id.clone()
        } else {
            planted.iter().map(|d| d.id.clone()).min().unwrap()
        };
        assert_eq!(
            ok["device_id"],
            expected.as_str(),
            "created_at: {created_at}"
        );
        assert_opens_to_the_clouds_token(&cloud, &ok);
        assert_eq!(cloud.count(Endpoint::Create), 0);
    }
}
