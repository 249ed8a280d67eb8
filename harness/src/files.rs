//! What tests check of files on disk: who owns what the daemon and its CLI leave behind
//! in a store (a file left to root would lock the service's own user out of it).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Every path below `dir` (directories included, symlinks not followed) with its owner uid.
pub fn owners_below(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries.flatten() {
        let p = entry.path();
        let meta =
            std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        out.push((p.display().to_string(), meta.uid()));
        if meta.is_dir() {
            out.extend(owners_below(&p));
        }
    }
    out
}
