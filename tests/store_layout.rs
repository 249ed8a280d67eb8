//! The state directory as the packaged unit has it: sled in `{store.path}/db`, the
//! claim key beside it, and a `{store.path}` that belongs to the service's dynamic
//! user below a root-only `/var/lib/private`.
//!
//! These run the real binary against a real mosquitto and the fake Qubitro. The
//! CLI test needs root (it hands the store to uid 65534, as `DynamicUser=` does).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use fake_qubitro::FakeQubitro;

/// Onboards `sensor` on a fresh daemon and stops it cleanly; returns the daemon
/// (stopped) and the sensor's ok reply.
async fn onboard_then_stop(
    broker: &Mosquitto,
    cloud: &FakeQubitro,
    sensor: &str,
    extra: &str,
) -> (Daemon, serde_json::Value) {
    let mut d = Daemon::start(broker, cloud, extra);
    let mut s = d.sensor(broker.port, sensor).await;
    s.announce("{}").await;
    let ok = s.reply().await;
    assert_opens_to_the_clouds_token(cloud, &ok);
    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));
    (d, ok.json)
}

fn store_path(d: &Daemon) -> PathBuf {
    d.store_path()
}

/// The last line the daemon printed before it exited with 78.
async fn refused(d: &mut Daemon) -> String {
    d.spawn();
    let st = d.wait_exit_async().await;
    let log = d.log.text();
    assert_eq!(st.code(), Some(78), "{log}");
    log.lines()
        .rev()
        .find(|l| l.starts_with("onboardd: "))
        .unwrap_or_else(|| panic!("no error line in:\n{log}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_claim_key_is_not_replaced_while_the_database_holds_sensors() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let (mut d, _) = onboard_then_stop(&broker, &cloud, "keyed-1", "").await;
    let store = store_path(&d);
    let key = store.join("claim-key");
    assert!(store.join("db").join("conf").is_file(), "sled lives in db/");
    std::fs::remove_file(&key).unwrap();

    let line = refused(&mut d).await;
    assert!(
        line.contains(&format!("restore {}", key.display())),
        "{line}"
    );
    assert!(
        line.contains(&format!("delete {}", store.join("db").display())),
        "{line}"
    );
    assert!(!key.exists(), "no new key was made");

    // Deleting the evidence, as the message says, starts afresh with a new key.
    std::fs::remove_dir_all(store.join("db")).unwrap();
    d.spawn();
    d.wait_subscribed();
    assert!(key.is_file(), "a new key for a fresh start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_claim_key_is_not_replaced_after_the_database_was_moved_aside() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let (mut d, _) = onboard_then_stop(&broker, &cloud, "keyed-2", "").await;
    let store = store_path(&d);
    let key = store.join("claim-key");
    std::fs::remove_file(&key).unwrap();
    // What a power cut on a worn SD card leaves in sled's files.
    for name in ["conf", "db"] {
        std::fs::write(store.join("db").join(name), vec![0x5A; 4096]).unwrap();
    }

    let line = refused(&mut d).await;
    assert!(
        line.contains(&format!("restore {}", key.display())),
        "{line}"
    );
    assert!(
        line.contains(&format!("delete {}/db.corrupt-", store.display())),
        "{line}"
    );
    assert!(!key.exists(), "no new key was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_as_root_reads_a_stopped_services_store_below_a_root_only_directory() {
    // As systemd lays out StateDirectory= with DynamicUser=: /var/lib/onboardd is a
    // symlink to /var/lib/private/onboardd, which the dynamic user owns, and
    // /var/lib/private is root's, mode 0700.
    let root = tempfile::tempdir().unwrap();
    let private = root.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let real = private.join("onboardd");
    let link = root.path().join("onboardd");
    std::os::unix::fs::symlink("private/onboardd", &link).unwrap();

    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let extra = format!("[store]\npath = \"{}\"", real.display());
    let (d, ok) = onboard_then_stop(&broker, &cloud, "cellar-7", &extra).await;
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&real)
        .status()
        .unwrap();
    assert!(chown.success(), "this test runs as root");

    // The operator's config names the symlink, as the packaged one does.
    let text = std::fs::read_to_string(&d.config_path)
        .unwrap()
        .replace(&real.display().to_string(), &link.display().to_string());
    let cfg = root.path().join("onboardd.toml");
    std::fs::write(&cfg, text).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(bin())
        .args(["devices", "list", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("cellar-7"), "{stdout}");
    assert!(
        stdout.contains(ok["device_id"].as_str().unwrap()),
        "{stdout}"
    );
    for (path, uid) in owners_below(&real) {
        assert_eq!(uid, 65534, "{path} is owned by uid {uid}");
    }
}
