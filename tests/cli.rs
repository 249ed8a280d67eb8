//! The command line: config checking, the operator's `devices` commands (with the
//! daemon running and without), and the gateway status topic.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env_remove("ONBOARDD_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help_answer() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["run", "check-config", "print-default-config", "devices"] {
        assert!(out.contains(cmd), "--help lists {cmd}");
    }
}

#[test]
fn print_default_config_is_a_config_check_config_accepts_once_the_required_keys_are_set() {
    let (code, text, _) = run(&["print-default-config"]);
    assert_eq!(code, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, _, err) = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "the default lacks project_id and api_key");
    assert!(err.contains("qubitro.project_id"), "{err}");
    let filled = text
        .replace("project_id = \"\"", "project_id = \"p-1\"")
        .replace("api_key = \"\"", "api_key = \"QB_very_secret\"");
    std::fs::write(&path, filled).unwrap();
    let (code, out, _) = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("p-1"));
    assert!(!out.contains("QB_very_secret"), "secrets are redacted");
    assert!(out.contains("<redacted>"));
}

#[test]
fn check_config_names_the_offending_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for (text, key) in [
        // (A missing API key is not an error here: only `run` needs it.)
        ("[qubitro]\napi_key = \"k\"", "qubitro.project_id"),
        (
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[mqtt]\nport = \"x\"",
            "port",
        ),
        (
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[mqtt]\nreply_topic = \"r\"",
            "mqtt.reply_topic",
        ),
        (
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[stor]\npath = \"/x\"",
            "stor",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = run(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 78, "{text}");
        assert!(err.contains(key), "{key} in {err}");
    }
    let (code, _, err) = run(&["check-config", "--config", "/nonexistent/onboardd.toml"]);
    assert_eq!(code, 78);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn environment_variables_override_file_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[qubitro]\nproject_id = \"p\"\n[mqtt]\nport = 1883\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["check-config", "--config", path.to_str().unwrap()])
        .env("ONBOARDD__QUBITRO__API_KEY", "QB_from_env")
        .env("ONBOARDD__MQTT__PORT", "2883")
        .env("ONBOARDD__GATEWAY_ID", "gw-env")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("port = 2883"), "{stdout}");
    assert!(stdout.contains("gw-env"), "{stdout}");
    assert!(!stdout.contains("QB_from_env"));
}

#[test]
fn a_config_error_at_run_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[qubitro]\nproject_id = \"p\"").unwrap();
    let (code, _, err) = run(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78);
    assert!(err.contains("qubitro.api_key"));
}

#[test]
fn a_worker_thread_count_that_is_not_one_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[qubitro]\nproject_id = \"p\"\napi_key = \"QB_x\"").unwrap();
    for bad in ["0", "two", "-1", "100000"] {
        let out = Command::new(bin())
            .args(["run", "--config", path.to_str().unwrap()])
            .env_remove("ONBOARDD_CONFIG")
            .env("TOKIO_WORKER_THREADS", bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{bad}: {err}");
        assert!(err.contains("TOKIO_WORKER_THREADS"), "{bad}: {err}");
    }
}

#[test]
fn a_log_level_run_would_refuse_exits_78_from_check_config_run_and_devices_alike() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let p = path.to_str().unwrap();
    let base = "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[log]\nlevel = ";
    std::fs::write(&path, format!("{base}\"inf0\"")).unwrap();
    for args in [
        &["check-config", "--config", p][..],
        &["run", "--config", p],
        &["devices", "list", "--config", p],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 78, "{args:?}: {err}");
        assert!(
            err.contains("log.level") && err.contains("inf0"),
            "{args:?}: {err}"
        );
        assert!(out.is_empty(), "{args:?} printed {out}");
    }
    std::fs::write(&path, format!("{base}\"info,rumqttc=warn\"")).unwrap();
    let (code, _, err) = run(&["check-config", "--config", p]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_rust_log_that_does_not_parse_is_a_config_error_at_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"").unwrap();
    let out = Command::new(bin())
        .args(["run", "--config", path.to_str().unwrap()])
        .env_remove("ONBOARDD_CONFIG")
        .env("RUST_LOG", "=nonsense=")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("RUST_LOG"), "{err}");
}

/// `onboardd devices ARGS… --config FILE` (the option after the action, as people type it).
fn devices(cfg: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["devices"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--config", cfg.to_str().unwrap()]);
    run(&a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_commands_work_while_the_daemon_runs_and_after_it_stopped() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "cli-1").await;
    s.announce(r#"{"name":"Cellar"}"#).await;
    let ok = s.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &ok);
    let token = ok.token().to_string();
    let cfg = d.config_path.clone();
    use std::os::unix::fs::PermissionsExt;
    let sock = std::fs::metadata(d.state_dir.join("onboardd.sock")).unwrap();
    assert_eq!(
        sock.permissions().mode() & 0o777,
        0o600,
        "the control socket is owner-only"
    );

    let (code, table, _) = devices(&cfg, &["list"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("cli-1") && table.contains("Cellar"),
        "{table}"
    );
    assert!(table.contains(ok["device_id"].as_str().unwrap()));
    assert!(!table.contains(&token), "no token in the table");

    let (code, json, _) = devices(&cfg, &["list", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["sensor_id"], "cli-1");

    let (_, shown, _) = devices(&cfg, &["show", "cli-1"]);
    assert!(!shown.contains(&token));
    let (_, shown, _) = devices(&cfg, &["show", "cli-1", "--show-token"]);
    assert!(shown.contains(&token));
    let (code, _, err) = devices(&cfg, &["show", "nobody"]);
    assert_eq!(code, 1);
    assert!(err.contains("not known"), "{err}");

    let (_, export, _) = devices(&cfg, &["export"]);
    assert_eq!(export.lines().count(), 1);
    let row: Value = serde_json::from_str(export.lines().next().unwrap()).unwrap();
    assert_eq!(row["device_id"], ok["device_id"]);

    let (code, msg, _) = devices(&cfg, &["forget", "cli-1"]);
    assert_eq!(code, 0);
    assert!(
        msg.contains("KEPT"),
        "says plainly the cloud device is kept: {msg}"
    );
    let (_, table, _) = devices(&cfg, &["list"]);
    assert!(!table.contains("cli-1"));

    // Stopped daemon: the CLI opens the store itself.
    s.announce("{}").await;
    let again = s.reply().await;
    assert_eq!(again["status"], "ok", "re-onboarded after forget: {again}");
    assert_eq!(
        again.token(),
        ok.token(),
        "the kept device was adopted again"
    );
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    let (code, table, err) = devices(&cfg, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("cli-1"), "{table}");
    assert_eq!(
        cloud.devices().len(),
        1,
        "forget kept the device; it was adopted again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_with_delete_remote_deletes_the_cloud_device() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "gone-1").await;
    s.announce("{}").await;
    s.reply().await;
    let (code, msg, _) = devices(&d.config_path, &["forget", "gone-1", "--delete-remote"]);
    assert_eq!(code, 0, "{msg}");
    assert!(msg.contains("deleted"), "{msg}");
    assert!(cloud.devices().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_status_is_retained_online_and_offline_on_stop_or_crash() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let topic = "onboard/gateway/gw-test/status";
    let mut watcher = Sensor::connect_as(broker.port, "w", topic, None, None).await;
    // Retained: a late subscriber still learns the state.
    let (t, v) = watcher_raw(&mut watcher).await;
    assert_eq!(t, topic);
    assert_eq!(v, "online");
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    assert_eq!(watcher_raw(&mut watcher).await.1, "offline");
    d.spawn();
    assert_eq!(watcher_raw(&mut watcher).await.1, "online");
    d.kill9();
    // The last will, published by the broker once it notices (keep-alive 5 s).
    assert_eq!(watcher_raw(&mut watcher).await.1, "offline");
}

/// The status payload is plain text, not JSON.
async fn watcher_raw(w: &mut Sensor) -> (String, String) {
    let (t, v, _) = w.next_raw().await;
    (t, String::from_utf8_lossy(&v).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_published_on_the_stats_topic() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let d = Daemon::start(&broker, &cloud, "[log]\nstats_interval_s = 1");
    let mut stats = Sensor::connect_as(
        broker.port,
        "st",
        "onboard/gateway/gw-test/stats",
        None,
        None,
    )
    .await;
    let mut s = d.sensor(broker.port, "counted").await;
    s.announce("{}").await;
    s.reply().await;
    // Published every second: the first one counting the onboarding, within WAIT.
    let v = tokio::time::timeout(WAIT, async {
        loop {
            let (_, v, _) = stats.next().await;
            if v["onboarded"] == 1 {
                return v;
            }
        }
    })
    .await
    .expect("stats counting the onboarding within WAIT");
    assert_eq!(v["announces"], 1, "{v}");
    assert!(v["cloud_requests"].as_u64().unwrap() >= 2, "{v}");
    assert!(v.get("cloud_latency_ms_avg").is_some(), "{v}");
    assert_eq!(v["pending_now"], 0, "{v}");
}

#[test]
fn claim_prints_the_sensor_key_from_the_key_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("claim-key");
    std::fs::write(&key, "fleet-key\n").unwrap();
    let (code, out, _) = run(&["claim", "--key-file", key.to_str().unwrap(), "sensor-1"]);
    assert_eq!(code, 0);
    // printf %s sensor-1 | openssl dgst -sha256 -mac HMAC -macopt key:fleet-key
    assert_eq!(
        out,
        "5d40dfe05fa572b8343e3d480ad8f9b53c89aad08e4e5512405ebc88682bf1d6\n"
    );
    let (code, _, err) = run(&["claim", "--key-file", key.to_str().unwrap(), "bad id"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a valid sensor id"));
    let missing = dir.path().join("missing");
    let (code, _, err) = run(&["claim", "--key-file", missing.to_str().unwrap(), "s"]);
    assert_eq!(code, 78, "an unreadable key is a config error");
    assert!(
        err.contains("--key-file") && err.contains("missing"),
        "{err}"
    );
}

/// Without the feature a crash test would wait for a crash that never comes; the daemon
/// refuses to start instead, so the test fails at once and says why.
#[cfg(not(feature = "failpoints"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failpoint_asked_of_a_build_without_failpoints_stops_the_daemon_at_once() {
    let cloud = fake_cloud().await;
    let mut d = Daemon::spawn_new(
        free_port(),
        &cloud,
        "",
        vec![(
            onboardd::failpoint::ENV.into(),
            "after_pending_recorded".into(),
        )],
    );
    let st = d.wait_exit_async().await;
    assert_eq!(st.code(), Some(1), "{}", d.log.text());
    d.log.wait_for("built without the `failpoints` feature");
}

/// The harness finds the binary next to a test's own executable when a test never called
/// `bin()`; that must be the very binary cargo built for the tests.
#[test]
fn the_harness_finds_the_daemon_binary_cargo_built_for_the_tests() {
    assert_eq!(
        harness::daemon::sibling_daemon_bin(),
        std::path::Path::new(env!("CARGO_BIN_EXE_onboardd"))
    );
}

/// A copy of `cfg` without its `api_key` line, readable by everyone (as the
/// packaged /etc/onboardd/onboardd.toml is: the key reaches only the service).
fn without_api_key(cfg: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let text: String = std::fs::read_to_string(cfg)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("api_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.join("nokey.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_check_config_work_without_the_api_key_and_only_run_needs_it() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "nokey-1").await;
    s.announce("{}").await;
    let ok = s.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &ok);
    let dir = tempfile::tempdir().unwrap();
    let nokey = without_api_key(&d.config_path, dir.path());
    assert!(!std::fs::read_to_string(&nokey)
        .unwrap()
        .contains(&cloud.api_key()));

    let check = || {
        for args in [&["list"][..], &["show", "nokey-1"], &["export"]] {
            let (code, out, err) = devices(&nokey, args);
            assert_eq!(code, 0, "devices {args:?}: {err}");
            assert!(out.contains("nokey-1"), "devices {args:?}: {out}");
            assert!(out.contains(ok["device_id"].as_str().unwrap()));
        }
    };
    check(); // daemon running: over the socket
    let (code, out, err) = run(&["check-config", "--config", nokey.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid"), "{out}");
    assert!(
        err.contains("note: `run` in this environment would stop: qubitro.api_key: is required"),
        "{err}"
    );

    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    check(); // daemon stopped: the store opened directly

    let (code, _, err) = run(&["run", "--config", nokey.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("qubitro.api_key: is required"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_run_as_root_leave_no_root_owned_file_in_the_services_store() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let mut d = Daemon::start(&broker, &cloud, "");
    for id in ["own-1", "own-2"] {
        let mut s = d.sensor(broker.port, id).await;
        s.announce("{}").await;
        assert_eq!(s.reply().await["status"], "ok");
    }
    assert_eq!(d.signal_and_wait(libc::SIGTERM).code(), Some(0));
    // As under DynamicUser=: store.path is root's symlink to the service user's
    // directory, whose parent (`private`, 0700) is root's.
    let store = d.store_path();
    let private = std::fs::canonicalize(&store).unwrap();
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&private)
        .status()
        .unwrap();
    assert!(chown.success());

    let cfg = d.config_path.clone();
    let (code, table, err) = devices(&cfg, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("own-1") && table.contains("own-2"),
        "{table}"
    );
    // A write too: forget changes the store.
    let (code, msg, err) = devices(&cfg, &["forget", "own-2"]);
    assert_eq!(code, 0, "{msg} {err}");
    let (_, table, _) = devices(&cfg, &["list"]);
    assert!(!table.contains("own-2"), "{table}");
    for (path, uid) in owners_below(&private) {
        assert_eq!(uid, 65534, "{path} is owned by uid {uid}");
    }

    // No store at all: nothing is created, the message says why.
    let missing = d.state_dir.join("never-ran");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&store.display().to_string(), &missing.display().to_string());
    let other = d.state_dir.join("missing.toml");
    std::fs::write(&other, text).unwrap();
    let (code, _, err) = devices(&other, &["list"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("onboardd has not run here yet"), "{err}");
    assert!(!missing.exists(), "no store is created by the CLI");
}

#[test]
fn plain_http_to_a_remote_cloud_and_a_client_certificate_without_a_ca_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for (extra, key) in [
        (
            "[qubitro]\nbase_url = \"http://api.qubitro.com\"\n",
            "qubitro.base_url: http:// is allowed only for a loopback host",
        ),
        (
            "[mqtt]\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/k.pem\"\n",
            "mqtt.ca_file: is required",
        ),
    ] {
        std::fs::write(&path, format!("gateway_id = \"gw\"\n{extra}")).unwrap();
        // project_id and api_key in the environment, so only the key under test fails.
        let out = Command::new(bin())
            .args(["check-config", "--config"])
            .arg(&path)
            .env("ONBOARDD__QUBITRO__PROJECT_ID", "p")
            .env("ONBOARDD__QUBITRO__API_KEY", "k")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{extra}: {err}");
        assert!(err.contains(key), "{extra}: {err}");
    }
    std::fs::write(
        &path,
        "[qubitro]\nbase_url = \"http://127.0.0.1:8080\"\nproject_id = \"p\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "loopback is fine for a local fake: {err}");
}

#[test]
fn the_warning_about_a_readable_config_with_a_secret_gives_advice_that_works_under_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_a_readable_secret(dir.path(), "QB_visible");
    let (code, _, err) = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("LoadCredential="), "{err}");
    assert!(err.contains("*_file"), "{err}");
    assert!(
        !err.contains("chmod 600 it"),
        "chmod breaks the packaged service: {err}"
    );
}

#[test]
fn prune_refuses_a_duration_without_a_unit_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"").unwrap();
    for bad in ["30", "3w", "x"] {
        let (code, _, err) = run(&[
            "devices",
            "prune",
            "--not-seen-for",
            bad,
            "--config",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "a usage error: {err}");
        assert!(
            err.contains("30d, 12h, 15m, 90s"),
            "says what it takes: {err}"
        );
    }
}
