//! TLS to the broker: a CA, server and client certificates made with the openssl CLI,
//! mosquitto with a TLS listener (onboardd) and a plain loopback listener (the sensors).

mod common;

use std::path::Path;

use common::pki::Pki;
use common::*;
use fake_qubitro::FakeQubitro;

fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// mosquitto with a plain loopback listener on `plain` (sensors) and a TLS listener on
/// the harness port (onboardd). The plain one comes first so it is open once the
/// harness sees the TLS one listening.
fn tls_broker(pki: &Pki, plain: u16, tls_extra: &str, global: &str) -> Mosquitto {
    tls_broker_with(
        Mosquitto::builder(),
        pki,
        "server",
        plain,
        tls_extra,
        global,
    )
}

fn tls_broker_with_cert(
    pki: &Pki,
    server: &str,
    plain: u16,
    tls_extra: &str,
    global: &str,
) -> Mosquitto {
    tls_broker_with(Mosquitto::builder(), pki, server, plain, tls_extra, global)
}

/// `broker` may carry more files (`{dir}/name` in `global`).
fn tls_broker_with(
    broker: MosquittoBuilder,
    pki: &Pki,
    server: &str,
    plain: u16,
    tls_extra: &str,
    global: &str,
) -> Mosquitto {
    // mosquitto started as root reads certificates after dropping to its own user: the
    // harness copies them where that user can read them (`{dir}` in the conf).
    broker
        .file(pki.path("ca.crt"), "ca.crt")
        .file(pki.path(&format!("{server}.crt")), "server.crt")
        .file(pki.path(&format!("{server}.key")), "server.key")
        .conf(&format!(
            "per_listener_settings false\n\
             {global}\n\
             listener {plain} 127.0.0.1\n\
             listener {{port}} 127.0.0.1\n\
             cafile {{dir}}/ca.crt\n\
             certfile {{dir}}/server.crt\n\
             keyfile {{dir}}/server.key\n\
             {tls_extra}\n",
        ))
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_onboards_a_sensor_over_tls_after_verifying_the_broker_certificate() {
    let pki = Pki::standard();
    let plain = free_port();
    let broker = tls_broker(&pki, plain, "", "allow_anonymous true");
    let cloud = fake_cloud().await;
    // host 127.0.0.1 (the harness default): checked against the IP subjectAltName.
    let d = Daemon::start(
        &broker,
        &cloud,
        &format!("[mqtt]\nca_file = {}", toml_path(&pki.path("ca.crt"))),
    );
    let mut s = d.sensor(plain, "tls-s1").await;
    s.announce(r#"{"request_id":"t1"}"#).await;
    let r = s.reply().await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["request_id"], "t1");
    assert_eq!(r.token(), cloud.devices()[0].token.as_str());
    assert_eq!(d.log.count("TLS"), 0, "{}", d.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_the_client_certificate_cn_is_the_acl_user_of_the_daemon() {
    let pki = Pki::standard();
    let plain = free_port();
    // The shipped ACL: only user `onboardd` may read announces and write replies.
    // No password file: on the plain listener a sensor's username is taken as given.
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto/onboardd.acl");
    let broker = tls_broker_with(
        Mosquitto::builder().file(acl, "onboardd.acl"),
        &pki,
        "server",
        plain,
        "require_certificate true\nuse_identity_as_username true",
        "allow_anonymous true\nacl_file {dir}/onboardd.acl",
    );
    let cloud = fake_cloud().await;
    // host localhost: checked against the DNS subjectAltName. No MQTT username: the
    // broker takes "onboardd" from the certificate's CN, and only that user may read
    // announces (mosquitto 2.0 grants the SUBACK to anyone but delivers nothing the
    // ACL forbids), so the onboarding below proves the identity reached the ACL.
    let d = Daemon::start(
        &broker,
        &cloud,
        &format!(
            "[mqtt]\nhost = \"localhost\"\nca_file = {}\ncert_file = {}\nkey_file = {}",
            toml_path(&pki.path("ca.crt")),
            toml_path(&pki.path("client.crt")),
            toml_path(&pki.path("client.key")),
        ),
    );
    let mut s = Sensor::connect_as(
        plain,
        "mtls-s1",
        "onboard/reply/mtls-s1/#",
        Some(("mtls-s1", "unused")),
        Some(&d.flashed()),
    )
    .await;
    s.announce("{}").await;
    let r = s.reply().await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(cloud.devices().len(), 1);
    assert!(
        broker.log().contains("u'onboardd'"),
        "the broker saw the daemon as user onboardd:\n{}",
        broker.log()
    );
    drop(d);
}

/// onboardd trusting only `ca` for the broker, not waited for (it must never get
/// through); returned with the log line of its first failed connection.
async fn daemon_refused(broker: &Mosquitto, cloud: &FakeQubitro, ca: &Path) -> (Daemon, String) {
    let d = Daemon::spawn_new(
        broker.port,
        cloud,
        &format!("[mqtt]\nca_file = {}", toml_path(ca)),
        vec![],
    );
    d.log.wait_for_async("cannot connect to the broker").await;
    let first = d
        .log
        .all()
        .into_iter()
        .find(|l| l.contains("cannot connect to the broker"))
        .expect("the line just awaited");
    (d, first)
}

/// The daemon keeps retrying (`attempts` more attempts, each failing for `why`), never
/// gets a session, and is still running: SIGTERM exits 0 (a process that had exited on
/// its own would report its own status instead).
async fn assert_keeps_retrying_then_stops_cleanly(mut d: Daemon, attempts: usize, why: &str) {
    // reconnect_max_ms is 500 ms in tests: several attempts, each failing the same way.
    d.log
        .wait_for_n_async("broker still unreachable", attempts)
        .await;
    assert!(
        d.log
            .all()
            .iter()
            .filter(|l| l.contains("broker still unreachable"))
            .all(|l| l.contains(why)),
        "every attempt fails for {why:?}:\n{}",
        d.log.text()
    );
    assert_eq!(
        d.log.count("connected to the broker"),
        0,
        "{}",
        d.log.text()
    );
    assert_eq!(
        d.log.count("subscribed to announces"),
        0,
        "{}",
        d.log.text()
    );
    assert_eq!(d.signal_and_wait_async(libc::SIGTERM).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_is_a_logged_tls_error_and_the_daemon_keeps_retrying()
{
    let pki = Pki::standard();
    let other_ca = pki.ca("other-ca");
    let broker = tls_broker(&pki, free_port(), "", "allow_anonymous true");
    let cloud = fake_cloud().await;
    let (d, first) = daemon_refused(&broker, &cloud, &other_ca).await;
    assert!(
        first.contains("TLS") && first.contains("UnknownIssuer"),
        "the first failure names the TLS problem: {first}"
    );
    assert_keeps_retrying_then_stops_cleanly(d, 3, "UnknownIssuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_for_another_name_is_refused() {
    let pki = Pki::standard();
    pki.leaf(
        "ca",
        "elsewhere",
        "broker.elsewhere.example",
        "subjectAltName=DNS:broker.elsewhere.example\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    );
    let broker = tls_broker_with_cert(&pki, "elsewhere", free_port(), "", "allow_anonymous true");
    let cloud = fake_cloud().await;
    let (d, first) = daemon_refused(&broker, &cloud, &pki.path("ca.crt")).await;
    assert!(
        first.contains("TLS") && first.contains("not valid for name"),
        "a trusted certificate for another name is refused: {first}"
    );
    assert_keeps_retrying_then_stops_cleanly(d, 2, "not valid for name").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_listener_refuses_the_daemon_without_a_client_certificate() {
    let pki = Pki::standard();
    let broker = tls_broker(
        &pki,
        free_port(),
        "require_certificate true\nuse_identity_as_username true",
        "allow_anonymous true",
    );
    let cloud = fake_cloud().await;
    let (d, first) = daemon_refused(&broker, &cloud, &pki.path("ca.crt")).await;
    // TLS 1.3: the client finishes its side of the handshake, then the broker's
    // alert arrives with the first read (the CONNACK).
    assert!(
        first.contains("CertificateRequired"),
        "the broker demands a client certificate: {first}"
    );
    assert_keeps_retrying_then_stops_cleanly(d, 2, "CertificateRequired").await;
}
