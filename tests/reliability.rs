//! Reliability: exactly one Qubitro device per sensor and no lost announce,
//! through cloud outages, broker restarts, crashes at every step and lost databases.
//!
//! The restart and burst tests run against a broker with persistence on, as a stock
//! Debian mosquitto is: sessions and queued messages survive it. Delivery is judged by
//! what a sensor's own MQTT client received, and every token is compared with the cloud's.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use fake_qubitro::{Endpoint, FakeQubitro, NewDevice};

/// Bound for the bursts of hundreds of onboardings (a failure bound, not a speed claim).
const BURST_WAIT: Duration = Duration::from_secs(120);

/// Asserts `ok` is an ok reply carrying the credentials of the one cloud device of its
/// sensor: its device id, and the token the sensor opened from the seal with its key.
fn assert_ok_carries_the_one_device(cloud: &FakeQubitro, ok: &Reply, context: &str) {
    assert_eq!(ok["status"], "ok", "{context}: {ok}");
    let sensor = ok["sensor_id"].as_str().expect("sensor_id");
    let devices = cloud_devices_of(cloud, sensor);
    assert_eq!(
        devices.len(),
        1,
        "{context}: exactly one device for {sensor}"
    );
    assert_eq!(ok["device_id"], devices[0].id.as_str(), "{context}");
    assert_eq!(ok.token(), devices[0].token.as_str(), "{context}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_500_three_times_then_201_gives_one_device_and_pending_then_ok() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.push_faults(
        Endpoint::Create,
        vec![status_fault(500), status_fault(500), status_fault(500)],
    );
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "flaky").await;
    s.announce(r#"{"request_id":"x"}"#).await;
    let first = s.reply().await;
    assert_eq!(first["status"], "pending", "{first}");
    assert!(first["retry_after_s"].as_u64().is_some(), "{first}");
    assert_eq!(first["request_id"], "x");
    let ok = s.reply_with_status("ok").await;
    assert_eq!(cloud.count(Endpoint::Create), 4);
    assert_eq!(cloud.devices().len(), 1);
    assert_ok_carries_the_one_device(&cloud, &ok, "after three 500s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_of_a_429_is_honoured() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    // With lookup_before_create on, the first request of an onboarding is the lookup.
    cloud.push_faults(Endpoint::List, vec![retry_after_fault(429, 2)]);
    // Retry-After is honoured up to retry_max_ms (1 s in tests): raise the cap.
    let d = Daemon::start(&broker, &cloud, "[qubitro]\nretry_max_ms = 5000");
    let mut s = d.sensor(broker.port, "busy").await;
    s.announce("{}").await;
    let pending = s.reply().await;
    assert_eq!(pending["status"], "pending");
    assert!(pending["retry_after_s"].as_u64().unwrap() >= 2, "{pending}");
    wait_for_cloud_requests(&cloud, Endpoint::List, 2).await;
    let ok = s.reply_with_status("ok").await;
    assert_ok_carries_the_one_device(&cloud, &ok, "after a 429");
    // The lookups before the create (the list after it is the race check).
    let lists: Vec<_> = cloud
        .requests()
        .into_iter()
        .take_while(|r| r.endpoint != Some(Endpoint::Create))
        .filter(|r| r.endpoint == Some(Endpoint::List))
        .map(|r| r.at)
        .collect();
    assert_eq!(lists.len(), 2, "one retry of the lookup");
    // Not a timing assertion: a lower bound on the daemon's own wait. Both instants are the
    // fake's, taken when each request arrived; the 429 left after the first, so a daemon
    // that honours Retry-After cannot arrive sooner however slow or loaded the machine is
    // (load only lengthens the gap). It fails only for a daemon that retries early.
    let gap = lists[1].duration_since(lists[0]);
    assert!(
        gap >= Duration::from_secs(2),
        "retried {gap:?} after the 429, before its Retry-After of 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cloud_gets_pending_and_the_ok_follows_without_a_new_announce() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    cloud.stop().await;
    let mut s = d.sensor(broker.port, "offline-1").await;
    s.announce("{}").await;
    assert_eq!(s.reply().await["status"], "pending");
    assert_eq!(s.reply().await["status"], "pending", "still retrying");
    cloud.restart().await.unwrap();
    let ok = s.reply_with_status("ok").await;
    assert_ok_carries_the_one_device(&cloud, &ok, "after the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_key_pauses_all_cloud_calls_instead_of_retrying() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    cloud.push_faults(Endpoint::List, vec![status_fault(401)]);
    let d = Daemon::start(&broker, &cloud, "[qubitro]\nauth_failure_backoff_s = 3600");
    let mut a = d.sensor(broker.port, "a1").await;
    a.announce("{}").await;
    let r = a.reply().await;
    assert_eq!(r["status"], "pending");
    assert!(r["retry_after_s"].as_u64().unwrap() >= 3000, "{r}");
    d.log.wait_for_async("OPERATOR ERROR").await;
    // A second sensor during the pause is told to wait and costs no request.
    let mut b = d.sensor(broker.port, "b1").await;
    b.announce("{}").await;
    assert_eq!(b.reply().await["status"], "pending");
    assert_eq!(cloud.requests().len(), 1, "one request, then silence");
    assert_eq!(
        d.log.count("OPERATOR ERROR"),
        1,
        "logged once, not per sensor"
    );
}

/// A broker without persistence, killed and started again, has forgotten onboardd's
/// session and subscription: onboardd reconnects, subscribes again, and serves the
/// announces sent after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_that_loses_the_session_is_survived_by_subscribing_again() {
    let mut broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "before").await;
    s.announce("{}").await;
    let ok = s.reply().await;
    assert_ok_carries_the_one_device(&cloud, &ok, "before the restart");
    drop(s);

    broker.restart(); // SIGKILL, same port, no persistence: every session is gone
                      // With the session lost, an announce sent before the new subscription has nobody to
                      // go to: the resubscription is what this test is about.
    d.log.wait_for_n_async("subscribed to announces", 2).await;
    let mut s = d.sensor(broker.port, "after").await;
    s.announce("{}").await;
    let ok = s.reply().await;
    assert_ok_carries_the_one_device(&cloud, &ok, "after the restart");
    assert_eq!(cloud.devices().len(), 2);
}

/// A persistent broker stopped cleanly saves onboardd's session: an announce a sensor
/// sends while onboardd cannot reach the restarted broker yet is queued in that session
/// and served once onboardd is back, without a new announce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_that_keeps_the_session_serves_announces_sent_before_onboardd_reconnected()
{
    let mut broker = Mosquitto::start_persistent();
    let cloud = fake_cloud().await;
    // onboardd reaches the broker through a proxy, so the test decides when it gets back.
    let proxy = Proxy::start(broker.port);
    let d = Daemon::spawn_new(proxy.port, &cloud, "", vec![]);
    d.wait_subscribed();
    let mut s = Sensor::connect_persistent(broker.port, "before", &d.flashed()).await;
    s.announce_acked("{}").await;
    let ok = s.reply().await;
    assert_ok_carries_the_one_device(&cloud, &ok, "before the restart");

    proxy.stall();
    broker.restart_clean();
    // onboardd's old connection is gone; its new ones are accepted and held.
    proxy.sever();
    let mut late = Sensor::connect_persistent(broker.port, "after", &d.flashed()).await;
    late.announce_acked(r#"{"request_id":"sent-while-away"}"#)
        .await;
    proxy.resume();
    let ok = late.reply().await;
    assert_eq!(ok["request_id"], "sent-while-away", "{ok}");
    assert_ok_carries_the_one_device(&cloud, &ok, "announced while onboardd was away");
    assert_eq!(cloud.devices().len(), 2);
}

/// The announce waits in onboardd's persistent session on the broker, even through a
/// clean broker restart while onboardd is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announces_published_while_onboardd_was_stopped_are_served_when_it_starts() {
    let mut broker = Mosquitto::start_persistent();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));

    let mut s = Sensor::connect_persistent(broker.port, "early-bird", &d.flashed()).await;
    s.announce_acked(r#"{"request_id":"while-down"}"#).await;
    broker.restart_clean();
    d.spawn();
    let r = s.reply().await;
    assert_eq!(r["request_id"], "while-down", "{r}");
    assert_ok_carries_the_one_device(&cloud, &r, "announced while onboardd was stopped");
}

/// Crashes (SIGKILL) at each step of an onboarding, restarts, and checks the sensor
/// ends with exactly one device and its own client gets that device's token, without
/// announcing again; then a later announce gets the same device. Against a persistent
/// broker, with the lookup policy given.
async fn sigkill_at_every_step(policy: &str) {
    let config = format!("[qubitro]\nlookup_before_create = \"{policy}\"");
    for step in onboardd::failpoint::STEPS {
        let context = format!("lookup_before_create = {policy:?}, failpoint {step}");
        let broker = Mosquitto::start_persistent();
        let cloud = fake_cloud().await;
        let mut d = Daemon::spawn_new(
            broker.port,
            &cloud,
            &config,
            vec![(onboardd::failpoint::ENV.into(), step.to_string())],
        );
        d.wait_subscribed();
        let sensor = format!("crash-{}", step.replace('_', "-"));
        let mut s = Sensor::connect_persistent(broker.port, &sensor, &d.flashed()).await;
        s.announce_acked("{}").await;
        let st = d.wait_exit_async().await;
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "{context}: died by its failpoint; log:\n{}",
            d.log.text()
        );
        d.log.wait_for(&format!("failpoint {step} reached"));
        let crashed_log = d.log.text();

        d.clear_env();
        d.spawn();
        let ok = s.reply_with_status("ok").await;
        let log = || {
            format!(
                "log before the crash:\n{crashed_log}\nafter:\n{}",
                d.log.text()
            )
        };
        assert_eq!(cloud.devices().len(), 1, "{context}: one device; {}", log());
        assert_ok_carries_the_one_device(&cloud, &ok, &format!("{context}; {}", log()));
        // And a later announce still gets the same device.
        s.announce("{}").await;
        let again = s.reply_with_status("ok").await;
        assert_eq!(again.token(), ok.token(), "{context}");
        assert_eq!(cloud.devices().len(), 1, "{context}; {}", log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs failpoints: cargo test --workspace --features failpoints"
)]
async fn sigkill_at_every_step_still_gives_exactly_one_device_and_the_token() {
    sigkill_at_every_step("always").await;
}

/// A `Creating` sensor is looked up before any further create whatever the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs failpoints: cargo test --workspace --features failpoints"
)]
async fn sigkill_at_every_step_with_lookup_only_after_failure_still_gives_exactly_one_device() {
    sigkill_at_every_step("after_failure").await;
}

/// A `Creating` sensor is looked up before any further create whatever the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs failpoints: cargo test --workspace --features failpoints"
)]
async fn sigkill_at_every_step_with_lookup_never_still_gives_exactly_one_device() {
    sigkill_at_every_step("never").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_sensors_and_fifty_simultaneous_announces_of_one_more_give_501_devices() {
    let broker = Mosquitto::start_persistent();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut all = d.fleet(broker.port).await;
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
    let ok = all.ok_replies_of(501, BURST_WAIT).await;
    assert_eq!(cloud.devices().len(), 501);
    assert_eq!(cloud.count(Endpoint::Create), 501);
    for r in ok.values() {
        assert_ok_carries_the_one_device(&cloud, r, "burst");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_is_rebuilt_by_adopting_the_existing_device() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "amnesia").await;
    s.announce("{}").await;
    let first = s.reply().await;
    assert_ok_carries_the_one_device(&cloud, &first, "first onboarding");
    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));

    d.delete_database();
    d.spawn();
    d.wait_subscribed();
    s.announce("{}").await;
    let second = s.reply_with_status("ok").await;
    assert_eq!(first["device_id"], second["device_id"]);
    assert_eq!(first.token(), second.token());
    assert_ok_carries_the_one_device(&cloud, &second, "after the database was deleted");
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
    // sled's files, unreadable, where the daemon opens its database.
    let db = store_path(state.path());
    std::fs::write(db.join("conf"), b"\xff\xfe not a sled config").unwrap();
    std::fs::write(db.join("db"), vec![0xA5; 8192]).unwrap();
    // The gateway's key, beside the database: without it a corrupt database is
    // evidence of sensors onboarded with a lost key, and onboardd refuses to start.
    std::fs::write(db.join("claim-key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let d = Daemon::with_state(broker.port, &cloud, state.path(), "", vec![]);
    d.log.wait_for_async("DATABASE UNREADABLE").await;
    d.wait_subscribed();
    assert_eq!(
        d.corrupt_copies().len(),
        1,
        "the unreadable database is kept aside for inspection"
    );
    let mut s = d.sensor(broker.port, "old-timer").await;
    s.announce("{}").await;
    let r = s.reply().await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["device_id"], existing.id.as_str());
    assert_eq!(r.token(), existing.token.as_str());
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
    let st = d2.wait_exit_async().await;
    assert_eq!(st.code(), Some(1), "{}", d2.log.text());
    assert!(
        d2.log.text().contains("in use by another process"),
        "{}",
        d2.log.text()
    );
    // The first one is untouched and still serves.
    let mut s = d1.sensor(broker.port, "still-served").await;
    s.announce("{}").await;
    let ok = s.reply().await;
    assert_ok_carries_the_one_device(&cloud, &ok, "the first daemon after the second failed");
    drop(d1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_adopts_the_device_the_first_one_made() {
    let broker_a = Mosquitto::start();
    let broker_b = Mosquitto::start();
    let cloud = fake_cloud().await;
    let a = Daemon::start(&broker_a, &cloud, "gateway_id = \"gw-a\"");
    let b = Daemon::start(&broker_b, &cloud, "gateway_id = \"gw-b\"");
    // Each gateway has its own claim key: the sensor is flashed for the one it talks to.
    let mut sa = a.sensor(broker_a.port, "roamer").await;
    sa.announce("{}").await;
    let ra = sa.reply().await;
    let mut sb = b.sensor(broker_b.port, "roamer").await;
    sb.announce("{}").await;
    let rb = sb.reply().await;
    assert_ok_carries_the_one_device(&cloud, &ra, "gateway a");
    assert_ok_carries_the_one_device(&cloud, &rb, "gateway b");
    assert_eq!(cloud.devices().len(), 1);
    assert_eq!(
        cloud.devices()[0]
            .metadata
            .get("gateway_id")
            .map(String::as_str),
        Some("gw-a"),
        "made by the first gateway, adopted by the second"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_packet_is_dropped_by_the_broker_and_the_daemon_keeps_serving() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "huge").await;
    // Over mqtt.max_packet_bytes (64 KiB): the broker must not send it to us (MQTT 5
    // Maximum Packet Size), so it can never become a poison message.
    s.announce_raw(&"x".repeat(200_000)).await;
    s.announce(r#"{"request_id":"after"}"#).await;
    let r = s.reply().await;
    assert_ok_carries_the_one_device(&cloud, &r, "after the oversized packet");
    assert_eq!(r["request_id"], "after");
    assert!(
        !d.log.text().contains("broker connection lost"),
        "{}",
        d.log.text()
    );
}

/// SIGTERM while 200 onboardings are under way: a clean exit, and after a restart every
/// sensor's reply (read by one client subscribed to all of them) carries the token of its
/// one device. The broker is persistent, so what was announced but not acknowledged waits
/// in onboardd's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_loses_nothing() {
    let broker = Mosquitto::start_persistent();
    let cloud = fake_cloud().await;
    cloud.set_delay(Duration::from_millis(50));
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut all = d.fleet(broker.port).await;
    for i in 0..200 {
        all.announce_on(&format!("onboard/announce/load-{i}"), "{}")
            .await;
    }
    d.log.wait_for_n_async("new sensor; onboarding", 20).await;
    // How fast it stops is systemd's TimeoutStopSec and the benchmark's business; here it
    // must stop by itself (exit 0, not the harness's SIGKILL after WAIT).
    let st = d.signal_and_wait_async(libc::SIGTERM).await;
    assert_eq!(st.code(), Some(0), "{}", d.log.text());

    d.spawn();
    let ok = all.ok_replies_of(200, BURST_WAIT).await;
    assert_eq!(cloud.devices().len(), 200, "exactly one device each");
    for r in ok.values() {
        assert_ok_carries_the_one_device(&cloud, r, "after SIGTERM and a restart");
    }
}

/// Every file of the database: name, size, modification time and contents.
type DbSnapshot = BTreeMap<String, (u64, std::time::SystemTime, Vec<u8>)>;

fn db_snapshot(dir: &Path) -> DbSnapshot {
    let mut files = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::metadata(&path).unwrap();
            if m.is_dir() {
                dirs.push(path);
            } else {
                let name = path.strip_prefix(dir).unwrap().display().to_string();
                let bytes = std::fs::read(&path).unwrap();
                files.insert(name, (m.len(), m.modified().unwrap(), bytes));
            }
        }
    }
    files
}

/// The files of `b` that differ from `a` (added, removed, other bytes, or, unless named
/// in `touched_anyway`, another modification time), described by size and time.
fn snapshot_diff(a: &DbSnapshot, b: &DbSnapshot, touched_anyway: &[String]) -> Vec<String> {
    let names: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .filter(|n| match (a.get(*n), b.get(*n)) {
            (Some((_, ta, ba)), Some((_, tb, bb))) => {
                ba != bb || (ta != tb && !touched_anyway.contains(*n))
            }
            _ => true,
        })
        .map(|n| {
            let show = |s: &DbSnapshot| s.get(n).map(|(len, at, _)| format!("{len} bytes, {at:?}"));
            let same = matches!((a.get(n), b.get(n)), (Some(x), Some(y)) if x.2 == y.2);
            let bytes = if same { "same bytes" } else { "other bytes" };
            format!("{n}: {:?} -> {:?} ({bytes})", show(a), show(b))
        })
        .collect()
}

/// Writes are absent events, so instead of waiting for sled's background flusher this
/// compares what clean stops leave on disk: SIGTERM flushes everything, so after it the
/// files hold all a run wrote. A run that only starts and stops shows what opening and
/// closing the database do by themselves (sled 0.34 touches its `db` file at every open,
/// rewriting the same bytes); a run that also serves 100 re-announces must leave exactly
/// the same files: the same bytes (sled's log is append-only, so any insert, even of an
/// identical value, changes them) and the same modification times, except for files the
/// idle run touched too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reannounce_of_a_known_sensor_writes_nothing_to_disk() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let db = d.store_path();
    let mut s = d.sensor(broker.port, "quiet").await;
    s.announce("{}").await;
    let ok = s.reply().await;
    assert_ok_carries_the_one_device(&cloud, &ok, "first onboarding");
    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));

    // Two idle runs: the baseline of what a start and a stop alone do to the files (the
    // first start after the onboarding may still tidy up what that run left).
    let mut idle = DbSnapshot::new();
    let mut touched_by_open = Vec::new();
    for _ in 0..2 {
        d.spawn();
        d.wait_subscribed();
        assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));
        let next = db_snapshot(&db);
        touched_by_open = next
            .iter()
            .filter(|(n, (_, at, bytes))| {
                idle.get(*n)
                    .is_some_and(|(_, at0, bytes0)| at0 != at && bytes0 == bytes)
            })
            .map(|(n, _)| n.clone())
            .collect();
        idle = next;
    }

    d.spawn();
    d.wait_subscribed();
    for _ in 0..100 {
        s.announce("{}").await;
        let again = s.reply().await;
        assert_eq!(again.token(), ok.token(), "{again}");
    }
    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));
    let after = db_snapshot(&db);
    let changed = snapshot_diff(&idle, &after, &touched_by_open);
    assert!(
        changed.is_empty(),
        "re-announces changed the database files (an idle run touches only \
         {touched_by_open:?}):\n{}",
        changed.join("\n")
    );
}
