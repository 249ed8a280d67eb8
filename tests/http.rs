//! The HTTP listener through the real daemon, a real mosquitto and the fake Qubitro:
//! /healthz follows the broker session, /metrics is Prometheus text whose counters
//! move with an onboarding, and beyond loopback every request needs the password.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use fake_qubitro::FakeQubitro;

/// One HTTP/1.1 request over a fresh connection: (status, body).
fn get(port: u16, path: &str, headers: &str) -> (u16, String) {
    try_get(port, path, headers).expect("an answer from the http listener")
}

/// As [`get`], None when the listener closed the connection unanswered.
fn try_get(port: u16, path: &str, headers: &str) -> Option<(u16, String)> {
    try_get_at("127.0.0.1", port, path, headers)
}

/// As [`try_get`], to the listener at `host`.
fn try_get_at(host: &str, port: u16, path: &str, headers: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect((host, port)).expect("connect to the http listener");
    s.set_read_timeout(Some(WAIT)).unwrap();
    // The listener may close a connection past its limit before reading it.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n{headers}\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    Some((status, body.to_string()))
}

/// Asks until `path` answers `status` (the daemon sees the broker change on its own time).
fn until_status(port: u16, path: &str, status: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = try_get(port, path, "");
        if let Some((got, body)) = &answer {
            if *got == status {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} answered {answer:?}, wanted {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon on `broker` with its listener on a loopback port: (port, daemon, its cloud).
async fn daemon_listening(broker: &Mosquitto) -> (u16, Daemon, FakeQubitro) {
    let cloud = fake_cloud().await;
    let d = Daemon::start(broker, &cloud, "[http]\nlisten = \"127.0.0.1:0\"\n");
    (d.http_port(), d, cloud)
}

/// /metrics as Prometheus reads it, parsed by the `prometheus-parse` crate.
struct Metrics(Vec<prometheus_parse::Sample>);

/// Parses `text`, and fails on any sample line the parser skipped (it ignores what it
/// cannot read) or any series given twice.
fn parse_prometheus(text: &str) -> Metrics {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let sample_lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .count();
    let parsed: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(
        parsed, sample_lines,
        "lines the parser could not read in:\n{text}"
    );
    let mut seen = HashSet::new();
    for s in &scrape.samples {
        let mut labels: Vec<_> = s.labels.iter().collect();
        labels.sort();
        assert!(
            seen.insert(format!("{}{labels:?}", s.metric)),
            "{} twice",
            s.metric
        );
    }
    Metrics(scrape.samples)
}

impl Metrics {
    /// The value of the counter or gauge `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.0.iter().find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        });
        match found.map(|s| &s.value) {
            Some(prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v)) => *v,
            // A histogram's _sum and _count.
            Some(prometheus_parse::Value::Untyped(v)) if name.ends_with("_count") => *v,
            other => panic!("no counter or gauge {name}{labels:?} in /metrics: {other:?}"),
        }
    }

    /// The histogram `name`: its buckets' counts (cumulative, +Inf last) and its count.
    fn histogram(&self, name: &str) -> (Vec<f64>, f64) {
        let buckets = self
            .0
            .iter()
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(b) if s.metric == name => Some(b),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name} in /metrics"));
        let counts = buckets.iter().map(|b| b.count).collect();
        (counts, self.value(&format!("{name}_count"), &[]))
    }

    fn announces(&self, result: &str) -> f64 {
        self.value("onboardd_announces_total", &[("result", result)])
    }

    fn sensors(&self, state: &str) -> f64 {
        self.value("onboardd_sensors", &[("state", state)])
    }
}

/// Scrapes until `done` holds for /metrics (the daemon counts some events, such as a
/// PUBACK, after the sensor has its reply), and returns that scrape.
async fn metrics_until(port: u16, what: &'static str, done: fn(&Metrics) -> bool) -> Metrics {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = parse_prometheus(&get(port, "/metrics", "").1);
            if done(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "/metrics never showed {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_200_while_the_broker_is_up_and_503_with_the_reason_while_it_is_down() {
    common::bin();
    let mut broker = Mosquitto::start();
    let (port, d, _cloud) = daemon_listening(&broker).await;
    let body = until_status(port, "/healthz", 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "ok", "{body}");
    assert_eq!(json["store"], "writable", "{body}");

    broker.kill();
    let body = tokio::task::spawn_blocking(move || until_status(port, "/healthz", 503))
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["reason"], "broker session down", "{body}");

    broker.spawn_on_the_same_port();
    tokio::task::spawn_blocking(move || until_status(port, "/healthz", 200))
        .await
        .unwrap();
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_as_announces_are_served() {
    common::bin();
    let broker = Mosquitto::start();
    let (port, d, cloud) = daemon_listening(&broker).await;
    let (status, before) = get(port, "/metrics", "");
    assert_eq!(status, 200);
    let before = parse_prometheus(&before);
    for result in ["ok", "pending", "onboarding", "refused", "dropped"] {
        assert_eq!(before.announces(result), 0.0, "{result}");
    }
    for state in ["pending", "creating", "created", "delivered"] {
        assert_eq!(before.sensors(state), 0.0, "{state}");
    }
    assert_eq!(before.histogram("onboardd_announce_reply_seconds").1, 0.0);
    let created = [("origin", "created")];
    assert_eq!(
        before.value("onboardd_devices_created_total", &created),
        0.0
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        before.value("onboardd_build_info", &[("version", version)]),
        1.0
    );
    assert!(before.value("onboardd_store_size_bytes", &[]) > 0.0);
    before.value("onboardd_storage_written_bytes_total", &[]);

    // A new sensor: its onboarding task answers, and the broker's PUBACK of that
    // reply makes it delivered.
    let mut s = d.sensor(broker.port, "metered-1").await;
    s.announce("{}").await;
    let reply = s.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &reply);
    // The PUBACK is counted, then the record moves to delivered; the reply is timed
    // once handed to the MQTT client: each may trail the sensor's reading of it.
    let after = metrics_until(port, "the reply delivered and timed", |m| {
        m.value("onboardd_replies_delivered_total", &[]) >= 1.0
            && m.sensors("delivered") >= 1.0
            && m.histogram("onboardd_announce_reply_seconds").1 >= 1.0
    })
    .await;
    assert_eq!(after.value("onboardd_replies_delivered_total", &[]), 1.0);
    assert_eq!(after.announces("onboarding"), 1.0);
    assert_eq!(after.sensors("delivered"), 1.0);
    assert_eq!(after.sensors("pending") + after.sensors("created"), 0.0);
    assert_eq!(after.value("onboardd_devices_created_total", &created), 1.0);
    assert_eq!(after.value("onboardd_mqtt_connected", &[]), 1.0);
    let (buckets, count) = after.histogram("onboardd_announce_reply_seconds");
    assert_eq!(count, 1.0, "the new sensor's reply was timed");
    assert_eq!(buckets.last(), Some(&1.0), "+Inf holds every observation");
    let ok = after.value("onboardd_cloud_requests_total", &[("outcome", "ok")]);
    assert!(ok >= 1.0, "the create was answered: {ok}");
    let all: f64 = ["ok", "client_error", "server_error", "transport_error"]
        .iter()
        .map(|o| after.value("onboardd_cloud_requests_total", &[("outcome", o)]))
        .sum();
    let (_, cloud_count) = after.histogram("onboardd_cloud_request_duration_seconds");
    assert_eq!(cloud_count, all);

    // Known now: answered from the store; then an announce without a proof, refused.
    s.announce("{}").await;
    assert_eq!(s.reply().await["status"], "ok");
    s.announce_raw("{}").await;
    assert_eq!(s.unauthenticated_reply().await["code"], "unauthorized");
    let last = metrics_until(port, "the refusal", |m| m.announces("refused") >= 1.0).await;
    assert_eq!(last.announces("ok"), 1.0);
    assert_eq!(last.announces("refused"), 1.0);
    let unauthorized = [("code", "unauthorized")];
    assert_eq!(
        last.value("onboardd_announces_refused_total", &unauthorized),
        1.0
    );
    let (_, count) = last.histogram("onboardd_announce_reply_seconds");
    assert!(count >= 2.0, "the known sensor's reply was timed: {count}");
    assert_eq!(last.sensors("delivered"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_address_beyond_loopback_without_a_password_refuses_to_start_with_exit_78() {
    common::bin();
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let extra = format!("[http]\nlisten = \"0.0.0.0:{}\"\n", free_port());
    let mut d = Daemon::spawn_new(broker.port, &cloud, &extra, vec![]);
    let status = d.wait_exit_async().await;
    assert_eq!(status.code(), Some(78), "{}", d.log.text());
    assert!(d.log.text().contains("http.listen"), "{}", d.log.text());
}

/// A daemon whose listener on `ip` needs the password "correct horse": (port, what to keep).
async fn daemon_with_password(
    ip: &str,
) -> (u16, Daemon, (Mosquitto, FakeQubitro, tempfile::TempDir)) {
    common::bin();
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("http-password");
    std::fs::write(&pw, "correct horse\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let extra = format!(
        "[http]\nlisten = \"{ip}:0\"\npassword_file = \"{}\"\n",
        pw.display()
    );
    let d = Daemon::start(&broker, &cloud, &extra);
    (d.http_port(), d, (broker, cloud, dir))
}

/// This machine's address on its default route (no packet is sent: a UDP socket
/// only picks its source address on connect). The test needs one; a machine without
/// any network interface but loopback cannot play a LAN client.
fn non_loopback_ip() -> String {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    socket.connect("192.0.2.1:9").expect(
        "a route beyond loopback: this test needs a non-loopback IPv4 address on this machine",
    );
    let ip = socket.local_addr().expect("its address").ip();
    assert!(
        !ip.is_loopback() && !ip.is_unspecified(),
        "no address beyond loopback: {ip}"
    );
    ip.to_string()
}

fn basic(password: &str) -> String {
    use base64::Engine as _;
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("prometheus:{password}"));
    format!("Authorization: Basic {encoded}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_password_file_a_request_without_the_right_password_gets_401() {
    let (port, d, _keep) = daemon_with_password("0.0.0.0").await;
    // A client beyond loopback, as on a LAN: this machine's own outward address.
    let lan = non_loopback_ip();
    let (status, _) =
        try_get_at(&lan, port, "/healthz", "").unwrap_or_else(|| panic!("no answer on {lan}"));
    assert_eq!(status, 401, "from {lan}");
    let (status, _) =
        try_get_at(&lan, port, "/", "").unwrap_or_else(|| panic!("no answer on {lan}"));
    assert_eq!(status, 401, "the gateway page from {lan}");
    let (status, _) = get(port, "/healthz", "");
    assert_eq!(status, 401);
    let (status, _) = get(port, "/metrics", &basic("wrong guess"));
    assert_eq!(status, 401);
    let (status, body) = get(port, "/metrics", &basic("correct horse"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("onboardd_build_info"), "{body}");
    d.log.wait_for("without the right password");
    assert!(
        !d.log.text().contains("wrong guess"),
        "a refused password is never logged"
    );
    assert!(!d.log.text().contains("correct horse"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_failed_too_often_is_refused_even_with_the_right_password() {
    let (port, _d, _keep) = daemon_with_password("127.0.0.1").await;
    for _ in 0..5 {
        assert_eq!(get(port, "/metrics", &basic("wrong guess")).0, 401);
    }
    assert_eq!(get(port, "/metrics", &basic("correct horse")).0, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_request_idle_connections_and_a_slow_client_leave_announces_served_and_healthz_back()
{
    common::bin();
    raise_fd_limit(IDLE as u64 + 512);
    let broker = Mosquitto::start();
    let (port, d, cloud) = daemon_listening(&broker).await;

    // A 1 MiB body is refused unread; 1 MiB of headers too.
    let (status, _) = get(port, "/metrics", "Content-Length: 1048576\r\n");
    assert_eq!(status, 413);
    let mut big = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let header = format!(
        "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    // The daemon may close before reading it all: a refused write is its answer too.
    let _ = big.write_all(header.as_bytes());
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    // 1 000 idle connections, far past the limit, and a client that sends its
    // headers a byte at a time.
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // 20 s of headers that never end, unless the daemon drops it first.
        for b in b"GET /metrics HTTP/1.1\r\nX-Slow: "
            .iter()
            .cycle()
            .take(400)
        {
            if s.write_all(&[*b]).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });

    let mut s = d.sensor(broker.port, "busy-http-1").await;
    s.announce("{}").await;
    let reply = s.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &reply);

    // Still holding every idle connection: the daemon drops them itself, those past
    // the limit at once and the others at the end of their time.
    tokio::task::spawn_blocking(move || until_status(port, "/healthz", 200))
        .await
        .unwrap();
    assert!(slow.join().unwrap(), "the slow client was never dropped");
    let closed = tokio::task::spawn_blocking(move || {
        idle.into_iter()
            .filter_map(|mut c| {
                c.set_read_timeout(Some(WAIT)).unwrap();
                let mut byte = [0u8; 1];
                // End of stream, or reset: closed by the daemon, unanswered.
                matches!(c.read(&mut byte), Ok(0) | Err(_)).then_some(())
            })
            .count()
    })
    .await
    .unwrap();
    assert_eq!(closed, IDLE, "idle connections the daemon let go of");
    drop(d);
}

/// Idle connections the daemon must survive.
const IDLE: usize = 1000;

/// Lets this process (and the daemon it starts, which inherits the limit) hold the
/// idle connections of a test: the usual soft limit, 1024, leaves too few to spare.
fn raise_fd_limit(to: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < to {
            lim.rlim_cur = to.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= to,
        "RLIMIT_NOFILE's hard limit {} is below {to}",
        lim.rlim_max
    );
}

/// One HTTPS request to the listener, trusting only the CA in `ca`: (status, body), or
/// None when no answer came.
fn https_get(port: u16, path: &str, ca: &std::path::Path) -> Option<(u16, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).ok()?;
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    tls.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_and_key_the_listener_speaks_https_and_refuses_plain_http() {
    common::bin();
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let pki = harness::pki::Pki::standard();
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.path("server.crt").display(),
        pki.path("server.key").display()
    );
    let d = Daemon::start(&broker, &cloud, &extra);
    d.log.wait_for("(HTTPS only)");
    let port = d.http_port();
    let ca = pki.path("ca.crt");
    let body = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            let answer = https_get(port, "/healthz", &ca);
            if let Some((200, body)) = answer {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/healthz over HTTPS answered {answer:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "ok", "{body}");
    assert_eq!(
        try_get(port, "/healthz", ""),
        None,
        "plain HTTP got an HTTP answer"
    );
    let key = std::fs::read_to_string(pki.path("server.key")).unwrap();
    let secret = key.lines().nth(1).unwrap();
    assert!(
        !d.log.text().contains(secret),
        "the key's PEM is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_its_key_refuses_to_start_with_exit_78_naming_the_key() {
    common::bin();
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:{}\"\ncert_file = \"/etc/onboardd/http.crt\"\n",
        free_port()
    );
    let mut d = Daemon::spawn_new(broker.port, &cloud, &extra, vec![]);
    let status = d.wait_exit_async().await;
    assert_eq!(status.code(), Some(78), "{}", d.log.text());
    assert!(d.log.text().contains("http.key_file"), "{}", d.log.text());
}

fn oldest_buffered_age(m: &Metrics) -> f64 {
    m.value("onboardd_bridge_oldest_buffered_age_seconds", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_buffered_readings_age_grows_through_an_uplink_outage_and_is_0_once_forwarded() {
    let mut rig = bridged()
        .extra("[http]\nlisten = \"127.0.0.1:0\"\n")
        .start()
        .await;
    let port = rig.d.http_port();
    let s = {
        let mut s = rig.sensor("aged-1").await;
        onboard_bridged(&mut s).await;
        s
    };
    let device = cloud_devices_of(&rig.cloud, "aged-1").remove(0);
    s.publish("onboard/data/aged-1", br#"{"n":0}"#, false).await;
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0]["n"], 0);
    let m = metrics_until(port, "nothing buffered", |m| {
        m.value("onboardd_bridge_readings_buffered", &[]) == 0.0
    })
    .await;
    assert_eq!(oldest_buffered_age(&m), 0.0);

    // Qubitro's broker goes away: the next reading is spilled after spill_after_ms
    // and its age grows while it waits.
    rig.qubitro.stop();
    let published = Instant::now();
    s.publish("onboard/data/aged-1", br#"{"n":1}"#, false).await;
    let m = metrics_until(port, "a reading buffered for over a second", |m| {
        m.value("onboardd_bridge_readings_buffered", &[]) == 1.0 && oldest_buffered_age(m) >= 1.0
    })
    .await;
    let age = oldest_buffered_age(&m);
    assert!(
        age <= published.elapsed().as_secs_f64(),
        "an age of {age} s is older than the reading"
    );

    rig.qubitro.start_again();
    assert_eq!(rig.obs.on_topic(&device.id, 1).await[0]["n"], 1);
    let m = metrics_until(port, "the buffer drained", |m| {
        m.value("onboardd_bridge_readings_buffered", &[]) == 0.0
    })
    .await;
    assert_eq!(oldest_buffered_age(&m), 0.0);
}
