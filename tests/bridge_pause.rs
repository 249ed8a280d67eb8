//! What Qubitro refuses, through the daemon. A bridged device whose login is refused
//! is paused, not given up: `onboardd devices show` says why and when it is retried,
//! and `onboardd devices resume` retries it at once over the control socket. A
//! reading refused again and again (a non-success PUBACK, made here by a proxy in
//! front of the stand-in broker) is dropped and counted after five refusals.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use harness::qubitro_broker::QubitroBroker;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// `devices show SENSOR` as JSON.
fn show(d: &Daemon, sensor: &str) -> Value {
    let (code, out, err) = d.devices(&["show", sensor]);
    assert_eq!(code, 0, "devices show {sensor}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("devices show {sensor}: {e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_resume_retries_a_paused_device_at_once_and_its_readings_go_out() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // The stand-in learns the devices of another cloud: every device this daemon
    // makes is refused until its login is added below.
    let elsewhere = fake_cloud().await;
    let qubitro = QubitroBroker::start(&elsewhere);
    let mut obs = qubitro.observer().await;
    // The first retry would come after 5 to 10 minutes: only a resume is quick.
    let d = Daemon::start(
        &broker,
        &cloud,
        &format!(
            "[qubitro]\nbroker_host = \"127.0.0.1\"\nbroker_port = {}\nbroker_tls = false\n\
             [bridge]\nreconnect_max_ms = 600000\n",
            qubitro.port()
        ),
    );
    let mut s = d.sensor(broker.port, "br-p").await;
    s.announce(r#"{"bridge":true,"name":"Paused"}"#).await;
    s.reply_with_status("ok").await;
    let device = cloud_devices_of(&cloud, "br-p").remove(0);
    s.publish("onboard/data/br-p", br#"{"n":1}"#, false).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    let shown = loop {
        let shown = show(&d, "br-p");
        if shown["bridge"]["state"] == "paused" {
            break shown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not paused within {WAIT:?}: {shown}; log:\n{}",
            d.log.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let bridge = &shown["bridge"];
    assert!(
        bridge["reason"]
            .as_str()
            .is_some_and(|r| r.contains("login refused")),
        "{shown}"
    );
    let retry_in = bridge["next_retry_in_s"].as_u64().expect("next_retry_in_s");
    assert!((240..=600).contains(&retry_in), "{shown}");
    assert_eq!(bridge["buffered"], 1, "{shown}");
    assert!(
        d.log.text().contains("BRIDGE PAUSED"),
        "the pause is said loudly; log:\n{}",
        d.log.text()
    );

    qubitro
        .add_writer(&device.id, &device.token, &device.id)
        .await;
    let (code, out, err) = d.devices(&["resume", "br-p"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumed"), "{out}");
    assert_eq!(obs.on_topic(&device.id, 1).await, vec![json!({"n":1})]);

    let (code, out, _) = d.devices(&["resume", "no-such-sensor"]);
    assert_eq!(code, 1, "{out}");
}

/// Between the bridge and the stand-in Qubitro broker: passes every byte, except
/// that while `refusing` is set it turns each PUBACK from the broker into PUBACK
/// 0x80 "unspecified error" (the broker still took the reading, as a broker that
/// accepts and then fails to store it would).
struct RefusingProxy {
    port: u16,
    refusing: Arc<AtomicBool>,
}

impl RefusingProxy {
    async fn start(upstream: u16) -> RefusingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let refusing = Arc::new(AtomicBool::new(true));
        let flag = refusing.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (mut client_r, client_w) = client.into_split();
                let (broker_r, mut broker_w) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_r, &mut broker_w).await;
                });
                tokio::spawn(rewrite_pubacks(broker_r, client_w, flag.clone()));
            }
        });
        RefusingProxy { port, refusing }
    }
}

/// Copies MQTT packets from the broker to the client, refusing PUBACKs while asked.
async fn rewrite_pubacks(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    refusing: Arc<AtomicBool>,
) {
    loop {
        let mut first = [0u8; 1];
        if from.read_exact(&mut first).await.is_err() {
            return;
        }
        // The remaining length: a variable byte integer (MQTT 5 §1.5.5).
        let (mut len, mut shift, mut header) = (0usize, 0, vec![first[0]]);
        loop {
            let mut b = [0u8; 1];
            if from.read_exact(&mut b).await.is_err() {
                return;
            }
            header.push(b[0]);
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        if from.read_exact(&mut body).await.is_err() {
            return;
        }
        let out = if first[0] == 0x40 && len >= 2 && refusing.load(Ordering::SeqCst) {
            vec![0x40, 3, body[0], body[1], 0x80]
        } else {
            header.extend_from_slice(&body);
            header
        };
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_qubitro_refuses_again_and_again_is_dropped_and_counted_and_the_next_goes_out() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let qubitro = QubitroBroker::start(&cloud);
    let mut obs = qubitro.observer().await;
    let proxy = RefusingProxy::start(qubitro.port()).await;
    let mut stats =
        Sensor::connect_as(broker.port, "stats", "onboard/gateway/+/stats", None, None).await;
    let d = Daemon::start(
        &broker,
        &cloud,
        &format!(
            "[qubitro]\nbroker_host = \"127.0.0.1\"\nbroker_port = {}\nbroker_tls = false\n\
             [bridge]\nreconnect_max_ms = 500\n[log]\nstats_interval_s = 1\n",
            proxy.port
        ),
    );
    let mut s = d.sensor(broker.port, "br-r").await;
    s.announce(r#"{"bridge":true,"name":"Refused"}"#).await;
    s.reply_with_status("ok").await;
    let device = cloud_devices_of(&cloud, "br-r").remove(0);

    s.publish("onboard/data/br-r", br#"{"n":1}"#, false).await;
    // Each refusal was a send the broker took: the observer sees every attempt.
    for _ in 0..5 {
        assert_eq!(obs.on_topic(&device.id, 1).await, vec![json!({"n":1})]);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, v, _) = stats.next().await;
        if v["bridge_dropped"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not dropped: {v}");
    }

    // Qubitro takes readings again: the next one goes out, and the dropped one
    // never came a sixth time.
    proxy.refusing.store(false, Ordering::SeqCst);
    s.publish("onboard/data/br-r", br#"{"n":2}"#, false).await;
    assert_eq!(obs.on_topic(&device.id, 1).await, vec![json!({"n":2})]);
}
