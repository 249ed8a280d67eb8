//! Opening the database: recovery from corruption (move-aside), sled's panics
//! while opening, its segment size, and the retry on a lingering lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::commit::Flusher;
use super::layout::Layout;
use super::{OpenOutcome, Store, StoreError};
use crate::config::StoreConfig;

impl Store {
    /// Opens (or creates) the database in the state directory `store.path` and
    /// starts its flusher; needs a tokio runtime. sled lives in `{store.path}/db`
    /// (see [`super::layout`]); a database of the previous layout, directly in
    /// `store.path`, is first moved in there.
    ///
    /// Only a database that sled cannot read is moved aside (to
    /// `{store.path}/db.corrupt-<secs>`) and replaced by an empty one; the lookup
    /// before create then adopts each sensor's existing Qubitro device instead of
    /// duplicating it. "Cannot read" means sled reported corruption, an unsupported
    /// format or a bug, its `conf` file cannot be parsed, or it panicked while
    /// opening (see [`OPEN_PANICKED`]). Every other failure (no space, I/O error, no
    /// permission, too many open files, a path that is not a directory) is returned
    /// as [`StoreError::Open`] naming the path and the OS error, and nothing on disk
    /// is touched: moving a healthy database aside would lose the acknowledged
    /// Pending/Creating sensors, and each restart by systemd would make another copy.
    ///
    /// A lock held by another process is retried for a moment (right after a kill -9
    /// the old lock can linger briefly), then reported clearly.
    pub fn open(cfg: &StoreConfig) -> Result<(Store, OpenOutcome), StoreError> {
        let path = Path::new(&cfg.path);
        let opened = Store::open_layout(&Layout::new(path, path), cfg.cache_capacity_bytes)?;
        opened
            .0
            .set_last_seen_every(Duration::from_secs(cfg.last_seen_flush_s.max(1)));
        Ok(opened)
    }

    /// As [`Store::open`], for the state directory `cfg.path` reached through
    /// another path `dir` (the CLI's `/proc/self/cwd`); messages name `cfg.path`.
    pub fn open_via(dir: &Path, cfg: &StoreConfig) -> Result<(Store, OpenOutcome), StoreError> {
        let layout = Layout::new(dir, Path::new(&cfg.path));
        let opened = Store::open_layout(&layout, cfg.cache_capacity_bytes)?;
        opened
            .0
            .set_last_seen_every(Duration::from_secs(cfg.last_seen_flush_s.max(1)));
        Ok(opened)
    }

    fn open_layout(layout: &Layout, cache: u64) -> Result<(Store, OpenOutcome), StoreError> {
        if let Ok(meta) = std::fs::metadata(layout.dir()) {
            if !meta.is_dir() {
                return Err(StoreError::Open {
                    message: format!(
                        "{}; store.path must name a directory",
                        std::io::Error::from_raw_os_error(libc::ENOTDIR)
                    ),
                    path: layout.shown_dir().to_path_buf(),
                });
            }
        }
        // An error here is about the directory (no permission, no space), as it
        // would be for sled: named the same way, and nothing is moved aside.
        let moved_in = layout
            .move_in_previous_layout()
            .map_err(|io| StoreError::Open {
                path: layout.shown_db(),
                message: io.to_string(),
            })?;
        if moved_in {
            tracing::info!(
                path = %layout.shown_db().display(),
                "moved the database into {} (the layout of this version)",
                layout.shown_db().display()
            );
        }
        let path = layout.db();
        let marker = path.join(OPEN_PANICKED);
        let first = if marker.exists() {
            Err(OpenFailure::Corrupt(format!(
                "an earlier start panicked inside sled while opening it ({} exists)",
                layout.shown(&marker).display()
            )))
        } else {
            open_with_retry(layout, cache)
        };
        let (db, outcome) = match first {
            Ok(db) => (db, OpenOutcome::Opened),
            Err(OpenFailure::Fatal(e)) => return Err(e),
            Err(OpenFailure::Corrupt(why)) => {
                tracing::error!(
                    path = %layout.shown_db().display(),
                    error = %why,
                    concat!(
                        "DATABASE UNREADABLE: moving it aside and starting empty; ",
                        "sensors will be re-adopted from Qubitro on their next announce"
                    )
                );
                let moved_to = layout.move_db_aside().map_err(|io| StoreError::Open {
                    path: layout.shown_db(),
                    message: format!("it is unreadable ({why}), and moving it aside failed: {io}"),
                })?;
                let moved_to = layout.shown(&moved_to);
                tracing::error!(moved_to = %moved_to.display(), "the unreadable database is kept at {}", moved_to.display());
                let db = match open_with_retry(layout, cache) {
                    Ok(db) => db,
                    Err(OpenFailure::Fatal(e)) => return Err(e),
                    Err(OpenFailure::Corrupt(why)) => {
                        return Err(StoreError::Open {
                            path: layout.shown_db(),
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
        let (flusher, closer) = Flusher::start(&db);
        let store = Store {
            db: db.clone(),
            sensors,
            pending,
            undelivered,
            quarantine,
            creds,
            bridged,
            flusher,
            last_seen: Arc::new(super::last_seen::LastSeen::new()),
            census: Arc::default(),
            dir: layout.db(),
            _closer: Arc::new(closer.drop_guard()),
        };
        // The mark goes before this run writes anything: from here on a crash means
        // the next open reconciles.
        let mark = layout.db().join(super::CLEAN_STOP_FILE);
        let open_error = |io: std::io::Error| StoreError::Open {
            path: layout.shown(&mark),
            message: io.to_string(),
        };
        // The counts an orderly stop left, read before the mark goes.
        let counted = std::fs::read_to_string(&mark)
            .ok()
            .and_then(|m| super::census::Census::decode(&m));
        match std::fs::remove_file(&mark) {
            Ok(()) => {
                std::fs::File::open(layout.db())
                    .and_then(|d| d.sync_all())
                    .map_err(open_error)?;
                match counted {
                    Some(counts) => store.census.seed(counts),
                    None => store.count_states()?,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let added = store.reconcile_indexes()?;
                if added > 0 {
                    tracing::warn!(
                        added,
                        "restored {added} index entries of records written just before an unclean stop"
                    );
                }
            }
            Err(e) => return Err(open_error(e)),
        }
        Ok((store, outcome))
    }
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

fn open_with_retry(layout: &Layout, cache: u64) -> Result<sled::Db, OpenFailure> {
    let db = layout.db();
    let path = db.as_path();
    let shown = layout.shown_db();
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
                    return Err(OpenFailure::Fatal(StoreError::Locked { path: shown }));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(Err(e)) => return Err(classify_open_error(&shown, e)),
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
    use super::super::test_support::{cfg, created, pending};
    use super::super::{encode, ASIDE_PREFIX, DB_DIR};
    use super::*;

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

    // /metrics reports this from the first scrape, before anything was written.
    #[tokio::test]
    async fn a_new_database_has_a_size_on_disk_and_it_grows_with_durable_records() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let empty = s.size_on_disk().unwrap();
        assert!(empty > 0, "sled's config file is on disk from the start");
        for i in 0..50 {
            s.insert_new(&format!("sensor-{i}"), &created()).unwrap();
        }
        let seq = s.insert_new("last", &created()).unwrap().unwrap();
        s.durable(seq).await.unwrap();
        assert!(s.size_on_disk().unwrap() > empty);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_made_with_another_segment_size_opens_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let other = SEGMENT_SIZE / 2;
        assert_ne!(other, SEGMENT_SIZE);
        let db = Path::new(&c.path).join(DB_DIR);
        db_with_one_record(&db, other);
        assert_eq!(existing_segment_size(&db), Some(other));
        let (s, outcome) = Store::open(&c).unwrap();
        assert_eq!(outcome, OpenOutcome::Opened);
        assert!(s.get("old").unwrap().is_some());
        assert_eq!(existing_segment_size(&db), Some(other));
    }

    /// A database with one record, closed again (no flusher task holding it).
    fn healthy_db(c: &StoreConfig) {
        db_with_one_record(&Path::new(&c.path).join(DB_DIR), SEGMENT_SIZE);
    }

    /// sled's files directly in `path`: `{store.path}/db`, or `store.path` itself as
    /// the previous version kept them.
    fn db_with_one_record(path: &Path, segment_size: usize) {
        let db = sled::Config::new()
            .path(path)
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
        let db = &Path::new(&c.path).join(DB_DIR);
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
        assert!(!Path::new(&c.path).join(DB_DIR).join(OPEN_PANICKED).exists());
        let (s, outcome) = Store::open(&c).unwrap();
        assert_eq!(outcome, OpenOutcome::Opened);
        assert!(s.get("old").unwrap().is_some());
    }

    /// Noise where sled's `conf` and `db` are: what a power cut on a worn SD card
    /// leaves.
    fn garbage_at(path: &Path) {
        std::fs::create_dir_all(path).unwrap();
        std::fs::write(path.join("conf"), b"\xff\xfe garbage").unwrap();
        std::fs::write(path.join("db"), vec![0xAB; 4096]).unwrap();
    }

    /// The state directory keeps its name and its other files: only `db/` moves,
    /// to a sibling inside it (a rename that works where the directory itself is a
    /// systemd `StateDirectory=` or a Docker volume).
    fn assert_moved_aside_inside(state: &Path, outcome: &OpenOutcome) {
        let OpenOutcome::RebuiltAfterCorruption { moved_to } = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(moved_to.parent(), Some(state), "{}", moved_to.display());
        let name = moved_to.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(ASIDE_PREFIX), "{name}");
        assert!(
            moved_to.join("db").is_file(),
            "the unreadable files went with it"
        );
        assert_eq!(std::fs::read(state.join("claim-key")).unwrap(), b"key\n");
        assert!(
            state.join(DB_DIR).join("conf").is_file(),
            "a new database in db/"
        );
    }

    #[tokio::test]
    async fn garbage_database_is_moved_aside_inside_the_state_directory_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let state = Path::new(&c.path);
        garbage_at(&state.join(DB_DIR));
        std::fs::write(state.join("claim-key"), "key\n").unwrap();
        let (s, outcome) = Store::open(&c).unwrap();
        assert_moved_aside_inside(state, &outcome);
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn garbage_in_the_previous_layout_is_moved_in_then_aside_inside_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let state = Path::new(&c.path);
        garbage_at(state);
        std::fs::write(state.join("claim-key"), "key\n").unwrap();
        let (s, outcome) = Store::open(&c).unwrap();
        assert_moved_aside_inside(state, &outcome);
        assert!(s.is_empty());
    }

    // Multi-threaded: sled's own flusher thread of the first open must let go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_of_the_previous_layout_is_moved_into_db_and_its_sensor_survives() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let state = Path::new(&c.path);
        // As the previous version left it: sled directly in store.path, the key beside.
        db_with_one_record(state, SEGMENT_SIZE);
        std::fs::write(state.join("claim-key"), "key\n").unwrap();
        let (s, outcome) = Store::open(&c).unwrap();
        assert_eq!(outcome, OpenOutcome::Opened);
        assert_eq!(s.get("old").unwrap().unwrap().state, pending().state);
        assert_eq!(siblings(state), ["claim-key", "db"]);
        assert!(state.join(DB_DIR).join("conf").is_file());
    }
}
