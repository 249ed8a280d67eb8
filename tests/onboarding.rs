//! The core flow against a real mosquitto and the fake Qubitro over HTTP:
//! announce → create → store → reply, idempotency, and every bad input.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fake_qubitro::{CredentialsAt, Endpoint, Envelope, FakeOptions, FakeQubitro};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_maps_every_field_and_replies_with_the_issued_credentials() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "temp-01").await;
    s.announce(
        r#"{"name":"Greenhouse 1","description":"north wall","brand":"Acme","model":"T1000",
            "tags":["greenhouse","zone_1"],"metadata":{"floor":"2"},"request_id":"req-7","unknown":true}"#,
    )
    .await;
    let (topic, reply, _) = s.next().await;
    assert_eq!(topic, "onboard/reply/temp-01");
    let devices = cloud.devices();
    assert_eq!(devices.len(), 1);
    let dev = &devices[0];
    // The token travels only sealed (its ciphertext differs at every reply): the rest of
    // the reply is compared whole, the token as the sensor opened it.
    let mut clear = reply.json.clone();
    let sealed = clear
        .as_object_mut()
        .and_then(|o| o.remove("device_token_sealed"));
    assert!(sealed.is_some(), "{reply}");
    // The body as MAC'd: bound to the announce by its nonce.
    let nonce = d.flashed().current_nonce("temp-01").unwrap();
    assert_eq!(
        clear,
        json!({"status":"ok","sensor_id":"temp-01","device_id":dev.id,"nonce":nonce,
               "request_id":"req-7","broker":{"host":"broker.qubitro.com","port":8883}})
    );
    assert_eq!(reply.token(), dev.token);
    assert_eq!(dev.name, "Greenhouse 1");
    assert_eq!(dev.description, "north wall");
    assert_eq!(dev.brand, "Acme");
    assert_eq!(dev.model, "T1000");
    assert_eq!(dev.source, "mqtt");
    assert_eq!(dev.tags, vec!["greenhouse", "zone_1"]);
    assert_eq!(dev.metadata.get("floor").map(String::as_str), Some("2"));
    assert_eq!(
        dev.metadata.get("sensor_id").map(String::as_str),
        Some("temp-01")
    );
    assert_eq!(
        dev.metadata.get("gateway_id").map(String::as_str),
        Some("gw-test")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_announce_gets_the_documented_defaults() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "bare-1").await;
    // No field but the proof its firmware adds.
    s.announce("{}").await;
    let reply = s.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &reply);
    assert!(
        reply.get("request_id").is_none(),
        "no request_id when the announce had none"
    );
    let dev = &cloud.devices()[0];
    assert_eq!(dev.name, "bare-1");
    assert_eq!(dev.brand, "Custom");
    assert_eq!(dev.model, "Custom");
    assert!(dev.description.contains("gw-test"), "{}", dev.description);
    assert!(dev.tags.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_reannounce_changes_nothing_recorded_not_even_bridge() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "fixed-1").await;
    s.announce(r#"{"name":"First"}"#).await;
    assert_opens_to_the_clouds_token(&cloud, &s.reply_with_status("ok").await);
    // What the announce made; `last_seen_ms` is left out: the sensor's own
    // authenticated announce is a sign of life, and moves it by design.
    let recorded = || {
        let (code, out, err) = d.devices(&["show", "fixed-1"]);
        assert_eq!(code, 0, "{err}");
        let mut v: serde_json::Value =
            serde_json::from_str(&out).expect("devices show prints JSON");
        v.as_object_mut().expect("an object").remove("last_seen_ms");
        v
    };
    let before = recorded();

    // Its own key, its own fresh nonce: still only answered from the record.
    s.announce(r#"{"name":"Second","bridge":true}"#).await;
    let ok = s.reply_with_status("ok").await;
    assert!(
        ok.get("bridged").is_none(),
        "bridged by a re-announce: {ok}"
    );
    assert_opens_to_the_clouds_token(&cloud, &ok);
    assert_eq!(recorded(), before, "the record is as it was made");
    assert_eq!(cloud.devices()[0].name, "First");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reannounce_returns_the_same_credentials_without_a_second_create_even_across_restarts() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "again-1").await;
    s.announce("{}").await;
    let first = s.reply().await;
    s.announce(r#"{"name":"renamed"}"#).await;
    let second = s.reply().await;
    assert_eq!(first["device_id"], second["device_id"]);
    assert_eq!(first.token(), second.token());

    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    d.spawn();
    d.wait_subscribed();
    s.announce("{}").await;
    let third = s.reply_with_status("ok").await;
    assert_eq!(first.token(), third.token());
    assert_eq!(cloud.count(Endpoint::Create), 1);
    assert_eq!(cloud.devices().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_announces_of_one_sensor_create_exactly_one_device() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.set_delay(Duration::from_millis(200));
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "twin").await;
    let flashed = d.flashed();
    let mut nonces = Vec::new();
    for i in 0..20 {
        s.announce(&format!(r#"{{"request_id":"r{i}"}}"#)).await;
        nonces.push(flashed.current_nonce("twin").unwrap());
    }
    // Each announce is answered: ok once the device exists, or pending (ask again)
    // when more announces wait than onboardd keeps answers for.
    let mut tokens = std::collections::HashSet::new();
    let mut answered = std::collections::HashSet::new();
    tokio::time::timeout(WAIT, async {
        while answered.len() < 20 {
            // Each reply read as the answer to the announce it names (the sensor
            // itself would act only on the answer to its latest).
            let (_, payload, _) = s.next_raw().await;
            let r = nonces
                .iter()
                .find_map(|n| flashed.open_reply_for("twin", n, &payload).ok())
                .unwrap_or_else(|| panic!("no answer to any announce: {payload:?}"));
            assert!(r["status"] == "ok" || r["status"] == "pending", "{r}");
            if r["status"] == "ok" {
                tokens.insert(r.token().to_string());
            }
            answered.insert(r["request_id"].to_string());
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of 20 announces answered within {WAIT:?}",
            answered.len()
        )
    });
    assert_eq!(tokens.len(), 1, "one token for all");
    s.announce("{}").await;
    assert_eq!(
        s.reply_with_status("ok").await.token(),
        tokens.iter().next().unwrap()
    );
    assert_eq!(cloud.count(Endpoint::Create), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_documented_error_and_the_daemon_keeps_serving() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "bad-1").await;
    let cases: Vec<(String, &str, &str)> = vec![
        ("{not json".into(), "invalid_json", ""),
        // Not an object: it cannot carry a proof, so it is refused as such.
        ("[1,2]".into(), "unauthorized", "protocol v2"),
        (
            r#"{"name":5,"request_id":"rq"}"#.into(),
            "invalid_field",
            "name",
        ),
        (r#"{"tags":"a"}"#.into(), "invalid_field", "tags"),
        (
            r#"{"metadata":{"k":1}}"#.into(),
            "invalid_field",
            "metadata",
        ),
        (
            format!(r#"{{"name":"{}"}}"#, "x".repeat(101)),
            "invalid_field",
            "name",
        ),
        (
            format!(r#"{{"description":"{}"}}"#, "x".repeat(501)),
            "invalid_field",
            "description",
        ),
        (r#"{"tags":["has space"]}"#.into(), "invalid_field", "tags"),
        (
            format!(r#"{{"name":"{}"}}"#, "x".repeat(5000)),
            "payload_too_large",
            "4096",
        ),
    ];
    for (payload, code, mention) in &cases {
        // What is an object goes out signed, so it reaches the field checks; the rest
        // cannot carry a proof and goes out as it is.
        if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(payload).is_ok() {
            s.announce(payload).await;
        } else {
            s.announce_raw(payload).await;
        }
        // Only a proved body is answered with a MAC; what proved nothing is not.
        let r = match *code {
            "invalid_field" => s.reply().await,
            _ => s.unauthenticated_reply().await,
        };
        assert_eq!(r["status"], "error", "{payload}: {r}");
        assert_eq!(r["code"], *code, "{payload}: {r}");
        assert_eq!(r["sensor_id"], "bad-1");
        assert!(r["message"].as_str().unwrap().contains(mention), "{r}");
    }
    // request_id is echoed even in an error reply.
    s.announce(r#"{"name":5,"request_id":"rq"}"#).await;
    assert_eq!(s.reply().await["request_id"], "rq");

    // An invalid sensor id gets no reply (no safe topic) but a warning.
    s.announce_on("onboard/announce/bad id!", "{}").await;
    d.log.wait_for_async("without a valid sensor id").await;

    assert_eq!(
        cloud.count(Endpoint::Create),
        0,
        "no bad input reached the cloud"
    );
    s.announce("{}").await;
    assert_opens_to_the_clouds_token(&cloud, &s.reply().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_response_topic_and_correlation_data_are_honoured_only_in_the_sensors_namespace() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "v5-1").await;
    let props = PublishProperties {
        response_topic: Some("onboard/reply/v5-1/boot-42".into()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        ..Default::default()
    };
    s.announce_with_props("{}", props).await;
    let (topic, reply, corr) = s.next().await;
    assert_eq!(topic, "onboard/reply/v5-1/boot-42");
    assert_opens_to_the_clouds_token(&cloud, &reply);
    assert_eq!(corr.as_deref(), Some(&b"corr-1"[..]));

    // A Response Topic outside its namespace is ignored: the default topic is used,
    // and a listener on the foreign topic hears nothing.
    let mut thief = Sensor::connect_as(broker.port, "thief", "stolen/#", None, None).await;
    let props = PublishProperties {
        response_topic: Some("stolen/tokens".into()),
        ..Default::default()
    };
    s.announce_with_props("{}", props).await;
    let (topic, reply, _) = s.next().await;
    assert_eq!(topic, "onboard/reply/v5-1");
    assert_opens_to_the_clouds_token(&cloud, &reply);
    // The broker routed onboardd's reply before the sensor got it; a marker sent now
    // reaches the thief after anything onboardd published there, so it must come first.
    thief
        .announce_on("stolen/marker", r#"{"marker":true}"#)
        .await;
    let (topic, first, _) = thief.next().await;
    let first = first.json;
    assert_eq!(
        (topic.as_str(), &first),
        ("stolen/marker", &json!({"marker":true})),
        "the foreign Response Topic received a message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt311_sensor_is_onboarded_too() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = SensorV3::connect(broker.port, "old-fw", &d.flashed()).await;
    s.announce(r#"{"model":"legacy"}"#).await;
    let r = s.reply().await;
    assert_eq!(r["status"], "ok");
    let dev = &cloud.devices()[0];
    assert_eq!(r["device_id"], dev.id.as_str());
    assert_eq!(r.token(), dev.token.as_str());
    assert_eq!(dev.model, "legacy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_response_shape_yields_the_credentials() {
    for (envelope, at, status) in [
        (Envelope::Wrapped, CredentialsAt::DeviceCredentials, 201),
        (Envelope::Wrapped, CredentialsAt::Metadata, 200),
        (Envelope::Bare, CredentialsAt::DeviceCredentials, 201),
        (Envelope::Bare, CredentialsAt::Metadata, 200),
    ] {
        let broker = Mosquitto::start();
        let cloud = FakeQubitro::start(FakeOptions {
            envelope,
            credentials_at: at,
            create_status: status,
            ..Default::default()
        })
        .await
        .unwrap();
        let d = Daemon::start(&broker, &cloud, "");
        let mut s = d.sensor(broker.port, "shape").await;
        s.announce("{}").await;
        let r = s.reply().await;
        let dev = &cloud.devices()[0];
        assert_eq!(r["device_id"], dev.id.as_str(), "{envelope:?} {at:?}");
        assert_eq!(r.token(), dev.token.as_str(), "{envelope:?} {at:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_from_the_cloud_becomes_rejected_by_cloud_and_a_corrected_announce_succeeds() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    cloud.push_faults(Endpoint::Create, vec![refused_fault("brand unknown")]);
    let mut s = d.sensor(broker.port, "rej-1").await;
    s.announce(r#"{"request_id":"a"}"#).await;
    let r = s.reply().await;
    assert_eq!(r["status"], "error");
    assert_eq!(r["code"], "rejected_by_cloud");
    assert_eq!(r["request_id"], "a");
    assert!(
        r["message"].as_str().unwrap().contains("brand unknown"),
        "{r}"
    );
    // Corrected (the same announce again is refused without a cloud call for a
    // while: hardening::a_rejected_create_is_not_retried_…).
    s.announce(r#"{"brand":"Acme"}"#).await;
    assert_opens_to_the_clouds_token(&cloud, &s.reply().await);
    assert_eq!(cloud.devices().len(), 1);
}
