//! `devices forget --delete-remote` is all or nothing, whether the daemon runs (it
//! deletes with its own client) or not (the CLI opens the store and calls Qubitro
//! itself): the Qubitro device is deleted first (one already gone counts as
//! deleted), then the sensor is forgotten; when Qubitro refuses the delete, nothing
//! is forgotten and the command fails with Qubitro's answer. A sensor whose device
//! was never created is forgotten without a cloud call.

mod common;

use common::*;
use fake_qubitro::{Endpoint, FakeQubitro};

/// Whether the operator runs the command beside the running daemon or with it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Daemonless {
    No,
    Yes,
}

/// Onboards `sensor` and returns its Qubitro device id.
async fn onboard(cloud: &FakeQubitro, s: &mut Sensor) -> String {
    s.announce("{}").await;
    let ok = s.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(cloud, &ok);
    ok["device_id"].as_str().expect("a device id").to_string()
}

/// The device id `devices show` gives for `sensor` (`None`: not known, or no device).
fn recorded_device(d: &Daemon, sensor: &str) -> Option<String> {
    let (code, out, err) = d.devices(&["show", sensor]);
    if code != 0 {
        assert!(err.contains("not known"), "devices show {sensor}: {err}");
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).expect("devices show answers JSON");
    v["device_id"].as_str().map(str::to_string)
}

/// Runs `devices forget SENSOR --delete-remote` the way `mode` says (stopping the
/// daemon before and starting it again after, when daemonless).
fn forget_remote(d: &mut Daemon, sensor: &str, mode: Daemonless) -> (i32, String, String) {
    if mode == Daemonless::Yes {
        assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    }
    let out = d.devices(&["forget", sensor, "--delete-remote"]);
    if mode == Daemonless::Yes {
        d.spawn();
        d.wait_subscribed();
    }
    out
}

async fn the_device_is_deleted_and_a_reannounce_creates_a_new_one(sensor: &str, mode: Daemonless) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, sensor).await;
    let first = onboard(&cloud, &mut s).await;

    let (code, out, err) = forget_remote(&mut d, sensor, mode);
    assert_eq!(code, 0, "{mode:?}: {out}{err}");
    assert!(
        out.contains(&format!("Qubitro device {first} deleted")),
        "{out}"
    );
    assert!(cloud.devices().is_empty(), "no device is left in Qubitro");
    assert_eq!(d.state_of(sensor), None, "the sensor is forgotten");

    let second = onboard(&cloud, &mut s).await;
    assert_ne!(second, first, "a new device, not the deleted one");
    let now: Vec<String> = cloud_devices_of(&cloud, sensor)
        .into_iter()
        .map(|dev| dev.id)
        .collect();
    assert_eq!(now, vec![second], "Qubitro holds exactly the new device");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_delete_remote_with_the_daemon_running_leaves_no_device_and_a_reannounce_creates_a_new_one(
) {
    the_device_is_deleted_and_a_reannounce_creates_a_new_one("ld-on", Daemonless::No).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_delete_remote_with_the_daemon_stopped_leaves_no_device_and_a_reannounce_creates_a_new_one(
) {
    the_device_is_deleted_and_a_reannounce_creates_a_new_one("ld-off", Daemonless::Yes).await;
}

async fn a_refused_delete_forgets_nothing(sensor: &str, mode: Daemonless) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, sensor).await;
    let device = onboard(&cloud, &mut s).await;
    cloud.set_delete_permission(false);

    let (code, out, err) = forget_remote(&mut d, sensor, mode);
    assert_ne!(
        code, 0,
        "{mode:?}: a refused delete is a failure: {out}{err}"
    );
    assert!(
        err.contains("may lack the Delete permission"),
        "says the key may lack the Delete permission: {err}"
    );
    assert!(err.contains("403"), "carries Qubitro's answer: {err}");
    assert!(!err.contains(&cloud.api_key()), "no secret: {err}");
    assert!(!out.contains("forgotten"), "{out}");

    assert_eq!(
        recorded_device(&d, sensor).as_deref(),
        Some(device.as_str()),
        "the record is still there, with its device"
    );
    let (code, table, err) = d.devices(&["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains(sensor) && table.contains(&device), "{table}");
    assert_eq!(cloud.devices().len(), 1, "the device is still in Qubitro");
    assert_eq!(cloud.count(Endpoint::Delete), 1);

    // The sensor is still served its device: nothing was undone.
    s.announce("{}").await;
    let again = s.reply_with_status("ok").await;
    assert_eq!(again["device_id"], device.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_qubitro_refuses_with_403_forgets_nothing_while_the_daemon_runs() {
    a_refused_delete_forgets_nothing("ld-403-on", Daemonless::No).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_qubitro_refuses_with_403_forgets_nothing_while_the_daemon_is_stopped() {
    a_refused_delete_forgets_nothing("ld-403-off", Daemonless::Yes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_fails_on_qubitros_side_forgets_nothing_and_says_why() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "ld-503").await;
    let device = onboard(&cloud, &mut s).await;
    cloud.push_faults(Endpoint::Delete, vec![status_fault(503)]);

    let (code, out, err) = forget_remote(&mut d, "ld-503", Daemonless::No);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("503"), "{err}");
    assert!(err.contains("nothing was forgotten"), "{err}");
    assert_eq!(recorded_device(&d, "ld-503"), Some(device));
    assert_eq!(cloud.devices().len(), 1);
}

async fn a_device_already_gone_counts_as_deleted(sensor: &str, mode: Daemonless) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, sensor).await;
    let device = onboard(&cloud, &mut s).await;
    // Someone deleted it in Qubitro's portal: the delete answers 404.
    assert!(cloud.remove_device(&device).is_some());

    let (code, out, err) = forget_remote(&mut d, sensor, mode);
    assert_eq!(code, 0, "{mode:?}: {out}{err}");
    assert!(out.contains("already gone"), "{out}");
    assert_eq!(cloud.count(Endpoint::Delete), 1, "the delete was asked");
    assert_eq!(d.state_of(sensor), None, "the sensor is forgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_qubitro_no_longer_has_counts_as_deleted_while_the_daemon_runs() {
    a_device_already_gone_counts_as_deleted("ld-404-on", Daemonless::No).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_qubitro_no_longer_has_counts_as_deleted_while_the_daemon_is_stopped() {
    a_device_already_gone_counts_as_deleted("ld-404-off", Daemonless::Yes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_whose_device_was_never_created_is_forgotten_without_a_cloud_call() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    // Qubitro stays unavailable: the sensor stays pending.
    cloud.push_faults(Endpoint::Create, vec![status_fault(503); 1000]);
    let s = d.sensor(broker.port, "ld-pending").await;
    s.announce("{}").await;
    wait_for_cloud_requests(&cloud, Endpoint::Create, 1).await;

    let (code, out, err) = forget_remote(&mut d, "ld-pending", Daemonless::Yes);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("forgotten"), "{out}");
    assert_eq!(cloud.count(Endpoint::Delete), 0, "no device, no delete");
    assert_eq!(d.state_of("ld-pending"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_daemon_and_without_the_api_key_a_delete_forgets_nothing_and_says_how_to_give_the_key(
) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "ld-nokey").await;
    let device = onboard(&cloud, &mut s).await;
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    // `devices` commands run without the key (the packaged unit hands it to the
    // service alone); a delete without the daemon cannot.
    let text: String = std::fs::read_to_string(&d.config_path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("api_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    let nokey = d.state_dir.join("nokey.toml");
    std::fs::write(&nokey, text).unwrap();

    let out = std::process::Command::new(bin())
        .args([
            "devices",
            "forget",
            "ld-nokey",
            "--delete-remote",
            "--config",
        ])
        .arg(&nokey)
        .env_remove("ONBOARDD__QUBITRO__API_KEY")
        .env_remove("ONBOARDD__QUBITRO__API_KEY_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("ONBOARDD__QUBITRO__API_KEY_FILE"),
        "says how: {err}"
    );
    assert!(err.contains("Nothing was forgotten"), "{err}");
    assert_eq!(cloud.count(Endpoint::Delete), 0);
    assert_eq!(recorded_device(&d, "ld-nokey"), Some(device));
}
