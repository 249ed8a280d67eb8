//! TLS to the Qubitro API: the daemon's rustls client (ring, webpki roots plus
//! `qubitro.ca_file`) against the fake cloud serving HTTPS with an openssl-made
//! certificate.

mod common;

use std::sync::Arc;

use common::pki::Pki;
use common::*;
use fake_qubitro::{Endpoint, FakeOptions, FakeQubitro};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

async fn https_cloud(pki: &Pki) -> FakeQubitro {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = CertificateDer::pem_file_iter(pki.path("server.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    FakeQubitro::start(FakeOptions {
        tls: Some(Arc::new(cfg)),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_onboards_over_https_when_it_trusts_the_certificate() {
    let pki = Pki::standard();
    let cloud = https_cloud(&pki).await;
    assert!(cloud.base_url().starts_with("https://"));
    let broker = Mosquitto::start();
    let d = Daemon::start(
        &broker,
        &cloud,
        &format!("[qubitro]\nca_file = \"{}\"", pki.path("ca.crt").display()),
    );
    let mut s = d.sensor(broker.port, "tls-1").await;
    s.announce("{}").await;
    let r = s.reply().await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["device_id"], cloud.devices()[0].id.as_str());
    assert_opens_to_the_clouds_token(&cloud, &r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_api_certificate_is_retried_with_a_log_line_that_names_it() {
    let pki = Pki::standard();
    let cloud = https_cloud(&pki).await;
    let broker = Mosquitto::start();
    // No ca_file: only the public web roots, which do not know this CA.
    let d = Daemon::start(&broker, &cloud, "");
    let mut s = d.sensor(broker.port, "tls-2").await;
    s.announce("{}").await;
    assert_eq!(s.reply().await["status"], "pending");
    assert_eq!(
        s.reply().await["status"],
        "pending",
        "retried, still refused"
    );
    d.log.wait_for_async("TLS certificate is not trusted").await;
    assert!(cloud.devices().is_empty());
    assert_eq!(cloud.count(Endpoint::Create), 0);
}
