//! Acknowledge-through, through the daemon: a bridged reading is forwarded at once
//! and acknowledged to the local broker only when Qubitro's broker acknowledged it;
//! it is written to the store only when the uplink cannot take it in time. The
//! stand-in for Qubitro's broker (`harness::qubitro_broker`) sits behind a proxy
//! where a test needs it to withhold its PUBACKs.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use harness::qubitro_broker::Observer;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A plain MQTT 5 client on the local broker that publishes readings. Its own
/// PUBACKs come from the broker whatever onboardd does: onboardd's are read in the
/// broker's debug log instead.
struct Publisher {
    client: AsyncClient,
}

impl Publisher {
    async fn connect(port: u16) -> Publisher {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "pub-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = AsyncClient::new(opts, 1024);
        let (up_tx, mut up) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = up_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, up.recv())
            .await
            .expect("the publisher connected in time");
        Publisher { client }
    }

    async fn publish(&self, sensor: &str, qos: QoS, n: u64) {
        let topic = format!("onboard/data/{sensor}");
        let body = format!(r#"{{"n":{n}}}"#).into_bytes();
        tokio::time::timeout(WAIT, self.client.publish(topic, qos, false, body))
            .await
            .expect("publish queued in time")
            .expect("publish");
    }
}

/// The bytes the process has caused to be written to storage (`/proc/<pid>/io`).
fn write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/<pid>/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes in /proc/<pid>/io")
}

/// `write_bytes` once the daemon has written nothing for 1.5 s (sled's own
/// background work included).
async fn quiet_write_bytes(pid: u32) -> u64 {
    const QUIET: Duration = Duration::from_millis(1500);
    let deadline = Instant::now() + WAIT;
    let mut last = write_bytes(pid);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = write_bytes(pid);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon kept writing for {WAIT:?}"
        );
    }
}

/// The `n` of each reading of each of `devices` the observer receives until each
/// of `wanted` was seen for every device, first arrivals only (at least once: a
/// reading may come twice).
async fn first_arrivals(
    obs: &mut Observer,
    devices: &[&str],
    wanted: std::ops::Range<u64>,
) -> HashMap<String, Vec<u64>> {
    let mut seen: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut first: HashMap<String, Vec<u64>> = HashMap::new();
    let done = |seen: &HashMap<String, HashSet<u64>>| {
        devices.iter().all(|d| {
            seen.get(*d)
                .is_some_and(|s| wanted.clone().all(|v| s.contains(&v)))
        })
    };
    while !done(&seen) {
        let (topic, payload) = obs.next().await;
        if !devices.contains(&topic.as_str()) {
            continue;
        }
        let v: Value = serde_json::from_slice(&payload).expect("JSON");
        let n = v["n"].as_u64().expect("a reading with n");
        if wanted.contains(&n) && seen.entry(topic.clone()).or_default().insert(n) {
            first.entry(topic).or_default().push(n);
        }
    }
    first
}

/// What `devices show` says of the bridge's side of `sensor`.
fn shown_bridge(d: &Daemon, sensor: &str) -> Value {
    let (code, out, err) = d.devices(&["show", sensor]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    v["bridge"].clone()
}

/// Waits (at most [`WAIT`]) until `devices show` says `sensor` has `n` buffered.
async fn until_buffered(d: &Daemon, sensor: &str, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let b = shown_bridge(d, sensor);
        if b["buffered"] == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sensor}: {b} instead of {n} buffered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_healthy_uplink_200_readings_at_a_sensors_pace_write_nothing_to_the_store() {
    let mut rig = bridged().start().await;
    let mut s = rig.sensor("br-quiet").await;
    onboard_bridged(&mut s).await;
    let device = cloud_devices_of(&rig.cloud, "br-quiet").remove(0);
    let p = Publisher::connect(rig.broker.port).await;
    // The uplink is up once a first reading went through.
    p.publish("br-quiet", QoS::AtLeastOnce, 0).await;
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0], json!({"n":0}));

    let before = quiet_write_bytes(rig.d.pid()).await;
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    for n in 1..=200 {
        pace.tick().await;
        p.publish("br-quiet", QoS::AtLeastOnce, n).await;
    }
    let got = rig.obs.on_topic(&device.id, 200).await;
    let ns: Vec<u64> = got.iter().map(|v| v["n"].as_u64().expect("n")).collect();
    assert_eq!(ns, (1..=200).collect::<Vec<_>>());
    let after = quiet_write_bytes(rig.d.pid()).await;
    assert_eq!(
        after - before,
        0,
        "bytes written for 200 readings acknowledged through; log:\n{}",
        rig.d.log.text()
    );
    assert_eq!(shown_bridge(&rig.d, "br-quiet")["buffered"], 0);
}

/// The first line of the local broker's log, from the `skip`th line on, for which
/// `find` returns something (the broker logs each packet with `log_type debug`).
async fn broker_line<T>(
    broker: &Mosquitto,
    skip: usize,
    find: impl Fn(&str) -> Option<T>,
) -> (usize, T) {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = broker.log();
        if let Some(found) = log
            .lines()
            .enumerate()
            .skip(skip)
            .find_map(|(i, l)| find(l).map(|t| (i, t)))
        {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "not in the broker's log within {WAIT:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The message id of a PUBLISH mosquitto sent onboardd on `topic`, from its debug
/// line `Sending PUBLISH to onboardd-… (d0, q1, r0, m7, 'topic', … (n bytes))`.
fn publish_to_onboardd(line: &str, topic: &str) -> Option<u16> {
    let rest = line.split("Sending PUBLISH to onboardd-").nth(1)?;
    if !rest.contains(&format!("'{topic}'")) {
        return None;
    }
    rest.split(", m").nth(1)?.split(',').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_is_acknowledged_locally_only_after_qubitros_puback_or_once_spilled_after_spill_after_ms(
) {
    const SPILL_AFTER: Duration = Duration::from_millis(1000);
    // The local broker logs every packet: onboardd's PUBACK to it is seen there
    // (the sensor's own PUBACK comes from the broker, whatever onboardd does).
    // The uplink reaches the stand-in through a proxy that can withhold its PUBACKs.
    let mut rig = bridged()
        .broker_conf("log_type debug\n")
        .through_proxy()
        .extra(&format!(
            "[bridge]\nspill_after_ms = {}\n",
            SPILL_AFTER.as_millis()
        ))
        .start()
        .await;
    let mut s = rig.sensor("br-held").await;
    onboard_bridged(&mut s).await;
    let device = cloud_devices_of(&rig.cloud, "br-held").remove(0);
    let topic = "onboard/data/br-held";
    let p = Publisher::connect(rig.broker.port).await;
    p.publish("br-held", QoS::AtLeastOnce, 0).await;
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0], json!({"n":0}));
    // The first reading went through the buffer (no uplink yet); the next are held.
    until_buffered(&rig.d, "br-held", 0).await;
    let (first, _) = broker_line(&rig.broker, 0, |l| publish_to_onboardd(l, topic)).await;

    // Qubitro's broker takes the next reading but withholds its PUBACK.
    rig.proxy().stall_downstream();
    let sent_at = Instant::now();
    p.publish("br-held", QoS::AtLeastOnce, 1).await;
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0], json!({"n":1}));
    let (at, mid) = broker_line(&rig.broker, first + 1, |l| publish_to_onboardd(l, topic)).await;
    // onboardd's PUBACK of it waits for Qubitro's, then for the spill.
    let puback = "Received PUBACK from onboardd-";
    let mid_is = format!("(Mid: {mid}, RC:0)");
    broker_line(&rig.broker, at, |l| {
        (l.contains(puback) && l.contains(&mid_is)).then_some(())
    })
    .await;
    let waited = sent_at.elapsed();
    assert!(
        waited >= SPILL_AFTER,
        "acknowledged locally after {waited:?}, before Qubitro's PUBACK and before spill_after_ms; log:\n{}",
        rig.d.log.text()
    );
    assert_eq!(
        shown_bridge(&rig.d, "br-held")["buffered"],
        1,
        "spilled to the store"
    );

    // The withheld PUBACK arrives: the spilled copy is not needed and is not sent again.
    rig.proxy().resume();
    until_buffered(&rig.d, "br-held", 0).await;
    p.publish("br-held", QoS::AtLeastOnce, 2).await;
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0], json!({"n":2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uplink_outage_mid_stream_loses_no_reading_qos_1_or_qos_0_and_keeps_each_devices_order()
{
    let mut rig = bridged().start().await;
    let mut one = rig.sensor("br-q1").await;
    onboard_bridged(&mut one).await;
    let mut zero = rig.sensor("br-q0").await;
    onboard_bridged(&mut zero).await;
    let dev1 = cloud_devices_of(&rig.cloud, "br-q1").remove(0);
    let dev0 = cloud_devices_of(&rig.cloud, "br-q0").remove(0);
    let p = Publisher::connect(rig.broker.port).await;

    let total = 150;
    let mut pace = tokio::time::interval(Duration::from_millis(15));
    for n in 0..total {
        if n == 50 {
            rig.qubitro.stop();
        }
        if n == 100 {
            rig.qubitro.start_again();
        }
        pace.tick().await;
        p.publish("br-q1", QoS::AtLeastOnce, n).await;
        p.publish("br-q0", QoS::AtMostOnce, n).await;
    }
    let expected: Vec<u64> = (0..total).collect();
    let first = first_arrivals(&mut rig.obs, &[&dev1.id, &dev0.id], 0..total).await;
    assert_eq!(first[&dev1.id], expected, "QoS 1");
    assert_eq!(first[&dev0.id], expected, "QoS 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_acknowledged_through_arrive_in_order_across_a_kill_9_of_onboardd() {
    let mut rig = bridged().persistent_broker().start().await;
    let mut s = Sensor::connect_persistent(rig.broker.port, "br-k9", &rig.d.flashed()).await;
    onboard_bridged(&mut s).await;
    let device = cloud_devices_of(&rig.cloud, "br-k9").remove(0);
    let p = Publisher::connect(rig.broker.port).await;

    // Killed while readings are in flight to Qubitro, acknowledged to nobody yet:
    // the local broker delivers them again to the next onboardd.
    let total = 200;
    for n in 0..total {
        if n == 100 {
            rig.d.kill9();
        }
        p.publish("br-k9", QoS::AtLeastOnce, n).await;
    }
    rig.d.spawn();
    rig.d.wait_subscribed();
    let expected: Vec<u64> = (0..total).collect();
    let first = first_arrivals(&mut rig.obs, &[&device.id], 0..total).await;
    assert_eq!(first[&device.id], expected);
}

/// In the local broker's debug log, the message ids of the PUBLISHes it sent onboardd
/// on `topics`, and of onboardd's PUBACKs of those, each in log order.
fn onboardd_mids(log: &str, topics: &[&str]) -> (Vec<u16>, Vec<u16>) {
    let sent: Vec<u16> = log
        .lines()
        .filter_map(|l| topics.iter().find_map(|t| publish_to_onboardd(l, t)))
        .collect();
    let acked = log
        .lines()
        .filter_map(|l| {
            let rest = l.split("Received PUBACK from onboardd-").nth(1)?;
            rest.split("(Mid: ").nth(1)?.split(',').next()?.parse().ok()
        })
        .filter(|m| sent.contains(m))
        .collect();
    (sent, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_pubacks_leave_in_the_order_the_readings_arrived_across_devices() {
    // onboardd's PUBACKs are seen in the local broker's debug log.
    // One uplink at a time: while one device holds it and is acknowledged through,
    // the other has none, so its readings are spilled and wait for a paced flush.
    let mut rig = bridged()
        .broker_conf("log_type debug\n")
        .extra("[bridge]\nmax_connections = 1\nspill_flush_ms = 300\n")
        .start()
        .await;
    let mut fast = rig.sensor("br-fast").await;
    onboard_bridged(&mut fast).await;
    let mut slow = rig.sensor("br-slow").await;
    onboard_bridged(&mut slow).await;
    let dev_fast = cloud_devices_of(&rig.cloud, "br-fast").remove(0);
    let p = Publisher::connect(rig.broker.port).await;
    p.publish("br-fast", QoS::AtLeastOnce, 0).await;
    assert_eq!(rig.obs.on_topic(&dev_fast.id, 1).await[0], json!({"n":0}));
    until_buffered(&rig.d, "br-fast", 0).await;

    let n = 20;
    for i in 1..=n {
        p.publish("br-slow", QoS::AtLeastOnce, i).await;
        p.publish("br-fast", QoS::AtLeastOnce, i).await;
    }
    let topics = ["onboard/data/br-slow", "onboard/data/br-fast"];
    let deadline = Instant::now() + WAIT;
    loop {
        let log = rig.broker.log();
        let (sent, acked) = onboardd_mids(&log, &topics);
        // The warm-up reading and the stream, each acknowledged.
        if acked.len() == 2 * n as usize + 1 {
            assert_eq!(
                acked, sent,
                "onboardd's PUBACK order = the order it received them"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} readings acknowledged by onboardd within {WAIT:?}",
            acked.len(),
            sent.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_broker_lets_onboardd_hold_more_readings_than_its_default_in_flight_limit_of_20()
{
    // onboardd's PUBACKs are seen in the local broker's debug log.
    let mut rig = bridged()
        .broker_conf("log_type debug\n")
        .through_proxy()
        .extra("[bridge]\nspill_after_ms = 5000\n")
        .start()
        .await;
    let mut s = rig.sensor("br-win").await;
    onboard_bridged(&mut s).await;
    let device = cloud_devices_of(&rig.cloud, "br-win").remove(0);
    let topic = "onboard/data/br-win";
    let p = Publisher::connect(rig.broker.port).await;
    p.publish("br-win", QoS::AtLeastOnce, 0).await;
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0], json!({"n":0}));
    until_buffered(&rig.d, "br-win", 0).await;

    // Qubitro withholds its PUBACKs: onboardd acknowledges none of these before
    // spill_after_ms, yet the broker hands it all 60 at once.
    rig.proxy().stall_downstream();
    let n = 60;
    for i in 1..=n {
        p.publish("br-win", QoS::AtLeastOnce, i).await;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let (sent, acked) = onboardd_mids(&rig.broker.log(), &[topic]);
        // The warm-up reading was acknowledged; none of the 60 may be.
        assert!(
            acked.len() <= 1,
            "onboardd acknowledged {acked:?} while Qubitro withheld its PUBACKs"
        );
        if sent.len() == n as usize + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker sent onboardd {} of {n} readings before any acknowledgement",
            sent.len().saturating_sub(1)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.proxy().resume();
}
