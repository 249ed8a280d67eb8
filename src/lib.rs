//! onboardd — onboards MQTT sensors on an edge gateway as Qubitro devices.
//!
//! Map of the crate, in the order one announce meets it:
//! - [`mqtt`]: the one task that owns rumqttc's event loop; announces leave it through
//!   an inbox, replies and acks enter through [`mqtt::Mqtt`], and its tracker tells
//!   which reply a PUBACK acknowledges. It knows no topic's meaning: the daemon hands
//!   it the [`mqtt::Subscriptions`] (announces, bridge data, discovery prefixes).
//! - [`engine`]: `dispatch` parses and checks each announce ([`announce`],
//!   [`security`], which verifies [`proof`]s) and records a new sensor; `worker`
//!   runs one sensor's onboarding against [`cloud`] (the Qubitro REST client) and
//!   [`store`] (sled, group-commit flushes), one transition of [`onboarding`] (the
//!   persisted state machine) at a time; `delivery` publishes [`reply`]s (tokens sealed with [`proof`]) and marks
//!   them delivered.
//! - [`control`]: the Unix socket behind `onboardd devices …` (server and client).
//! - [`bridge`]: the telemetry bridge: readings of bridged sensors flattened
//!   ([`bridge::flatten`]), buffered durably in the store's database
//!   ([`bridge::buffer`]) and forwarded to Qubitro's broker under each device's own
//!   login ([`bridge::uplink`]).
//! - [`discovery`]: zero-firmware onboarding: Home Assistant and Tasmota discovery
//!   configs parsed into physical devices and their entities, state messages into
//!   flat readings for the bridge (pure; the engine onboards what it reports).
//! - [`daemon`]: wires everything for `onboardd run` and stops it within one deadline.
//!
//! Shared leaves: [`config`] (TOML/env, validated once), [`claim_key`] (configured
//! or generated at first start), [`proof`] (the sensor protocol's crypto),
//! [`device`] (credentials and tokens), [`clock`] (tokio's pausable time, wall time for records), [`backoff`],
//! [`heartbeat`] (watchdog beats), [`tls`] (one rustls builder), [`metrics`],
//! [`open_broker`] (does the broker let anyone in; not wired in yet),
//! [`logging`], [`systemd`], [`failpoint`] (crash injection, feature `failpoints`).
//!
//! Dependencies point one way: sources (`mqtt` inbox) → `engine` → `cloud`/`store` →
//! sinks (`mqtt` publishes); `daemon` and `control` sit on top; no module imports
//! one that imports it back (CI runs `modcycles.py`).

pub mod announce;
pub mod backoff;
pub mod bridge;
pub mod claim_key;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod discovery;
pub mod engine;
pub mod failpoint;
pub mod heartbeat;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod onboarding;
pub mod open_broker;
pub mod proof;
pub mod reply;
pub mod security;
pub mod store;
pub mod systemd;
pub mod tls;
