//! Each sensor's recent log events, kept in memory for the gateway page: a tracing
//! layer ([`Capture`]) copies every event that carries a `sensor_id` field into that
//! sensor's ring. Log lines already say what happened to a sensor and never carry a
//! secret, so the page shows what the journal shows, and the engine needs no second
//! way of reporting.
//!
//! Bounded three ways: [`Limits::per_sensor`] events per ring (the oldest goes),
//! [`Limits::sensors`] rings (the least recently updated sensor goes), and
//! [`Limits::bytes`] in all, counted as each event's text (cut to [`MAX_TEXT`] bytes)
//! plus [`EVENT_OVERHEAD`] per event and the sensor id plus [`RING_OVERHEAD`] per
//! ring; over it, least recently updated sensors go until it fits. The defaults
//! (20 events, 2 000 sensors, 4 MiB) keep the whole store of events under 4 MiB of
//! counted bytes whatever the fleet does. Lost on restart, like the journal's view
//! of a process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// An event's text (message and fields) is cut to this many bytes.
pub const MAX_TEXT: usize = 240;
/// A sensor id longer than this is cut (ids from the network are bounded by the
/// announce parser already; this holds whatever logs one).
pub const MAX_ID: usize = 128;
/// Fields of an event kept besides its message (their text is cut with it).
const MAX_FIELDS: usize = 16;
/// Bytes counted for each event besides its text: the struct and the ring's slot.
pub const EVENT_OVERHEAD: usize = 64;
/// Bytes counted for each ring besides its id: the map entries and the ring itself.
pub const RING_OVERHEAD: usize = 160;

/// How much is kept.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_sensor: usize,
    pub sensors: usize,
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_sensor: 20,
            sensors: 2000,
            bytes: 4 << 20,
        }
    }
}

/// One log event of a sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Wall-clock ms.
    pub at_ms: u64,
    pub level: Level,
    /// The message, then the other fields as `name=value`.
    pub text: String,
}

/// An announce the daemon refused, as its log line says (`outcome = "refused"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub at_ms: u64,
    /// The reply code: `rate_limited`, `rejected_by_cloud`, …
    pub code: String,
    pub detail: String,
    /// When asking again can succeed, when the refusal said.
    pub retry_after_s: Option<u64>,
}

struct Ring {
    events: VecDeque<Event>,
    /// Its key in `Inner::order`: when it was last updated.
    tick: u64,
    /// Set by a refusal, cleared by a later event of the sensor at info level or
    /// above (the debug line of the refusal's own reply does not clear it).
    refusal: Option<Refusal>,
}

#[derive(Default)]
struct Inner {
    rings: HashMap<String, Ring>,
    /// Rings by last update, oldest first: who goes when full.
    order: BTreeMap<u64, String>,
    next_tick: u64,
    bytes: usize,
}

/// The rings of all sensors.
pub struct Events {
    limits: Limits,
    inner: Mutex<Inner>,
}

fn event_cost(e: &Event) -> usize {
    e.text.len() + EVENT_OVERHEAD
}

fn ring_cost(id: &str) -> usize {
    id.len() + RING_OVERHEAD
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Events {
    pub fn new(limits: Limits) -> Events {
        Events {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The process's rings, which [`Capture`] fills and the page reads.
    pub fn global() -> &'static Events {
        static GLOBAL: OnceLock<Events> = OnceLock::new();
        GLOBAL.get_or_init(|| Events::new(Limits::default()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an event to `sensor`'s ring; `refusal` when the event is one.
    pub fn record(&self, sensor: &str, mut event: Event, refusal: Option<Refusal>) {
        let sensor = cut(sensor, MAX_ID);
        event.text = cut(&event.text, MAX_TEXT).to_string();
        let limits = self.limits;
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.next_tick += 1;
        let tick = inner.next_tick;
        match inner.rings.get_mut(sensor) {
            Some(ring) => {
                inner.order.remove(&ring.tick);
                ring.tick = tick;
            }
            None => {
                inner.bytes += ring_cost(sensor);
                let ring = Ring {
                    events: VecDeque::new(),
                    tick,
                    refusal: None,
                };
                inner.rings.insert(sensor.to_string(), ring);
            }
        }
        inner.order.insert(tick, sensor.to_string());
        let ring = inner.rings.get_mut(sensor).expect("inserted above");
        inner.bytes += event_cost(&event);
        if refusal.is_some() || event.level <= Level::INFO {
            ring.refusal = refusal;
        }
        ring.events.push_back(event);
        while ring.events.len() > limits.per_sensor.max(1) {
            if let Some(old) = ring.events.pop_front() {
                inner.bytes -= event_cost(&old);
            }
        }
        // Evict the least recently updated, never the ring just written (its one
        // event always fits: text and id are cut).
        while inner.rings.len() > limits.sensors.max(1) || inner.bytes > limits.bytes {
            let Some((&oldest, _)) = inner.order.iter().next() else {
                break;
            };
            if oldest == tick {
                break;
            }
            if let Some(id) = inner.order.remove(&oldest) {
                if let Some(ring) = inner.rings.remove(&id) {
                    inner.bytes -=
                        ring_cost(&id) + ring.events.iter().map(event_cost).sum::<usize>();
                }
            }
        }
    }

    /// `sensor`'s events, newest first.
    pub fn recent(&self, sensor: &str) -> Vec<Event> {
        let inner = self.lock();
        inner
            .rings
            .get(sensor)
            .map(|r| r.events.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Sensors whose latest event is a refusal, most recent first, at most `max`.
    pub fn refused(&self, max: usize) -> Vec<(String, Refusal)> {
        let inner = self.lock();
        inner
            .order
            .values()
            .rev()
            .filter_map(|id| {
                let r = inner.rings.get(id)?.refusal.clone()?;
                Some((id.clone(), r))
            })
            .take(max)
            .collect()
    }

    /// Counted bytes held now (see the module's doc).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Sensors with a ring now.
    pub fn sensors(&self) -> usize {
        self.lock().rings.len()
    }
}

/// The tracing layer that fills [`Events::global`].
pub struct Capture {
    events: &'static Events,
}

impl Capture {
    pub fn new(events: &'static Events) -> Capture {
        Capture { events }
    }
}

#[derive(Default)]
struct Fields {
    sensor: Option<String>,
    message: String,
    /// The other fields, name and value (cut to [`MAX_TEXT`]).
    rest: Vec<(&'static str, String)>,
    refused: bool,
    code: String,
    detail: String,
    retry_after_s: Option<u64>,
}

impl Fields {
    fn text(&mut self, name: &'static str, value: &dyn std::fmt::Display) {
        match name {
            "message" => {
                let _ = write!(self.message, "{value}");
            }
            "sensor_id" => self.sensor = Some(value.to_string()),
            _ => {
                if name == "outcome" {
                    self.refused = value.to_string() == "refused";
                } else if name == "code" {
                    self.code = value.to_string();
                } else if name == "detail" {
                    self.detail = value.to_string();
                }
                if self.rest.len() < MAX_FIELDS {
                    let mut v = value.to_string();
                    v.truncate(cut(&v, MAX_TEXT).len());
                    self.rest.push((name, v));
                }
            }
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field.name(), &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "retry_after_s" {
            self.retry_after_s = Some(value);
        }
        self.text(field.name(), &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        struct AsDisplay<'a>(&'a dyn std::fmt::Debug);
        impl std::fmt::Display for AsDisplay<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        self.text(field.name(), &AsDisplay(value));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        // Most events name no sensor: look at the field names before formatting.
        if event.metadata().fields().field("sensor_id").is_none() {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(sensor) = fields.sensor.take() else {
            return;
        };
        let at_ms = crate::clock::system_ms();
        let refusal = fields.refused.then(|| Refusal {
            at_ms,
            code: std::mem::take(&mut fields.code),
            detail: cut(&fields.detail, MAX_TEXT).to_string(),
            retry_after_s: fields.retry_after_s,
        });
        // As the journal's line shows them, less what the message says already.
        for (name, value) in &fields.rest {
            if !fields.message.contains(value.as_str()) {
                let _ = write!(fields.message, " {name}={value}");
            }
        }
        let e = Event {
            at_ms,
            level: *event.metadata().level(),
            text: fields.message,
        };
        self.events.record(&sensor, e, refusal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    fn ev(text: &str) -> Event {
        Event {
            at_ms: 1,
            level: Level::INFO,
            text: text.into(),
        }
    }

    fn limits(per_sensor: usize, sensors: usize, bytes: usize) -> Limits {
        Limits {
            per_sensor,
            sensors,
            bytes,
        }
    }

    #[test]
    fn a_ring_keeps_only_its_newest_events_newest_first() {
        let events = Events::new(limits(3, 10, 1 << 20));
        for i in 0..5 {
            events.record("s1", ev(&format!("e{i}")), None);
        }
        let texts: Vec<_> = events.recent("s1").into_iter().map(|e| e.text).collect();
        assert_eq!(texts, ["e4", "e3", "e2"]);
        assert_eq!(events.bytes(), ring_cost("s1") + 3 * (2 + EVENT_OVERHEAD));
    }

    #[test]
    fn the_least_recently_updated_sensor_goes_when_there_are_too_many() {
        let events = Events::new(limits(5, 2, 1 << 20));
        events.record("a", ev("1"), None);
        events.record("b", ev("1"), None);
        events.record("a", ev("2"), None);
        events.record("c", ev("1"), None);
        assert_eq!(events.sensors(), 2);
        assert!(
            events.recent("b").is_empty(),
            "b was updated least recently"
        );
        assert_eq!(events.recent("a").len(), 2);
        assert_eq!(events.recent("c").len(), 1);
    }

    #[test]
    fn the_bytes_held_never_pass_the_limit_whatever_is_logged() {
        let budget = 20_000;
        let events = Events::new(limits(20, 2000, budget));
        let long = "x".repeat(10 * MAX_TEXT);
        for i in 0..5000 {
            let id = format!("sensor-{i}-{}", "y".repeat(i % 100));
            events.record(&id, ev(&long), None);
            assert!(events.bytes() <= budget, "{} after {i}", events.bytes());
        }
        let held: Vec<_> = events.recent(&format!("sensor-4999-{}", "y".repeat(4999 % 100)));
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].text.len(), MAX_TEXT, "the text is cut");
    }

    #[test]
    fn a_text_is_cut_on_a_character_boundary() {
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("abc", 5), "abc");
    }

    #[test]
    fn the_layer_keeps_events_with_a_sensor_id_and_the_refusals_among_them() {
        static EVENTS: OnceLock<Events> = OnceLock::new();
        let events = EVENTS.get_or_init(|| Events::new(Limits::default()));
        let subscriber = tracing_subscriber::registry().with(Capture::new(events));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(sensor_id = "s1", "new sensor; onboarding s1");
            tracing::info!("no sensor here");
            tracing::warn!(sensor_id = "s2", code = "rate_limited", detail = %"too fast", outcome = "refused",
                retry_after_s = 30u64, "announce of sensor s2 refused");
            tracing::debug!(sensor_id = "s2", "reply");
            tracing::info!(sensor_id = "s3", code = "x", outcome = "refused", "refused");
            tracing::info!(sensor_id = "s3", "onboarded");
        });
        let s1 = events.recent("s1");
        assert_eq!(s1.len(), 1);
        assert_eq!(s1[0].text, "new sensor; onboarding s1");
        assert_eq!(s1[0].level, Level::INFO);
        assert_eq!(events.sensors(), 3);
        let refused = events.refused(10);
        assert_eq!(
            refused.len(),
            1,
            "s3's refusal was followed by another event"
        );
        assert_eq!(refused[0].0, "s2");
        assert_eq!(refused[0].1.code, "rate_limited");
        assert_eq!(refused[0].1.detail, "too fast");
        assert_eq!(refused[0].1.retry_after_s, Some(30));
        assert_eq!(
            events.recent("s2")[1].text,
            "announce of sensor s2 refused code=rate_limited detail=too fast retry_after_s=30"
        );
        assert_eq!(
            events.recent("s3")[1].text,
            "refused code=x",
            "what the message says is not repeated"
        );
        assert_eq!(
            events.recent("s2")[0].level,
            Level::DEBUG,
            "kept, but clears nothing"
        );
    }
}
