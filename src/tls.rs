//! TLS for the broker connection: rustls with the ring provider (it builds for
//! armv7, aws-lc-rs does not), the CA given in `mqtt.ca_file`, and an optional
//! client certificate. No OpenSSL and no system store loader (rumqtt#992).

use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::MqttConfig;

pub fn mqtt_tls(m: &MqttConfig) -> anyhow::Result<rumqttc::TlsConfiguration> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&m.ca_file)
        .with_context(|| format!("mqtt.ca_file: cannot read {}", m.ca_file))?
    {
        let cert = cert.with_context(|| format!("mqtt.ca_file: bad PEM in {}", m.ca_file))?;
        roots
            .add(cert)
            .with_context(|| format!("mqtt.ca_file: unusable certificate in {}", m.ca_file))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports TLS 1.2 and 1.3")
    .with_root_certificates(roots);
    let config = if m.cert_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let certs = CertificateDer::pem_file_iter(&m.cert_file)
            .with_context(|| format!("mqtt.cert_file: cannot read {}", m.cert_file))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("mqtt.cert_file: bad PEM in {}", m.cert_file))?;
        // The path only: the key's bytes never reach an error message.
        let key = PrivateKeyDer::from_pem_file(&m.key_file).map_err(|_| {
            anyhow::anyhow!("mqtt.key_file: no readable private key in {}", m.key_file)
        })?;
        builder
            .with_client_auth_cert(certs, key)
            .context("mqtt.cert_file/mqtt.key_file: certificate and key do not match")?
    };
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

/// True when a TLS failure is a certificate that is not valid *yet*: on a Pi with no
/// real-time clock that means NTP has not synced, so it is worth retrying.
pub fn is_clock_not_synced(err: &str) -> bool {
    let s = err;
    s.contains("NotValidYet") || s.contains("not valid yet") || s.contains("not yet valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_not_yet_valid_certificate_is_recognised_as_an_unsynced_clock() {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet);
        assert!(is_clock_not_synced(&format!("{e:?}")));
        let other = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert!(!is_clock_not_synced(&format!("{other:?}")));
    }
}
