//! `devices prune --not-seen-for DURATION`: forgets exactly the sensors silent for
//! longer than DURATION (with `--delete-remote`, their Qubitro devices deleted
//! first), one line per sensor; `--dry-run` changes nothing. The same with the
//! daemon running and without it.

mod common;

use std::time::Duration;

use common::*;
use fake_qubitro::FakeQubitro;

/// Whether the operator runs the command beside the running daemon or with it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Daemonless {
    No,
    Yes,
}

async fn onboard(cloud: &FakeQubitro, d: &Daemon, port: u16, sensor: &str) -> String {
    let mut s = d.sensor(port, sensor).await;
    s.announce("{}").await;
    let ok = s.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(cloud, &ok);
    ok["device_id"].as_str().expect("a device id").to_string()
}

async fn prune_removes_exactly_the_silent_sensors(old: &str, new: &str, mode: Daemonless) {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let old_device = onboard(&cloud, &d, broker.port, old).await;
    // Silence is measured in wall-clock time: `old` must be silent longer than the
    // 3 s asked for below, `new` (seen just before the prune) shorter.
    let quiet_from = onboardd::clock::system_ms();
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let new_device = onboard(&cloud, &d, broker.port, new).await;
    assert!(onboardd::clock::system_ms() - quiet_from >= 4_000);
    if mode == Daemonless::Yes {
        assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    }

    let (code, out, err) = d.devices(&["prune", "--not-seen-for", "3s", "--dry-run"]);
    assert_eq!(code, 0, "{mode:?}: {out}{err}");
    assert_eq!(out.lines().count(), 1, "one line per silent sensor: {out}");
    assert!(out.contains(old) && out.contains("dry run"), "{out}");
    assert!(!out.contains(new), "{out}");
    assert_eq!(cloud.devices().len(), 2, "a dry run changes nothing");
    assert_eq!(
        d.state_of(old).as_deref(),
        Some("delivered"),
        "a dry run changes nothing"
    );

    let (code, out, err) = d.devices(&["prune", "--not-seen-for", "3s", "--delete-remote"]);
    assert_eq!(code, 0, "{mode:?}: {out}{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains(&format!("Qubitro device {old_device} deleted")),
        "{out}"
    );
    assert_eq!(d.state_of(old), None, "the silent sensor is forgotten");
    assert_eq!(
        d.state_of(new).as_deref(),
        Some("delivered"),
        "the other is kept"
    );
    let left: Vec<String> = cloud.devices().into_iter().map(|dev| dev.id).collect();
    assert_eq!(left, vec![new_device]);

    if mode == Daemonless::Yes {
        d.spawn();
        d.wait_subscribed();
        assert_eq!(d.state_of(old), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_with_the_daemon_running_forgets_exactly_the_silent_sensors_and_a_dry_run_nothing() {
    prune_removes_exactly_the_silent_sensors("pr-old-on", "pr-new-on", Daemonless::No).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_with_the_daemon_stopped_forgets_exactly_the_silent_sensors_and_a_dry_run_nothing() {
    prune_removes_exactly_the_silent_sensors("pr-old-off", "pr-new-off", Daemonless::Yes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_whose_delete_qubitro_refuses_is_kept_and_prune_fails() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let device = onboard(&cloud, &d, broker.port, "pr-403").await;
    cloud.set_delete_permission(false);
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let (code, out, err) = d.devices(&["prune", "--not-seen-for", "1s", "--delete-remote"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        out.contains("pr-403") && out.contains("NOT pruned"),
        "{out}"
    );
    assert!(out.contains("Delete permission"), "{out}");
    assert!(err.contains("could not be pruned"), "{err}");
    assert_eq!(d.state_of("pr-403").as_deref(), Some("delivered"));
    assert_eq!(
        cloud
            .devices()
            .into_iter()
            .map(|x| x.id)
            .collect::<Vec<_>>(),
        vec![device]
    );
}
