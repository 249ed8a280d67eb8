//! The size limits of the shipped broker config (config/mosquitto/mosquitto.conf):
//! mosquitto runs with exactly its `max_packet_size`, `max_queued_bytes` and
//! `max_queued_messages` lines, and a 1 MiB publish never reaches a subscriber
//! while an announce of the largest size onboardd accepts still does.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// The limit lines of the shipped mosquitto.conf, exactly as shipped.
fn shipped_limits() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto/mosquitto.conf");
    let text = std::fs::read_to_string(&path).expect("read config/mosquitto/mosquitto.conf");
    let lines: Vec<String> = text
        .lines()
        .filter(|l| {
            l.starts_with("max_packet_size ")
                || l.starts_with("max_queued_bytes ")
                || l.starts_with("max_queued_messages ")
        })
        .map(str::to_string)
        .collect();
    for key in ["max_packet_size", "max_queued_bytes", "max_queued_messages"] {
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.split(' ').next() == Some(key))
                .count(),
            1,
            "the shipped mosquitto.conf must set {key} once: {lines:?}"
        );
    }
    lines
}

fn value_of(lines: &[String], key: &str) -> u64 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} in {lines:?}"))
}

#[test]
fn the_shipped_packet_limit_is_a_few_kib_above_the_largest_announce() {
    let limits = shipped_limits();
    let max_packet = value_of(&limits, "max_packet_size");
    let cfg = onboardd::config::Config::from_toml("[qubitro]\nproject_id = \"p\"\napi_key = \"k\"")
        .unwrap();
    let max_payload = cfg.announce.max_payload_bytes as u64;
    assert!(
        max_packet >= max_payload + 1024 && max_packet <= max_payload + 16 * 1024,
        "max_packet_size {max_packet} must be a few KiB above announce.max_payload_bytes {max_payload}"
    );
    assert!(value_of(&limits, "max_queued_bytes") <= 64 << 20);
    assert!(value_of(&limits, "max_queued_messages") > 0);
}

/// A subscriber to `filter` that itself accepts packets of any size (so that the
/// broker, not the client, is what the test measures).
async fn subscriber(port: u16, filter: &str) -> mpsc::UnboundedReceiver<(String, usize)> {
    let mut opts = MqttOptions::new(
        format!("limits-sub-{}", fastrand::u32(..)),
        "127.0.0.1",
        port,
    );
    opts.set_max_packet_size(Some(16 << 20));
    let (client, mut el) = AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
    let f = filter.to_string();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(f.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).to_string();
                    if tx.send((topic, p.payload.len())).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(WAIT, sub_rx.recv())
        .await
        .expect("subscribed within WAIT");
    rx
}

/// `mosquitto_pub` over MQTT 3.1.1 (no Maximum Packet Size in its CONNACK, so the
/// client sends whatever it is given and the broker must refuse it).
fn publish(port: u16, topic: &str, payload: &Path) -> std::process::Output {
    Command::new("mosquitto_pub")
        .args(["-V", "mqttv311", "-h", "127.0.0.1", "-q", "1", "-t", topic])
        .arg("-p")
        .arg(port.to_string())
        .arg("-f")
        .arg(payload)
        .output()
        .expect("run mosquitto_pub")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_broker_limits_refuse_a_1_mib_publish() {
    let broker = Mosquitto::builder()
        .conf(&shipped_limits().join("\n"))
        .start();
    let mut sub = subscriber(broker.port, "limits/#").await;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 1 << 20]).unwrap();
    let announce_sized = dir.path().join("announce");
    std::fs::write(&announce_sized, vec![b'y'; 4096]).unwrap();

    let out = publish(broker.port, "limits/big", &big);
    // The broker cuts the connection: the client may or may not notice in time to
    // say so, but nothing reaches the subscriber (checked below).
    eprintln!(
        "mosquitto_pub of 1 MiB: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let out = publish(broker.port, "limits/announce", &announce_sized);
    assert!(out.status.success(), "{out:?}");

    // Messages from one broker to one subscriber arrive in order: the first one is
    // the 4 KiB announce, so the 1 MiB publish before it was never delivered.
    let (topic, len) = tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("the 4 KiB publish is delivered")
        .expect("subscriber alive");
    assert_eq!((topic.as_str(), len), ("limits/announce", 4096));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.recv())
            .await
            .is_err(),
        "nothing else may arrive"
    );
    let log = broker.log();
    assert!(
        !log.is_empty(),
        "the broker log is readable (for a failure's diagnosis)"
    );
}
