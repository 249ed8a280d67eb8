//! sd_notify integration: READY, STATUS and watchdog pings.
//!
//! A thin wrapper over the `sd-notify` crate so that the rest of the daemon says
//! *what* happened (`ready()`, `status("…")`) and never deals with the protocol.
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (a terminal, a test, a
//! container), so callers need no "am I under systemd" checks.
//!
//! When to ping the watchdog is the caller's decision: only while the MQTT event
//! loop and the workers make progress, so that a wedged daemon is killed and
//! restarted by systemd instead of pinging from a timer that outlives the hang.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd that start-up is complete (`Type=notify`): `systemctl start`
/// returns and units ordered after us start only now.
pub fn ready() {
    send(&[NotifyState::Ready], "READY=1");
}

/// One line of human-readable state shown by `systemctl status` (StatusText).
pub fn status(text: &str) {
    let text = one_line(text);
    send(&[NotifyState::Status(&text)], "STATUS=");
}

/// Tells systemd that a clean shutdown has begun, so a slow stop is not mistaken
/// for a hang and `systemctl status` says "deactivating".
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING=1");
}

/// How often to ping: half of `WatchdogSec=` (as sd_watchdog_enabled(3) advises,
/// one late ping must not be fatal), or `None` when no watchdog is configured for
/// this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// Resets the watchdog timer.
pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog], "WATCHDOG=1");
}

/// The notify protocol is newline-separated `KEY=value` assignments in one
/// datagram: a newline inside a status text would end it early and could inject
/// another assignment (`READY=1`, `MAINPID=`). Status texts may carry error
/// messages from the broker or the cloud, so flatten them.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn send(state: &[NotifyState<'_>], what: &str) {
    // An error here means NOTIFY_SOCKET is set but unusable: with Type=notify
    // systemd will time the start out or kill us for a missed watchdog, so say
    // why in the log. It is not fatal by itself; systemd decides.
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, notification = what, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn status_text_cannot_inject_other_assignments() {
        assert_eq!(one_line("broker down\nREADY=1"), "broker down READY=1");
        assert_eq!(one_line("ok"), "ok");
    }

    /// One test owns NOTIFY_SOCKET/WATCHDOG_* for the whole process: these are
    /// process-wide and only this module reads them.
    #[test]
    fn sends_the_protocol_lines_and_halves_the_watchdog_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // SAFETY (edition 2024 marks these unsafe): no other test in this crate
        // reads or writes these variables.
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "30000000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());

        let mut buf = [0u8; 256];
        let mut recv = || {
            let n = socket.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        ready();
        assert_eq!(recv(), "READY=1\n");
        status("connected to broker\nsecond line");
        assert_eq!(recv(), "STATUS=connected to broker second line\n");
        watchdog_ping();
        assert_eq!(recv(), "WATCHDOG=1\n");
        stopping();
        assert_eq!(recv(), "STOPPING=1\n");
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(15)));

        // A watchdog meant for another process (a parent's, inherited) is not ours.
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(watchdog_interval(), None);

        // Outside systemd everything is a silent no-op.
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
        ready();
        watchdog_ping();
        assert_eq!(watchdog_interval(), None);
    }
}
