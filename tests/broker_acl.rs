//! Broker access control as shipped: mosquitto runs with config/mosquitto/mosquitto.conf
//! (only the port and file locations rewritten) and config/mosquitto/onboardd.acl itself,
//! a password file made with `mosquitto_passwd -b` as in config/mosquitto/README.md,
//! and onboardd logged in as `onboardd`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet, PubAckReason, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;

const ONBOARDD_PW: &str = "onboardd-secret";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn sensor_pw(id: &str) -> String {
    format!("pw-of-{id}")
}

/// The shipped mosquitto.conf with its port, password file, ACL file and persistence
/// directory replaced by the harness's copies in the broker's own directory (`{dir}`);
/// every other line exactly as shipped.
fn shipped_conf() -> String {
    let shipped = std::fs::read_to_string(repo_file("config/mosquitto/mosquitto.conf"))
        .expect("read config/mosquitto/mosquitto.conf");
    let mut rewritten = [0usize; 4];
    let mut out = String::new();
    for line in shipped.lines() {
        let line = if line == "listener 1883 127.0.0.1" {
            rewritten[0] += 1;
            "listener {port} 127.0.0.1".to_string()
        } else if line.starts_with("password_file ") {
            rewritten[1] += 1;
            "password_file {dir}/onboardd.passwd".to_string()
        } else if line.starts_with("acl_file ") {
            rewritten[2] += 1;
            "acl_file {dir}/onboardd.acl".to_string()
        } else if line.starts_with("persistence_location ") {
            rewritten[3] += 1;
            "persistence_location {dir}/db/".to_string()
        } else {
            assert!(
                !line.starts_with("listener "),
                "unexpected listener in the shipped conf: {line}"
            );
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    assert_eq!(
        rewritten,
        [1, 1, 1, 1],
        "the shipped conf must have exactly one each of: `listener 1883 127.0.0.1`, \
         password_file, acl_file, persistence_location"
    );
    for must in [
        "per_listener_settings false",
        "allow_anonymous false",
        "use_username_as_clientid true",
    ] {
        assert!(
            out.lines().any(|l| l == must),
            "shipped conf lacks `{must}`"
        );
    }
    out
}

/// A broker configured as shipped, with users `onboardd` and each of `sensors`.
struct SecuredBroker {
    broker: Mosquitto,
    _files: tempfile::TempDir,
}

impl SecuredBroker {
    fn start(sensors: &[&str]) -> SecuredBroker {
        let files = tempfile::tempdir().expect("tempdir");
        let passwd = files.path().join("onboardd.passwd");
        mosquitto_passwd(&["-c", "-b"], &passwd, "onboardd", ONBOARDD_PW);
        for id in sensors {
            mosquitto_passwd(&["-b"], &passwd, id, &sensor_pw(id));
        }
        // mosquitto started as root reads these after dropping to its own user: the
        // harness copies them where that user can read them (`{dir}` in the conf).
        let broker = Mosquitto::builder()
            .file(&passwd, "onboardd.passwd")
            .file(repo_file("config/mosquitto/onboardd.acl"), "onboardd.acl")
            .conf(&shipped_conf())
            .start();
        SecuredBroker {
            broker,
            _files: files,
        }
    }

    fn port(&self) -> u16 {
        self.broker.port
    }

    /// Sensor `id`, flashed for `d`, logged in as itself (with its password), subscribed
    /// to its own reply namespace.
    async fn sensor(&self, d: &Daemon, id: &str) -> Sensor {
        let pw = sensor_pw(id);
        let filter = format!("onboard/reply/{id}/#");
        Sensor::connect_as(
            self.port(),
            id,
            &filter,
            Some((id, &pw)),
            Some(&d.flashed()),
        )
        .await
    }
}

/// A reply a raw client received (already parsed), read as its sensor's firmware reads it.
fn opened(flashed: &Flashed, sensor: &str, reply: &Value) -> Reply {
    flashed
        .open_reply(sensor, reply.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{sensor}: {e}"))
}

fn mosquitto_passwd(flags: &[&str], file: &Path, user: &str, pw: &str) {
    let out = Command::new("mosquitto_passwd")
        .args(flags)
        .arg(file)
        .arg(user)
        .arg(pw)
        .output()
        .expect("run mosquitto_passwd (package mosquitto-clients or mosquitto)");
    assert!(
        out.status.success(),
        "mosquitto_passwd {flags:?} {user}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn daemon_login() -> String {
    format!("[mqtt]\nusername = \"onboardd\"\npassword = \"{ONBOARDD_PW}\"")
}

/// What a raw MQTT 5 client observed.
#[derive(Debug)]
enum Seen {
    SubAck(Vec<SubscribeReasonCode>),
    PubAck(PubAckReason),
    Publish(String, Value),
}

/// An MQTT 5 client that reports SUBACK and PUBACK reason codes too, which the
/// harness's Sensor does not expose.
struct RawClient {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl RawClient {
    /// Connects and waits for the CONNACK; a refused connection is the error.
    async fn connect(port: u16, login: Option<(&str, &str)>) -> Result<RawClient, ConnectionError> {
        let mut opts = MqttOptions::new(format!("raw-{}", fastrand::u32(..)), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut el) = AsyncClient::new(opts, 64);
        match tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("CONNACK in time")
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {}
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(e) => return Err(e),
        }
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let ev = match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(a))) => Seen::SubAck(a.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(a))) => Seen::PubAck(a.reason),
                    Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish(
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                    ),
                    Ok(_) => continue,
                    Err(_) => break,
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Ok(RawClient { client, seen })
    }

    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("an event within WAIT")
            .expect("connection open")
    }

    async fn subscribe(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        match self.next().await {
            Seen::SubAck(codes) => codes,
            other => panic!("expected SUBACK for {filter}, got {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, payload: &str) -> PubAckReason {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
        match self.next().await {
            Seen::PubAck(reason) => reason,
            other => panic!("expected PUBACK for {topic}, got {other:?}"),
        }
    }

    async fn next_publish(&mut self) -> (String, Value) {
        match self.next().await {
            Seen::Publish(t, v) => (t, v),
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// An MQTT 3.1.1 client: connect result, then PUBACKs and messages.
async fn connect_v311(
    port: u16,
    login: Option<(&str, &str)>,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), rumqttc::ConnectionError> {
    let mut opts =
        rumqttc::MqttOptions::new(format!("raw3-{}", fastrand::u32(..)), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 64);
    match tokio::time::timeout(WAIT, el.poll())
        .await
        .expect("CONNACK in time")?
    {
        rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => Ok((client, el)),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Polls a 3.1.1 event loop until `want` matches an incoming packet.
async fn v311_until<T>(
    el: &mut rumqttc::EventLoop,
    mut want: impl FnMut(rumqttc::Packet) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(p) = el.poll().await.expect("3.1.1 connection") {
                if let Some(t) = want(p) {
                    return t;
                }
            }
        }
    })
    .await
    .expect("3.1.1 event within WAIT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensors_logged_in_as_their_own_id_are_onboarded_through_the_shipped_acl() {
    let b = SecuredBroker::start(&["acl-a", "acl-v3"]);
    let cloud = fake_cloud().await;
    // Daemon::start returns at the SUBACK of onboard/announce/+; mosquitto 2.0 grants
    // every SUBACK, so it is the onboardings below that prove `onboardd` may read it.
    let d = Daemon::start(&b.broker, &cloud, &daemon_login());

    // MQTT 5, default reply topic.
    let mut a = b.sensor(&d, "acl-a").await;
    a.announce(r#"{"request_id":"r1"}"#).await;
    let (topic, reply, _) = a.next().await;
    assert_eq!(topic, "onboard/reply/acl-a");
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["request_id"], "r1");
    let dev = cloud.devices()[0].clone();
    assert_eq!(reply.token(), dev.token.as_str());
    assert_eq!(
        dev.metadata.get("sensor_id").map(String::as_str),
        Some("acl-a")
    );

    // MQTT 5 Response Topic below its own reply topic (`pattern read onboard/reply/%u/#`).
    let props = PublishProperties {
        response_topic: Some("onboard/reply/acl-a/boot-7".into()),
        correlation_data: Some(Bytes::from_static(b"c-7")),
        ..Default::default()
    };
    a.announce_with_props("{}", props).await;
    let (topic, reply, corr) = a.next().await;
    assert_eq!(topic, "onboard/reply/acl-a/boot-7");
    assert_eq!(reply["status"], "ok");
    assert_eq!(reply.token(), dev.token.as_str());
    assert_eq!(corr.as_deref(), Some(&b"c-7"[..]));

    // MQTT 3.1.1: no Response Topic, the reply comes on exactly onboard/reply/<id>.
    let pw = sensor_pw("acl-v3");
    let (c3, mut el3) = connect_v311(b.port(), Some(("acl-v3", &pw)))
        .await
        .expect("3.1.1 sensor with its password is accepted");
    c3.subscribe("onboard/reply/acl-v3", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = v311_until(&mut el3, |p| match p {
        rumqttc::Packet::SubAck(a) => Some(a.return_codes),
        _ => None,
    })
    .await;
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );
    c3.publish(
        "onboard/announce/acl-v3",
        rumqttc::QoS::AtLeastOnce,
        false,
        d.flashed()
            .announce("acl-v3", r#"{"model":"legacy"}"#)
            .into_bytes(),
    )
    .await
    .unwrap();
    let (topic, reply) = v311_until(&mut el3, |p| match p {
        rumqttc::Packet::Publish(p) => Some((p.topic.clone(), p.payload.clone())),
        _ => None,
    })
    .await;
    assert_eq!(topic, "onboard/reply/acl-v3");
    let reply = d.flashed().open_reply("acl-v3", &reply).unwrap();
    assert_opens_to_the_clouds_token(&cloud, &reply);
    assert_eq!(cloud.devices().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_cannot_read_another_sensors_reply() {
    let b = SecuredBroker::start(&["victim", "snoop"]);
    let cloud = fake_cloud().await;
    let d = Daemon::start(&b.broker, &cloud, &daemon_login());
    let flashed = d.flashed();

    let pw = sensor_pw("snoop");
    let mut snoop = RawClient::connect(b.port(), Some(("snoop", &pw)))
        .await
        .expect("snoop logs in");
    // mosquitto 2.0 does not refuse these subscriptions: it grants the SUBACK and
    // then checks the ACL for each message it would deliver.
    for filter in ["onboard/reply/victim", "onboard/reply/+", "onboard/reply/#"] {
        assert_eq!(
            snoop.subscribe(filter).await,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "mosquitto 2.0 grants {filter}; nothing is delivered (below)"
        );
    }

    let mut victim = b.sensor(&d, "victim").await;
    victim.announce("{}").await;
    let reply = victim.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &reply);

    // The victim's reply went out before the snoop's own: if the broker leaked it,
    // it would be the first message the snoop gets.
    assert_eq!(
        snoop
            .publish("onboard/announce/snoop", &flashed.announce("snoop", "{}"))
            .await,
        PubAckReason::Success
    );
    let (topic, own) = snoop.next_publish().await;
    assert_eq!(topic, "onboard/reply/snoop", "got {own}");
    let own = opened(&flashed, "snoop", &own);
    assert_opens_to_the_clouds_token(&cloud, &own);
    assert_ne!(own["device_id"], reply["device_id"]);
    // Its own reply matches two of its filters, so it may come twice. A second announce
    // of its own is a marker: until its reply, nothing but its own replies may arrive.
    snoop
        .client
        .publish(
            "onboard/announce/snoop",
            QoS::AtLeastOnce,
            false,
            flashed
                .announce("snoop", r#"{"request_id":"marker"}"#)
                .into_bytes(),
        )
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match snoop.next().await {
                Seen::PubAck(PubAckReason::Success) => {}
                Seen::Publish(t, v) if t == "onboard/reply/snoop" => {
                    // Its own: the marker's answer, or the first answer again (which
                    // answers an earlier announce: its firmware would ignore it).
                    let payload = v.to_string().into_bytes();
                    if flashed
                        .open_reply("snoop", &payload)
                        .is_ok_and(|r| r["request_id"] == "marker")
                    {
                        return;
                    }
                }
                other => panic!("the snoop received {other:?}"),
            }
        }
    })
    .await
    .expect("the snoop's marker reply within WAIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_cannot_announce_as_another_sensor() {
    let b = SecuredBroker::start(&["target", "forger", "forger-v3"]);
    let cloud = fake_cloud().await;
    let d = Daemon::start(&b.broker, &cloud, &daemon_login());

    let mut target = b.sensor(&d, "target").await;

    // MQTT 5: the broker says so in the PUBACK.
    let pw = sensor_pw("forger");
    let mut forger = RawClient::connect(b.port(), Some(("forger", &pw)))
        .await
        .expect("forger logs in");
    assert_eq!(
        forger.subscribe("onboard/reply/forger").await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    assert_eq!(
        forger
            .publish("onboard/announce/target", r#"{"name":"forged"}"#)
            .await,
        PubAckReason::NotAuthorized
    );

    // MQTT 3.1.1: the PUBACK has no reason code and looks like success; the broker
    // drops the message all the same.
    let pw = sensor_pw("forger-v3");
    let (c3, mut el3) = connect_v311(b.port(), Some(("forger-v3", &pw)))
        .await
        .expect("forger-v3 logs in");
    c3.publish(
        "onboard/announce/target",
        rumqttc::QoS::AtLeastOnce,
        false,
        br#"{"name":"forged-v3"}"#.to_vec(),
    )
    .await
    .unwrap();
    v311_until(&mut el3, |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;

    // Both forgeries were acknowledged before this announce was sent, so onboardd
    // would have received them first; it answers this one and created nothing else.
    assert_eq!(
        forger
            .publish(
                "onboard/announce/forger",
                &d.flashed().announce("forger", "{}")
            )
            .await,
        PubAckReason::Success
    );
    let (topic, own) = forger.next_publish().await;
    assert_eq!(topic, "onboard/reply/forger");
    assert_opens_to_the_clouds_token(&cloud, &opened(&d.flashed(), "forger", &own));
    let devices = cloud.devices();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(
        devices[0].metadata.get("sensor_id").map(String::as_str),
        Some("forger")
    );
    assert_eq!(
        d.log.count("target"),
        0,
        "onboardd never saw an announce for `target`:\n{}",
        d.log.text()
    );
    // The impersonated sensor's own announce is a marker: onboardd answers in arrival
    // order, so a reply caused by a forgery would reach it first.
    target.announce(r#"{"request_id":"own"}"#).await;
    let first = target.reply().await;
    assert_eq!(
        first["request_id"], "own",
        "a reply went to the impersonated sensor: {first}"
    );
    assert_eq!(
        first.token(),
        cloud_devices_of(&cloud, "target")[0].token.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_login_are_refused() {
    let b = SecuredBroker::start(&["known"]);

    let anonymous = RawClient::connect(b.port(), None).await;
    assert!(
        matches!(
            anonymous,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "MQTT 5 anonymous: {:?}",
        anonymous.err()
    );
    let anonymous = connect_v311(b.port(), None).await;
    assert!(
        matches!(
            anonymous,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::NotAuthorized
            ))
        ),
        "MQTT 3.1.1 anonymous: {:?}",
        anonymous.err()
    );

    for (what, user, pw) in [
        ("wrong password", "known", "not-its-password"),
        ("unknown user", "stranger", "whatever"),
    ] {
        let refused = RawClient::connect(b.port(), Some((user, pw))).await;
        assert!(
            matches!(
                refused,
                Err(ConnectionError::ConnectionRefused(
                    ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
                ))
            ),
            "{what}: {:?}",
            refused.err()
        );
    }

    // The same broker does let a known sensor in.
    let pw = sensor_pw("known");
    assert!(RawClient::connect(b.port(), Some(("known", &pw)))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_acl_lets_zigbee2mqtt_publish_discovery_and_onboardd_read_its_states() {
    let b = SecuredBroker::start(&["zigbee2mqtt", "intruder"]);
    let cloud = fake_cloud().await;
    let qubitro = harness::qubitro_broker::QubitroBroker::start(&cloud);
    let mut obs = qubitro.observer().await;
    let toml = format!(
        "{}\n[qubitro]\nbroker_host = \"127.0.0.1\"\nbroker_port = {}\nbroker_tls = false\n[discovery]\nhomeassistant = true",
        daemon_login(),
        qubitro.port()
    );
    let _d = Daemon::start(&b.broker, &cloud, &toml);
    let pw = sensor_pw("intruder");
    let intruder = Sensor::connect_as(
        b.port(),
        "intruder",
        "nothing/here",
        Some(("intruder", &pw)),
        None,
    )
    .await;
    let pw = sensor_pw("zigbee2mqtt");
    let z2m = Sensor::connect_as(
        b.port(),
        "zigbee2mqtt",
        "nothing/here",
        Some(("zigbee2mqtt", &pw)),
        None,
    )
    .await;
    let config = |ieee: &str| {
        format!(
            concat!(
                r#"{{"device":{{"identifiers":["zigbee2mqtt_{ieee}"],"name":"n","manufacturer":"Aqara","#,
                r#""model":"m"}},"state_topic":"zigbee2mqtt/{ieee}","#,
                r#""value_template":"{{{{ value_json.temperature }}}}"}}"#,
            ),
            ieee = ieee,
        )
    };
    // Anyone else's discovery config never reaches onboardd.
    intruder
        .client
        .publish(
            "homeassistant/sensor/0xbad/temperature/config",
            QoS::AtLeastOnce,
            true,
            config("0xbad"),
        )
        .await
        .unwrap();
    z2m.client
        .publish(
            "homeassistant/sensor/0x01/temperature/config",
            QoS::AtLeastOnce,
            true,
            config("0x01"),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let device = loop {
        if let Some(d) = cloud_devices_of(&cloud, "ha-zigbee2mqtt_0x01").pop() {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "no device made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    qubitro.wait_for_login(&device).await;
    z2m.client
        .publish(
            "zigbee2mqtt/0x01",
            QoS::AtLeastOnce,
            false,
            r#"{"temperature":20.5}"#,
        )
        .await
        .unwrap();
    assert_eq!(
        obs.on_topic(&device.id, 1).await[0],
        serde_json::json!({"temperature":20.5})
    );
    assert!(cloud_devices_of(&cloud, "ha-zigbee2mqtt_0xbad").is_empty());
    assert_eq!(cloud.devices().len(), 1);
}
