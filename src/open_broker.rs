//! Whether the broker lets anyone in: one anonymous connection (connect, disconnect,
//! within a bound) to the configured broker, reported as accepted, refused or unknown.
//!
//! The sensor protocol holds on an open broker, but an open broker still lets anyone
//! take over onboardd's session (the client id is no secret), write any bridged
//! sensor's readings and publish discovery configs. Debian's mosquitto is open by
//! default and the ACL is installed by hand, so the operator must be told, not left
//! to find out.
//!
//! How it is to be wired (by the daemon, not here): run [`probe`] at start and after
//! every reconnect, off the event-loop task; when it returns [`Anonymous::Accepted`],
//! log a warning at every start naming what an open broker still allows (the three
//! points above), add `open broker` to the systemd STATUS line, and publish
//! `"open_broker": true` in the stats JSON (`false` when refused; absent or `null`
//! when unknown, since a probe that could not reach the broker proves nothing).
//!
//! The probe never presents onboardd's login or client certificate (with them it
//! would test onboardd's access, not anyone's) and never uses onboardd's client id (a
//! connection under it would end onboardd's own session).

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use rumqttc::Outgoing;

use crate::config::MqttConfig;

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
