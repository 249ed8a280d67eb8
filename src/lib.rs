//! onboardd — onboards MQTT sensors on an edge gateway as Qubitro devices.
//!
//! Map of the crate (read top to bottom to follow one announce):
//! - [`config`]: the TOML/env configuration, validated once at start.
//! - [`announce`]: topic and payload of an announce → a validated device spec.
//! - [`reply`]: the JSON answers published back to a sensor.
//! - [`store`]: the durable per-sensor state in sled, with group-commit flushes.
//! - [`cloud`]: the Qubitro REST client (create, lookup, get) and its error classes.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`mqtt`]: the one task that owns rumqttc's event loop, acks and delivery tracking.
//! - [`engine`]: the onboarding state machine: dispatcher, scheduler and workers.
//! - [`security`]: claim proofs, allow/deny rules, flood limits.
//! - [`control`]: the Unix socket behind `onboardd devices …`.
//! - [`metrics`]: counters for the stats topic and log.
//! - [`failpoint`]: crash injection for the reliability tests (feature `failpoints` only).
//! - [`tls`]: rustls (ring) for the broker connection.
//! - [`daemon`]: wires everything together for `onboardd run`.
//! - [`logging`], [`systemd`]: journald/stderr logging and sd_notify.

pub mod announce;
pub mod backoff;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod failpoint;
pub mod heartbeat;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod onboarding;
pub mod reply;
pub mod security;
pub mod store;
pub mod systemd;
pub mod tls;
