//! TLS client configuration for both ends onboardd talks to, the HTTP listener's
//! server configuration ([`server_config`]), and the reading of TLS failures.
//!
//! One builder ([`client_config`]) makes the rustls `ClientConfig` for the broker
//! ([`mqtt_tls`]: only the CA of `mqtt.ca_file`, optionally a client certificate) and
//! for the Qubitro API ([`api_tls`]: the webpki roots compiled in, plus the CAs of
//! `qubitro.ca_file`). Always rustls with the ring provider (it builds for armv7,
//! aws-lc-rs does not: rustls#2725); no OpenSSL and no system store loader, which can
//! panic on an odd certificate (rumqtt#992).
//!
//! [`cert_problem`] recognises a refused server certificate from the error a client
//! library returns, by walking its source chain to the `rustls::Error`: reqwest and
//! rumqttc both hand it back wrapped in `std::io::Error`s.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CertificateError, RootCertStore};

use crate::config::MqttConfig;

/// Why a TLS client configuration could not be built. Every variant names the
/// config key and the file; none carries the bytes of a private key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file cannot be opened or read.
    #[error("{key}: cannot read {}", path.display())]
    CaFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    /// A PEM section of a certificate file does not parse.
    #[error("{key}: bad PEM in {}", path.display())]
    BadPem {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    /// A CA certificate parses as PEM but rustls cannot use it as a trust anchor.
    #[error("{key}: unusable certificate in {}", path.display())]
    BadCaCert {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The client certificate file cannot be read or holds no certificate.
    #[error("{key}: cannot read a certificate from {}", path.display())]
    ClientCert {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    /// The key file cannot be read or holds no private key. No source: a PEM error
    /// can quote a line of the file, and this file is a secret.
    #[error("{key}: no readable private key in {}", path.display())]
    ClientKey { key: &'static str, path: PathBuf },
    /// The listener's certificate file cannot be read or holds no certificate.
    #[error("{key}: cannot read a certificate from {}", path.display())]
    ServerCert { key: &'static str, path: PathBuf },
    /// The listener's key file holds no private key (its bytes are never quoted).
    #[error("{key}: no readable private key in {}", path.display())]
    ServerKey { key: &'static str, path: PathBuf },
    /// rustls refuses the certificate and key together.
    #[error("{cert_key}/{key_key}: certificate and key do not match")]
    KeyMismatch {
        cert_key: &'static str,
        key_key: &'static str,
        #[source]
        source: rustls::Error,
    },
}

/// Extra CA certificates to trust, and the config key that named them (for errors).
#[derive(Debug, Clone, Copy)]
pub struct CaFile<'a> {
    pub key: &'static str,
    pub path: &'a Path,
}

/// A client certificate and its private key, each with the config key naming it.
#[derive(Debug, Clone, Copy)]
pub struct ClientAuth<'a> {
    pub cert_key: &'static str,
    pub cert: &'a Path,
    pub key_key: &'static str,
    pub key: &'a Path,
}

/// What a TLS client trusts and what it presents.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientTls<'a> {
    /// Trust the public web roots compiled in (webpki-roots): public servers such as
    /// the Qubitro API, without a system CA store.
    pub webpki_roots: bool,
    /// Trust the CAs in this PEM file as well (a broker's own CA, a TLS proxy).
    pub ca_file: Option<CaFile<'a>>,
    /// Present this certificate (brokers that authenticate clients by certificate).
    pub client_auth: Option<ClientAuth<'a>>,
}

/// The one rustls client-config builder: ring provider, TLS 1.2 and 1.3, the roots
/// and client certificate `tls` asks for.
pub fn client_config(tls: &ClientTls<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = if tls.webpki_roots {
        RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }
    } else {
        RootCertStore::empty()
    };
    if let Some(ca) = tls.ca_file {
        add_ca_file(&mut roots, ca)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports TLS 1.2 and 1.3")
    .with_root_certificates(roots);
    let Some(auth) = tls.client_auth else {
        return Ok(builder.with_no_client_auth());
    };
    let certs = CertificateDer::pem_file_iter(auth.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ClientCert {
            key: auth.cert_key,
            path: auth.cert.to_path_buf(),
            source,
        })?;
    // The path only: the key's bytes never reach an error message.
    let key = PrivateKeyDer::from_pem_file(auth.key).map_err(|_| TlsError::ClientKey {
        key: auth.key_key,
        path: auth.key.to_path_buf(),
    })?;
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|source| TlsError::KeyMismatch {
            cert_key: auth.cert_key,
            key_key: auth.key_key,
            source,
        })
}

fn add_ca_file(roots: &mut RootCertStore, ca: CaFile<'_>) -> Result<(), TlsError> {
    let certs = CertificateDer::pem_file_iter(ca.path).map_err(|source| TlsError::CaFile {
        key: ca.key,
        path: ca.path.to_path_buf(),
        source,
    })?;
    for cert in certs {
        let cert = cert.map_err(|source| TlsError::BadPem {
            key: ca.key,
            path: ca.path.to_path_buf(),
            source,
        })?;
        roots.add(cert).map_err(|source| TlsError::BadCaCert {
            key: ca.key,
            path: ca.path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// The broker connection: only the CA of `mqtt.ca_file` (a broker on the LAN has
/// its own CA, not a public one), and the client certificate when one is set.
pub fn mqtt_tls(m: &MqttConfig) -> Result<rumqttc::TlsConfiguration, TlsError> {
    let client_auth = (!m.cert_file.is_empty()).then(|| ClientAuth {
        cert_key: "mqtt.cert_file",
        cert: Path::new(&m.cert_file),
        key_key: "mqtt.key_file",
        key: Path::new(&m.key_file),
    });
    let config = client_config(&ClientTls {
        webpki_roots: false,
        ca_file: Some(CaFile {
            key: "mqtt.ca_file",
            path: Path::new(&m.ca_file),
        }),
        client_auth,
    })?;
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

/// The Qubitro API: the webpki root set compiled in, so no system store is needed,
/// plus the CAs of `qubitro.ca_file` (`extra_ca_file`) when it is set.
pub fn api_tls(extra_ca_file: &str) -> Result<rustls::ClientConfig, TlsError> {
    client_config(&ClientTls {
        webpki_roots: true,
        ca_file: (!extra_ca_file.is_empty()).then(|| CaFile {
            key: "qubitro.ca_file",
            path: Path::new(extra_ca_file),
        }),
        client_auth: None,
    })
}

/// The HTTP listener's HTTPS (`http.cert_file` and the PEM text of `http.key_file`,
/// read as a secret): ring, TLS 1.2 and 1.3, no client certificates (requests
/// authenticate with the password).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    key_pem: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let no_cert = || TlsError::ServerCert {
        key: "http.cert_file",
        path: cert_file.to_path_buf(),
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|_| no_cert())?;
    if certs.is_empty() {
        return Err(no_cert());
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TlsError::ServerKey {
            key: "http.key_file",
            path: key_file.to_path_buf(),
        })?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::KeyMismatch {
            cert_key: "http.cert_file",
            key_key: "http.key_file",
            source,
        })
}

/// Installs ring as the process-wide rustls provider. reqwest and rumqttc are built
/// without a default provider; installing it once at start, before any client,
/// covers any path that does not get one of our configs. A second call is a no-op.
pub fn install_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How the server's certificate was refused, as far as it decides what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProblem {
    /// Not valid *yet*: on a Pi with no real-time clock that means NTP has not synced,
    /// so retrying is right and the operator should look at the clock.
    NotValidYet,
    /// Not issued by a CA we trust, or not for this host: a TLS-inspecting proxy, a
    /// wrong `ca_file`, a wrong host name.
    Untrusted,
    /// Any other certificate refusal: expired, revoked, badly encoded…
    Other,
}

/// The certificate problem somewhere in `err`'s source chain, if any.
///
/// Walks `source()` and, because `io::Error::source()` skips the error it wraps,
/// also looks inside every `std::io::Error` (`get_ref()`): reqwest (hyper-util's
/// connect error → io::Error → rustls::Error) and rumqttc (`ConnectionError::Tls`
/// → `TlsError::Io`/`TlsError::TLS`) both deliver the rustls error that way.
/// `None` when no `rustls::Error::InvalidCertificate` is found.
pub fn cert_problem(err: &(dyn StdError + 'static)) -> Option<CertProblem> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(rustls::Error::InvalidCertificate(c)) = e.downcast_ref::<rustls::Error>() {
            return Some(classify(c));
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            let inner: &(dyn StdError + 'static) = inner;
            if let Some(p) = cert_problem(inner) {
                return Some(p);
            }
        }
        next = e.source();
    }
    None
}

fn classify(c: &CertificateError) -> CertProblem {
    use CertificateError as C;
    match c {
        C::NotValidYet | C::NotValidYetContext { .. } => CertProblem::NotValidYet,
        C::UnknownIssuer
        | C::BadSignature
        | C::NotValidForName
        | C::NotValidForNameContext { .. }
        | C::InvalidPurpose
        | C::InvalidPurposeContext { .. }
        | C::ApplicationVerificationFailure => CertProblem::Untrusted,
        _ => CertProblem::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn rustls_cert(e: CertificateError) -> rustls::Error {
        rustls::Error::InvalidCertificate(e)
    }

    /// An error with a source, as hyper-util's and reqwest's wrappers are.
    #[derive(Debug, thiserror::Error)]
    #[error("{what}")]
    struct Wrapper {
        what: &'static str,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    }

    fn wrap(what: &'static str, e: impl StdError + Send + Sync + 'static) -> Wrapper {
        Wrapper {
            what,
            source: Box::new(e),
        }
    }

    #[test]
    fn a_not_yet_valid_certificate_is_recognised_as_an_unsynced_clock() {
        let e = rustls_cert(CertificateError::NotValidYet);
        assert_eq!(cert_problem(&e), Some(CertProblem::NotValidYet));
        let expired = rustls_cert(CertificateError::Expired);
        assert_eq!(cert_problem(&expired), Some(CertProblem::Other));
    }

    #[test]
    fn the_rustls_error_is_found_inside_io_errors_as_reqwest_delivers_it() {
        // reqwest::Error → hyper_util connect error → io::Error(custom: rustls::Error)
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls_cert(CertificateError::NotValidYet),
        );
        let chain = wrap("error sending request", wrap("client error (Connect)", io));
        assert_eq!(cert_problem(&chain), Some(CertProblem::NotValidYet));

        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls_cert(CertificateError::UnknownIssuer),
        );
        let chain = wrap("error sending request", io);
        assert_eq!(cert_problem(&chain), Some(CertProblem::Untrusted));
    }

    #[test]
    fn rumqttc_tls_errors_are_read_both_ways_it_wraps_them() {
        let direct = rumqttc::ConnectionError::Tls(rumqttc::TlsError::TLS(rustls_cert(
            CertificateError::NotValidYet,
        )));
        assert_eq!(cert_problem(&direct), Some(CertProblem::NotValidYet));

        let via_io = rumqttc::ConnectionError::Tls(rumqttc::TlsError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls_cert(CertificateError::BadSignature),
        )));
        assert_eq!(cert_problem(&via_io), Some(CertProblem::Untrusted));

        let plain_io = rumqttc::ConnectionError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls_cert(CertificateError::NotValidForName),
        ));
        assert_eq!(cert_problem(&plain_io), Some(CertProblem::Untrusted));
    }

    #[test]
    fn errors_without_a_certificate_problem_are_none() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(cert_problem(&wrap("connect", refused)), None);
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure);
        let chain = wrap("tls", io::Error::new(io::ErrorKind::InvalidData, alert));
        assert_eq!(cert_problem(&chain), None);
        // Text that merely mentions the words is not a certificate error.
        let text = io::Error::other("NotValidYet");
        assert_eq!(cert_problem(&text), None);
    }

    #[test]
    fn config_errors_name_the_key_and_the_file() {
        let err = api_tls("/nonexistent/ca.pem").unwrap_err();
        assert!(matches!(
            err,
            TlsError::CaFile {
                key: "qubitro.ca_file",
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "qubitro.ca_file: cannot read /nonexistent/ca.pem"
        );

        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        let err = api_tls(bad.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, TlsError::BadPem { .. }), "{err:?}");

        let cfg = crate::config::Config::from_toml(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[mqtt]\nca_file = \"/nonexistent/ca.pem\"",
        )
        .unwrap();
        let err = mqtt_tls(&cfg.mqtt).unwrap_err();
        assert!(err.to_string().starts_with("mqtt.ca_file: "), "{err}");
    }

    #[test]
    fn the_api_config_without_an_extra_ca_builds() {
        api_tls("").unwrap();
    }
}
