//! A real mosquitto on a free loopback port, in a directory of its own.
//!
//! mosquitto started as root drops to the `mosquitto` user before it reads `acl_file`,
//! `password_file`, certificates and its persistence directory. A checkout under a
//! root-only directory (root's home is 0700 on Debian) would make every such file
//! unreadable to it, so every file a test hands the broker is copied into the broker's own
//! directory ([`MosquittoBuilder::file`]), which that user can read; its persistence
//! directory belongs to it.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use crate::process::{die_with_parent, LogLines, Proc};
use crate::{free_port, WAIT};

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

/// The uid and gid mosquitto drops to when started as root; None when we are not root (it
/// then runs as us) or the user does not exist (it then keeps running as root).
fn mosquitto_user() -> Option<(libc::uid_t, libc::gid_t)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = CString::new("mosquitto").expect("no NUL in a literal");
    // SAFETY: getpwnam gets a valid C string; the result is read at once, before any other
    // call could reuse its static buffer (tests do not call getpw* elsewhere).
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// Makes `path` the broker user's (when there is one) with `mode`.
fn hand_over(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    if let Some((uid, gid)) = mosquitto_user() {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
        // SAFETY: chown(2) on a valid C string path.
        let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
        assert_eq!(
            rc,
            0,
            "chown {} to the mosquitto user: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// How to start a [`Mosquitto`].
#[derive(Default)]
pub struct MosquittoBuilder {
    conf: String,
    files: Vec<(PathBuf, String)>,
    persistent: bool,
    die_with_parent: bool,
}

impl MosquittoBuilder {
    /// More mosquitto.conf lines. `{port}` is the harness port; `{dir}` the broker's own
    /// directory, where [`file`](Self::file) puts its copies. Without a `listener` line the
    /// harness adds `listener {port} 127.0.0.1` and `allow_anonymous true`.
    pub fn conf(mut self, lines: &str) -> Self {
        self.conf.push_str(lines);
        if !self.conf.ends_with('\n') {
            self.conf.push('\n');
        }
        self
    }

    /// Copies `src` into the broker's directory as `name`, readable by the broker's user;
    /// refer to it as `{dir}/name` in [`conf`](Self::conf). For ACL and password files,
    /// certificates and keys.
    pub fn file(mut self, src: impl AsRef<Path>, name: &str) -> Self {
        assert!(
            !name.contains('/') && name != "db" && name != "mosquitto.conf",
            "file name {name:?} must be a plain name other than db and mosquitto.conf"
        );
        self.files
            .push((src.as_ref().to_path_buf(), name.to_owned()));
        self
    }

    /// Persistence on, in `{dir}/db/` (saved every second and on a clean stop): sessions,
    /// subscriptions and queued messages survive [`Mosquitto::restart_clean`], and what was
    /// saved survives [`Mosquitto::restart`].
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// The broker gets SIGKILL when the thread that started it exits (see
    /// [`crate::process::die_with_parent`]): for the benchmark, not for tests.
    pub fn die_with_parent(mut self) -> Self {
        self.die_with_parent = true;
        self
    }

    pub fn start(self) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("harness-mosquitto.")
            .tempdir()
            .expect("tempdir");
        // The broker's user must reach its files; the directory holds nothing secret.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the broker dir");
        for (src, name) in &self.files {
            let to = dir.path().join(name);
            std::fs::copy(src, &to).unwrap_or_else(|e| {
                panic!("copy {} for mosquitto: {e}", src.display());
            });
            hand_over(&to, 0o600);
        }
        let db = dir.path().join("db");
        std::fs::create_dir(&db).expect("create the persistence dir");
        hand_over(&db, 0o700);
        let dir_str = dir.path().display().to_string();
        let mut m = Mosquitto {
            port: free_port(),
            proc: None,
            extra: self.conf.replace("{dir}", &dir_str),
            persistent: self.persistent,
            die_with_parent: self.die_with_parent,
            dir,
        };
        m.spawn_on_a_free_port();
        m
    }
}

/// A mosquitto process on 127.0.0.1:port, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    extra: String,
    persistent: bool,
    die_with_parent: bool,
}

impl Mosquitto {
    pub fn builder() -> MosquittoBuilder {
        MosquittoBuilder::default()
    }

    pub fn start() -> Mosquitto {
        Self::builder().start()
    }

    /// With persistence on: see [`MosquittoBuilder::persistent`].
    pub fn start_persistent() -> Mosquitto {
        Self::builder().persistent().start()
    }

    /// `extra`: more mosquitto.conf lines (see [`MosquittoBuilder::conf`]). Files the broker
    /// must read go through [`MosquittoBuilder::file`] instead of their own paths.
    pub fn start_with(extra: &str) -> Mosquitto {
        Self::builder().conf(extra).start()
    }

    /// The broker's own directory (`{dir}` in its conf).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// 0 while it is not running.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    fn spawn_on_a_free_port(&mut self) {
        // Another test may grab the same free port between our probe and mosquitto's
        // bind: then our mosquitto exits, and we try another port.
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn_once() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            self.port = free_port();
        }
        panic!("mosquitto did not start: {last}");
    }

    fn spawn_once(&mut self) -> Result<(), String> {
        let conf = self.dir.path().join("mosquitto.conf");
        let has_listener = self.extra.lines().any(|l| l.starts_with("listener "));
        let mut text = String::new();
        if has_listener {
            text.push_str(&self.extra.replace("{port}", &self.port.to_string()));
        } else {
            text.push_str(&format!(
                "listener {} 127.0.0.1\nallow_anonymous true\n",
                self.port
            ));
        }
        text.push_str("set_tcp_nodelay true\nmax_queued_messages 100000\n");
        if self.persistent {
            text.push_str(&format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                self.dir.path().join("db").display()
            ));
        } else {
            text.push_str("persistence false\n");
        }
        text.push_str("log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n");
        if !has_listener {
            text.push_str(&self.extra);
        }
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let mut cmd = Command::new(find_mosquitto());
        cmd.arg("-c").arg(&conf);
        if self.die_with_parent {
            die_with_parent(&mut cmd);
        }
        let proc =
            Proc::spawn("mosquitto", &mut cmd, LogLines::default()).expect("start mosquitto");
        let listening = format!("listen socket on port {}", self.port);
        // "Opening … listen socket on port N" is logged before bind(2), also when the bind
        // then fails because another process took the port since our probe; only
        // "mosquitto version … running", after every listener is open, says the port is
        // ours. (Waiting for the first line alone once let a test's daemon talk to
        // another test's HTTP listener on that port.) A failed bind exits at once, and
        // the caller tries another port.
        let waited = proc
            .log
            .try_wait_for_n(&listening, 1, WAIT)
            .and_then(|_| proc.log.try_wait_for_n(" running", 1, WAIT));
        self.proc = Some(proc);
        waited?;
        // "running" comes just before the event loop; make sure connections are accepted.
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "mosquitto logged {listening:?} but refused connections for {WAIT:?}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Starts it again on the same port (a test's clients and daemon know that one),
    /// after [`Mosquitto::kill`] or [`Mosquitto::stop`].
    pub fn spawn_on_the_same_port(&mut self) {
        if let Err(e) = self.spawn_once() {
            panic!("mosquitto did not start again on port {}: {e}", self.port);
        }
    }

    /// Kills the broker (SIGKILL: no clean shutdown, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Stops the broker cleanly (SIGTERM; a persistent one saves its database), waiting at
    /// most [`WAIT`].
    pub fn stop(&mut self) -> ExitStatus {
        let mut p = self.proc.take().expect("mosquitto is running");
        let deadline = std::time::Instant::now() + WAIT;
        // mosquitto 2.0 sets its run flag after installing its SIGTERM handler, so a SIGTERM
        // right after start-up can be lost: repeat it until it exits.
        while std::time::Instant::now() < deadline {
            p.signal(libc::SIGTERM);
            match p.exited_within(std::time::Duration::from_millis(500)) {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                Err(e) => panic!("stopping mosquitto: {e}"),
            }
        }
        panic!(
            "mosquitto did not stop within {WAIT:?} of SIGTERM; log:\n{}",
            p.log.text()
        );
    }

    /// SIGKILL, then the same broker on the same port and directory. Without persistence
    /// every session is gone; with it, what was saved (every second) comes back.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_on_the_same_port();
    }

    /// A clean stop (the database saved), then the same broker on the same port: with
    /// persistence, sessions and queued messages survive.
    pub fn restart_clean(&mut self) {
        if self.proc.is_some() {
            self.stop();
        }
        self.spawn_on_the_same_port();
    }

    /// What the broker logged since it last started.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log.text()).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Between the free-port probe and mosquitto's bind, another process can take the
    /// port: mosquitto then still logs "Opening … listen socket on port N", and a
    /// connect to N succeeds (to the other process). Neither may pass for our broker.
    #[test]
    fn a_port_another_process_listens_on_is_not_taken_for_the_brokers() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken = squatter.local_addr().expect("addr").port();
        let mut broker = Mosquitto::start();
        broker.kill();
        broker.port = taken;
        let err = broker
            .spawn_once()
            .expect_err("the port is another process's");
        assert!(err.contains("exited first"), "{err}");
        // As at start: another port, and a broker of our own on it.
        broker.spawn_on_a_free_port();
        assert_ne!(broker.port, taken);
        assert!(broker.log().contains(" running"), "{}", broker.log());
    }

    #[test]
    fn files_handed_over_are_copied_into_the_broker_dir_and_found_through_dir() {
        let src = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(src.path(), "topic readwrite #\n").expect("write the ACL");
        let broker = Mosquitto::builder()
            .file(src.path(), "test.acl")
            .conf("acl_file {dir}/test.acl")
            .start();
        let copy = broker.dir().join("test.acl");
        assert_eq!(
            std::fs::read_to_string(&copy).expect("copied"),
            "topic readwrite #\n"
        );
        assert!(std::net::TcpStream::connect(("127.0.0.1", broker.port)).is_ok());
    }

    /// A client with a persistent session (v3.1.1, clean session off) subscribed to `t`;
    /// returns the messages it receives.
    async fn persistent_subscriber(
        port: u16,
    ) -> (
        rumqttc::AsyncClient,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        use rumqttc::{Event, Packet, QoS};
        let mut opts = rumqttc::MqttOptions::new("harness-persistent-sub", "127.0.0.1", port);
        opts.set_clean_session(false);
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 16);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, mut ready) = tokio::sync::mpsc::unbounded_channel();
        let sub = client.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe("t", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p.payload.to_vec());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        tokio::time::timeout(WAIT, ready.recv())
            .await
            .expect("subscribed in time");
        (client, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_persistent_broker_keeps_sessions_and_queued_messages_across_a_restart() {
        let mut broker = Mosquitto::start_persistent();
        let port = broker.port;
        let (sub, _) = persistent_subscriber(port).await;
        sub.disconnect().await.expect("disconnect");
        // Offline now: the broker queues this for the session.
        let mut opts = rumqttc::MqttOptions::new("harness-publisher", "127.0.0.1", port);
        opts.set_clean_session(true);
        let (publisher, mut el) = rumqttc::AsyncClient::new(opts, 16);
        publisher
            .publish("t", rumqttc::QoS::AtLeastOnce, false, b"queued".to_vec())
            .await
            .expect("queue the publish");
        tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = el.poll().await {
                    return;
                }
            }
        })
        .await
        .expect("the broker acknowledged the publish");
        drop(el);

        // Blocks this worker for the restart; nothing else of the test runs meanwhile.
        broker.restart_clean();
        assert_eq!(broker.port, port, "same port after a restart");
        let (_, mut got) = persistent_subscriber(port).await;
        let msg = tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("the queued message arrives in time");
        assert_eq!(msg.as_deref(), Some(&b"queued"[..]));
    }

    #[test]
    fn a_persistent_broker_restarts_on_the_same_port_and_saves_its_database() {
        let mut broker = Mosquitto::start_persistent();
        let port = broker.port;
        broker.restart_clean();
        assert_eq!(broker.port, port);
        assert!(
            broker.dir().join("db/mosquitto.db").exists(),
            "a clean stop writes the database; log:\n{}",
            broker.log()
        );
        broker.restart();
        assert_eq!(broker.port, port);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }
}
