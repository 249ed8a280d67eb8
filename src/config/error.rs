//! The one error type of configuration: every variant names the key or file at fault.

use std::path::PathBuf;

/// A configuration problem, always naming the key (or the file) at fault. The
/// detail of a wrapped error is its `source()`: print the chain (`{:#}` via anyhow).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: not found (give --config FILE or set ONBOARDD_CONFIG)", path.display())]
    NotFound { path: PathBuf },
    /// The file does not parse, or a key has the wrong type or is unknown.
    #[error("config file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    #[error("invalid config")]
    Invalid(#[source] config::ConfigError),
    #[error("{key}: {message}")]
    Key { key: String, message: String },
    /// A `*_file` secret (or `claim --key-file`) cannot be read.
    #[error("{key}: cannot read {}", path.display())]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {} is empty", path.display())]
    EmptySecretFile { key: &'static str, path: PathBuf },
    #[error("log.level")]
    LogLevel(#[source] crate::logging::LogError),
}

pub(super) fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_string(),
        message: message.into(),
    }
}
