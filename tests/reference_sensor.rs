//! The reference sensor (`examples/sensor.rs`, the real binary) on an open broker: a real
//! anonymous mosquitto where the test plays both the gateway and the attacker. The
//! gateway's side uses onboardd's protocol v2 primitives; the attacker has what anyone
//! subscribed to `#` has: the sensor's announces and every reply the gateway ever sent,
//! but not the sensor key.
//!
//! The example is built on first use with the features of this test run (`SENSOR_BIN`
//! names a binary to use instead).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::Duration;

use harness::{LogLines, Mosquitto, Proc, WAIT};
use onboardd::proof::v2::{AnnounceNonce, ExchangeKeys};
use onboardd::proof::{generate_claim_key, SensorKey};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const SENSOR: &str = "temp-01";
const DEVICE_ID: &str = "6b1f3a9e-2c44-4d7a-9e0b-5f2d8c7a1e90";
const TOKEN: &str = "qt_genuine_token_3Xv9Lq2Zp";
const BROKER_HOST: &str = "broker.qubitro.com";
const ATTACKER_HOST: &str = "mqtt.attacker.example";
const ATTACKER_TOKEN: &str = "attacker-chosen-token";
const IGNORED: &str = "ignored a reply";

/// The example binary, built once per test process like cargo built this test: same
/// profile directory, same features.
fn sensor_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("SENSOR_BIN") {
            return PathBuf::from(bin);
        }
        // target/<profile>/deps/<this test> → target/<profile>
        let me = std::env::current_exe().expect("the test's own path");
        let profile_dir = me
            .parent()
            .and_then(Path::parent)
            .expect("the test runs from target/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target/ above the profile");
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        // Cargo sets these for this test; build scripts (ring's) rerun when they change,
        // so left in they would make this build and a build from a shell undo each other.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let per_crate = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_CFG_",
                "CARGO_FEATURE_",
            ];
            if per_crate.iter().any(|p| name.starts_with(p))
                || [
                    "OUT_DIR",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&&*name)
            {
                cargo.env_remove(&*name);
            }
        }
        cargo
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", target_dir)
            .args(["build", "--quiet", "--example", "sensor"]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        if cfg!(feature = "failpoints") {
            cargo.args(["--features", "failpoints"]);
        }
        let status = cargo
            .status()
            .expect("run cargo to build the example sensor");
        assert!(status.success(), "cargo build --example sensor: {status}");
        profile_dir.join("examples/sensor")
    })
}

/// The reference sensor as a child process, announcing every 0.5 to 1 s.
fn start_sensor(port: u16, key: &SensorKey) -> Proc {
    start_sensor_announcing_every(port, key, "0.5", "1")
}

/// The reference sensor, its re-announces `interval` to `max` seconds apart.
fn start_sensor_announcing_every(port: u16, key: &SensorKey, interval: &str, max: &str) -> Proc {
    let mut cmd = Command::new(sensor_bin());
    cmd.args([
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--sensor-id",
        SENSOR,
    ])
    .args(["--sensor-key", &key.to_hex(), "--timeout", "60"])
    .args(["--interval", interval, "--max-interval", max])
    .args(["--fields", r#"{"name":"Greenhouse","brand":"acme"}"#]);
    Proc::spawn("sensor", &mut cmd, LogLines::default()).expect("start the example sensor")
}

/// The sensor's exit, waited for off the runtime's threads.
async fn exit_of(mut sensor: Proc) -> (ExitStatus, LogLines) {
    tokio::task::spawn_blocking(move || {
        let status = sensor
            .wait_exit(WAIT)
            .unwrap_or_else(|e| panic!("the sensor did not exit: {e}"));
        (status, sensor.log.clone())
    })
    .await
    .expect("the waiting thread does not panic")
}

/// The `n`th line where the sensor says it ignored a reply.
fn nth_ignored(log: &LogLines, n: usize) -> String {
    log.try_wait_for_n(IGNORED, n, WAIT)
        .unwrap_or_else(|e| panic!("{e}\nfull log:\n{}", log.text()))
        .1
}

/// The test's MQTT client: the gateway's side of the broker, and the attacker's.
struct Gateway {
    client: AsyncClient,
    keys: ExchangeKeys,
    announces: mpsc::UnboundedReceiver<Vec<u8>>,
    replies: mpsc::UnboundedReceiver<Vec<u8>>,
    nonces: HashSet<AnnounceNonce>,
}

impl Gateway {
    async fn connect(port: u16, keys: ExchangeKeys) -> Gateway {
        let opts = MqttOptions::new("gateway-and-attacker", "127.0.0.1", port);
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (announce_tx, announces) = mpsc::unbounded_channel();
        let (reply_tx, replies) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
        let announce_topic = format!("onboard/announce/{SENSOR}");
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == announce_topic => {
                        let _ = announce_tx.send(p.payload.to_vec());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = reply_tx.send(p.payload.to_vec());
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) if announce_tx.is_closed() => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        for topic in [format!("onboard/announce/{SENSOR}"), reply_topic()] {
            client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
            tokio::time::timeout(WAIT, subscribed.recv())
                .await
                .expect("the broker acknowledges the test's subscription");
        }
        Gateway {
            client,
            keys,
            announces,
            replies,
            nonces: HashSet::new(),
        }
    }

    /// The sensor's next announce, checked as onboardd checks it: a v2 announce whose
    /// proof verifies under the sensor's key, carrying its fields and a nonce never seen.
    async fn next_announce(&mut self) -> AnnounceNonce {
        let payload = tokio::time::timeout(WAIT, self.announces.recv())
            .await
            .unwrap_or_else(|_| panic!("no announce from the sensor within {WAIT:?}"))
            .expect("the test's client runs");
        self.check(&payload)
    }

    fn check(&mut self, payload: &[u8]) -> AnnounceNonce {
        let announce = self
            .keys
            .verify_announce(payload)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(payload)));
        assert_eq!(announce.object["name"], "Greenhouse", "{}", announce.body);
        assert!(
            self.nonces.insert(announce.nonce.clone()),
            "a nonce announced twice: {}",
            announce.body
        );
        announce.nonce
    }

    /// The first announce published after this call (those already received are checked
    /// and passed over): proof that the sensor is still announcing now.
    async fn announce_after_now(&mut self) -> AnnounceNonce {
        while let Ok(payload) = self.announces.try_recv() {
            self.check(&payload);
        }
        self.next_announce().await
    }

    /// Publishes on the sensor's reply topic and waits for the broker to pass it on, so a
    /// retained message is stored before anything that follows.
    async fn reply(&mut self, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(reply_topic(), QoS::AtLeastOnce, retain, payload.clone())
            .await
            .unwrap();
        let echoed = tokio::time::timeout(WAIT, self.replies.recv())
            .await
            .expect("the broker passes the reply on")
            .expect("the test's client runs");
        assert_eq!(echoed, payload);
    }
}

fn reply_topic() -> String {
    format!("onboard/reply/{SENSOR}")
}

fn keys() -> (SensorKey, ExchangeKeys) {
    let key = SensorKey::derive(&generate_claim_key(), SENSOR);
    let keys = ExchangeKeys::derive(&key);
    (key, keys)
}

/// What onboardd answers an authenticated announce with `nonce` once the device exists.
fn genuine_ok(keys: &ExchangeKeys, nonce: &AnnounceNonce) -> Vec<u8> {
    let ok = json!({
        "status": "ok",
        "sensor_id": SENSOR,
        "device_id": DEVICE_ID,
        "broker": {"host": BROKER_HOST, "port": 8883},
        "device_token_sealed": keys.seal_token(SENSOR, DEVICE_ID, nonce, TOKEN),
    });
    keys.authenticated_reply(&ok, nonce).unwrap()
}

/// A genuine authenticated reply with the broker host in its body changed, its MAC kept.
fn with_broker_host(genuine: &[u8], host: &str) -> Vec<u8> {
    let mut envelope: Value = serde_json::from_slice(genuine).unwrap();
    let mut body: Value = serde_json::from_str(envelope["body"].as_str().unwrap()).unwrap();
    body["broker"]["host"] = json!(host);
    envelope["body"] = json!(body.to_string());
    serde_json::to_vec(&envelope).unwrap()
}

/// Answers every announce with `answer` (for its nonce) until the sensor exits: it may
/// announce again before an answer arrives, and then that answer is for an old nonce.
async fn answer_until_exit(
    gw: &mut Gateway,
    sensor: Proc,
    mut nonce: AnnounceNonce,
    answer: impl Fn(&AnnounceNonce) -> Vec<u8>,
) -> (ExitStatus, String) {
    let mut exited = tokio::spawn(exit_of(sensor));
    loop {
        gw.reply(answer(&nonce), false).await;
        tokio::select! {
            done = &mut exited => {
                let (status, log) = done.expect("the exit waiter runs");
                return (status, log.text());
            }
            next = gw.next_announce() => nonce = next,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_sensor_ignores_forged_and_replayed_replies_and_onboards_only_on_the_authenticated_ok(
) {
    let broker = Mosquitto::start();
    let (key, keys) = keys();
    let mut gw = Gateway::connect(broker.port, keys.clone()).await;

    // An earlier exchange's genuine ok, as a listener on the broker saw it go by; the
    // attacker republishes it retained with its own broker host before the sensor boots.
    let old_ok = genuine_ok(&keys, &AnnounceNonce::generate());
    gw.reply(with_broker_host(&old_ok, ATTACKER_HOST), true)
        .await;
    let sensor = start_sensor(broker.port, &key);
    let log = sensor.log.clone();
    let mut nonce = gw.next_announce().await;
    let retained = nth_ignored(&log, 1);
    assert!(retained.contains("mac does not verify"), "{retained}");

    // Each forgery carries the nonce of the announce in progress; after each one the
    // sensor must go on announcing, with a new nonce.
    let error = |n: &AnnounceNonce| {
        json!({"status": "error", "sensor_id": SENSOR, "code": "denied", "message": "go away",
            "nonce": n.as_str()})
    };
    let bytes = |reply: Value| serde_json::to_vec(&reply).unwrap();
    type Forge<'a> = Box<dyn Fn(&AnnounceNonce) -> Vec<u8> + 'a>;
    let forgeries: Vec<(&str, Forge, &str)> = vec![
        (
            "a genuine sealed ok for this announce, its broker host changed",
            Box::new(|n| with_broker_host(&genuine_ok(&keys, n), ATTACKER_HOST)),
            "mac does not verify",
        ),
        (
            "a replayed genuine ok of an earlier announce",
            Box::new(|_| old_ok.clone()),
            "answers another announce",
        ),
        (
            "an error without a mac",
            Box::new(|n| bytes(error(n))),
            "not a protocol v2 reply",
        ),
        (
            "an error with a made-up mac",
            Box::new(|n| bytes(json!({"body": error(n).to_string(), "mac": "00".repeat(32)}))),
            "mac does not verify",
        ),
        (
            "a pending without a mac, asking for an hour's silence",
            Box::new(|n| {
                bytes(
                    json!({"status": "pending", "sensor_id": SENSOR, "retry_after_s": 3600, "nonce": n.as_str()}),
                )
            }),
            "not a protocol v2 reply",
        ),
        (
            "an ok with a clear device_token and another broker",
            Box::new(|n| {
                bytes(
                    json!({"status": "ok", "sensor_id": SENSOR, "device_id": DEVICE_ID, "device_token": ATTACKER_TOKEN,
                    "broker": {"host": ATTACKER_HOST, "port": 8883}, "nonce": n.as_str()}),
                )
            }),
            "not a protocol v2 reply",
        ),
    ];
    for (i, (what, forge, why)) in forgeries.iter().enumerate() {
        gw.reply(forge(&nonce), false).await;
        let line = nth_ignored(&log, i + 2);
        assert!(line.contains(why), "{what}: {line}");
        nonce = gw.announce_after_now().await;
    }

    let (status, text) = answer_until_exit(&mut gw, sensor, nonce, |n| genuine_ok(&keys, n)).await;
    assert!(status.success(), "{status}: {text}");
    assert!(text.contains(&format!("device_id: {DEVICE_ID}")), "{text}");
    assert!(text.contains(&format!("device_token: {TOKEN}")), "{text}");
    assert!(
        text.contains(&format!("broker: {BROKER_HOST}:8883")),
        "{text}"
    );
    assert!(
        !text.contains(ATTACKER_HOST) && !text.contains(ATTACKER_TOKEN),
        "{text}"
    );
}

/// How a sensor that gets `reply`, authenticated, for every announce ends.
async fn answered_with(reply: Value) -> (ExitStatus, String) {
    let broker = Mosquitto::start();
    let (key, keys) = keys();
    let mut gw = Gateway::connect(broker.port, keys.clone()).await;
    let sensor = start_sensor(broker.port, &key);
    let nonce = gw.next_announce().await;
    answer_until_exit(&mut gw, sensor, nonce, |n| {
        keys.authenticated_reply(&reply, n).unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_error_without_a_retry_time_stops_the_reference_sensor() {
    let (status, text) = answered_with(
        json!({"status": "error", "sensor_id": SENSOR, "code": "denied", "message": "a deny rule"}),
    )
    .await;
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("refused: error denied"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_bridged_ok_onboards_the_reference_sensor_with_its_data_topic() {
    let (status, text) = answered_with(
        json!({"status": "ok", "sensor_id": SENSOR, "device_id": DEVICE_ID,
        "bridged": true, "data_topic": "onboard/data/temp-01"}),
    )
    .await;
    assert!(status.success(), "{text}");
    assert!(text.contains("data_topic: onboard/data/temp-01"), "{text}");
    assert!(!text.contains("device_token"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_pending_keeps_its_announce_current_until_the_ok_for_it() {
    let broker = Mosquitto::start();
    let (key, keys) = keys();
    let mut gw = Gateway::connect(broker.port, keys.clone()).await;
    // Re-announces 16 s apart at the soonest: the pending surely answers the announce in
    // progress.
    let sensor = start_sensor_announcing_every(broker.port, &key, "20", "20");
    let nonce = gw.next_announce().await;
    let pending = json!({"status": "pending", "sensor_id": SENSOR, "retry_after_s": 3600});
    gw.reply(keys.authenticated_reply(&pending, &nonce).unwrap(), false)
        .await;
    sensor
        .log
        .wait_for_async("pending; announcing again in 3600 s")
        .await;
    gw.reply(genuine_ok(&keys, &nonce), false).await;
    let (status, log) = exit_of(sensor).await;
    let text = log.text();
    assert!(status.success(), "{text}");
    assert!(text.contains(&format!("device_token: {TOKEN}")), "{text}");
    assert!(
        gw.announces.try_recv().is_err(),
        "no announce while the pending holds: {text}"
    );
}
