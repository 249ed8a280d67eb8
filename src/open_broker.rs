//! Whether the broker lets anyone in: one anonymous connection (connect, disconnect,
//! within a bound) to the configured broker, reported as accepted, refused or unknown.
//!
//! The sensor protocol holds on an open broker, but an open broker still lets anyone
//! take over onboardd's session (the client id is no secret), write any bridged
//! sensor's readings and publish discovery configs. Debian's mosquitto is open by
//! default and the ACL is installed by hand, so the operator must be told, not left
//! to find out.
//!
//! [`watch`] runs [`probe`] at start and after every reconnect, in a task of its own
//! (never on the event loop's): when the broker lets the probe in, a warning names
//! what an open broker still allows (the three points above) once per start, and
//! again if it opens after having refused; the [`Verdict`] it keeps puts `open broker`
//! on the systemd STATUS line and `"open_broker": true` in the stats JSON (`false`
//! when refused; `null` when unknown, since a probe that could not reach the broker
//! proves nothing).
//!
//! The probe never presents onboardd's login or client certificate (with them it
//! would test onboardd's access, not anyone's) and never uses onboardd's client id (a
//! connection under it would end onboardd's own session).

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use rumqttc::Outgoing;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;

/// The bound of one probe: long enough for a TLS handshake on a Pi, short enough
/// that a broker that swallows the connection is reported unknown soon.
pub const PROBE_WITHIN: Duration = Duration::from_secs(5);

/// What one anonymous connection attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anonymous {
    /// The broker accepted a client with no login and no certificate.
    Accepted,
    /// The broker answered with a CONNACK refusing it: `reason` is its reason code.
    Refused { reason: String },
    /// No CONNACK within the bound: the broker is down or unreachable, or the TLS
    /// handshake failed (our CA does not match, or the broker demands a client
    /// certificate; rustls does not tell those apart reliably). Proves nothing either
    /// way, so it must never be reported as open.
    Unknown { why: String },
}

/// The client id of a probe: onboardd's own plus a random suffix, so it never
/// collides with (and so never ends) onboardd's session.
pub fn probe_client_id(daemon_client_id: &str) -> String {
    format!("{daemon_client_id}-anon-probe-{:08x}", fastrand::u32(..))
}

/// One anonymous connection to `m.host:m.port` (TLS with `m.ca_file` when set, without
/// the client certificate), then a clean disconnect; at most `within` in all.
pub async fn probe(m: &MqttConfig, within: Duration) -> Anonymous {
    let mut opts = MqttOptions::new(probe_client_id(&m.client_id), m.host.clone(), m.port);
    opts.set_clean_start(true);
    opts.set_keep_alive(Duration::from_secs(5));
    let secs = within.as_secs().max(1);
    opts.set_connection_timeout(secs);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(secs);
    opts.set_network_options(net);
    if !m.ca_file.is_empty() {
        let mut anonymous = m.clone();
        anonymous.cert_file.clear();
        anonymous.key_file.clear();
        match crate::tls::mqtt_tls(&anonymous) {
            Ok(tls) => {
                opts.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            Err(e) => {
                return Anonymous::Unknown {
                    why: format!("TLS setup: {e}"),
                };
            }
        }
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    let attempt = async {
        let outcome = loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break Anonymous::Accepted,
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Anonymous::Refused {
                        reason: refusal(code),
                    }
                }
                Err(e) => return Anonymous::Unknown { why: e.to_string() },
            }
        };
        // Leave politely so the broker logs a disconnect, not a dropped client; the
        // answer is already known, so a failure here changes nothing.
        if client.try_disconnect().is_ok() {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        outcome
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Anonymous::Unknown {
            why: format!("no answer within {within:?}"),
        },
    }
}

fn refusal(code: ConnectReturnCode) -> String {
    format!("CONNACK {code:?}")
}

/// What the latest probe found, read by the STATUS line and the stats JSON.
#[derive(Debug, Default)]
pub struct Verdict(AtomicU8);

const UNKNOWN: u8 = 0;
const OPEN: u8 = 1;
const CLOSED: u8 = 2;

impl Verdict {
    /// `Some(true)`: anonymous clients get in; `Some(false)`: refused; `None`: unknown.
    pub fn open(&self) -> Option<bool> {
        match self.0.load(Relaxed) {
            OPEN => Some(true),
            CLOSED => Some(false),
            _ => None,
        }
    }

    fn set(&self, found: &Anonymous) {
        let v = match found {
            Anonymous::Accepted => OPEN,
            Anonymous::Refused { .. } => CLOSED,
            Anonymous::Unknown { .. } => UNKNOWN,
        };
        self.0.store(v, Relaxed);
    }
}

/// Probes the broker at each connection of onboardd's session (`connected` turning
/// true: the start and every reconnect) until `stop`; returns the verdict it keeps.
pub fn watch(
    m: MqttConfig,
    connected: watch::Receiver<bool>,
    stop: CancellationToken,
) -> Arc<Verdict> {
    let verdict = Arc::new(Verdict::default());
    tokio::spawn(run(m, connected, stop, verdict.clone()));
    verdict
}

async fn run(
    m: MqttConfig,
    mut connected: watch::Receiver<bool>,
    stop: CancellationToken,
    verdict: Arc<Verdict>,
) {
    let mut warned = false;
    loop {
        tokio::select! {
            r = connected.wait_for(|c| *c) => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
        let found = tokio::select! {
            found = probe(&m, PROBE_WITHIN) => found,
            _ = stop.cancelled() => return,
        };
        verdict.set(&found);
        match &found {
            Anonymous::Accepted if !warned => {
                warned = true;
                tracing::warn!(
                    broker = %format!("{}:{}", m.host, m.port),
                    open_broker = true,
                    "open broker: {}:{} lets clients in without a login, so anyone who reaches it can take over \
                     onboardd's session (its client id is no secret), write any bridged sensor's readings and publish \
                     discovery configs; give the broker a password file and the shipped ACL (README, Security)",
                    m.host,
                    m.port
                );
            }
            Anonymous::Accepted => {}
            Anonymous::Refused { reason } => {
                warned = false;
                tracing::debug!(%reason, "the broker refuses anonymous clients ({reason})");
            }
            Anonymous::Unknown { why } => {
                tracing::debug!(%why, "whether the broker lets anyone in is unknown: {why}");
            }
        }
        tokio::select! {
            r = connected.wait_for(|c| !*c) => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_never_uses_the_daemons_client_id_and_two_probes_differ() {
        let a = probe_client_id("onboardd-gw");
        assert_ne!(a, "onboardd-gw");
        assert!(a.starts_with("onboardd-gw-anon-probe-"), "{a}");
        assert_ne!(a, probe_client_id("onboardd-gw"));
    }
}
