//! Test harness: a real mosquitto on a free port, the onboardd binary as a child
//! process, the fake Qubitro in-process over real HTTP, and MQTT sensors (v5 and
//! v3.1.1) built on rumqttc.
#![allow(dead_code)]

pub mod pki;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fake_qubitro::{FakeOptions, FakeQubitro};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;

/// Long enough for a loaded CI machine; a passing test never waits this long.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn find_mosquitto() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/local/bin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v mosquitto"])
        .output()
    {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !s.is_empty() {
            return PathBuf::from(s);
        }
    }
    panic!(
        "mosquitto is not installed, and these tests need a real broker.\n\
         Install it with:  sudo apt-get install -y mosquitto   (or run scripts/install-deps.sh)"
    );
}

/// A mosquitto process on 127.0.0.1:port, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: String,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// `extra`: more mosquitto.conf lines (ACLs, password file…).
    pub fn start_with(extra: &str) -> Mosquitto {
        let mut m = Mosquitto {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.to_string(),
        };
        m.spawn();
        m
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        // Another test may grab the same free port between our probe and mosquitto's
        // bind: then our mosquitto exits, and we try another port.
        for _ in 0..20 {
            if self.spawn_once() {
                return;
            }
            self.port = free_port();
        }
        panic!("mosquitto did not start; log:\n{}", self.log());
    }

    fn spawn_once(&mut self) -> bool {
        let conf = self.dir.path().join("mosquitto.conf");
        let has_listener = self.extra.contains("listener ");
        let mut text = String::new();
        if !has_listener {
            text.push_str(&format!(
                "listener {} 127.0.0.1\nallow_anonymous true\n",
                self.port
            ));
        } else {
            text.push_str(&self.extra.replace("{port}", &self.port.to_string()));
        }
        text.push_str("set_tcp_nodelay true\npersistence false\nmax_queued_messages 100000\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n");
        if !has_listener {
            text.push_str(&self.extra);
        }
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).expect("log file");
        let child = Command::new(find_mosquitto())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let c = self.child.as_mut().expect("just spawned");
            if c.try_wait().expect("try_wait").is_some() {
                self.child = None;
                return false;
            }
            if self
                .log()
                .contains(&format!("listen socket on port {}", self.port))
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return true;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto never listened; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the broker (SIGKILL: no clean shutdown, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines a child process wrote to stderr, with a way to wait for one.
#[derive(Clone, Default)]
pub struct LogLines {
    inner: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl LogLines {
    fn push(&self, line: String) {
        let (m, c) = &*self.inner;
        m.lock().unwrap().push(line);
        c.notify_all();
    }

    pub fn all(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    pub fn count(&self, needle: &str) -> usize {
        self.all().iter().filter(|l| l.contains(needle)).count()
    }

    /// Blocks until `n` lines contain `needle` (panics after WAIT with the log).
    pub fn wait_for_n(&self, needle: &str, n: usize) {
        let (m, c) = &*self.inner;
        let deadline = std::time::Instant::now() + WAIT;
        let mut lines = m.lock().unwrap();
        loop {
            if lines.iter().filter(|l| l.contains(needle)).count() >= n {
                return;
            }
            let now = std::time::Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {n} log lines with {needle:?}; log:\n{}",
                lines.join("\n")
            );
            lines = c.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn wait_for(&self, needle: &str) {
        self.wait_for_n(needle, 1)
    }

    pub async fn wait_for_async(&self, needle: &str) {
        let me = self.clone();
        let needle = needle.to_string();
        tokio::task::spawn_blocking(move || me.wait_for(&needle))
            .await
            .unwrap();
    }

    pub async fn wait_for_n_async(&self, needle: &str, n: usize) {
        let me = self.clone();
        let needle = needle.to_string();
        tokio::task::spawn_blocking(move || me.wait_for_n(&needle, n))
            .await
            .unwrap();
    }
}

/// The onboardd binary under test.
pub struct Daemon {
    child: Option<Child>,
    pub log: LogLines,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_onboardd")
}

/// A config for one test: the broker and fake cloud given, fast retries.
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
"#,
        base = cloud.base_url(),
        project = cloud.project_id(),
        key = cloud.api_key(),
        state = state_dir.join("db").display(),
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

impl Daemon {
    /// Starts onboardd with a fresh state dir and waits until it has subscribed.
    pub fn start(broker: &Mosquitto, cloud: &FakeQubitro, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().to_path_buf();
        let mut d = Daemon::with_state(broker.port, cloud, &state, extra, vec![]);
        d._dir = Some(dir);
        d.wait_subscribed();
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
        std::fs::write(&config_path, toml).unwrap();
        // Owner-only, as the README says: otherwise onboardd warns about the secret.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut d = Daemon {
            child: None,
            log: LogLines::default(),
            config_path,
            state_dir: state.to_path_buf(),
            _dir: None,
            env,
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        self.log = LogLines::default();
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start onboardd");
        let stderr = child.stderr.take().expect("stderr");
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("ONBOARDD_TEST_ECHO").is_some() {
                    eprintln!("[onboardd] {line}");
                }
                log.push(line);
            }
        });
        self.child = Some(child);
    }

    pub fn set_env(&mut self, k: &str, v: &str) {
        self.env.retain(|(a, _)| a != k);
        self.env.push((k.into(), v.into()));
    }

    pub fn clear_env(&mut self) {
        self.env.clear();
    }

    pub fn wait_subscribed(&self) {
        self.log.wait_for("subscribed to announces");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal and waits for the exit status.
    pub fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, sig);
        }
        c.wait().expect("wait")
    }

    /// Waits for the process to exit by itself (e.g. after a failpoint).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        c.wait().expect("wait")
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn fake_cloud() -> FakeQubitro {
    FakeQubitro::start(FakeOptions::default())
        .await
        .expect("start the fake Qubitro")
}

/// A simulated sensor: an MQTT 5 client subscribed to its reply topic.
pub struct Sensor {
    pub id: String,
    pub client: AsyncClient,
    replies: mpsc::UnboundedReceiver<(String, Vec<u8>, Option<Vec<u8>>)>,
}

impl Sensor {
    pub async fn connect(port: u16, id: &str) -> Sensor {
        Self::connect_as(port, id, &format!("onboard/reply/{id}/#"), None).await
    }

    /// Connects (optionally with username/password) and subscribes to `filter`.
    pub async fn connect_as(
        port: u16,
        id: &str,
        filter: &str,
        login: Option<(&str, &str)>,
    ) -> Sensor {
        let mut opts = MqttOptions::new(
            format!("sensor-{id}-{}", fastrand::u32(..)),
            "127.0.0.1",
            port,
        );
        opts.set_keep_alive(Duration::from_secs(10));
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
            opts.set_client_id(u.to_string());
        }
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let c2 = client.clone();
        let f = filter.to_string();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.try_subscribe(f.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let _ = sub_tx.send(a);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).to_string();
                        let v = p.payload.to_vec();
                        let corr = p
                            .properties
                            .as_ref()
                            .and_then(|pp| pp.correlation_data.as_ref())
                            .map(|c| c.to_vec());
                        if tx.send((topic, v, corr)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, sub_rx.recv())
            .await
            .expect("sensor subscribed in time");
        Sensor {
            id: id.to_string(),
            client,
            replies: rx,
        }
    }

    pub async fn announce(&self, payload: &str) {
        self.announce_on(&format!("onboard/announce/{}", self.id), payload)
            .await;
    }

    pub async fn announce_on(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .expect("publish announce");
    }

    pub async fn announce_with_props(&self, payload: &str, props: PublishProperties) {
        self.client
            .publish_with_properties(
                format!("onboard/announce/{}", self.id),
                QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
                props,
            )
            .await
            .expect("publish announce");
    }

    /// The next message (topic, payload bytes, correlation data).
    pub async fn next_raw(&mut self) -> (String, Vec<u8>, Option<Vec<u8>>) {
        tokio::time::timeout(WAIT, self.replies.recv())
            .await
            .unwrap_or_else(|_| panic!("no reply for sensor {} within {WAIT:?}", self.id))
            .expect("reply channel open")
    }

    /// The next reply (topic, JSON, correlation data).
    pub async fn next(&mut self) -> (String, Value, Option<Vec<u8>>) {
        let (t, p, c) = self.next_raw().await;
        let v = serde_json::from_slice(&p).unwrap_or_else(|_| {
            panic!("reply on {t} is not JSON: {}", String::from_utf8_lossy(&p))
        });
        (t, v, c)
    }

    pub async fn reply(&mut self) -> Value {
        self.next().await.1
    }

    /// The next reply whose status is `status`, skipping others (e.g. pending).
    pub async fn reply_with_status(&mut self, status: &str) -> Value {
        loop {
            let v = self.reply().await;
            if v["status"] == status {
                return v;
            }
        }
    }

    /// True when no reply arrives within `d` (for "must not answer" checks).
    pub async fn silent_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.replies.recv()).await.is_err()
    }
}

/// An MQTT 3.1.1 sensor (rumqttc's v4 client): announces and reads its reply.
pub struct SensorV3 {
    pub id: String,
    client: rumqttc::AsyncClient,
    replies: mpsc::UnboundedReceiver<Value>,
}

impl SensorV3 {
    pub async fn connect(port: u16, id: &str) -> SensorV3 {
        let mut opts = rumqttc::MqttOptions::new(format!("v3-{id}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let c2 = client.clone();
        let topic = format!("onboard/reply/{id}");
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = c2.try_subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, sub_rx.recv())
            .await
            .expect("v3 sensor subscribed");
        SensorV3 {
            id: id.to_string(),
            client,
            replies: rx,
        }
    }

    pub async fn announce(&self, payload: &str) {
        self.client
            .publish(
                format!("onboard/announce/{}", self.id),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .expect("publish");
    }

    pub async fn reply(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.replies.recv())
            .await
            .expect("v3 reply in time")
            .expect("open")
    }
}
