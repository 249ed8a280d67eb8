//! A fake Qubitro REST API, faithful to the documented endpoints, for tests and firmware work.
//!
//! It speaks real HTTP/1.1 on a real socket so the daemon's client is exercised end to end, and it
//! can misbehave on demand ([`Fault`]) to reproduce what a flaky cloud does to onboarding.
//! Where the documentation disagrees with itself (response envelope, where create puts the
//! credentials, 200 vs 201) the choice is an option, so every documented form can be tested.
//!
//! Requests are routed by an axum [`Router`](axum::Router); the server runs it on hyper directly rather than
//! through `axum::serve`: `stop()` must drop connections that are still open (a hung request,
//! an idle keep-alive) so clients see a dead cloud, and `axum::serve` keeps every connection
//! alive until it finishes on its own.
//!
//! The list endpoint (onboardd's lookup, `GET …/devices?metadata=sensor_id:ID`) can be made to
//! answer in the other shapes a real API might use ([`ListShape`]), paginated
//! ([`FakeOptions::list_page_size`]), unfiltered, oldest first, or with `created_at` fields, so a
//! client's lookup can be tested against each of them.
//!
//! Layers, each using only those below it: `server` (the [`FakeQubitro`] handle and the
//! hyper server it stops and restarts) → `routes` (the device API's handlers: record, apply
//! the queued fault, authenticate, answer) and `control` (`/_fake/*` of the standalone binary)
//! → `list` (the list call) → `answer` (JSON in the configured envelope) → `store` (the store of
//! devices, recorded requests, queued faults and switches) → `faults` ([`Fault`] injection and
//! its JSON form), `options` ([`FakeOptions`]), `shapes` (the list and pagination [`ListShape`]s)
//! and `devices` (device JSON, create validation, tokens).

mod answer;
mod control;
mod devices;
mod faults;
mod list;
mod options;
mod routes;
mod server;
mod shapes;
mod store;
#[cfg(test)]
mod test_util;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use devices::{DeviceHook, FakeDevice, NewDevice, RecordedRequest};
pub use faults::Fault;
pub use options::{CredentialsAt, Endpoint, Envelope, FakeOptions};
pub use server::FakeQubitro;
pub use shapes::ListShape;

/// Project id used when a test does not care which one.
pub const DEFAULT_PROJECT_ID: &str = "5f2c1a9e-8b3d-4e7a-9c61-2d4b8e0f7a13";
/// API key used when a test does not care which one (real keys start with `QB_`).
pub const DEFAULT_API_KEY: &str = "QB_test_key";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later call into a second panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
