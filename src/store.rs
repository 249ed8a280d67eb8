//! The durable per-sensor state, in sled 0.34.
//!
//! sled makes nothing durable on return: only `flush` fsyncs. Every write here
//! returns a sequence number, and [`Store::durable`] waits until a flush has covered
//! it. One flusher task serves all waiters, so concurrent onboardings share one
//! fsync (group commit) instead of each paying for its own. `flush_async` can
//! deadlock in 0.34, so the flush runs in `spawn_blocking`. Any sled error is
//! returned, and callers treat it as fatal: sled's own flusher stops silently after
//! an I/O error, so carrying on would lose data.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::StoreConfig;
use crate::device::Credentials;
use crate::onboarding::{Record, State};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlushState {
    flushed: u64,
    failed: bool,
}

struct Flusher {
    /// Sequence number of the last completed write.
    written: AtomicU64,
    /// The highest write a `durable` caller waits for. Only these make a flush:
    /// writes nobody waits for (a delivered mark, a forwarded reading's removal) ride
    /// along with the next flush or sled's own every second, so they cost no extra
    /// fsync (SD-card wear).
    wanted: AtomicU64,
    state: watch::Sender<FlushState>,
    wake: Notify,
    /// Flushes done, for tests.
    #[cfg(test)]
    flushes: AtomicU64,
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
    /// Stops the flusher (and so releases the database) when the last clone goes.
    _closer: Arc<DropGuard>,
}

/// How the database was opened, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    Opened,
    /// The old directory was unreadable and moved here; a new one was made.
    RebuiltAfterCorruption {
        moved_to: PathBuf,
    },
}

impl Store {
    /// Opens (or creates) the database and starts its flusher; needs a tokio runtime.
    ///
    /// Only a database that sled cannot read is moved aside (to `<path>.corrupt-<secs>`)
    /// and replaced by an empty one; the lookup before create then adopts each
    /// sensor's existing Qubitro device instead of duplicating it. "Cannot read"
    /// means sled reported corruption, an unsupported format or a bug, its `conf`
    /// file cannot be parsed, or it panicked while opening (see [`OPEN_PANICKED`]).
    /// Every other failure (no space, I/O error, no permission, too many open files,
    /// a path that is not a directory) is returned as [`StoreError::Open`] naming the
    /// path and the OS error, and nothing on disk is touched: moving a healthy
    /// database aside would lose the acknowledged Pending/Creating sensors, and each
    /// restart by systemd would make another copy.
    ///
    /// A lock held by another process is retried for a moment (right after a kill -9
    /// the old lock can linger briefly), then reported clearly.
    pub fn open(cfg: &StoreConfig) -> Result<(Store, OpenOutcome), StoreError> {
        let path = PathBuf::from(&cfg.path);
        if let Ok(meta) = std::fs::metadata(&path) {
            if !meta.is_dir() {
                return Err(StoreError::Open {
                    message: format!(
                        "{}; store.path must name a directory",
                        std::io::Error::from_raw_os_error(libc::ENOTDIR)
                    ),
                    path,
                });
            }
        }
        let marker = path.join(OPEN_PANICKED);
        let first = if marker.exists() {
            Err(OpenFailure::Corrupt(format!(
                "an earlier start panicked inside sled while opening it ({} exists)",
                marker.display()
            )))
        } else {
            open_with_retry(&path, cfg.cache_capacity_bytes)
        };
        let (db, outcome) = match first {
            Ok(db) => (db, OpenOutcome::Opened),
            Err(OpenFailure::Fatal(e)) => return Err(e),
            Err(OpenFailure::Corrupt(why)) => {
                let moved_to = aside_name(&path);
                tracing::error!(
                    path = %path.display(),
                    moved_to = %moved_to.display(),
                    error = %why,
                    "DATABASE UNREADABLE: moving it aside and starting empty; sensors will be re-adopted from Qubitro on their next announce"
                );
                std::fs::rename(&path, &moved_to).map_err(|io| StoreError::Open {
                    path: path.clone(),
                    message: format!("it is unreadable ({why}), and moving it aside failed: {io}"),
                })?;
                let db = match open_with_retry(&path, cfg.cache_capacity_bytes) {
                    Ok(db) => db,
                    Err(OpenFailure::Fatal(e)) => return Err(e),
                    Err(OpenFailure::Corrupt(why)) => {
                        return Err(StoreError::Open {
                            path,
                            message: format!("a new, empty database is unreadable too: {why}"),
                        })
                    }
                };
                (db, OpenOutcome::RebuiltAfterCorruption { moved_to })
            }
        };
        let sensors = db.open_tree("sensors")?;
        let pending = db.open_tree("pending")?;
        let undelivered = db.open_tree("undelivered")?;
        let quarantine = db.open_tree("quarantine")?;
        let creds = db.open_tree("creds")?;
        let bridged = db.open_tree("bridged")?;
        let (state, _) = watch::channel(FlushState {
            flushed: 0,
            failed: false,
        });
        let flusher = Arc::new(Flusher {
            written: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            state,
            wake: Notify::new(),
            #[cfg(test)]
            flushes: AtomicU64::new(0),
        });
        let closer = CancellationToken::new();
        tokio::spawn(run_flusher(db.clone(), flusher.clone(), closer.clone()));
        Ok((
            Store {
                db: db.clone(),
                sensors,
                pending,
                undelivered,
                quarantine,
                creds,
                bridged,
                flusher,
                _closer: Arc::new(closer.drop_guard()),
            },
            outcome,
        ))
    }

    pub fn get(&self, sensor: &str) -> Result<Option<Record>, StoreError> {
        match self.sensors.get(sensor.as_bytes())? {
            Some(v) => self.decode_or_quarantine(sensor.as_bytes(), &v),
            None => Ok(None),
        }
    }

    /// A number never handed out before in this database (survives restarts): the
    /// `generation` of a new onboarding.
    pub fn next_generation(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// A record that cannot be decoded is moved to the quarantine tree and treated
    /// as unknown: the lookup before create then adopts the sensor's device. Failing
    /// instead would make systemd restart into the same failure forever.
    fn decode_or_quarantine(&self, key: &[u8], bytes: &[u8]) -> Result<Option<Record>, StoreError> {
        match decode(key, bytes) {
            Ok(rec) => Ok(Some(rec)),
            Err(e) => {
                tracing::error!(error = %e, "UNREADABLE RECORD moved to quarantine; the sensor is re-adopted from Qubitro on its next announce");
                self.quarantine.insert(key, bytes)?;
                self.creds.remove(key)?;
                self.sensors.remove(key)?;
                self.pending.remove(key)?;
                self.undelivered.remove(key)?;
                self.bridged.remove(key)?;
                self.wrote();
                Ok(None)
            }
        }
    }

    /// Index entries are added before the record changes and removed after, so a
    /// crash in between leaves a stale entry (cleaned when read), never a missing one.
    fn index_before(&self, key: &[u8], rec: &Record) -> Result<(), StoreError> {
        match rec.state {
            State::Pending | State::Creating => {
                self.pending.insert(key, &[1u8])?;
            }
            State::Created { .. } => {
                self.undelivered.insert(key, &[1u8])?;
            }
            State::Delivered { .. } => {}
        }
        if rec.bridged {
            self.bridged.insert(key, &[1u8])?;
        }
        Ok(())
    }

    /// After the record: stale index entries go, and the credentials shortcut is
    /// written (a crash before it leaves a record without the shortcut, and the full
    /// record still answers).
    fn index_after(&self, key: &[u8], rec: &Record) -> Result<(), StoreError> {
        if !rec.state.is_unfinished() {
            self.pending.remove(key)?;
        }
        if !matches!(rec.state, State::Created { .. }) {
            self.undelivered.remove(key)?;
        }
        if !rec.bridged {
            self.bridged.remove(key)?;
        }
        if let Some(c) = rec.credentials() {
            self.creds.insert(
                key,
                serde_json::to_vec(c).expect("credentials always serialize"),
            )?;
        }
        Ok(())
    }

    /// Sensors whose onboarding is unfinished (Pending or Creating).
    pub fn unfinished(&self) -> Result<Vec<(String, Record)>, StoreError> {
        self.indexed(&self.pending, |r| r.state.is_unfinished())
    }

    /// Sensors whose ok reply the broker has not acknowledged (Created).
    pub fn undelivered(&self) -> Result<Vec<(String, Record)>, StoreError> {
        self.indexed(&self.undelivered, |r| {
            matches!(r.state, State::Created { .. })
        })
    }

    /// Bridged sensors, with their records.
    pub fn bridged(&self) -> Result<Vec<(String, Record)>, StoreError> {
        self.indexed(&self.bridged, |r| r.bridged)
    }

    /// Whether the sensor is bridged (an index read, not a record read).
    pub fn is_bridged(&self, sensor: &str) -> Result<bool, StoreError> {
        Ok(self.bridged.contains_key(sensor.as_bytes())?)
    }

    /// Whether the sensor's ok reply still waits for the broker's acknowledgement
    /// (an index read, not a record read).
    pub fn is_undelivered(&self, sensor: &str) -> Result<bool, StoreError> {
        Ok(self.undelivered.contains_key(sensor.as_bytes())?)
    }

    fn indexed(
        &self,
        index: &sled::Tree,
        wanted: impl Fn(&Record) -> bool,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        let mut out = Vec::new();
        for item in index.iter() {
            let (k, _) = item?;
            let sensor = String::from_utf8_lossy(&k).into_owned();
            match self.get(&sensor)? {
                Some(rec) if wanted(&rec) => out.push((sensor, rec)),
                _ => {
                    index.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    /// Records a new sensor unless one is already recorded. `Some(seq)` when inserted.
    pub fn insert_new(&self, sensor: &str, rec: &Record) -> Result<Option<u64>, StoreError> {
        let key = sensor.as_bytes();
        self.index_before(key, rec)?;
        let swapped = self
            .sensors
            .compare_and_swap(key, None::<&[u8]>, Some(encode(rec)))?;
        match swapped {
            Ok(()) => {
                self.index_after(key, rec)?;
                Ok(Some(self.wrote()))
            }
            Err(_) => Ok(None),
        }
    }

    /// The credentials of an onboarded sensor, from the compact tree; `None` when
    /// the sensor is not (yet) onboarded or the shortcut is missing.
    pub fn credentials(&self, sensor: &str) -> Result<Option<Credentials>, StoreError> {
        match self.creds.get(sensor.as_bytes())? {
            Some(v) => Ok(serde_json::from_slice(&v).ok()),
            None => Ok(None),
        }
    }

    /// The one way a stored record changes: compare-and-swap against the bytes
    /// that `next` was shown, retried if another writer got there first. `next`
    /// returns the new record, or `None` to leave it as it is (a record of another
    /// generation, a transition that no longer applies). Nothing is written when
    /// the sensor is unknown. Returns the new record and its write's sequence number.
    pub fn update(
        &self,
        sensor: &str,
        mut next: impl FnMut(&Record) -> Option<Record>,
    ) -> Result<Option<(Record, u64)>, StoreError> {
        let key = sensor.as_bytes();
        loop {
            let Some(old) = self.sensors.get(key)? else {
                return Ok(None);
            };
            let Some(current) = self.decode_or_quarantine(key, &old)? else {
                return Ok(None);
            };
            let Some(new) = next(&current) else {
                return Ok(None);
            };
            self.index_before(key, &new)?;
            if self
                .sensors
                .compare_and_swap(key, Some(&old), Some(encode(&new)))?
                .is_ok()
            {
                self.index_after(key, &new)?;
                let seq = self.wrote();
                return Ok(Some((new, seq)));
            }
        }
    }

    /// Deletes a sensor's record (forget, or a create Qubitro rejected). With
    /// `generation`, only that onboarding is deleted, not a newer one.
    pub fn remove(
        &self,
        sensor: &str,
        generation: Option<u64>,
    ) -> Result<Option<Record>, StoreError> {
        let key = sensor.as_bytes();
        loop {
            let Some(old) = self.sensors.get(key)? else {
                return Ok(None);
            };
            let rec = decode(key, &old).ok();
            if let (Some(g), Some(r)) = (generation, &rec) {
                if r.generation != g {
                    return Ok(None);
                }
            }
            // The shortcut first: it must never outlive the record.
            self.creds.remove(key)?;
            if self
                .sensors
                .compare_and_swap(key, Some(&old), None::<&[u8]>)?
                .is_ok()
            {
                self.pending.remove(key)?;
                self.undelivered.remove(key)?;
                self.bridged.remove(key)?;
                self.wrote();
                return Ok(rec);
            }
        }
    }

    /// Reads every record (sled has no count): for tests, never for a hot path.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.sensors.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.sensors.is_empty()
    }

    /// All readable records in sensor-id order (unreadable ones are quarantined).
    pub fn scan(&self) -> impl Iterator<Item = Result<(String, Record), StoreError>> + '_ {
        self.sensors.iter().filter_map(|item| {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            match self.decode_or_quarantine(&k, &v) {
                Ok(Some(rec)) => Some(Ok((String::from_utf8_lossy(&k).into_owned(), rec))),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            }
        })
    }

    fn wrote(&self) -> u64 {
        self.flusher.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The sequence number of the latest write, for waiting on everything so far.
    pub fn last_write(&self) -> u64 {
        self.flusher.written.load(Ordering::SeqCst)
    }

    /// Resolves once write `seq` is on disk. Many waiters share one flush.
    pub async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.flusher.state.subscribe();
        {
            let s = *rx.borrow();
            if s.failed {
                return Err(StoreError::Flush("an earlier flush failed".into()));
            }
            if s.flushed >= seq {
                return Ok(());
            }
        }
        self.flusher.wanted.fetch_max(seq, Ordering::SeqCst);
        self.flusher.wake.notify_one();
        let s = rx
            .wait_for(|s| s.failed || s.flushed >= seq)
            .await
            .map_err(|_| StoreError::Flush("the flusher stopped".into()))?;
        if s.failed {
            Err(StoreError::Flush("flush failed".into()))
        } else {
            Ok(())
        }
    }

    /// Flushes everything written so far (shutdown, CLI writes).
    pub async fn flush_all(&self) -> Result<(), StoreError> {
        self.durable(self.last_write()).await
    }
}

// The telemetry bridge's reading buffer (`bridge::buffer`) lives in this same
// database, so that the one flusher above covers it too: a reading and an
// onboarding acknowledged in the same moment share one fsync, and there is no
// second flusher competing for the SD card.

/// The bridge's tree in this database, and the way its writes join the group
/// commit ([`Store::durable`]).
#[derive(Clone)]
pub struct ReadingsTree {
    pub tree: sled::Tree,
    store: Store,
}

impl Store {
    /// The bridge's reading buffer tree (created on first use).
    pub fn readings(&self) -> Result<ReadingsTree, StoreError> {
        Ok(ReadingsTree {
            tree: self.db.open_tree("bridge_readings")?,
            store: self.clone(),
        })
    }
}

/// Key prefix of the discovery tree's retired markers (see [`Store::discovery`]).
pub const RETIRED_PREFIX: &str = "r/";

impl Store {
    /// Zero-firmware onboarding's state (`engine::discovered`): devices, config
    /// topics and retired markers, as JSON, in this database so its writes join the
    /// same group commit as the records they lead to.
    pub fn discovery(&self) -> Result<ReadingsTree, StoreError> {
        Ok(ReadingsTree {
            tree: self.db.open_tree("discovery")?,
            store: self.clone(),
        })
    }

    /// Sensors discovery made whose entities are all gone (`devices list` shows
    /// them `retired`); readable without the daemon.
    pub fn retired_discovered(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let tree = self.db.open_tree("discovery")?;
        let mut out = std::collections::BTreeSet::new();
        for item in tree.scan_prefix(RETIRED_PREFIX) {
            let (k, _) = item?;
            if let Some(id) = std::str::from_utf8(&k)
                .ok()
                .and_then(|k| k.strip_prefix(RETIRED_PREFIX))
            {
                out.insert(id.to_string());
            }
        }
        Ok(out)
    }
}

impl ReadingsTree {
    /// Records that a write to the tree happened; `durable(seq)` then covers it.
    pub fn wrote(&self) -> u64 {
        self.store.wrote()
    }

    /// A number never handed out before in this database, also after a kill -9
    /// (sled skips ahead on recovery): orders readings across restarts.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.store.db.generate_id()?)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

async fn run_flusher(db: sled::Db, f: Arc<Flusher>, closer: CancellationToken) {
    loop {
        tokio::select! {
            _ = f.wake.notified() => {}
            _ = closer.cancelled() => return,
        }
        loop {
            if f.wanted.load(Ordering::SeqCst) <= f.state.borrow().flushed {
                break;
            }
            // Everything written so far is covered by this flush, waited for or not.
            let target = f.written.load(Ordering::SeqCst);
            let db2 = db.clone();
            let result = tokio::task::spawn_blocking(move || db2.flush()).await;
            match result {
                Ok(Ok(_)) => {
                    #[cfg(test)]
                    f.flushes.fetch_add(1, Ordering::Relaxed);
                    f.state.send_modify(|s| s.flushed = s.flushed.max(target));
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "flushing the database failed");
                    f.state.send_modify(|s| s.failed = true);
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the flush task died");
                    f.state.send_modify(|s| s.failed = true);
                    return;
                }
            }
        }
    }
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

fn aside_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{}", crate::clock::system_ms() / 1000));
    PathBuf::from(name)
}

/// sled's log segment size for new databases: its default. (64 KiB segments were
/// tried: the database grew to twice the bytes per sensor, for no gain in memory.)
/// sled refuses to open a database with another segment size, so an existing
/// database keeps its own (`existing_segment_size`).
const SEGMENT_SIZE: usize = 512 * 1024;

/// The segment size an existing database was made with (sled's `conf` file), so a
/// database made with another size opens as it is instead of looking corrupt.
fn existing_segment_size(path: &Path) -> Option<usize> {
    // Text lines followed by a binary checksum.
    let bytes = std::fs::read(path.join("conf")).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    text.lines()
        .find_map(|l| l.strip_prefix("segment_size:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| n.is_power_of_two())
}

/// Why an open failed: only `Corrupt` lets [`Store::open`] move the directory aside.
#[derive(Debug)]
enum OpenFailure {
    /// sled cannot read what is there.
    Corrupt(String),
    /// Anything else: reported, nothing touched.
    Fatal(StoreError),
}

/// Sorts a sled open error. An I/O error that carries an OS error number (ENOSPC,
/// EIO, EACCES, EMFILE, ENOTDIR, EROFS, …) is about the machine, not the data, and
/// would fail the same way on a fresh database. sled reports its own reading of a
/// short or malformed file as an I/O error without one (UnexpectedEof, InvalidData).
fn classify_open_error(path: &Path, e: sled::Error) -> OpenFailure {
    use std::io::ErrorKind;
    let fatal = |message: String| {
        OpenFailure::Fatal(StoreError::Open {
            path: path.to_path_buf(),
            message,
        })
    };
    match e {
        sled::Error::Io(io) if io.raw_os_error().is_some() => fatal(io.to_string()),
        sled::Error::Io(io)
            if matches!(io.kind(), ErrorKind::UnexpectedEof | ErrorKind::InvalidData) =>
        {
            OpenFailure::Corrupt(io.to_string())
        }
        sled::Error::Io(io) => fatal(io.to_string()),
        sled::Error::Corruption { .. }
        | sled::Error::ReportableBug(_)
        | sled::Error::Unsupported(_) => OpenFailure::Corrupt(e.to_string()),
        other => fatal(other.to_string()),
    }
}

/// The file that says "sled panicked while opening this database".
///
/// sled panics on some corrupt files instead of returning an error. Where panics
/// unwind (debug builds, tests) `catch_unwind` turns that into `Corrupt` at once.
/// Release builds use `panic = "abort"`: there nothing can be caught, the process
/// dies and systemd restarts it into the same panic, forever. So a panic hook writes
/// this file inside the database directory before the abort, and the next start
/// sees it and moves the directory aside (the file goes with it). Only a panic on
/// the thread that is opening writes it: a power cut or a SIGKILL during open
/// leaves no marker and is never mistaken for corruption.
pub const OPEN_PANICKED: &str = "onboardd-open-panicked";

thread_local! {
    /// The database this thread is opening, for the panic hook.
    static OPENING: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once) a panic hook that writes [`OPEN_PANICKED`] when the panicking
/// thread is inside sled's open, then runs the hook that was there before.
fn install_open_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let opening = OPENING.try_with(|o| o.borrow().clone()).ok().flatten();
            if let Some(dir) = opening {
                // Best effort: a full or read-only disk leaves the loop to systemd.
                let _ = std::fs::write(dir.join(OPEN_PANICKED), format!("{info}\n"));
            }
            previous(info);
        }));
    });
}

/// Runs sled's open with the panic hook armed for `path`.
fn guarded_open<T>(path: &Path, open: impl FnOnce() -> T) -> std::thread::Result<T> {
    install_open_panic_hook();
    OPENING.with(|o| *o.borrow_mut() = Some(path.to_path_buf()));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open));
    OPENING.with(|o| *o.borrow_mut() = None);
    result
}

fn open_with_retry(path: &Path, cache: u64) -> Result<sled::Db, OpenFailure> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let segment_size = existing_segment_size(path).unwrap_or(SEGMENT_SIZE);
    loop {
        let cfg = sled::Config::new()
            .path(path)
            .cache_capacity(cache)
            .flush_every_ms(Some(1000))
            .segment_size(segment_size);
        match guarded_open(path, move || cfg.open()) {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(e)) if is_lock_error(&e) => {
                if std::time::Instant::now() >= deadline {
                    return Err(OpenFailure::Fatal(StoreError::Locked {
                        path: path.to_path_buf(),
                    }));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(Err(e)) => return Err(classify_open_error(path, e)),
            Err(_) => {
                return Err(OpenFailure::Corrupt(
                    "sled panicked while reading it".into(),
                ))
            }
        }
    }
}

fn is_lock_error(e: &sled::Error) -> bool {
    if let sled::Error::Io(io) = e {
        if io.kind() == std::io::ErrorKind::WouldBlock {
            return true;
        }
    }
    let s = e.to_string();
    s.contains("could not acquire lock") || s.contains("Resource temporarily unavailable")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::announce::DeviceSpec;
    use crate::device::Token;
    use crate::onboarding::Origin;
    use crate::reply::Route;

    fn pending() -> Record {
        Record::pending(spec(), Route::default(), 1, 1)
    }

    fn created() -> Record {
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

    fn cfg(dir: &Path) -> StoreConfig {
        StoreConfig {
            path: dir.join("db").display().to_string(),
            cache_capacity_bytes: 1 << 20,
        }
    }

    #[tokio::test]
    async fn insert_new_refuses_a_second_record() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let rec = pending();
        let seq = s.insert_new("a", &rec).unwrap().unwrap();
        assert!(s.insert_new("a", &rec).unwrap().is_none());
        s.durable(seq).await.unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().state, State::Pending);
    }

    // Multi-threaded: the first store's flusher must get to run and let go of the
    // database while the second open retries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushed_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(&cfg(dir.path())).unwrap();
            let seq = s.insert_new("a", &created()).unwrap().unwrap();
            s.durable(seq).await.unwrap();
        }
        let (s, outcome) = Store::open(&cfg(dir.path())).unwrap();
        assert_eq!(outcome, OpenOutcome::Opened);
        assert_eq!(
            s.get("a")
                .unwrap()
                .unwrap()
                .credentials()
                .unwrap()
                .device_id,
            "d"
        );
    }

    #[tokio::test]
    async fn many_waiters_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let mut waits = Vec::new();
        for i in 0..200 {
            let rec = pending();
            let seq = s.insert_new(&format!("s{i}"), &rec).unwrap().unwrap();
            let s2 = s.clone();
            waits.push(tokio::spawn(async move { s2.durable(seq).await }));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        assert_eq!(s.len(), 200);
    }

    #[tokio::test]
    async fn writes_nobody_waits_for_cost_no_flush_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let seq = s.insert_new("a", &pending()).unwrap().unwrap();
        s.durable(seq).await.unwrap();
        let flushes = || s.flusher.flushes.load(Ordering::Relaxed);
        assert_eq!(flushes(), 1);
        // Marks and removals that nobody awaits: no flush.
        for i in 0..20 {
            s.update("a", |r| r.retry_later(i, None, true, i).ok())
                .unwrap();
        }
        s.insert_new("b", &pending()).unwrap();
        tokio::task::yield_now().await;
        assert_eq!(flushes(), 1);
        // The next awaited write covers them all in one flush.
        let seq = s.update("b", |r| r.creating(9).ok()).unwrap().unwrap().1;
        s.durable(seq).await.unwrap();
        assert_eq!(flushes(), 2);
        assert!(
            s.durable(seq - 1).await.is_ok(),
            "earlier writes are durable too"
        );
    }

    #[tokio::test]
    async fn update_changes_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        assert!(s.update("a", |_| None).unwrap().is_none());
        let (r, _) = s
            .update("a", |r| r.retry_later(5, None, true, 9).ok())
            .unwrap()
            .unwrap();
        assert_eq!(r.attempts, 1);
        assert_eq!(s.get("a").unwrap().unwrap(), r);
        assert!(s.update("missing", |r| Some(r.clone())).unwrap().is_none());
    }

    #[tokio::test]
    async fn the_bridged_index_follows_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        s.insert_new("b", &pending().bridged(1).unwrap()).unwrap();
        assert!(!s.is_bridged("a").unwrap());
        assert!(s.is_bridged("b").unwrap());
        s.update("a", |r| r.bridged(2)).unwrap();
        let names: Vec<String> = s.bridged().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["a", "b"]);
        s.remove("a", None).unwrap();
        assert!(!s.is_bridged("a").unwrap());
    }

    #[tokio::test]
    async fn remove_with_a_generation_spares_a_newer_onboarding() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        assert!(s.remove("a", Some(99)).unwrap().is_none());
        assert!(s.get("a").unwrap().is_some());
        assert!(s.remove("a", Some(1)).unwrap().is_some());
        assert!(s.get("a").unwrap().is_none());
        assert!(s.remove("a", None).unwrap().is_none());
    }

    #[tokio::test]
    async fn generations_are_never_handed_out_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let a = s.next_generation().unwrap();
        let b = s.next_generation().unwrap();
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn indexes_follow_the_phase() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        s.insert_new("b", &pending()).unwrap();
        assert_eq!(s.unfinished().unwrap().len(), 2);
        s.update("a", |_| Some(created())).unwrap();
        let names = |v: Vec<(String, Record)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(names(s.unfinished().unwrap()), vec!["b"]);
        assert_eq!(names(s.undelivered().unwrap()), vec!["a"]);
        assert!(s.is_undelivered("a").unwrap());
        s.update("a", |r| r.delivered(3).ok()).unwrap();
        assert!(s.undelivered().unwrap().is_empty());
        assert!(!s.is_undelivered("a").unwrap());
        s.remove("b", None).unwrap();
        assert!(s.unfinished().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_made_with_another_segment_size_opens_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let other = SEGMENT_SIZE / 2;
        assert_ne!(other, SEGMENT_SIZE);
        db_with_one_record(&c, other);
        assert_eq!(existing_segment_size(Path::new(&c.path)), Some(other));
        let (s, outcome) = Store::open(&c).unwrap();
        assert_eq!(outcome, OpenOutcome::Opened);
        assert!(s.get("old").unwrap().is_some());
        assert_eq!(existing_segment_size(Path::new(&c.path)), Some(other));
    }

    /// A database with one record, closed again (no flusher task holding it).
    fn healthy_db(c: &StoreConfig) {
        db_with_one_record(c, SEGMENT_SIZE);
    }

    fn db_with_one_record(c: &StoreConfig, segment_size: usize) {
        let db = sled::Config::new()
            .path(&c.path)
            .segment_size(segment_size)
            .open()
            .unwrap();
        db.open_tree("sensors")
            .unwrap()
            .insert("old", encode(&pending()))
            .unwrap();
        db.flush().unwrap();
    }

    fn siblings(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_store_path_that_is_a_file_is_an_error_and_the_file_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        std::fs::write(&c.path, b"not a database").unwrap();
        let e = Store::open(&c).err().expect("opening a file must fail");
        let text = e.to_string();
        assert!(text.contains(&c.path), "{text}");
        assert!(text.contains("Not a directory (os error 20)"), "{text}");
        assert_eq!(std::fs::read(&c.path).unwrap(), b"not a database");
        assert_eq!(siblings(dir.path()), vec!["db"]);
    }

    #[test]
    fn only_corruption_is_classified_as_corrupt() {
        let p = Path::new("/var/lib/onboardd/db");
        for errno in [
            libc::ENOSPC,
            libc::EIO,
            libc::EACCES,
            libc::EMFILE,
            libc::EROFS,
        ] {
            let e = sled::Error::Io(std::io::Error::from_raw_os_error(errno));
            match classify_open_error(p, e) {
                OpenFailure::Fatal(StoreError::Open { path, message }) => {
                    assert_eq!(path, p);
                    let os = std::io::Error::from_raw_os_error(errno).to_string();
                    assert_eq!(message, os);
                }
                other => panic!("errno {errno}: {other:?}"),
            }
        }
        let nospc = classify_open_error(
            p,
            sled::Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        );
        let OpenFailure::Fatal(e) = nospc else {
            panic!("{nospc:?}")
        };
        assert_eq!(
            e.to_string(),
            "cannot open the database at /var/lib/onboardd/db: No space left on device (os error 28)"
        );
        for corrupt in [
            sled::Error::Corruption { at: None, bt: () },
            sled::Error::Unsupported("cannot change the io buffer size".into()),
            sled::Error::ReportableBug("x".into()),
            sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "failed to fill buffer",
            )),
        ] {
            assert!(
                matches!(classify_open_error(p, corrupt), OpenFailure::Corrupt(_)),
                "must be corrupt"
            );
        }
    }

    #[tokio::test]
    async fn a_panic_while_opening_leaves_a_marker_and_the_next_open_moves_the_database_aside() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        healthy_db(&c);
        let db = Path::new(&c.path);
        // What happens in a release build (panic = "abort") up to the abort: the hook
        // runs and leaves the marker. Unwinding here lets the test see it.
        let caught = guarded_open(db, || -> sled::Result<()> {
            panic!("simulated sled panic")
        });
        assert!(caught.is_err());
        assert!(db.join(OPEN_PANICKED).exists(), "the hook wrote no marker");
        let (_s, outcome) = Store::open(&c).unwrap();
        let OpenOutcome::RebuiltAfterCorruption { moved_to } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(moved_to.join(OPEN_PANICKED).exists());
        assert!(!db.join(OPEN_PANICKED).exists());
    }

    #[tokio::test]
    async fn a_panic_elsewhere_leaves_no_marker() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        healthy_db(&c);
        install_open_panic_hook();
        assert!(std::panic::catch_unwind(|| panic!("not in open")).is_err());
        assert!(!Path::new(&c.path).join(OPEN_PANICKED).exists());
        let (s, outcome) = Store::open(&c).unwrap();
        assert_eq!(outcome, OpenOutcome::Opened);
        assert!(s.get("old").unwrap().is_some());
    }

    #[tokio::test]
    async fn credentials_shortcut_follows_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.insert_new("a", &pending()).unwrap();
        assert!(s.credentials("a").unwrap().is_none());
        s.update("a", |_| Some(created())).unwrap();
        assert_eq!(s.credentials("a").unwrap().unwrap().device_id, "d");
        s.remove("a", None).unwrap();
        assert!(s.credentials("a").unwrap().is_none());
    }

    #[tokio::test]
    async fn an_unreadable_record_is_quarantined_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        s.sensors.insert(b"bad", b"{not json").unwrap();
        assert!(s.get("bad").unwrap().is_none());
        assert_eq!(s.quarantine.len(), 1);
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn garbage_database_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        std::fs::create_dir_all(&c.path).unwrap();
        std::fs::write(Path::new(&c.path).join("conf"), b"\xff\xfe garbage").unwrap();
        std::fs::write(Path::new(&c.path).join("db"), vec![0xAB; 4096]).unwrap();
        let (s, outcome) = Store::open(&c).unwrap();
        assert!(
            matches!(outcome, OpenOutcome::RebuiltAfterCorruption { .. }),
            "{outcome:?}"
        );
        assert!(s.is_empty());
    }
}
