//! The integration tests' view of the harness (the `harness/` crate): everything it
//! exports, plus what only cargo's integration-test build knows, the daemon binary's path.
#![allow(dead_code)]

pub use harness::*;

/// The onboardd binary cargo built for these tests (with the features of this test run),
/// handed to the harness too so every [`Daemon`] starts exactly this one.
pub fn bin() -> &'static str {
    let bin = env!("CARGO_BIN_EXE_onboardd");
    harness::set_daemon_bin(bin);
    bin
}
