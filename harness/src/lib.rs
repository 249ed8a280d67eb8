//! onboardd's test harness, shared by the integration tests (`tests/`) and the benchmark
//! (`examples/bench.rs`): a real mosquitto on a free port, the onboardd binary as a child
//! process, the fake Qubitro in-process over real HTTP, MQTT sensors (v5 and v3.1.1) built on
//! rumqttc, and a TCP proxy that makes the network hostile.
//!
//! Map:
//! - [`process`]: child processes with their output captured ([`Proc`], [`LogLines`]).
//! - [`mosquitto`]: the broker ([`Mosquitto`], [`MosquittoBuilder`]): persistence, files
//!   handed to it copied where its own user can read them.
//! - [`daemon`]: onboardd under test ([`Daemon`]), its config ([`config_toml`]) and where its
//!   binary is ([`daemon_bin`]).
//! - [`sensor`]: simulated sensors ([`Sensor`], [`SensorV3`]).
//! - [`proxy`]: a loopback TCP proxy with latency, stalls and severed connections.
//! - [`pki`]: a throw-away PKI made with the openssl CLI.
//!
//! Every wait has a deadline ([`WAIT`]) and panics saying what it waited for, with the log
//! of the process concerned.

pub mod daemon;
pub mod mosquitto;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod sensor;

use std::net::TcpListener;
use std::time::Duration;

use fake_qubitro::{FakeOptions, FakeQubitro};

pub use daemon::{config_toml, daemon_bin, merge_toml, set_daemon_bin, Daemon};
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

/// The fake Qubitro with its default options, on a free port.
pub async fn fake_cloud() -> FakeQubitro {
    FakeQubitro::start(FakeOptions::default())
        .await
        .expect("start the fake Qubitro")
}
