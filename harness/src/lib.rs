//! onboardd's test harness, shared by the integration tests (`tests/`) and the benchmark
//! (`examples/bench.rs`): a real mosquitto on a free port, the onboardd binary as a child
//! process, the fake Qubitro in-process over real HTTP, MQTT sensors (v5 and v3.1.1) built on
//! rumqttc, and a TCP proxy that makes the network hostile.
//!
//! Map:
//! - [`process`]: child processes with their output captured ([`Proc`], [`LogLines`]).
//! - [`mosquitto`]: the broker ([`Mosquitto`], [`MosquittoBuilder`]): persistence, files
//!   handed to it copied where its own user can read them.
//! - [`daemon`]: onboardd under test ([`Daemon`]), its config ([`config_toml`]: the shipped
//!   defaults, proofs required, the store in a unit-like state directory, [`store_path`])
//!   and where its binary is ([`daemon_bin`]).
//! - [`sensor`]: simulated sensors ([`Sensor`], [`SensorV3`]), flashed with their key.
//! - [`firmware`]: the sensor side of the protocol (sensor key, proof, unsealing),
//!   written from the README, independent of onboardd's code; [`Flashed`] is the one
//!   place that builds an announce and the one place that checks a reply.
//! - [`proxy`]: a loopback TCP proxy with latency, stalls and severed connections.
//! - [`pki`]: a throw-away PKI made with the openssl CLI.
//! - [`qubitro_broker`]: a second mosquitto standing in for Qubitro's broker, with a
//!   login per device the fake cloud creates (the telemetry bridge's tests).
//! - [`bridge_setup`]: the bridge's test setup in one call ([`bridged()`], [`Bridged`]): the
//!   local broker, the fake, the stand-in and its observer, onboardd bridging to it.
//! - [`files`]: files tests make and check ([`owners_below`], [`config_with_a_readable_secret`]).
//! - [`webdriver`]: a headless chromium driven over WebDriver (the gateway page's test).
//!
//! Every wait has a deadline ([`WAIT`]) and panics saying what it waited for, with the log
//! of the process concerned.

pub mod bridge_setup;
pub mod daemon;
pub mod files;
pub mod firmware;
pub mod mosquitto;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod qubitro_broker;
pub mod sensor;
pub mod webdriver;

use std::net::TcpListener;
use std::time::Duration;

use fake_qubitro::{Endpoint, FakeDevice, FakeOptions, FakeQubitro, Fault};

pub use bridge_setup::{bridged, bridged_daemon, onboard_bridged, Bridged, BridgedBuilder};
pub use daemon::{config_toml, daemon_bin, merge_toml, set_daemon_bin, store_path, Daemon};
pub use files::{config_with_a_readable_secret, owners_below};
pub use firmware::{Flashed, Reply};
pub use mosquitto::{Mosquitto, MosquittoBuilder};
pub use process::{LogLines, Proc};
pub use sensor::{Sensor, SensorV3};

/// Long enough for a loaded CI machine; a passing test never waits this long.
pub const WAIT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago (another process may take it before we bind it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// `[http]` for a listener on `ip:port` that needs `password`, and the owner-only
/// password file it names (keep the directory as long as the daemon runs).
pub fn http_with_password(ip: &str, port: u16, password: &str) -> (String, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("http-password");
    std::fs::write(&file, format!("{password}\n")).expect("write the password file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the password file");
    let listen = format!("{ip}:{port}");
    let toml = format!(
        "[http]\nlisten = \"{listen}\"\npassword_file = \"{}\"\n",
        file.display()
    );
    (toml, dir)
}

/// A fault answering `code` with the fake's usual error body and no Retry-After.
pub fn status_fault(code: u16) -> Fault {
    Fault::Status {
        status: code,
        retry_after: None,
        body: None,
    }
}

/// A 429 (or any `code`) asking to come back in `secs` seconds (`Retry-After`).
pub fn retry_after_fault(code: u16, secs: u64) -> Fault {
    Fault::Status {
        status: code,
        retry_after: Some(secs),
        body: None,
    }
}

/// A 400 with the body Qubitro sends when it refuses what was asked, saying `message`.
pub fn refused_fault(message: &str) -> Fault {
    let message = serde_json::Value::from(message);
    Fault::Status {
        status: 400,
        retry_after: None,
        body: Some(format!(
            r#"{{"success":false,"status":400,"message":{message}}}"#
        )),
    }
}

/// Waits (at most [`WAIT`]) until the fake has seen `n` calls to `ep`.
pub async fn wait_for_cloud_requests(cloud: &FakeQubitro, ep: Endpoint, n: usize) {
    if tokio::time::timeout(WAIT, cloud.wait_for_requests(ep, n))
        .await
        .is_err()
    {
        panic!(
            "the fake Qubitro saw {} of {n} {ep:?} requests within {WAIT:?}",
            cloud.count(ep)
        );
    }
}

/// The cloud devices whose metadata names `sensor_id`.
pub fn cloud_devices_of(cloud: &FakeQubitro, sensor_id: &str) -> Vec<FakeDevice> {
    cloud
        .devices()
        .into_iter()
        .filter(|d| d.metadata.get("sensor_id").map(String::as_str) == Some(sensor_id))
        .collect()
}

/// Asserts `ok` is an `ok` reply, read by a flashed sensor, for a device the fake cloud
/// holds, and that the token the sensor opened from its seal is that device's token.
pub fn assert_opens_to_the_clouds_token(cloud: &FakeQubitro, ok: &Reply) {
    assert_eq!(ok["status"], "ok", "{ok}");
    let id = ok["device_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no device_id: {ok}"));
    let device = cloud
        .devices()
        .into_iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("the fake cloud holds no device {id}: {ok}"));
    assert_eq!(ok.token(), device.token, "the opened token of {ok}");
}

/// The fake Qubitro with its default options, on a free port.
pub async fn fake_cloud() -> FakeQubitro {
    FakeQubitro::start(FakeOptions::default())
        .await
        .expect("start the fake Qubitro")
}
