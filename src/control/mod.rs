//! The operator's way in: `onboardd devices …`, while the daemon runs or not.
//!
//! sled allows one process per database, so the CLI cannot open the store while the
//! daemon holds it. The daemon therefore serves a Unix socket (owner-only, under
//! /run/onboardd via `RuntimeDirectory=`) speaking one JSON [`Request`] per line and
//! one JSON [`Response`] per line. When no daemon answers, the CLI opens the store
//! itself and answers the same way.
//!
//! - this module: the protocol (`Request`, `Response`, `DeviceRow`) and [`ControlError`].
//! - [`server`]: the daemon's side, and [`answer`], which both sides use.
//! - [`client`]: the `devices` commands: ask the daemon (or the store), print.
//! - [`forget`]: `devices forget`, all or nothing: the Qubitro device deleted first
//!   when asked, the sensor forgotten only then (a discovered one put on the ignore
//!   list).
//! - [`prune`]: `devices prune`, a forget of every sensor silent for too long.
//! - `devices adopt` (in [`server`]): this gateway bridges a device another made.

pub mod client;
pub mod forget;
pub mod prune;
pub mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::onboarding::Record;
use crate::store::{Ignored, StoreError};

pub use client::{request, DevicesCommand, Outcome};
pub use server::{answer, serve};

/// How talking over the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket's directory cannot be created, or a mode cannot be set.
    #[error("control.socket: cannot prepare {}", path.display())]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon cannot listen on `control.socket`.
    #[error("control.socket: cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A daemon listens, but this user may not talk to it.
    #[error(
        "cannot reach the daemon at {socket}: permission denied (run as the daemon's user or root)"
    )]
    Permission {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// The socket exists but connecting failed for another reason.
    #[error("cannot reach the daemon at {socket}")]
    Connect {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing an open control connection failed.
    #[error("control connection")]
    Io(#[from] std::io::Error),
    /// The daemon hung up before answering.
    #[error("the daemon closed the control connection")]
    Closed,
    /// A line that is not the JSON the protocol expects.
    #[error("bad control message")]
    Protocol(#[from] serde_json::Error),
    /// An answer of the wrong kind for the request.
    #[error("unexpected answer from the daemon")]
    Unexpected,
    /// The daemon (or the store the CLI opened) answered with an error.
    #[error("{message}")]
    Daemon { message: String },
    /// The daemon refused this client (`SO_PEERCRED`: neither root nor its own user).
    #[error("the daemon refused this user: {message}")]
    Refused { message: String },
    /// No daemon answers and there is no store to open (nothing is created).
    #[error("no daemon answers on {socket} and there is no store at {}: onboardd has not run here yet, or store.path is \
         wrong", path.display())]
    NoStore { socket: String, path: PathBuf },
    /// Running as root, the CLI cannot become the store's owner before opening it.
    #[error("cannot switch to the owner (uid {uid}) of the store {} before opening it", path.display())]
    BecomeOwner {
        uid: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No daemon answers, and a remote delete needs a Qubitro client this command
    /// cannot make (the API key is not readable here, or the client fails to build).
    #[error(
        "no daemon answers on {socket}, and deleting the Qubitro device without it needs the API key here: {reason}. \
         Give it with qubitro.api_key_file or ONBOARDD__QUBITRO__API_KEY_FILE (the service gets it from LoadCredential=), \
         or start the daemon. Nothing was forgotten"
    )]
    NoCloud { socket: String, reason: String },
    /// No daemon answers and the store cannot be opened either.
    #[error("no daemon answers on {socket} and the store cannot be opened")]
    NoDaemon {
        socket: String,
        #[source]
        source: StoreError,
    },
}

/// One request line. Device tokens travel over the socket only when the operator
/// asked for them (`--show-token`, `--include-tokens`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    List {
        #[serde(default)]
        with_tokens: bool,
    },
    Show {
        sensor_id: String,
        #[serde(default)]
        with_token: bool,
    },
    Forget {
        sensor_id: String,
        delete_remote: bool,
    },
    /// Retry a bridged device Qubitro refused, now rather than at its next retry.
    Resume { sensor_id: String },
    /// The ignore list (forgotten discovered devices).
    Ignored,
    /// Lift a device from the ignore list.
    Unignore { sensor_id: String },
    /// Bridge the sensor's device on this gateway, whichever gateway made it.
    Adopt { sensor_id: String },
    /// Forget every sensor silent for longer than `not_seen_for_s`.
    Prune {
        not_seen_for_s: u64,
        delete_remote: bool,
        dry_run: bool,
    },
}

/// One device as the CLI shows it. The token only when asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRow {
    pub sensor_id: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_token: Option<String>,
    pub name: String,
    pub brand: String,
    pub model: String,
    pub attempts: u32,
    pub first_seen_ms: u64,
    pub updated_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// When it was last heard from (an announce or a reading), wall-clock ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    /// The gateway forwards this sensor's readings.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bridged: bool,
    /// The gateway that bridges this device instead of this one, until `devices
    /// adopt` here (empty: a device whose `gateway_id` metadata is not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_by: Option<String>,
    /// When the operator adopted the device on this gateway, wall-clock ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_ms: Option<u64>,
    /// `devices show` of a bridged sensor while the daemon runs: its uplink's state
    /// (connected, paused and why, readings buffered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<serde_json::Value>,
}

impl DeviceRow {
    pub fn from_record(sensor_id: &str, rec: &Record, with_token: bool) -> DeviceRow {
        let (device_id, device_token) = match rec.credentials() {
            Some(c) => (
                Some(c.device_id.clone()),
                with_token.then(|| c.device_token.0.clone()),
            ),
            None => (None, None),
        };
        DeviceRow {
            sensor_id: sensor_id.to_string(),
            state: rec.shown_state().to_string(),
            device_id,
            device_token,
            name: rec.spec.name.clone(),
            brand: rec.spec.brand.clone(),
            model: rec.spec.model.clone(),
            attempts: rec.attempts,
            first_seen_ms: rec.first_seen_ms,
            updated_ms: rec.updated_ms,
            last_error: rec.last_error.clone(),
            origin: rec.origin().map(|o| o.as_str().to_string()),
            last_seen_ms: None,
            bridged: rec.bridged,
            owned_by: rec.owned_elsewhere().map(str::to_string),
            adopted_ms: rec.adopted_ms,
            bridge: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Devices {
        devices: Vec<DeviceRow>,
    },
    Device {
        device: Option<Box<DeviceRow>>,
    },
    Forgot {
        found: bool,
        remote_deleted: bool,
        message: String,
    },
    Resumed {
        found: bool,
        message: String,
    },
    Ignored {
        ignored: Vec<Ignored>,
    },
    Unignored {
        found: bool,
        message: String,
    },
    Adopted {
        found: bool,
        message: String,
    },
    /// One line per sensor pruned (or that would be, or that failed).
    Pruned {
        lines: Vec<String>,
        failed: usize,
    },
    Error {
        message: String,
    },
}
