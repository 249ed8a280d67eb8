//! Reliability: exactly one Qubitro device per sensor and no lost announce,
//! through cloud outages, broker restarts, crashes at every step and lost databases.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use fake_qubitro::{Endpoint, Fault, NewDevice};

fn status(code: u16) -> Fault {
    Fault::Status {
        status: code,
        retry_after: None,
        body: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_500_three_times_then_201_gives_one_device_and_pending_then_ok() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.push_faults(
        Endpoint::Create,
        vec![status(500), status(500), status(500)],
    );
    let _d = Daemon::start(&broker, &cloud, "");
    let mut s = Sensor::connect(broker.port, "flaky").await;
    s.announce(r#"{"request_id":"x"}"#).await;
    let first = s.reply().await;
    assert_eq!(first["status"], "pending", "{first}");
    assert!(first["retry_after_s"].as_u64().is_some(), "{first}");
    assert_eq!(first["request_id"], "x");
    let ok = s.reply_with_status("ok").await;
    assert_eq!(cloud.count(Endpoint::Create), 4);
    assert_eq!(cloud.devices().len(), 1);
    assert_eq!(ok["device_id"], cloud.devices()[0].id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_of_a_429_is_honoured() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // With lookup_before_create on, the first request of an onboarding is the lookup.
    cloud.push_faults(
        Endpoint::List,
        vec![Fault::Status {
            status: 429,
            retry_after: Some(2),
            body: None,
        }],
    );
    // Retry-After is honoured up to retry_max_ms (1 s in tests): raise the cap.
    let _d = Daemon::start(&broker, &cloud, "[qubitro]\nretry_max_ms = 5000");
    let mut s = Sensor::connect(broker.port, "busy").await;
    s.announce("{}").await;
    let pending = s.reply().await;
    assert_eq!(pending["status"], "pending");
    assert!(pending["retry_after_s"].as_u64().unwrap() >= 2, "{pending}");
    s.reply_with_status("ok").await;
    let lists: Vec<Instant> = cloud
        .requests()
        .iter()
        .filter(|r| r.endpoint == Some(Endpoint::List))
        .map(|r| r.at)
        .collect();
    assert_eq!(lists.len(), 2);
    assert!(
        lists[1].duration_since(lists[0]) >= Duration::from_secs(2),
        "retried after {:?}, before Retry-After",
        lists[1].duration_since(lists[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cloud_gets_pending_and_the_ok_follows_without_a_new_announce() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let _d = Daemon::start(&broker, &cloud, "");
    cloud.stop().await;
    let mut s = Sensor::connect(broker.port, "offline-1").await;
    s.announce("{}").await;
    assert_eq!(s.reply().await["status"], "pending");
    assert_eq!(s.reply().await["status"], "pending", "still retrying");
    cloud.restart().await.unwrap();
    let ok = s.reply_with_status("ok").await;
    assert_eq!(ok["device_id"], cloud.devices()[0].id.as_str());
    assert_eq!(cloud.devices().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_key_pauses_all_cloud_calls_instead_of_retrying() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.push_faults(Endpoint::List, vec![status(401)]);
    let d = Daemon::start(&broker, &cloud, "[qubitro]\nauth_failure_backoff_s = 3600");
    let mut a = Sensor::connect(broker.port, "a1").await;
    a.announce("{}").await;
    let r = a.reply().await;
    assert_eq!(r["status"], "pending");
    assert!(r["retry_after_s"].as_u64().unwrap() >= 3000, "{r}");
    d.log.wait_for_async("OPERATOR ERROR").await;
    // A second sensor during the pause is told to wait and costs no request.
    let mut b = Sensor::connect(broker.port, "b1").await;
    b.announce("{}").await;
    assert_eq!(b.reply().await["status"], "pending");
    assert_eq!(cloud.requests().len(), 1, "one request, then silence");
    assert_eq!(
        d.log.count("OPERATOR ERROR"),
        1,
        "logged once, not per sensor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_is_survived_and_later_announces_are_served() {
    let mut broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = Sensor::connect(broker.port, "before").await;
    s.announce("{}").await;
    assert_eq!(s.reply().await["status"], "ok");
    drop(s);

    broker.restart(); // SIGKILL, same port, no persistence: our session is gone
    d.log.wait_for_n_async("subscribed to announces", 2).await;
    let mut s = Sensor::connect(broker.port, "after").await;
    s.announce("{}").await;
    assert_eq!(s.reply().await["status"], "ok");
    assert_eq!(cloud.devices().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announces_published_while_onboardd_was_stopped_are_served_when_it_starts() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::with_state(broker.port, &cloud, state.path(), "", vec![]);
    d.wait_subscribed();
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));

    let mut s = Sensor::connect(broker.port, "early-bird").await;
    s.announce(r#"{"request_id":"while-down"}"#).await;
    d.spawn();
    let r = s.reply().await;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["request_id"], "while-down");
}

/// Crashes (SIGKILL) at each step of an onboarding, restarts, and checks the sensor
/// ends with exactly one device and gets its token, without announcing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs failpoints: cargo test --workspace --features failpoints"
)]
async fn sigkill_at_every_step_still_gives_exactly_one_device_and_the_token() {
    for step in onboardd::failpoint::STEPS {
        let broker = Mosquitto::start();
        let cloud = fake_cloud().await;
        let state = tempfile::tempdir().unwrap();
        let mut d = Daemon::with_state(
            broker.port,
            &cloud,
            state.path(),
            "",
            vec![("ONBOARDD_FAILPOINTS".into(), step.to_string())],
        );
        d.wait_subscribed();
        let sensor = format!("crash-{}", step.replace('_', "-"));
        let mut s = Sensor::connect(broker.port, &sensor).await;
        s.announce("{}").await;
        let exit = tokio::task::spawn_blocking(move || {
            let st = d.wait_exit();
            (d, st)
        })
        .await
        .unwrap();
        let (mut d, st) = exit;
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "{step}: died by its failpoint"
        );
        d.log.wait_for(&format!("failpoint {step} reached"));

        d.clear_env();
        d.spawn();
        let ok = s.reply_with_status("ok").await;
        let devices = cloud.devices();
        assert_eq!(devices.len(), 1, "{step}: exactly one device");
        assert_eq!(ok["device_id"], devices[0].id.as_str(), "{step}");
        assert_eq!(ok["device_token"], devices[0].token.as_str(), "{step}");
        // And a later announce still gets the same device.
        s.announce("{}").await;
        let again = s.reply_with_status("ok").await;
        assert_eq!(again["device_id"], devices[0].id.as_str(), "{step}");
        assert_eq!(cloud.devices().len(), 1, "{step}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_sensors_and_fifty_simultaneous_announces_of_one_more_give_501_devices() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let _d = Daemon::start(&broker, &cloud, "");
    let mut all = Sensor::connect_as(broker.port, "all", "onboard/reply/#", None).await;
    for i in 0..500 {
        all.announce_on(&format!("onboard/announce/many-{i}"), "{}")
            .await;
    }
    for i in 0..50 {
        all.announce_on(
            "onboard/announce/twin",
            &format!(r#"{{"request_id":"t{i}"}}"#),
        )
        .await;
    }
    let mut ok: HashMap<String, String> = HashMap::new();
    while ok.len() < 501 {
        let (_, r, _) = all.next().await;
        if r["status"] == "ok" {
            let sensor = r["sensor_id"].as_str().unwrap().to_string();
            let token = r["device_token"].as_str().unwrap().to_string();
            if let Some(prev) = ok.insert(sensor.clone(), token.clone()) {
                assert_eq!(prev, token, "{sensor} got two different tokens");
            }
        } else {
            assert_eq!(r["status"], "pending", "{r}");
        }
    }
    assert_eq!(cloud.devices().len(), 501);
    assert_eq!(cloud.count(Endpoint::Create), 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_is_rebuilt_by_adopting_the_existing_device() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::with_state(broker.port, &cloud, state.path(), "", vec![]);
    d.wait_subscribed();
    let mut s = Sensor::connect(broker.port, "amnesia").await;
    s.announce("{}").await;
    let first = s.reply().await;
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));

    std::fs::remove_dir_all(state.path().join("db")).unwrap();
    d.spawn();
    d.wait_subscribed();
    s.announce("{}").await;
    let second = s.reply_with_status("ok").await;
    assert_eq!(first["device_id"], second["device_id"]);
    assert_eq!(first["device_token"], second["device_token"]);
    assert_eq!(
        cloud.count(Endpoint::Create),
        1,
        "adopted, not created again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_moved_aside_loudly_and_devices_are_adopted() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("sensor_id".to_string(), "old-timer".to_string());
    let existing = cloud.insert_device(NewDevice {
        metadata: meta,
        ..NewDevice::named("old-timer")
    });
    let state = tempfile::tempdir().unwrap();
    let db = state.path().join("db");
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("conf"), b"\xff\xfe not a sled config").unwrap();
    std::fs::write(db.join("db"), vec![0xA5; 8192]).unwrap();
    let d = Daemon::with_state(broker.port, &cloud, state.path(), "", vec![]);
    d.log.wait_for_async("DATABASE UNREADABLE").await;
    d.wait_subscribed();
    let moved: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("db.corrupt-"))
        .collect();
    assert_eq!(
        moved.len(),
        1,
        "the unreadable database is kept aside for inspection"
    );
    let mut s = Sensor::connect(broker.port, "old-timer").await;
    s.announce("{}").await;
    let r = s.reply().await;
    assert_eq!(r["device_id"], existing.id.as_str());
    assert_eq!(cloud.count(Endpoint::Create), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_database_fails_with_a_clear_error() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().unwrap();
    let d1 = Daemon::with_state(broker.port, &cloud, state.path(), "", vec![]);
    d1.wait_subscribed();
    let mut d2 = Daemon::with_state(broker.port, &cloud, state.path(), "", vec![]);
    let st = tokio::task::spawn_blocking(move || {
        let st = d2.wait_exit();
        (d2, st)
    })
    .await
    .unwrap();
    assert_eq!(st.1.code(), Some(1));
    assert!(
        st.0.log.text().contains("in use by another process"),
        "{}",
        st.0.log.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_adopts_the_device_the_first_one_made() {
    let broker_a = Mosquitto::start();
    let broker_b = Mosquitto::start();
    let cloud = fake_cloud().await;
    let _a = Daemon::start(&broker_a, &cloud, "gateway_id = \"gw-a\"");
    let _b = Daemon::start(&broker_b, &cloud, "gateway_id = \"gw-b\"");
    let mut sa = Sensor::connect(broker_a.port, "roamer").await;
    sa.announce("{}").await;
    let ra = sa.reply().await;
    let mut sb = Sensor::connect(broker_b.port, "roamer").await;
    sb.announce("{}").await;
    let rb = sb.reply().await;
    assert_eq!(ra["device_id"], rb["device_id"]);
    assert_eq!(cloud.devices().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_packet_is_dropped_by_the_broker_and_the_daemon_keeps_serving() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = Sensor::connect(broker.port, "huge").await;
    // Over mqtt.max_packet_bytes (64 KiB): the broker must not send it to us (MQTT 5
    // Maximum Packet Size), so it can never become a poison message.
    s.announce(&"x".repeat(200_000)).await;
    s.announce(r#"{"request_id":"after"}"#).await;
    let r = s.reply().await;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["request_id"], "after");
    assert!(
        !d.log.text().contains("broker connection lost"),
        "{}",
        d.log.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_loses_nothing() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.set_delay(Duration::from_millis(50));
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::with_state(broker.port, &cloud, state.path(), "", vec![]);
    d.wait_subscribed();
    let mut all = Sensor::connect_as(broker.port, "all", "onboard/reply/#", None).await;
    for i in 0..200 {
        all.announce_on(&format!("onboard/announce/load-{i}"), "{}")
            .await;
    }
    d.log.wait_for_n_async("new sensor; onboarding", 20).await;
    let started = Instant::now();
    let st = tokio::task::spawn_blocking(move || {
        let st = d.signal_and_wait(libc::SIGTERM);
        (d, st)
    })
    .await
    .unwrap();
    let (mut d, st) = st;
    assert_eq!(st.code(), Some(0), "{}", d.log.text());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped within 10 s"
    );

    d.spawn();
    let mut ok = HashSet::new();
    while ok.len() < 200 {
        let (_, r, _) = all.next().await;
        if r["status"] == "ok" {
            ok.insert(r["sensor_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(cloud.devices().len(), 200, "exactly one device each");
}

/// Size and modification time of every file of the database.
fn db_fingerprint(dir: &std::path::Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| {
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.modified().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reannounce_of_a_known_sensor_writes_nothing_to_disk() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = Sensor::connect(broker.port, "quiet").await;
    s.announce("{}").await;
    s.reply().await;
    let db = d.state_dir.join("db");
    // Writes are absent events, so time is the only witness: wait until the files
    // stay unchanged for longer than sled's background flush period (1 s).
    let settle = Duration::from_millis(2500);
    let mut before = db_fingerprint(&db);
    for _ in 0..10 {
        tokio::time::sleep(settle).await;
        let now = db_fingerprint(&db);
        if now == before {
            break;
        }
        before = now;
    }
    for _ in 0..100 {
        s.announce("{}").await;
        assert_eq!(s.reply().await["status"], "ok");
    }
    tokio::time::sleep(settle).await;
    assert_eq!(
        before,
        db_fingerprint(&db),
        "re-announces changed the database files"
    );
}
