//! onboardd — onboards MQTT sensors on an edge gateway as Qubitro devices.
//!
//! Map of the crate, by layer, in the order data flows: sources → engine →
//! cloud/store → sinks. No module imports one that imports it back (CI's
//! module-cycle check sees submodules too).
//!
//! **Sources** — what arrives:
//! - [`mqtt`]: the one task that owns rumqttc's event loop; inbound messages leave it
//!   through an inbox, and its tracker tells which reply a PUBACK acknowledges. It
//!   knows no topic's meaning: the daemon hands it the subscriptions (announces,
//!   bridge data, discovery prefixes).
//! - [`announce`]: the pure parser of announce payloads (limits as constants, fuzzed).
//! - [`discovery`]: zero-firmware onboarding's pure half: Home Assistant and Tasmota
//!   configs parsed into devices and entities ([`discovery::homeassistant`],
//!   [`discovery::tasmota`], [`discovery::template`], [`discovery::registry`]), state
//!   messages into flat readings, the topics it may never follow
//!   ([`discovery::reserved`]), and the Qubitro spec of a discovered device
//!   ([`discovery::spec`]).
//!
//! **Engine** — [`engine`], one stage per file, each given only the state it touches:
//! - `inbound`: the pure routing of a topic (reading, discovery config, followed
//!   state, announce); `dispatch`: one task takes messages in arrival order and
//!   decides what each gets (`announce_route`: where it is answered); `acker`
//!   acknowledges each, in arrival order, once its
//!   write is durable and its bridged readings are forwarded or spilled.
//! - `admit`: the one place a new sensor becomes a record (rules and flood limits of
//!   [`security`], recent rejections in `rejections`), announced or discovered.
//! - `worker`: one task per unfinished sensor runs its cloud steps (`Steps`);
//!   `onboardings`: the running tasks and the routes they owe; `retry`: the wait
//!   before the next attempt; `health`: whether Qubitro answers and the pause after a
//!   refused key.
//! - `records`: the only door for a record change, one [`onboarding`] transition as a
//!   compare-and-swap on its generation; `forget`: `devices forget`, daemon or not.
//! - `delivery`: which [`reply`] a record gets and the broker's word on it; replies go
//!   out through `publisher` (a trait [`mqtt::Mqtt`] implements); `discovered`:
//!   discovery's configs and state messages as the engine sees them.
//!
//! **Cloud and store** — what the engine calls:
//! - [`cloud`]: the Qubitro REST client. [`onboarding`]: the persisted state machine,
//!   one pure function per transition (`wire`: its on-disk form, older records
//!   included; `owner`: which gateway bridges a device, one per device).
//!   [`store`]: sled with group-commit flushes (`layout`, `open`, `commit`,
//!   `records`, `census` for sensors per state, `trees` for the bridge's tree,
//!   `discovery` for discovery's state).
//!
//! **Sinks** — what leaves:
//! - replies through [`mqtt`] (tokens sealed with [`proof`]); readings through the
//!   [`bridge`]: flattened ([`bridge::flatten`]), held to each sensor's rate
//!   ([`bridge::rate`]), held in memory while forwarded ([`bridge::held`]), spilled to
//!   the store's database only when the uplink cannot take them ([`bridge::buffer`]),
//!   and forwarded to Qubitro's broker under each device's own login
//!   (`bridge::scheduler` decides which device may hold a connection,
//!   [`bridge::uplink`] is one device's session).
//!
//! **On top**: [`daemon`] wires everything for `onboardd run` and stops it within one
//! deadline; [`control`] is the Unix socket behind `onboardd devices …` (server and
//! client, and `forget`: the Qubitro delete first, then the local forget, all or
//! nothing, with the daemon running or not; `prune`, the same for every sensor silent
//! too long); [`http`] serves the gateway page, `/healthz` and `/metrics`; [`lifecycle`]
//! deletes discovered devices retired for too long (with `control`'s forget).
//!
//! Shared leaves: [`config`] (TOML/env, validated once), [`claim_key`] (configured
//! or generated at first start), [`proof`] (the sensor protocol's crypto),
//! [`device`] (credentials and tokens), [`clock`] (tokio's pausable time, wall time
//! for records), [`backoff`], [`heartbeat`] (watchdog beats), [`tls`] (one rustls
//! builder), [`metrics`], [`logging`] (and [`events`]: each sensor's recent log events,
//! bounded, for the gateway page), [`systemd`], [`failpoint`] (crash injection,
//! feature `failpoints`), [`open_broker`] (does the broker let anyone in: probed at each
//! connection, said in the log, STATUS and stats).

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
pub mod events;
pub mod failpoint;
pub mod heartbeat;
pub mod http;
pub mod lifecycle;
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
