//! Where things live in the state directory (`store.path`): sled in `db/`, the
//! claim key beside it, unreadable databases moved aside to `db.corrupt-<secs>`,
//! and the one-time move of a database from the previous layout into `db/`.
//!
//! The state directory itself is never renamed: under systemd's `StateDirectory=`
//! with `DynamicUser=` and `ProtectSystem=strict` its parent is read-only, and a
//! Docker volume's mount point cannot be renamed either. Every rename here happens
//! inside it, so it works in both.

use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use super::OPEN_PANICKED;

/// sled's directory inside the state directory.
pub const DB_DIR: &str = "db";
/// Name prefix of a database moved aside because sled could not read it.
pub const ASIDE_PREFIX: &str = "db.corrupt-";
/// Where the previous layout's files gather before they become `db/`. While it
/// exists a move is unfinished, and the next start finishes it.
const STAGING: &str = "db.moving-in";

/// A state directory, and how messages name it: the CLI reaches the packaged one
/// through `/proc/self/cwd` (see `control::client`), but an operator must read the
/// configured path.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    dir: PathBuf,
    shown: PathBuf,
}

impl Layout {
    pub(super) fn new(dir: &Path, shown: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            shown: shown.to_path_buf(),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state directory as the operator configured it.
    pub(super) fn shown_dir(&self) -> &Path {
        &self.shown
    }

    /// sled's directory.
    pub(super) fn db(&self) -> PathBuf {
        self.dir.join(DB_DIR)
    }

    /// sled's directory as the operator knows it.
    pub(super) fn shown_db(&self) -> PathBuf {
        self.shown.join(DB_DIR)
    }

    /// `path` (inside the directory) as the operator knows it.
    pub(super) fn shown(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.dir) {
            Ok(rel) => self.shown.join(rel),
            Err(_) => path.to_path_buf(),
        }
    }

    /// Moves the unreadable `db/` aside to a fresh `db.corrupt-<unix seconds>` (a
    /// suffix when that name is taken: two in the same second), and returns it.
    pub(super) fn move_db_aside(&self) -> io::Result<PathBuf> {
        let secs = crate::clock::system_ms() / 1000;
        let mut to = self.dir.join(format!("{ASIDE_PREFIX}{secs}"));
        let mut n = 1;
        while to.symlink_metadata().is_ok() {
            n += 1;
            to = self.dir.join(format!("{ASIDE_PREFIX}{secs}-{n}"));
        }
        std::fs::rename(self.db(), &to)?;
        sync_dir(&self.dir)?;
        Ok(to)
    }

    /// Moves a database of the previous layout (sled's files directly in the state
    /// directory) into `db/`. Returns whether there was one.
    ///
    /// Crash-safe: the files go one rename at a time into a staging directory,
    /// which becomes `db/` by one last rename. sled names its main file `db` too,
    /// so `db/` cannot be created while that file is there; staging avoids that.
    /// A power cut leaves every file either in the state directory or in staging,
    /// and the next start, seeing staging, moves the rest and finishes.
    pub(super) fn move_in_previous_layout(&self) -> io::Result<bool> {
        let staging = self.dir.join(STAGING);
        let db = self.db();
        let db_is_file = db.symlink_metadata().is_ok_and(|m| m.is_file());
        let unfinished = staging.symlink_metadata().is_ok();
        let loose = !db.exists() && self.sled_files_in_dir()?.next().is_some();
        if !(db_is_file || unfinished || loose) {
            return Ok(false);
        }
        if !unfinished {
            std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
        }
        for name in self.sled_files_in_dir()?.collect::<Vec<_>>() {
            std::fs::rename(self.dir.join(&name), staging.join(&name))?;
        }
        sync_dir(&staging)?;
        sync_dir(&self.dir)?;
        std::fs::rename(&staging, &db)?;
        sync_dir(&self.dir)?;
        Ok(true)
    }

    /// The names of sled's own files lying directly in the state directory.
    fn sled_files_in_dir(&self) -> io::Result<impl Iterator<Item = String>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new().into_iter()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // `db` only as sled's file: as a directory it is already the new layout.
            let is_db_file = name == DB_DIR && entry.file_type()?.is_file();
            if is_db_file || is_sled_file(&name) {
                out.push(name);
            }
        }
        Ok(out.into_iter())
    }
}

/// sled 0.34's files besides `db` (and the marker of a panic while opening, which
/// belongs to the database it is about).
fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "blobs" | OPEN_PANICKED) || name.starts_with("snap.")
}

/// Whether there is a database in `dir`, in either layout (or half-way between).
pub fn exists(dir: &Path) -> bool {
    let l = Layout::new(dir, dir);
    l.db().exists()
        || dir.join(STAGING).exists()
        || l.sled_files_in_dir().is_ok_and(|mut f| f.next().is_some())
}

/// The databases moved aside in `dir`, oldest name first.
pub fn moved_aside(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(ASIDE_PREFIX)
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Makes a rename in `dir` survive a power cut.
fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The previous layout, made by sled itself: its files directly in `dir`.
    fn previous_layout(dir: &Path) {
        let db = sled::Config::new().path(dir).open().unwrap();
        db.insert("k", "v").unwrap();
        db.flush().unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn reads_back(db: &Path) -> bool {
        let db = sled::Config::new().path(db).open().unwrap();
        db.get("k").unwrap().as_deref() == Some(&b"v"[..])
    }

    #[test]
    fn a_database_of_the_previous_layout_moves_into_db_and_the_claim_key_stays() {
        let dir = tempfile::tempdir().unwrap();
        previous_layout(dir.path());
        std::fs::write(dir.path().join("claim-key"), "k\n").unwrap();
        let l = Layout::new(dir.path(), dir.path());
        assert!(exists(dir.path()));
        assert!(l.move_in_previous_layout().unwrap());
        assert_eq!(names(dir.path()), ["claim-key", "db"]);
        assert!(reads_back(&l.db()));
        assert!(!l.move_in_previous_layout().unwrap(), "done once");
    }

    #[test]
    fn a_move_cut_short_at_any_file_is_finished_by_the_next_start() {
        let probe = tempfile::tempdir().unwrap();
        previous_layout(probe.path());
        let files = Layout::new(probe.path(), probe.path())
            .sled_files_in_dir()
            .unwrap()
            .count();
        // A power cut after k of the file moves, for every k (before the last rename).
        for k in 0..=files {
            let dir = tempfile::tempdir().unwrap();
            previous_layout(dir.path());
            let l = Layout::new(dir.path(), dir.path());
            let staging = dir.path().join(STAGING);
            std::fs::create_dir(&staging).unwrap();
            for name in l.sled_files_in_dir().unwrap().take(k) {
                std::fs::rename(dir.path().join(&name), staging.join(&name)).unwrap();
            }
            assert!(exists(dir.path()), "after {k} moves");
            assert!(l.move_in_previous_layout().unwrap(), "after {k} moves");
            assert_eq!(names(dir.path()), ["db"], "after {k} moves");
            assert!(reads_back(&l.db()), "after {k} moves");
        }
    }

    #[test]
    fn the_new_layout_and_an_empty_directory_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path(), dir.path());
        assert!(!exists(dir.path()));
        assert!(!l.move_in_previous_layout().unwrap());
        assert!(names(dir.path()).is_empty());
        previous_layout(&l.db());
        assert!(!l.move_in_previous_layout().unwrap());
        assert_eq!(names(dir.path()), ["db"]);
    }

    #[test]
    fn a_database_moved_aside_twice_in_a_second_gets_two_names_inside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path(), Path::new("/var/lib/onboardd"));
        std::fs::create_dir(l.db()).unwrap();
        let a = l.move_db_aside().unwrap();
        std::fs::create_dir(l.db()).unwrap();
        let b = l.move_db_aside().unwrap();
        assert_ne!(a, b);
        assert_eq!(moved_aside(dir.path()).unwrap().len(), 2);
        assert_eq!(a.parent(), Some(dir.path()));
        let shown = l.shown(&a).display().to_string();
        assert!(
            shown.starts_with("/var/lib/onboardd/db.corrupt-"),
            "{shown}"
        );
    }
}
