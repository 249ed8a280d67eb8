//! Files the tests make and check on disk: who owns what the daemon and its CLI leave
//! behind in a store (a file left to root would lock the service's own user out of it),
//! and a config whose secret other users could read (which onboardd warns about).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `dir/c.toml`, a minimal config holding the API key `secret`, left readable by every
/// user (mode 0644).
pub fn config_with_a_readable_secret(dir: &Path, secret: &str) -> PathBuf {
    let path = dir.join("c.toml");
    let text = format!("[qubitro]\nproject_id = \"p\"\napi_key = \"{secret}\"\n");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path
}

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
