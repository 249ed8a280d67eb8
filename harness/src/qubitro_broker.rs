//! A stand-in for Qubitro's MQTT broker, for the telemetry bridge's tests: a second
//! mosquitto on which every device the fake cloud creates gets its own login, as on
//! Qubitro (user = client id = device id, password = device token), and may write
//! only the topic equal to its id (`pattern write %u` with `use_username_as_clientid`,
//! so `%u` is the authenticated device and the client id cannot differ from it). An
//! `observer` login may read everything: the tests' subscriber ([`Observer`]).
//!
//! The fake tells us of each new device through `FakeQubitro::on_device_created`;
//! its login is added to the broker's password file with `mosquitto_passwd -b` and
//! the broker is sent SIGHUP, which makes it read the file again. The reload takes
//! a moment: [`QubitroBroker::wait_for_login`] waits until the login works.
//!
//! The broker is persistent, so the observer's session and subscription, and the
//! messages queued for it, survive [`QubitroBroker::stop`] and
//! [`QubitroBroker::start_again`] (an uplink outage).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_qubitro::{FakeDevice, FakeQubitro};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

use crate::mosquitto::Mosquitto;
use crate::WAIT;

/// The login that may read every topic.
pub const OBSERVER: &str = "observer";
pub const OBSERVER_PASSWORD: &str = "observer-password";

const ACL: &str = "user observer\ntopic read #\n\n# Each device writes only the topic equal to its id.\npattern write %u\n";

/// mosquitto acting as Qubitro's broker, with the fake cloud's devices as logins.
pub struct QubitroBroker {
    pub broker: Mosquitto,
    /// The broker's pid for the hook's SIGHUP (0 while stopped).
    pid: Arc<AtomicU32>,
}

impl QubitroBroker {
    /// Starts the broker and makes every device `fake` creates from now on a login.
    pub fn start(fake: &FakeQubitro) -> QubitroBroker {
        let src = tempfile::tempdir().expect("tempdir");
        let passwd = src.path().join("passwd");
        let acl = src.path().join("acl");
        std::fs::write(&acl, ACL).expect("write the ACL");
        let status = Command::new("mosquitto_passwd")
            .arg("-c")
            .arg("-b")
            .arg(&passwd)
            .arg(OBSERVER)
            .arg(OBSERVER_PASSWORD)
            .status()
            .expect("run mosquitto_passwd (package mosquitto)");
        assert!(status.success(), "mosquitto_passwd -c failed");
        let broker = Mosquitto::builder()
            .file(&passwd, "passwd")
            .file(&acl, "acl")
            .conf(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous false\n\
                 password_file {dir}/passwd\n\
                 acl_file {dir}/acl\n\
                 use_username_as_clientid true\n",
            )
            .persistent()
            .start();
        let pid = Arc::new(AtomicU32::new(broker.pid()));
        let live = broker.dir().join("passwd");
        let hook_pid = pid.clone();
        // One mosquitto_passwd at a time: concurrent creates would race on the file.
        let writing = Arc::new(Mutex::new(()));
        fake.on_device_created(Arc::new(move |d: &FakeDevice| {
            let _one = writing.lock().unwrap_or_else(|e| e.into_inner());
            add_login(&live, &d.id, &d.token);
            let pid = hook_pid.load(Ordering::SeqCst);
            if pid != 0 {
                // SAFETY: kill(2) with a pid we started and a valid signal.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
            }
        }));
        QubitroBroker { broker, pid }
    }

    pub fn port(&self) -> u16 {
        self.broker.port
    }

    /// The daemon's config lines that point its bridge at this broker (plain MQTT
    /// is accepted for a loopback host only), with quick reconnects and no practical
    /// per-sensor rate limit (tests publish readings in bursts no sensor would; the
    /// limit's own tests set it).
    pub fn daemon_toml(&self) -> String {
        self.daemon_toml_via(self.port())
    }

    /// [`daemon_toml`](Self::daemon_toml) with the bridge pointed at `port` instead: a
    /// proxy in front of this broker.
    pub fn daemon_toml_via(&self, port: u16) -> String {
        format!(
            "[qubitro]\nbroker_host = \"127.0.0.1\"\nbroker_port = {}\nbroker_tls = false\n\
             [bridge]\nreconnect_max_ms = 500\nmax_readings_per_s = 100000\n",
            port
        )
    }

    /// Stops the broker cleanly (an uplink outage); its state is saved.
    pub fn stop(&mut self) {
        self.pid.store(0, Ordering::SeqCst);
        self.broker.stop();
    }

    /// Starts it again on the same port with what it saved (and every login added
    /// meanwhile).
    pub fn start_again(&mut self) {
        self.broker.restart_clean();
        self.pid.store(self.broker.pid(), Ordering::SeqCst);
    }

    /// Adds a login `user` that may write `topic` (a filter: `onboard/data/#`), as
    /// no Qubitro device could: for the benchmark's plain mosquitto bridge, which
    /// forwards under one login and the local topic names. Returns once it works.
    pub async fn add_writer(&self, user: &str, password: &str, topic: &str) {
        let dir = self.broker.dir();
        add_login(&dir.join("passwd"), user, password);
        let acl = dir.join("acl");
        let mut text = std::fs::read_to_string(&acl).expect("read the ACL");
        text.push_str(&format!("\nuser {user}\ntopic write {topic}\n"));
        std::fs::write(&acl, text).expect("write the ACL");
        let pid = self.pid.load(Ordering::SeqCst);
        if pid != 0 {
            // SAFETY: kill(2) with a pid we started and a valid signal.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while !probe_login(self.port(), user, password).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "login {user} not accepted by the stand-in broker within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `device` can log in. Call it before the bridge connects as the
    /// device: the probe uses the device's client id and would take its session over.
    pub async fn wait_for_login(&self, device: &FakeDevice) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if probe_login(self.port(), &device.id, &device.token).await {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "device {} could not log in to the stand-in broker within {WAIT:?}; log:\n{}",
                    device.id,
                    self.broker.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A subscriber on every topic, logged in as [`OBSERVER`] with a persistent
    /// session; resolves once subscribed.
    pub async fn observer(&self) -> Observer {
        let mut opts = MqttOptions::new(OBSERVER, "127.0.0.1", self.port());
        opts.set_credentials(OBSERVER, OBSERVER_PASSWORD);
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let sub = client.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe("#", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        if tx.send((topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // The broker is away (an outage under test): try again shortly.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, ready.recv())
            .await
            .expect("the observer subscribed in time");
        Observer {
            _client: client,
            rx,
        }
    }
}

impl Drop for QubitroBroker {
    fn drop(&mut self) {
        self.pid.store(0, Ordering::SeqCst);
    }
}

fn add_login(passwd: &PathBuf, user: &str, password: &str) {
    // No shell: tokens contain `$`.
    let out = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(passwd)
        .arg(user)
        .arg(password)
        .output()
        .expect("run mosquitto_passwd");
    assert!(
        out.status.success(),
        "mosquitto_passwd -b failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True when the broker accepts this login.
async fn probe_login(port: u16, user: &str, password: &str) -> bool {
    let mut opts = MqttOptions::new(user, "127.0.0.1", port);
    opts.set_credentials(user, password);
    opts.set_clean_start(true);
    let (client, mut el) = AsyncClient::new(opts, 4);
    let ok = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    if ok {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(ev) = el.poll().await {
                if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = ev {
                    return;
                }
            }
        })
        .await;
    }
    ok
}

/// What the observer received, in arrival order: (topic, payload).
pub struct Observer {
    _client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl Observer {
    /// The next message, waiting at most [`WAIT`].
    pub async fn next(&mut self) -> (String, Vec<u8>) {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no message reached the observer within {WAIT:?}"))
            .expect("the observer task ended")
    }

    /// The next `n` messages on `topic` (others are skipped), as JSON.
    pub async fn on_topic(&mut self, topic: &str, n: usize) -> Vec<serde_json::Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let (t, payload) = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{} of {n} messages on {topic} reached the observer within {WAIT:?}",
                        out.len()
                    )
                })
                .expect("the observer task ended");
            if t == topic {
                out.push(serde_json::from_slice(&payload).unwrap_or_else(|e| {
                    panic!(
                        "not JSON on {topic}: {e}: {:?}",
                        String::from_utf8_lossy(&payload)
                    )
                }));
            }
        }
        out
    }

    /// Whatever arrives within `d` (for "nothing more came" checks).
    pub async fn drain_for(&mut self, d: Duration) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.push(m);
        }
        out
    }
}
