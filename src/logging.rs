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
//! wears out the SD card.

use std::collections::HashMap;
use std::hash::Hash;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::{Callsite, Identifier};
use tracing::field::{FieldSet, Value};
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

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

/// Counts events per key (a log statement) in fixed windows and decides which pass.
///
/// Pure bookkeeping with the time passed in, so the policy is testable without a
/// subscriber or a clock.
#[derive(Debug)]
pub struct Summariser<K> {
    /// Events let through per key and window.
    burst: u32,
    /// Window length; a key's window starts at its first event after the previous one ended.
    window: Duration,
    /// Only keys seen in a live window (expired ones are dropped at the next sweep),
    /// so memory is bounded by the number of log statements that fired recently.
    entries: HashMap<K, Entry>,
    /// Sweeping every key on every event would be wasted work during a flood.
    next_sweep: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    passed: u32,
    suppressed: u64,
}

/// What [`Summariser::check`] says about one event.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict<K> {
    /// Whether the event itself should be written.
    pub pass: bool,
    /// Summaries that are due now, to be written before the event.
    pub summaries: Vec<Summary<K>>,
}

/// "K events from `key` were dropped between `since` and now".
#[derive(Debug, PartialEq, Eq)]
pub struct Summary<K> {
    pub key: K,
    pub suppressed: u64,
    /// Time from the start of the window that suppressed them to the summary.
    pub over: Duration,
}

impl<K: Eq + Hash + Clone> Summariser<K> {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            entries: HashMap::new(),
            next_sweep: None,
        }
    }

    /// Records one event for `key` at `now`.
    pub fn check(&mut self, key: K, now: Instant) -> Verdict<K> {
        let mut summaries = Vec::new();
        let window = self.window;

        let entry = self.entries.entry(key.clone()).or_insert(Entry {
            window_start: now,
            passed: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(entry.window_start) >= window {
            if entry.suppressed > 0 {
                summaries.push(Summary {
                    key: key.clone(),
                    suppressed: entry.suppressed,
                    over: now.saturating_duration_since(entry.window_start),
                });
            }
            *entry = Entry {
                window_start: now,
                passed: 0,
                suppressed: 0,
            };
        }
        let pass = if entry.passed < self.burst {
            entry.passed += 1;
            true
        } else {
            entry.suppressed += 1;
            false
        };

        // Without this sweep a flood that simply stops would never be summarised
        // (its own key never fires again). Any later event, from anywhere, flushes it.
        if self.next_sweep.is_none_or(|t| now >= t) {
            self.next_sweep = Some(now + window.min(Duration::from_secs(1)));
            self.entries.retain(|k, e| {
                let expired = now.saturating_duration_since(e.window_start) >= window;
                if expired && e.suppressed > 0 {
                    summaries.push(Summary {
                        key: k.clone(),
                        suppressed: e.suppressed,
                        over: now.saturating_duration_since(e.window_start),
                    });
                }
                !expired
            });
        }
        Verdict { pass, summaries }
    }
}

/// Source of "now" for [`RateLimited`]; replaceable so tests control time.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// A layer that forwards everything to `inner` but rate-limits WARN and ERROR events
/// per callsite with a [`Summariser`], writing a summary event through `inner` when
/// a window that dropped events is over.
///
/// It wraps the output layer instead of filtering in front of it because the
/// summary must be written without going back through the dispatcher (re-entrant
/// dispatch from inside a layer is dropped by `tracing` for scoped subscribers).
pub struct RateLimited<L> {
    inner: L,
    state: Mutex<Summariser<Identifier>>,
    clock: Clock,
}

impl<L> RateLimited<L> {
    pub fn new(inner: L, burst: u32, window: Duration) -> Self {
        Self::with_clock(inner, burst, window, Arc::new(Instant::now))
    }

    pub fn with_clock(inner: L, burst: u32, window: Duration, clock: Clock) -> Self {
        Self {
            inner,
            state: Mutex::new(Summariser::new(burst, window)),
            clock,
        }
    }
}

/// INFO and below are per-sensor progress records ("sensor X onboarded") that must
/// all stay searchable by SENSOR_ID; floods worth cutting are warnings and errors.
fn is_rate_limited(level: &Level) -> bool {
    // tracing orders levels by verbosity: ERROR < WARN < INFO < DEBUG < TRACE.
    *level <= Level::WARN
}

impl<S, L> Layer<S> for RateLimited<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        if !is_rate_limited(meta.level()) {
            self.inner.on_event(event, ctx);
            return;
        }
        let now = (self.clock)();
        let verdict = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.check(meta.callsite(), now)
        };
        // The lock is released before writing: the inner layer does I/O.
        for summary in &verdict.summaries {
            write_summary(&self.inner, summary, ctx.clone());
        }
        if verdict.pass {
            self.inner.on_event(event, ctx);
        }
    }

    // Everything else is forwarded unchanged; the list mirrors tracing-subscriber's
    // own forwarding for `Option<L>` so that span bookkeeping in `inner` still works.
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber)
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber)
    }
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }
    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.enabled(metadata, ctx)
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.inner.max_level_hint()
    }
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_new_span(attrs, id, ctx)
    }
    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_record(span, values, ctx)
    }
    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_follows_from(span, follows, ctx)
    }
    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.event_enabled(event, ctx)
    }
    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx)
    }
    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx)
    }
    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx)
    }
    fn on_id_change(&self, old: &tracing::span::Id, new: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx)
    }
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else {
            // SAFETY: forwarded unchanged; the inner layer upholds the contract.
            unsafe { self.inner.downcast_raw(id) }
        }
    }
}

/// Field names of the summary event; in the journal they become MESSAGE,
/// SUPPRESSED and SUPPRESSED_FROM.
const SUMMARY_FIELDS: &[&str] = &["message", "suppressed", "suppressed_from"];

/// The summary is an event of its own, so it needs a `'static` callsite. One per
/// level, so that a summary of dropped errors is itself an error (and keeps its
/// journal PRIORITY) and a summary of warnings a warning.
struct SummaryCallsite(&'static Metadata<'static>);

impl Callsite for SummaryCallsite {
    // Never registered with tracing's callsite registry: summaries are handed
    // straight to the output layer, so there is no interest to cache.
    fn set_interest(&self, _interest: Interest) {}
    fn metadata(&self) -> &Metadata<'_> {
        self.0
    }
}

macro_rules! summary_callsite {
    ($cs:ident, $meta:ident, $level:expr) => {
        static $cs: SummaryCallsite = SummaryCallsite(&$meta);
        static $meta: Metadata<'static> = Metadata::new(
            "suppressed similar events",
            "onboardd::logging",
            $level,
            Some(file!()),
            Some(line!()),
            Some(module_path!()),
            FieldSet::new(SUMMARY_FIELDS, Identifier(&$cs)),
            Kind::EVENT,
        );
    };
}
summary_callsite!(SUMMARY_ERROR_CS, SUMMARY_ERROR, Level::ERROR);
summary_callsite!(SUMMARY_WARN_CS, SUMMARY_WARN, Level::WARN);

fn write_summary<S, L>(inner: &L, summary: &Summary<Identifier>, ctx: Context<'_, S>)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
{
    // The key is the callsite of the dropped events; its metadata says where they
    // came from so the summary can be traced back to one log statement.
    let dropped = summary.key.0.metadata();
    let meta: &'static Metadata<'static> = if *dropped.level() == Level::ERROR {
        &SUMMARY_ERROR
    } else {
        &SUMMARY_WARN
    };
    let origin = match (dropped.file(), dropped.line()) {
        (Some(file), Some(line)) => format!("{file}:{line}"),
        _ => dropped.target().to_owned(),
    };
    let fields = meta.fields();
    let field = |name| {
        fields
            .field(name)
            .expect("summary field is in SUMMARY_FIELDS")
    };
    let (f_message, f_suppressed, f_from) = (
        field("message"),
        field("suppressed"),
        field("suppressed_from"),
    );
    let message = format_args!(
        "suppressed {} similar messages from {} ({}) over the last {}s",
        summary.suppressed,
        origin,
        dropped.target(),
        summary.over.as_secs().max(1)
    );
    let values = [
        (&f_message, Some(&message as &dyn Value)),
        (&f_suppressed, Some(&summary.suppressed as &dyn Value)),
        (&f_from, Some(&origin.as_str() as &dyn Value)),
    ];
    let value_set = fields.value_set(&values);
    inner.on_event(&Event::new(meta, &value_set), ctx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::field::{Field, Visit};

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn lets_the_first_burst_through_then_suppresses_the_rest_of_the_window() {
        let t0 = Instant::now();
        let mut s = Summariser::new(3, Duration::from_secs(10));
        let passed: Vec<bool> = (0..10).map(|i| s.check("a", at(t0, i)).pass).collect();
        assert_eq!(
            passed,
            [true, true, true, false, false, false, false, false, false, false]
        );
    }

    #[test]
    fn summarises_the_suppressed_count_when_the_next_window_starts() {
        let t0 = Instant::now();
        let mut s = Summariser::new(2, Duration::from_secs(10));
        for i in 0..1000 {
            assert!(s.check("a", at(t0, i)).summaries.is_empty());
        }
        let v = s.check("a", at(t0, 10_000));
        assert!(v.pass, "the first event of a new window is written");
        assert_eq!(
            v.summaries,
            vec![Summary {
                key: "a",
                suppressed: 998,
                over: Duration::from_secs(10)
            }]
        );
        // The count was reset with the window.
        let v = s.check("a", at(t0, 10_001));
        assert!(v.pass && v.summaries.is_empty());
    }

    #[test]
    fn keys_are_limited_independently() {
        let t0 = Instant::now();
        let mut s = Summariser::new(1, Duration::from_secs(10));
        assert!(s.check("a", t0).pass);
        assert!(!s.check("a", t0).pass);
        assert!(
            s.check("b", t0).pass,
            "a flood from one statement must not mute another"
        );
    }

    #[test]
    fn a_flood_that_stops_is_summarised_by_any_later_event() {
        let t0 = Instant::now();
        let mut s = Summariser::new(1, Duration::from_secs(10));
        for i in 0..5 {
            s.check("flood", at(t0, i));
        }
        let v = s.check("other", at(t0, 12_000));
        assert!(v.pass);
        assert_eq!(
            v.summaries,
            vec![Summary {
                key: "flood",
                suppressed: 4,
                over: Duration::from_secs(12)
            }]
        );
        // Summarised once only, and the expired key is forgotten.
        assert!(s.check("other", at(t0, 14_000)).summaries.is_empty());
        assert!(!s.entries.contains_key("flood"));
    }

    #[test]
    fn a_quiet_statement_is_never_summarised() {
        let t0 = Instant::now();
        let mut s = Summariser::new(5, Duration::from_secs(10));
        for i in 0..50 {
            // One event every 2 s: never more than 5 per window.
            let v = s.check("slow", at(t0, i * 2_000));
            assert!(v.pass && v.summaries.is_empty(), "event {i}");
        }
    }

    #[test]
    fn memory_is_bounded_by_recently_active_statements() {
        let t0 = Instant::now();
        let mut s = Summariser::new(5, Duration::from_secs(1));
        for i in 0..1000u64 {
            s.check(i, at(t0, i * 100));
        }
        assert!(s.entries.len() <= 20, "{} entries kept", s.entries.len());
    }

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

    /// One written event: level, message, other fields as (name, value).
    type Written = (Level, String, Vec<(String, String)>);

    /// Records everything the wrapped layer writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Written>>>);

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            struct V(String, Vec<(String, String)>);
            impl Visit for V {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    } else {
                        self.1.push((field.name().to_owned(), format!("{value:?}")));
                    }
                }
            }
            let mut v = V(String::new(), Vec::new());
            event.record(&mut v);
            self.0
                .lock()
                .unwrap()
                .push((*event.metadata().level(), v.0, v.1));
        }
    }

    #[test]
    fn the_layer_writes_a_burst_then_one_summary_with_the_origin_of_the_flood() {
        let capture = Capture::default();
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || *now.lock().unwrap())
        };
        let layer = RateLimited::with_clock(capture.clone(), 3, Duration::from_secs(30), clock);
        let subscriber = tracing_subscriber::registry().with(layer);

        tracing::subscriber::with_default(subscriber, || {
            for i in 0..5000 {
                tracing::warn!(sensor_id = "abc", attempt = i, "broker refused publish");
                tracing::info!(sensor_id = "abc", "info is never limited");
            }
            *now.lock().unwrap() += Duration::from_secs(31);
            tracing::error!("something else entirely");
        });

        let events = capture.0.lock().unwrap();
        let warns: Vec<_> = events.iter().filter(|e| e.0 == Level::WARN).collect();
        let infos = events.iter().filter(|e| e.0 == Level::INFO).count();
        assert_eq!(infos, 5000);
        assert_eq!(warns.len(), 4, "3 of the burst and one summary: {warns:#?}");
        assert!(warns[..3].iter().all(|w| w.1 == "broker refused publish"));
        let summary = warns[3];
        assert!(
            summary
                .1
                .starts_with("suppressed 4997 similar messages from src/logging.rs:"),
            "{}",
            summary.1
        );
        assert!(summary
            .2
            .contains(&("suppressed".to_owned(), "4997".to_owned())));
        // The summary comes before the event that revealed it.
        assert_eq!(events.last().unwrap().1, "something else entirely");
    }

    #[test]
    fn a_summary_of_errors_is_an_error() {
        let capture = Capture::default();
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || *now.lock().unwrap())
        };
        let layer = RateLimited::with_clock(capture.clone(), 1, Duration::from_secs(30), clock);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for _ in 0..3 {
                tracing::error!("store write failed");
            }
            *now.lock().unwrap() += Duration::from_secs(30);
            tracing::error!("store write failed");
        });
        let events = capture.0.lock().unwrap();
        let levels: Vec<_> = events
            .iter()
            .map(|e| (e.0, e.1.starts_with("suppressed 2")))
            .collect();
        assert_eq!(
            levels,
            [
                (Level::ERROR, false),
                (Level::ERROR, true),
                (Level::ERROR, false)
            ]
        );
    }
}
