//! The tracing layer that applies the [`Summariser`] to warnings and errors in
//! front of the output layer, and writes each summary as an event of its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::{Callsite, Identifier};
use tracing::field::{FieldSet, Value};
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::summariser::{Summariser, Summary};

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
    use tracing_subscriber::layer::SubscriberExt as _;

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
                .starts_with("suppressed 4997 similar messages from src/logging/rate_limited.rs:"),
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
