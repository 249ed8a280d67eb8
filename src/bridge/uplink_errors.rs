//! How an uplink session ended, read from what rumqttc and the broker said: a
//! refusal that pauses the device, a takeover, or a loss to reconnect after; and the
//! waits as the log lines say them.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode};
use rumqttc::v5::{ConnectionError, StateError};

/// A connection the broker closes without a word this soon after accepting the
/// login counts as a takeover too: mosquitto 2.0 closes a taken-over connection
/// without the DISCONNECT 0x8E it queues for it (seen with 2.0.11), and other
/// brokers may do the same.
pub(super) const TAKEOVER_SUSPECT: Duration = Duration::from_secs(10);

/// How one connection (one rumqttc event loop) ended.
pub(super) enum SessionEnd {
    Idle,
    Closed,
    /// Qubitro refused the login or the topic: pause the device.
    Refused(String),
    /// Qubitro answered reading `id` with a non-success PUBACK: reconnect after a
    /// growing backoff; the reading is dropped after [`READING_REFUSALS_MAX`].
    ///
    /// [`READING_REFUSALS_MAX`]: super::uplink::READING_REFUSALS_MAX
    ReadingRefused {
        id: u64,
        reason: String,
    },
    /// Anything else: reconnect after a backoff.
    Lost {
        error: String,
        /// The broker had accepted the login (reset the backoff).
        connected: bool,
        takeover: bool,
    },
}

/// A wait as the log lines say it: "750 ms", "4 s", "2 min".
pub(super) fn humantime(d: Duration) -> String {
    match d.as_secs() {
        0 => format!("{} ms", d.as_millis()),
        s @ 1..=119 => format!("{s} s"),
        s => format!("{} min", s / 60),
    }
}

/// `soon`: the broker accepted the login less than [`TAKEOVER_SUSPECT`] ago.
pub(super) fn classify(e: ConnectionError, connected: bool, soon: bool) -> SessionEnd {
    let closed_without_a_word = match &e {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(StateError::Io(io)) | ConnectionError::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
        ),
        _ => false,
    };
    if soon && closed_without_a_word {
        return SessionEnd::Lost {
            error: format!("the broker closed the connection right after accepting the login ({e}): probably a session takeover"),
            connected: true,
            takeover: true,
        };
    }
    match &e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::Banned
            | ConnectReturnCode::BadAuthenticationMethod
            | ConnectReturnCode::ClientIdentifierNotValid
            | ConnectReturnCode::BadClientId => {
                SessionEnd::Refused(format!("login refused: {code:?}"))
            }
            _ => SessionEnd::Lost {
                error: e.to_string(),
                connected,
                takeover: false,
            },
        },
        ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
            SessionEnd::Lost {
                error: format!("disconnected by the broker: {reason_code:?}"),
                connected: true,
                takeover: *reason_code == DisconnectReasonCode::SessionTakenOver,
            }
        }
        _ => SessionEnd::Lost {
            error: match crate::tls::cert_problem(&e) {
                Some(crate::tls::CertProblem::NotValidYet) => format!(
                    "{e}: the broker's certificate is not valid yet; the clock is probably not synced (a Pi has no RTC until NTP runs)"
                ),
                Some(crate::tls::CertProblem::Untrusted) => format!(
                    "{e}: the broker's certificate is not trusted (a TLS-inspecting proxy needs qubitro.ca_file)"
                ),
                _ => e.to_string(),
            },
            connected,
            takeover: false,
        },
    }
}
