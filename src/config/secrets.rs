//! Secrets in the configuration: the `Secret` type that never prints itself, the
//! one reader of key and password files, and the warnings for files others can read.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

use super::error::{key_err, ConfigError};
use super::types::{Config, SecurityConfig};

/// Fewer characters than this make a configured claim key guessable offline: one
/// announce seen on the broker is enough to test guesses against, and every sensor
/// key derives from it. A generated key has 64.
pub const MIN_CLAIM_KEY_CHARS: usize = 32;

/// A secret value: never printed by `Debug`, `Display` or serialization.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is put on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            s.serialize_str("")
        } else {
            s.serialize_str("<redacted>")
        }
    }
}

/// Warns when a config file that holds a secret can be read by other users.
pub fn warn_if_readable_secrets(path: &Path, cfg: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let holds_secret = [
        cfg.qubitro.api_key.expose(),
        cfg.mqtt.password.expose(),
        cfg.security.claim_key.expose(),
    ]
    .iter()
    .any(|s| !s.is_empty() && text.contains(*s));
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    if holds_secret && mode & 0o044 != 0 {
        let msg = format!(
            "{} holds a secret and is readable by other users (mode {:o}): move the secret out of \
                it into a root-only file handed over with LoadCredential= and name it in the \
                matching *_file key (the packaged unit does this for the API key: \
                /etc/onboardd/qubitro-api-key, mode 0600). Do not chmod the config itself: the \
                service's dynamic user must read it",
            path.display(),
            mode & 0o777
        );
        tracing::warn!("{msg}");
        if !tracing::dispatcher::has_been_set() {
            eprintln!("onboardd: warning: {msg}");
        }
    }
}

/// Reads a secret from a file into `target` when `file` is set.
pub(super) fn read_secret_file(
    key: &'static str,
    file: &str,
    target: &mut Secret,
) -> Result<(), ConfigError> {
    if file.is_empty() {
        return Ok(());
    }
    *target = read_key_file(key, &secret_path(file))?;
    Ok(())
}

/// Refuses a configured claim key (after its file was read) that is too short or
/// whitespace only, naming the setting or the file it came from, never the value.
/// An empty key is no key: onboardd generates one.
pub(super) fn require_strong_claim_key(security: &SecurityConfig) -> Result<(), ConfigError> {
    let key = security.claim_key.expose();
    if key.is_empty() {
        return Ok(());
    }
    let why = if key.trim().is_empty() {
        "is whitespace only"
    } else if key.chars().count() < MIN_CLAIM_KEY_CHARS {
        "is too short"
    } else {
        return Ok(());
    };
    let advice = format!(
        "a claim key needs at least {MIN_CLAIM_KEY_CHARS} characters, not whitespace only (every sensor key derives \
            from it); use `openssl rand -hex 32`, or set neither key so onboardd generates one. Sensors flashed \
            with the old key need their new sensor key (`onboardd claim SENSOR_ID`)"
    );
    if security.claim_key_file.is_empty() {
        Err(key_err("security.claim_key", format!("{why}: {advice}")))
    } else {
        let path = secret_path(&security.claim_key_file);
        Err(key_err(
            "security.claim_key_file",
            format!("the key in {} {why}: {advice}", path.display()),
        ))
    }
}

/// Where a `*_file` secret is: a relative name is looked up in
/// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) when that is set.
fn secret_path(file: &str) -> PathBuf {
    let mut path = PathBuf::from(file);
    if path.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            path = Path::new(&dir).join(path);
        }
    }
    path
}

/// Warns (naming the file and the fix) when a `*_file` secret can be read by
/// group or others: anyone on the gateway could take the key.
pub fn warn_if_loose_secret_files(cfg: &Config) {
    use std::os::unix::fs::PermissionsExt;
    for (key, file) in [
        ("mqtt.password_file", &cfg.mqtt.password_file),
        ("qubitro.api_key_file", &cfg.qubitro.api_key_file),
        ("security.claim_key_file", &cfg.security.claim_key_file),
        ("http.password_file", &cfg.http.password_file),
        ("mqtt.key_file", &cfg.mqtt.key_file),
        ("http.key_file", &cfg.http.key_file),
    ] {
        if file.is_empty() {
            continue;
        }
        let path = secret_path(file);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o044 != 0 {
            tracing::warn!(
                key,
                path = %path.display(),
                mode = %format!("{mode:o}"),
                "{key}: {} is readable by group or others (mode {mode:o}): make it owner-only \
                    (chmod 600, owned by the user that reads it) or hand it over with systemd's \
                    LoadCredential= (the packaged unit reads /etc/onboardd/qubitro-api-key, mode \
                    0600 root, that way)",
                path.display()
            );
        }
    }
}

/// Reads a secret (API key, password, claim key) from `path`: the whole file
/// without its trailing line ending, which must leave something. `key` names the
/// setting in errors. The one place secret files are read, for the config's
/// `*_file` keys and for `onboardd claim --key-file`.
pub fn read_key_file(key: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(ConfigError::EmptySecretFile {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_read_once_trimmed_and_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "fleet\r\n").unwrap();
        assert_eq!(read_key_file("--key-file", &f).unwrap().expose(), "fleet");
        std::fs::write(&f, "\n").unwrap();
        let err = read_key_file("--key-file", &f).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::EmptySecretFile {
                    key: "--key-file",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = read_key_file("qubitro.api_key_file", &dir.path().join("none")).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::SecretFile {
                    key: "qubitro.api_key_file",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("qubitro.api_key_file: cannot read "),
            "{err}"
        );
    }

    fn security(claim_key: &str, claim_key_file: &str) -> SecurityConfig {
        SecurityConfig {
            require_claim: true,
            claim_key: Secret::new(claim_key),
            claim_key_file: claim_key_file.to_string(),
            allow_sensor_ids: vec![],
            deny_sensor_ids: vec![],
            allow_brands: vec![],
            allow_models: vec![],
            new_sensor_cooldown_s: 0,
            max_new_devices_per_hour: 0,
        }
    }

    #[test]
    fn a_claim_key_needs_32_characters_not_all_whitespace_and_errors_never_show_it() {
        for ok in [
            "",
            &"k".repeat(32),
            &"é".repeat(32),
            " padded key of thirty-two chars ",
        ] {
            assert!(
                require_strong_claim_key(&security(ok, "")).is_ok(),
                "{ok:?}"
            );
        }
        let short = "k".repeat(31);
        let blank = " \t\n".repeat(20);
        for (weak, why) in [
            (short.as_str(), "is too short"),
            (blank.as_str(), "is whitespace only"),
        ] {
            let err = require_strong_claim_key(&security(weak, ""))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("security.claim_key: {why}: ")),
                "{err}"
            );
            assert!(!err.contains(&short), "{err}");
            let err = require_strong_claim_key(&security(weak, "/etc/k"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!(
                    "security.claim_key_file: the key in /etc/k {why}: "
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn secret_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "QB_from_file\n").unwrap();
        let c = Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key_file = \"{}\"",
            f.display()
        ))
        .unwrap();
        assert_eq!(c.qubitro.api_key.expose(), "QB_from_file");
    }
}
