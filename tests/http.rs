//! The HTTP listener through the real daemon, a real mosquitto and the fake Qubitro:
//! /healthz follows the broker session, /metrics is Prometheus text whose counters
//! move with an onboarding, and beyond loopback every request needs the password.

mod common;

use std::collections::HashMap;
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
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the http listener");
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
    let port = free_port();
    let d = Daemon::start(
        broker,
        &cloud,
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    d.log.wait_for("http listening");
    (port, d, cloud)
}

/// A sample's name and its labels in order, as the text format writes them.
type Series = (String, String);

/// Prometheus' text format, strictly enough to catch a malformed line: every sample
/// belongs to a family declared by `# TYPE`, its value parses as a float.
fn parse_prometheus(text: &str) -> HashMap<Series, f64> {
    let mut types = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unknown type in {line}"
            );
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').expect("label=value");
            assert!(
                k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            assert!(
                v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                "{line}"
            );
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "{line}: no # TYPE for {family}");
        let old = samples.insert((name.to_string(), labels.to_string()), value);
        assert!(old.is_none(), "{line} twice");
    }
    samples
}

fn value(m: &HashMap<Series, f64>, name: &str, labels: &str) -> f64 {
    *m.get(&(name.to_string(), labels.to_string()))
        .unwrap_or_else(|| panic!("no {name}{{{labels}}} in /metrics"))
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
async fn metrics_parse_as_prometheus_text_and_count_an_onboarding() {
    common::bin();
    let broker = Mosquitto::start();
    let (port, d, cloud) = daemon_listening(&broker).await;
    let (status, before) = get(port, "/metrics", "");
    assert_eq!(status, 200);
    let before = parse_prometheus(&before);
    assert_eq!(value(&before, "onboardd_announces_total", ""), 0.0);
    assert_eq!(
        value(
            &before,
            "onboardd_devices_created_total",
            "origin=\"created\""
        ),
        0.0
    );
    assert_eq!(
        value(
            &before,
            "onboardd_build_info",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );

    let mut s = d.sensor(broker.port, "metered-1").await;
    s.announce("{}").await;
    let reply = s.reply().await;
    assert_opens_to_the_clouds_token(&cloud, &reply);

    // The broker's PUBACK for the reply may reach the daemon after the sensor has it.
    let after = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = parse_prometheus(&get(port, "/metrics", "").1);
            if value(&m, "onboardd_replies_delivered_total", "") >= 1.0 || Instant::now() > deadline
            {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert_eq!(value(&after, "onboardd_replies_delivered_total", ""), 1.0);
    assert_eq!(value(&after, "onboardd_announces_total", ""), 1.0);
    assert_eq!(
        value(
            &after,
            "onboardd_devices_created_total",
            "origin=\"created\""
        ),
        1.0
    );
    assert_eq!(value(&after, "onboardd_mqtt_connected", ""), 1.0);
    let ok = value(&after, "onboardd_cloud_requests_total", "outcome=\"ok\"");
    assert!(ok >= 1.0, "the create was answered: {ok}");
    let all: f64 = ["ok", "client_error", "server_error", "transport_error"]
        .iter()
        .map(|o| {
            value(
                &after,
                "onboardd_cloud_requests_total",
                &format!("outcome=\"{o}\""),
            )
        })
        .sum();
    assert_eq!(
        value(&after, "onboardd_cloud_request_duration_seconds_count", ""),
        all
    );
    assert_eq!(
        value(
            &after,
            "onboardd_cloud_request_duration_seconds_bucket",
            "le=\"+Inf\""
        ),
        all
    );
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
    let port = free_port();
    let extra = format!(
        "[http]\nlisten = \"{ip}:{port}\"\npassword_file = \"{}\"\n",
        pw.display()
    );
    let d = Daemon::start(&broker, &cloud, &extra);
    d.log.wait_for("http listening");
    (port, d, (broker, cloud, dir))
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

    // Idle connections past the limit, and a client that sends its headers a byte at a time.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
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

    // Still holding every idle connection: the daemon drops them itself.
    tokio::task::spawn_blocking(move || until_status(port, "/healthz", 200))
        .await
        .unwrap();
    assert!(slow.join().unwrap(), "the slow client was never dropped");
    drop(idle);
}
