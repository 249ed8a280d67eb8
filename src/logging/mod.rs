//! Logging setup: structured journald records under systemd, readable lines on stderr elsewhere.
//!
//! [`init`] is called once at start with the `[log] level` from the config.
//!
//! - Under systemd (stderr is the journal stream named by `JOURNAL_STREAM` and the
//!   journal socket answers) every event becomes a native journal record: the level
//!   becomes `PRIORITY`, and each event field becomes a journal field of the same name
//!   upper-cased, without prefix, so that `info!(sensor_id = "abc", ...)` is found by
//!   `journalctl SENSOR_ID=abc`.
//! - Anywhere else (a terminal, a container, a test) events are formatted lines on stderr.
//!
//! In both cases warnings and errors pass through a [`RateLimited`] layer: a flood of
//! events from one log statement (a sensor re-announcing a bad payload in a loop, a
//! broker refusing every publish) is cut to a few lines per window followed by one
//! "suppressed K similar messages" line, so that it neither hides everything else nor
//! wears out the SD card. The layer is `rate_limited`; its policy, pure and driven by
//! the time passed in, is `summariser` ([`Summariser`]).
//!
//! Events naming a sensor are also kept, a few per sensor, for the gateway page
//! ([`crate::events`]).

mod rate_limited;
mod summariser;

use std::io::IsTerminal;
use std::time::Duration;

use tracing::Subscriber;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

pub use rate_limited::{Clock, RateLimited};
pub use summariser::{Summariser, Summary, Verdict};

/// Events per log statement let through in one window before the rest are counted.
pub const DEFAULT_BURST: u32 = 10;
/// Length of a rate-limit window. 30 s matches journald's own `RateLimitIntervalSec`
/// default, so our summary and journald's (much coarser) limit line up in time.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// Sets the global subscriber. `level` is an `EnvFilter` directive such as `info` or
/// `onboardd=debug,rumqttc=warn`; a non-empty `RUST_LOG` replaces it, so that an
/// operator can turn on debugging with a drop-in without editing the config.
///
/// Fails if the directive does not parse or a global subscriber is already set.
pub fn init(level: &str) -> Result<(), LogError> {
    let filter = effective_filter(level, std::env::var("RUST_LOG").ok().as_deref())?;

    // The subscriber the output layer sits on: the registry with the level filter.
    type Base = tracing_subscriber::layer::Layered<EnvFilter, tracing_subscriber::Registry>;
    let mut journal_error = None;
    let output: Box<dyn Layer<Base> + Send + Sync> = match journal_stream_is_stderr() {
        true => match journald_layer() {
            Ok(layer) => Box::new(layer),
            Err(e) => {
                journal_error = Some(e);
                stderr_layer()
            }
        },
        false => stderr_layer(),
    };

    // `try_init` also installs the `log` → `tracing` bridge: rumqttc and sled log
    // through the `log` crate and would otherwise be silent.
    tracing_subscriber::registry()
        .with(filter)
        .with(RateLimited::new(output, DEFAULT_BURST, DEFAULT_WINDOW))
        // Beside the output, not behind its rate limit: a sensor's page shows its
        // events even when a flood cut them from the journal.
        .with(crate::events::Capture::new(crate::events::Events::global()))
        .try_init()
        .map_err(LogError::Install)?;

    if let Some(e) = journal_error {
        // Only visible now that a subscriber exists; stderr still reaches the journal
        // through systemd's stream, just without structured fields.
        tracing::warn!(error = %e, "journald socket not reachable, logging plain lines to stderr");
    }
    Ok(())
}

/// Shows an error with all its sources, `outer: inner: innermost`, for log fields:
/// `tracing::warn!(error = %logging::chain(&e), …)`. Typed errors keep their detail
/// in `source()`, which `%e` alone would not show.
pub fn chain<'a>(err: &'a (dyn std::error::Error + 'static)) -> impl std::fmt::Display + 'a {
    struct Chain<'a>(&'a (dyn std::error::Error + 'static));
    impl std::fmt::Display for Chain<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.0)?;
            let mut next = self.0.source();
            while let Some(e) = next {
                write!(f, ": {e}")?;
                next = e.source();
            }
            Ok(())
        }
    }
    Chain(err)
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A bare word that is not a level (EnvFilter would take it as a target name).
    #[error("invalid log level {directive:?}: expected one of {} or target=level", LEVELS.join(", "))]
    NotALevel { directive: String },
    /// The directive does not parse as an `EnvFilter`.
    #[error("invalid {origin} {directive:?}")]
    Filter {
        /// Where the directive came from: `log.level` or `RUST_LOG`.
        origin: &'static str,
        directive: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber is already installed.
    #[error("installing the global tracing subscriber")]
    Install(#[source] tracing_subscriber::util::TryInitError),
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `[log] level` value without installing anything; config validation
/// calls it, so `check-config` refuses what `run` would.
pub fn validate_level(level: &str) -> Result<(), LogError> {
    parse_filter(level, "log.level").map(|_| ())
}

/// EnvFilter reads a bare word as a *target* name: `level = "inf0"` would parse and
/// silently log nothing but a target called `inf0`. In the config file a bare word
/// must therefore be a level; targets need the `target=level` form.
fn check_level_words(level: &str) -> Result<(), LogError> {
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[']);
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(LogError::NotALevel {
                directive: directive.to_string(),
            });
        }
    }
    Ok(())
}

/// The configured level as a filter: bare words checked, then parsed.
fn parse_filter(level: &str, origin: &'static str) -> Result<EnvFilter, LogError> {
    check_level_words(level)?;
    env_filter(level, origin)
}

fn env_filter(directive: &str, origin: &'static str) -> Result<EnvFilter, LogError> {
    EnvFilter::builder()
        .parse(directive)
        .map_err(|source| LogError::Filter {
            origin,
            directive: directive.to_string(),
            source,
        })
}

/// The filter actually used: `RUST_LOG` if set and not blank, else the configured level.
fn effective_filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, LogError> {
    match rust_log {
        Some(v) if !v.trim().is_empty() => env_filter(v, "RUST_LOG"),
        _ => parse_filter(level, "log.level"),
    }
}

/// True when stderr is the journal stream systemd connected us to.
///
/// `JOURNAL_STREAM` alone is not enough: it is inherited by children whose stderr
/// was redirected elsewhere (a shell pipeline in an `ExecStart=`, `onboardd
/// check-config 2>file` run from a unit). systemd documents comparing the
/// `device:inode` pair with stderr's own, which is what this does.
fn journal_stream_is_stderr() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = parse_journal_stream(&stream) else {
        return false;
    };
    stderr_dev_ino() == Some((dev, ino))
}

fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    // A duplicate of fd 2 wrapped in a File gives fstat through std alone.
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    Ok(tracing_journald::layer()?
        // The crate prefixes user fields with `F_` by default (F_SENSOR_ID); we want
        // the documented `journalctl SENSOR_ID=...`. Our field names are chosen not to
        // collide with journal fields (no `priority`, `message_id`, `code_*`).
        .with_field_prefix(None)
        // The crate maps INFO to NOTICE (5), which journalctl prints in bold and which
        // `-p info` users do not expect; use the syslog meaning of each level instead.
        .with_priority_mappings(PriorityMappings {
            error: Priority::Error,
            warn: Priority::Warning,
            info: Priority::Informational,
            debug: Priority::Debug,
            trace: Priority::Debug,
        })
        // argv[0] may be a path or a symlink name; the identifier is what
        // `journalctl -t onboardd` filters on, so fix it.
        .with_syslog_identifier("onboardd".to_owned()))
}

fn stderr_layer<S>() -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let ansi = std::io::stderr().is_terminal();
    Box::new(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_target(true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_overrides_the_configured_level_only_when_not_blank() {
        let f = effective_filter("info", Some("onboardd=trace")).unwrap();
        assert_eq!(f.to_string(), "onboardd=trace");
        let f = effective_filter("warn", Some("  ")).unwrap();
        assert_eq!(f.to_string(), "warn");
        let f = effective_filter("debug", None).unwrap();
        assert_eq!(f.to_string(), "debug");
        let err = effective_filter("info", Some("=nonsense=")).unwrap_err();
        assert!(err.to_string().contains("RUST_LOG"), "{err}");
        assert!(
            validate_level("loud").is_err(),
            "a bare word is a level, not a target"
        );
        assert!(effective_filter("inf0", None).is_err());
        assert!(validate_level("WARN").is_ok());
        assert!(validate_level("info,rumqttc=warn").is_ok());
    }

    #[test]
    fn parses_journal_stream_device_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("a:b"), None);
    }
}
