//! The durable per-sensor state, in sled 0.34: the [`Store`] facade and its errors.
//!
//! sled makes nothing durable on return: only `flush` fsyncs. Every write here
//! returns a sequence number, and [`Store::durable`] waits until a flush has covered
//! it. One flusher task serves all waiters, so concurrent onboardings share one
//! fsync (group commit) instead of each paying for its own. `flush_async` can
//! deadlock in 0.34, so the flush runs in `spawn_blocking`. Any sled error is
//! returned, and callers treat it as fatal: sled's own flusher stops silently after
//! an I/O error, so carrying on would lose data.
//!
//! One concern per file: `layout` (what lives where in the state directory, the
//! move from the previous layout), `open` (open, recovery, lock retry), `commit`
//! (group commit), `records` (sensor records and their indexes), `shortcut` (the
//! compact credentials tree a re-announce reads), `trees` (the side
//! trees other modules keep in the same database), `discovery` (discovery's state in
//! its tree), `ignored` (forgotten discovered devices), `last_seen` (when each sensor
//! was last heard from, written in batches), `census` (sensors per state, kept as
//! records change).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::DropGuard;

use crate::onboarding::Record;

mod census;
mod commit;
mod discovery;
mod ignored;
mod last_seen;
mod layout;
mod open;
mod records;
mod shortcut;
mod trees;

pub use census::STATES as SENSOR_STATES;
pub use commit::BeforeFlush;
pub use discovery::{DiscoveryState, DiscoveryTree};
pub use ignored::Ignored;
pub use layout::{exists, moved_aside, ASIDE_PREFIX, DB_DIR};
pub use open::OPEN_PANICKED;
pub use shortcut::Shortcut;
pub use trees::{ReadingsTree, RETIRED_PREFIX};

use commit::Flusher;

/// A file in sled's directory that exists only while the database is closed after an
/// orderly stop ([`Store::close_cleanly`]). A file, not a sled key, so that starting
/// and stopping leave sled's own files as they were (an SD card counts every write).
pub const CLEAN_STOP_FILE: &str = "clean-stop";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record of sensor {sensor} is unreadable: {message}")]
    Decode { sensor: String, message: String },
    #[error("the database at {path} is in use by another process (is onboardd already running?)")]
    Locked { path: PathBuf },
    #[error("cannot open the database at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("flushing the database to disk failed: {0}")]
    Flush(String),
}

/// The sensor store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// The database itself: flushes and unique ids.
    db: sled::Db,
    sensors: sled::Tree,
    /// Index of sensors in Pending/Creating: the restart resumes these without
    /// reading every record (start-up time does not grow with the fleet).
    pending: sled::Tree,
    /// Index of sensors whose ok reply the broker has not acknowledged yet.
    undelivered: sled::Tree,
    /// Records that could not be decoded, kept for inspection, out of the way.
    quarantine: sled::Tree,
    /// sensor id → its credentials only: what a re-announce needs, a fraction of the
    /// record, so answering a large fleet does not pull every full record into memory.
    creds: sled::Tree,
    /// Index of bridged sensors: re-announces and the bridge's start read it, not
    /// every record.
    bridged: sled::Tree,
    flusher: Arc<Flusher>,
    /// Last-seen times not yet written: kept here so every clone (the engine's
    /// stages, the control socket) shares them.
    last_seen: Arc<last_seen::LastSeen>,
    /// Sensors per onboarding state, kept by every record change (/metrics).
    census: Arc<census::Census>,
    /// sled's directory (`{store.path}/db`), where [`CLEAN_STOP_FILE`] goes.
    dir: PathBuf,
    /// Stops the flusher (and so releases the database) when the last clone goes.
    _closer: Arc<DropGuard>,
}

/// How the database was opened, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    Opened,
    /// sled's `db/` was unreadable and moved here (a `db.corrupt-<secs>` inside the
    /// state directory); a new, empty one was made.
    RebuiltAfterCorruption {
        moved_to: PathBuf,
    },
}

impl Store {
    /// Sensors per onboarding state, as [`SENSOR_STATES`] names them; no record is read.
    pub fn sensors_by_state(&self) -> [u64; 4] {
        self.census.counts()
    }

    /// The bytes the files in sled's directory take: its log, snapshots, blobs and
    /// config. Measured from the directory rather than with sled's own
    /// `size_on_disk`, which counts only the log and blobs and reads 0 for a
    /// database whose first write is still in memory.
    pub fn size_on_disk(&self) -> std::io::Result<u64> {
        dir_bytes(&self.dir)
    }
}

/// The sizes of the files under `dir`, recursively. A file removed while it is read
/// (sled drops old snapshots and blobs in the background) counts as gone.
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() {
            dir_bytes(&entry.path()).unwrap_or(0)
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn encode(rec: &Record) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a record is plain data and always serializes")
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
        sensor: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod test_support {
    use std::path::Path;

    use crate::announce::DeviceSpec;
    use crate::config::StoreConfig;
    use crate::device::{Credentials, Token};
    use crate::onboarding::{Origin, Record};
    use crate::reply::Route;

    pub fn pending() -> Record {
        Record::pending(spec(), Route::default(), 1, 1)
    }

    pub fn created() -> Record {
        pending()
            .created(
                Credentials {
                    device_id: "d".into(),
                    device_token: Token("t".into()),
                },
                Origin::Created,
                2,
            )
            .unwrap()
    }

    fn spec() -> DeviceSpec {
        crate::announce::test_spec()
    }

    pub fn cfg(dir: &Path) -> StoreConfig {
        StoreConfig {
            path: dir.join("db").display().to_string(),
            cache_capacity_bytes: 1 << 20,
            last_seen_flush_s: 600,
        }
    }
}
