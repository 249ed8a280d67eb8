//! onboardd under test: the real binary as a child process, with a config made for one test.
//!
//! Where the binary is: integration tests of the onboardd package get its path from cargo
//! (`env!("CARGO_BIN_EXE_onboardd")`, which only they see); `tests/common/mod.rs` hands it
//! over with [`set_daemon_bin`]. Everything else (the benchmark, a test that never called
//! it) finds `onboardd` in the profile directory above its own executable: cargo puts test
//! binaries in `target/<profile>/deps/` and examples in `target/<profile>/examples/`, next to
//! `target/<profile>/onboardd`. `ONBOARDD_BIN` overrides both.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;

use fake_qubitro::FakeQubitro;

use crate::firmware::Flashed;
use crate::mosquitto::Mosquitto;
use crate::process::{LogLines, Proc};
use crate::sensor::Sensor;
use crate::WAIT;

static DAEMON_BIN: OnceLock<PathBuf> = OnceLock::new();

/// Tells the harness which onboardd binary to start. The first call wins; later calls
/// with another path panic (two binaries in one test process would be a harness bug).
pub fn set_daemon_bin(path: impl Into<PathBuf>) {
    let path = path.into();
    let set = DAEMON_BIN.get_or_init(|| path.clone());
    assert_eq!(
        *set, path,
        "the onboardd binary was already set to another path"
    );
}

/// `onboardd` in the cargo profile directory above the running executable
/// (`target/<profile>/{deps,examples}/<me>` → `target/<profile>/onboardd`).
pub fn sibling_daemon_bin() -> PathBuf {
    let me = std::env::current_exe().expect("the running executable's path");
    let profile_dir = me
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} has no grandparent directory", me.display()));
    profile_dir.join("onboardd")
}

/// The onboardd binary the harness starts: the one given to [`set_daemon_bin`], else
/// `$ONBOARDD_BIN`, else [`sibling_daemon_bin`]. Panics, saying how to build it, if it
/// does not exist.
pub fn daemon_bin() -> &'static Path {
    let bin = DAEMON_BIN.get_or_init(|| match std::env::var_os("ONBOARDD_BIN") {
        Some(p) => PathBuf::from(p),
        None => sibling_daemon_bin(),
    });
    assert!(
        bin.is_file(),
        "no onboardd binary at {} (build it: cargo build -p onboardd, or set ONBOARDD_BIN)",
        bin.display()
    );
    bin
}

/// The store directory of a test's state dir, laid out as systemd makes the unit's
/// `StateDirectory=onboardd` under `DynamicUser=yes`: `<state>/onboardd` is a symlink to
/// `private/onboardd` (a 0700 directory), so the daemon works through the symlink as it
/// does at `/var/lib/onboardd`. Made on first use, kept across restarts.
pub fn store_path(state_dir: &Path) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let private = state_dir.join("private");
    let target = private.join("onboardd");
    let link = state_dir.join("onboardd");
    if std::fs::symlink_metadata(&link).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&target)
            .unwrap_or_else(|e| panic!("make {}: {e}", target.display()));
        std::os::unix::fs::symlink("private/onboardd", &link)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
    }
    link
}

/// A config for one test: the broker and fake cloud given, fast retries, and everything
/// else as shipped: proofs required with no claim key configured (the daemon generates
/// one at `{store.path}/claim-key` on first start), the store in a unit-like state
/// directory ([`store_path`]). A test that needs another setting states it in `extra`,
/// with the reason.
pub fn config_toml(broker_port: u16, cloud: &FakeQubitro, state_dir: &Path, extra: &str) -> String {
    let base = format!(
        r#"gateway_id = "gw-test"
[log]
level = "info,onboardd=debug"
stats_interval_s = 0
[mqtt]
host = "127.0.0.1"
port = {broker_port}
client_id = "onboardd-test-{client}"
keep_alive_s = 5
reconnect_initial_ms = 50
reconnect_max_ms = 500
[qubitro]
base_url = "{base}"
project_id = "{project}"
api_key = "{key}"
retry_initial_ms = 100
retry_max_ms = 1000
request_timeout_ms = 3000
connect_timeout_ms = 1000
[store]
path = "{state}"
[security]
new_sensor_cooldown_s = 0
[control]
socket = "{sock}"
[http]
# A port of its own per daemon (the shipped one is fixed): tests run side by side.
listen = "127.0.0.1:0"
"#,
        base = cloud.base_url(),
        project = cloud.project_id(),
        key = cloud.api_key(),
        state = store_path(state_dir).display(),
        sock = state_dir.join("onboardd.sock").display(),
        // Stable per state dir (a restart resumes its session), unique across tests.
        client = state_dir
            .file_name()
            .map(|n| n.to_string_lossy().replace('.', ""))
            .unwrap_or_default(),
    );
    merge_toml(&base, extra)
}

/// Overlays `extra` (TOML) on `base`, table by table, so tests state only what differs.
pub fn merge_toml(base: &str, extra: &str) -> String {
    let mut b: toml::Table = base.parse().expect("base toml");
    let e: toml::Table = extra.parse().expect("extra toml");
    for (k, v) in e {
        match (b.get_mut(&k), v) {
            (Some(toml::Value::Table(bt)), toml::Value::Table(et)) => {
                for (k2, v2) in et {
                    bt.insert(k2, v2);
                }
            }
            (_, v) => {
                b.insert(k, v);
            }
        }
    }
    toml::to_string(&b).expect("toml")
}

/// The onboardd binary under test.
pub struct Daemon {
    proc: Option<Proc>,
    pub log: LogLines,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts onboardd with a fresh state dir of its own (kept across [`spawn`](Self::spawn))
    /// and waits until it has subscribed.
    pub fn start(broker: &Mosquitto, cloud: &FakeQubitro, extra: &str) -> Daemon {
        let d = Daemon::spawn_new(broker.port, cloud, extra, vec![]);
        d.wait_subscribed();
        d
    }

    /// Starts onboardd on `broker_port` with a fresh state dir of its own and `env`,
    /// without waiting: for a daemon that must fail, crash at a failpoint, or reach the
    /// broker through a proxy.
    pub fn spawn_new(
        broker_port: u16,
        cloud: &FakeQubitro,
        extra: &str,
        env: Vec<(String, String)>,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon::with_state(broker_port, cloud, dir.path(), extra, env);
        d._dir = Some(dir);
        d
    }

    /// Starts onboardd on a given state dir (restarts keep it), without waiting.
    pub fn with_state(
        broker_port: u16,
        cloud: &FakeQubitro,
        state: &Path,
        extra: &str,
        env: Vec<(String, String)>,
    ) -> Daemon {
        Daemon::from_toml(state, &config_toml(broker_port, cloud, state, extra), env)
    }

    /// Starts onboardd with exactly this config text, without waiting.
    pub fn from_toml(state: &Path, toml: &str, env: Vec<(String, String)>) -> Daemon {
        let config_path = state.join("onboardd.toml");
        std::fs::write(&config_path, toml).expect("write the config");
        // Owner-only, as the README says: otherwise onboardd warns about the secret.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the config");
        let mut d = Daemon {
            proc: None,
            log: LogLines::default(),
            config_path,
            state_dir: state.to_path_buf(),
            _dir: None,
            env,
        };
        d.spawn();
        d
    }

    /// Starts (again) the process, with a fresh log.
    pub fn spawn(&mut self) {
        self.log = LogLines::default();
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("ONBOARDD_FAILPOINTS");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn("onboardd", &mut cmd, self.log.clone()).expect("start onboardd");
        self.proc = Some(proc);
    }

    pub fn set_env(&mut self, k: &str, v: &str) {
        self.env.retain(|(a, _)| a != k);
        self.env.push((k.into(), v.into()));
    }

    pub fn clear_env(&mut self) {
        self.env.clear();
    }

    /// `onboardd devices ARGS… --config <this daemon's config>`: (exit code, stdout,
    /// stderr). It talks to this daemon over its control socket while it runs.
    pub fn devices(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(daemon_bin())
            .arg("devices")
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .output()
            .expect("run onboardd devices");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The state `onboardd devices show` reports for a sensor (`None`: not known).
    pub fn state_of(&self, sensor: &str) -> Option<String> {
        let (code, out, err) = self.devices(&["show", sensor]);
        if code != 0 {
            assert!(err.contains("not known"), "devices show {sensor}: {err}");
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("devices show {sensor}: {e}: {out}"));
        v["state"].as_str().map(str::to_string)
    }

    /// `store.path` as its config says (the harness's default: the symlink of the
    /// unit-like state directory, [`store_path`]).
    pub fn store_path(&self) -> PathBuf {
        let text = std::fs::read_to_string(&self.config_path).expect("read the config");
        let cfg: toml::Table = text.parse().expect("the config is TOML");
        cfg.get("store")
            .and_then(|s| s.get("path"))
            .and_then(toml::Value::as_str)
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no store.path in {}", self.config_path.display()))
    }

    /// The claim key this daemon generated (`{store.path}/claim-key`), once it has started.
    pub fn claim_key(&self) -> String {
        crate::firmware::generated_claim_key(&self.store_path())
    }

    /// What this gateway's sensors are flashed with.
    pub fn flashed(&self) -> Flashed {
        Flashed::new(&self.claim_key())
    }

    /// A sensor flashed for this gateway (its key derived from this daemon's claim key),
    /// connected to the broker on `port` and subscribed to its reply topic.
    pub async fn sensor(&self, port: u16, id: &str) -> Sensor {
        Sensor::connect(port, id, &self.flashed()).await
    }

    /// One client acting for every sensor of this gateway (each announce on
    /// `onboard/announce/<sensor>` signed with that sensor's key), subscribed to every
    /// reply topic: for tests of hundreds of sensors.
    pub async fn fleet(&self, port: u16) -> Sensor {
        let flashed = self.flashed();
        Sensor::connect_as(port, "all", "onboard/reply/#", None, Some(&flashed)).await
    }

    /// Deletes the database as an operator's "reset" does: everything in the store
    /// directory but the claim key, which the sensors were flashed from.
    pub fn delete_database(&self) {
        let store = self.store_path();
        for e in std::fs::read_dir(&store).expect("read the store directory") {
            let path = e.expect("a directory entry").path();
            if path.file_name() == Some(std::ffi::OsStr::new(crate::firmware::CLAIM_KEY_FILE)) {
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.unwrap_or_else(|e| panic!("delete {}: {e}", path.display()));
        }
    }

    /// The copies of unreadable databases the daemon moved aside (`*.corrupt-<secs>`),
    /// inside the store directory.
    pub fn corrupt_copies(&self) -> Vec<PathBuf> {
        // Only inside store.path: the unit's state directory (and a Docker volume)
        // cannot be renamed, so a copy beside it would mean the move-aside is broken.
        std::fs::read_dir(self.store_path())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .map(|e| e.path())
            .collect()
    }

    /// The port its HTTP listener bound, read from its "http listening on IP:PORT" line.
    /// Configure `listen = "127.0.0.1:0"`: a port probed free first can be taken by
    /// another test's process before the daemon binds it.
    pub fn http_port(&self) -> u16 {
        const SAYS: &str = "http listening on ";
        let (_, line) = self
            .log
            .try_wait_for_n(SAYS, 1, WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
        let at = &line[line.find(SAYS).expect("matched") + SAYS.len()..];
        let addr = at
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_end_matches(':');
        addr.rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"))
    }

    pub fn wait_subscribed(&self) {
        self.log.wait_for("subscribed to announces");
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("running").pid()
    }

    /// Sends a signal and waits (at most [`WAIT`]) for the exit status.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let mut p = self.proc.take().expect("running");
        p.signal_and_wait(sig, WAIT)
            .unwrap_or_else(|e| panic!("onboardd after signal {sig}: {e}"))
    }

    /// Sends a signal and waits at most `within` for the exit status (a deadline the
    /// daemon promises, such as systemd's stop timeout).
    pub fn signal_and_wait_within(
        &mut self,
        sig: i32,
        within: std::time::Duration,
    ) -> Result<ExitStatus, String> {
        let mut p = self.proc.take().expect("running");
        let r = p.signal_and_wait(sig, within);
        if r.is_err() {
            p.kill9();
        }
        r
    }

    /// Waits (at most [`WAIT`]) for the process to exit by itself (e.g. after a failpoint).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut p = self.proc.take().expect("running");
        p.wait_exit(WAIT)
            .unwrap_or_else(|e| panic!("waiting for onboardd to exit: {e}"))
    }

    /// [`signal_and_wait`](Self::signal_and_wait) without blocking the async runtime.
    pub async fn signal_and_wait_async(&mut self, sig: i32) -> ExitStatus {
        let mut p = self.proc.take().expect("running");
        tokio::task::spawn_blocking(move || p.signal_and_wait(sig, WAIT))
            .await
            .expect("the waiting thread does not panic")
            .unwrap_or_else(|e| panic!("onboardd after signal {sig}: {e}"))
    }

    /// [`wait_exit`](Self::wait_exit) without blocking the async runtime.
    pub async fn wait_exit_async(&mut self) -> ExitStatus {
        let mut p = self.proc.take().expect("running");
        tokio::task::spawn_blocking(move || p.wait_exit(WAIT))
            .await
            .expect("the waiting thread does not panic")
            .unwrap_or_else(|e| panic!("waiting for onboardd to exit: {e}"))
    }

    /// Whether the process runs: false once it was stopped, killed, or exited by itself
    /// (a fatal error; its log says why).
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::alive)
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
