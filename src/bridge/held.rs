//! Readings held in memory while their device's uplink forwards them
//! (acknowledge-through), and the spill that moves them to the durable buffer when
//! the uplink cannot take them in time.
//!
//! A reading is held only when its device's uplink is connected ([`Lane::uplink`]) and
//! the device has nothing in the buffer: then nothing is written for it, and the
//! local broker, which keeps it for onboardd's persistent session until acknowledged,
//! is its only durable copy. Everything else goes to the buffer at once. So a
//! device's buffered readings are always older than its held ones, and the uplink
//! sends the buffer first, then what is held: one order per device.
//!
//! A held reading is settled once: forwarded (Qubitro's PUBACK Success), or spilled
//! (appended to the buffer) when the acker's deadline passes or its uplink goes down.
//! A spill takes the whole lane, oldest first, so the buffer stays in arrival order.
//! A spilled reading already sent may still be acknowledged by Qubitro on the same
//! connection: its buffered copy is then removed; if the connection dies first, the
//! copy is sent again (at least once).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::buffer::Buffer;
use super::shared::lock;
use crate::store::StoreError;

/// Readings held in memory across all devices; past it, readings are spilled on
/// arrival (memory stays bounded whatever the sensors send at QoS 0).
pub const MAX_HELD: usize = 4096;
/// Bytes of held readings across all devices (same rule).
pub const MAX_HELD_BYTES: usize = 4 << 20;

/// How a reading was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Qubitro acknowledged it (or refused it for good): nothing to make durable.
    Forwarded,
    /// In the buffer: acknowledge once `store.durable(seq)`.
    Spilled(u64),
}

#[derive(Debug)]
enum State {
    Waiting(Option<oneshot::Sender<Settled>>),
    Forwarded,
    Spilled { id: u64 },
}

/// One reading held in memory; shared by its lane, the uplink that sent it and the
/// ticket the acker waits on.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) json: Vec<u8>,
    /// Changed only under the lanes' lock (the lock orders it against arrivals).
    state: Mutex<State>,
}

impl Held {
    fn settle(&self, to: State, how: Settled) {
        let mut s = lock(&self.state);
        if let State::Waiting(tx) = &mut *s {
            if let Some(tx) = tx.take() {
                let _ = tx.send(how);
            }
        }
        *s = to;
    }

    fn waiting(&self) -> bool {
        matches!(*lock(&self.state), State::Waiting(_))
    }
}

/// One device's held readings.
#[derive(Default)]
struct Lane {
    /// Its uplink is connected: new readings may be held, and each wakes it here.
    /// (Straight from the arrival, not through the scheduler: one task hand-over
    /// less on every reading's way to Qubitro.)
    uplink: Option<Arc<Notify>>,
    /// When a reading was last held for it: the scheduler's "least recently used".
    last_taken: Option<Instant>,
    /// Held readings in arrival order; the first `sent` went out on the uplink.
    held: VecDeque<Arc<Held>>,
    sent: usize,
}

/// The held readings of every device, with their totals.
#[derive(Default)]
pub(super) struct Lanes {
    per: HashMap<String, Lane>,
    count: usize,
    bytes: usize,
}

/// What [`Lanes::take`] decided for a reading.
pub(super) enum Taken {
    Held(Arc<Held>, oneshot::Receiver<Settled>),
    /// Spilled on arrival: its append's sequence number, and the readings its
    /// bounds dropped.
    Spilled {
        seq: u64,
        dropped: u64,
    },
}

impl Lanes {
    /// Holds `json` for `sensor`'s live uplink and wakes that uplink, or appends it to
    /// the buffer (the caller then tells the scheduler).
    pub(super) fn take(
        &mut self,
        buffer: &Buffer,
        sensor: &str,
        json: Vec<u8>,
    ) -> Result<Taken, StoreError> {
        let room = self.count < MAX_HELD && self.bytes + json.len() <= MAX_HELD_BYTES;
        let live = self.per.get(sensor).is_some_and(|l| l.uplink.is_some());
        if live && room && buffer.count(sensor) == 0 {
            let (tx, rx) = oneshot::channel();
            let held = Arc::new(Held {
                json,
                state: Mutex::new(State::Waiting(Some(tx))),
            });
            self.count += 1;
            self.bytes += held.json.len();
            if let Some(lane) = self.per.get_mut(sensor) {
                lane.held.push_back(held.clone());
                lane.last_taken = Some(Instant::now());
                if let Some(uplink) = &lane.uplink {
                    uplink.notify_one();
                }
            }
            return Ok(Taken::Held(held, rx));
        }
        // Whatever is held for it goes first, so the buffer keeps arrival order.
        let (_, mut dropped) = self.spill(buffer, sensor)?;
        let appended = buffer.append(sensor, &json)?;
        dropped += appended.dropped;
        Ok(Taken::Spilled {
            seq: appended.seq,
            dropped,
        })
    }

    /// Moves every held reading of `sensor` to the buffer, oldest first. Returns
    /// the last append's sequence number (0: nothing held) and the readings the
    /// buffer's bounds dropped.
    pub(super) fn spill(
        &mut self,
        buffer: &Buffer,
        sensor: &str,
    ) -> Result<(u64, u64), StoreError> {
        let Some(lane) = self.per.get_mut(sensor) else {
            return Ok((0, 0));
        };
        let (mut seq, mut dropped) = (0, 0);
        while let Some(h) = lane.held.pop_front() {
            self.count -= 1;
            self.bytes -= h.json.len();
            lane.sent = lane.sent.saturating_sub(1);
            if !h.waiting() {
                continue;
            }
            let appended = buffer.append(sensor, &h.json)?;
            seq = appended.seq;
            dropped += appended.dropped;
            h.settle(State::Spilled { id: appended.id }, Settled::Spilled(seq));
        }
        lane.sent = 0;
        if lane.uplink.is_none() {
            self.per.remove(sensor);
        }
        Ok((seq, dropped))
    }

    /// The acker's deadline for `held` passed: how it is settled now (spilled with
    /// the rest of its lane, unless Qubitro acknowledged it meanwhile).
    pub(super) fn settle_now(
        &mut self,
        buffer: &Buffer,
        sensor: &str,
        held: &Held,
    ) -> Result<(Settled, u64), StoreError> {
        if held.waiting() {
            let (_, dropped) = self.spill(buffer, sensor)?;
            if held.waiting() {
                // Not in its lane (cannot happen): settle it alone.
                let appended = buffer.append(sensor, &held.json)?;
                held.settle(
                    State::Spilled { id: appended.id },
                    Settled::Spilled(appended.seq),
                );
                return Ok((Settled::Spilled(appended.seq), dropped + appended.dropped));
            }
            return Ok((self.outcome(buffer, held), dropped));
        }
        Ok((self.outcome(buffer, held), 0))
    }

    fn outcome(&self, buffer: &Buffer, held: &Held) -> Settled {
        match *lock(&held.state) {
            // Already made durable or not: waiting for everything written so far
            // covers its append.
            State::Spilled { .. } => Settled::Spilled(buffer.store().last_write()),
            _ => Settled::Forwarded,
        }
    }

    /// `sensor`'s uplink is connected (`Some`, with what wakes it) or gone (`None`:
    /// its held readings are spilled, since nothing will forward them).
    pub(super) fn set_live(
        &mut self,
        buffer: &Buffer,
        sensor: &str,
        uplink: Option<Arc<Notify>>,
    ) -> Result<u64, StoreError> {
        if uplink.is_some() {
            self.per.entry(sensor.to_string()).or_default().uplink = uplink;
            return Ok(0);
        }
        if let Some(lane) = self.per.get_mut(sensor) {
            lane.uplink = None;
        }
        Ok(self.spill(buffer, sensor)?.1)
    }

    /// The next held reading of `sensor` to send, in arrival order.
    pub(super) fn next_to_send(&mut self, sensor: &str) -> Option<Arc<Held>> {
        let lane = self.per.get_mut(sensor)?;
        let h = lane.held.get(lane.sent)?.clone();
        lane.sent += 1;
        Some(h)
    }

    /// Qubitro took `held` (or refused it for good): settled as forwarded. Returns
    /// the id of its buffered copy to remove when it was spilled meanwhile.
    pub(super) fn forwarded(&mut self, sensor: &str, held: &Arc<Held>) -> Option<u64> {
        if let State::Spilled { id } = *lock(&held.state) {
            return Some(id);
        }
        held.settle(State::Forwarded, Settled::Forwarded);
        if let Some(lane) = self.per.get_mut(sensor) {
            if lane.held.front().is_some_and(|f| Arc::ptr_eq(f, held)) {
                lane.held.pop_front();
                lane.sent = lane.sent.saturating_sub(1);
                self.count -= 1;
                self.bytes -= held.json.len();
            }
        }
        None
    }

    /// When a reading was last held for `sensor`.
    pub(super) fn last_taken(&self, sensor: &str) -> Option<Instant> {
        self.per.get(sensor).and_then(|l| l.last_taken)
    }

    /// Whether `sensor` has held readings.
    pub(super) fn holds(&self, sensor: &str) -> bool {
        self.per.get(sensor).is_some_and(|l| !l.held.is_empty())
    }

    /// `devices forget`: its held readings are dropped (their acks go out).
    pub(super) fn forget(&mut self, sensor: &str) -> u64 {
        let Some(lane) = self.per.remove(sensor) else {
            return 0;
        };
        let n = lane.held.len() as u64;
        for h in lane.held {
            self.count -= 1;
            self.bytes -= h.json.len();
            h.settle(State::Forwarded, Settled::Forwarded);
        }
        n
    }

    /// Readings held now, across devices.
    pub(super) fn count(&self) -> usize {
        self.count
    }
}

/// What the acker waits on for one reading: forwarded, or spilled and durable.
pub struct Ticket {
    pub(super) bridge: super::Bridge,
    pub(super) sensor: String,
    pub(super) kind: Kind,
    /// When it is spilled if Qubitro has not acknowledged it.
    pub(super) deadline: Instant,
}

pub(super) enum Kind {
    Spilled(u64),
    Held(Arc<Held>, oneshot::Receiver<Settled>),
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Spilled(seq) => format!("spilled({seq})"),
            Kind::Held(..) => "held".to_string(),
        };
        write!(f, "Ticket({}, {kind})", self.sensor)
    }
}

impl Ticket {
    /// Whether the reading is held in memory (a QoS 0 one then still needs the
    /// acker, to be spilled at its deadline).
    pub fn is_held(&self) -> bool {
        matches!(self.kind, Kind::Held(..))
    }

    /// Waits until the reading is forwarded, or spills it at its deadline.
    pub async fn settle(self) -> Result<Settled, StoreError> {
        let (held, rx) = match self.kind {
            Kind::Spilled(seq) => return Ok(Settled::Spilled(seq)),
            Kind::Held(held, rx) => (held, rx),
        };
        if let Ok(Ok(how)) = tokio::time::timeout_at(self.deadline, rx).await {
            return Ok(how);
        }
        self.bridge.settle_now(&self.sensor, &held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::buffer::Limits;
    use crate::config::StoreConfig;
    use crate::store::Store;

    fn open(dir: &std::path::Path) -> (Store, Buffer) {
        let store = Store::open(&StoreConfig {
            path: dir.join("db").display().to_string(),
            cache_capacity_bytes: 1 << 20,
            last_seen_flush_s: 600,
        })
        .expect("open the store")
        .0;
        let limits = Limits {
            max_per_sensor: 10_000,
            max_bytes: 64 << 20,
        };
        let buffer = Buffer::open(&store, limits).expect("open the buffer");
        (store, buffer)
    }

    fn held(t: Taken) -> (Arc<Held>, oneshot::Receiver<Settled>) {
        match t {
            Taken::Held(h, rx) => (h, rx),
            Taken::Spilled { .. } => panic!("spilled, not held"),
        }
    }

    fn buffered(buffer: &Buffer, sensor: &str) -> Vec<String> {
        let got = buffer.oldest(sensor, None, 100).expect("read");
        got.into_iter()
            .map(|(_, b)| String::from_utf8(b).expect("utf8"))
            .collect()
    }

    #[tokio::test]
    async fn a_held_reading_wakes_its_own_uplink_and_marks_the_lanes_last_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, buffer) = open(dir.path());
        let mut lanes = Lanes::default();
        let (mine, other) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        lanes
            .set_live(&buffer, "s", Some(mine.clone()))
            .expect("live");
        lanes
            .set_live(&buffer, "t", Some(other.clone()))
            .expect("live");
        assert_eq!(lanes.last_taken("s"), None);
        let before = Instant::now();
        held(lanes.take(&buffer, "s", b"a".to_vec()).expect("take"));
        assert!(lanes.last_taken("s").is_some_and(|t| t >= before));
        assert_eq!(lanes.last_taken("t"), None);
        // The permit the take stored: its uplink's next wait returns at once; the
        // other uplink's does not.
        let woke = |n: &Arc<Notify>| {
            let mut f = std::pin::pin!(n.notified());
            f.as_mut().enable()
        };
        assert!(woke(&mine), "the reading's uplink was woken");
        assert!(!woke(&other), "no other uplink was");
        // Spilled on arrival (its uplink gone): nothing to wake, the scheduler is told.
        lanes.set_live(&buffer, "t", None).expect("down");
        let spilled = lanes.take(&buffer, "t", b"b".to_vec()).expect("take");
        assert!(matches!(spilled, Taken::Spilled { .. }));
        assert!(!woke(&other));
    }

    #[tokio::test]
    async fn a_reading_is_held_only_while_its_uplink_is_live_and_nothing_of_it_is_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, buffer) = open(dir.path());
        let mut lanes = Lanes::default();
        let first = lanes.take(&buffer, "s", b"a".to_vec()).expect("take");
        assert!(matches!(first, Taken::Spilled { .. }), "no uplink yet");
        lanes
            .set_live(&buffer, "s", Some(Arc::default()))
            .expect("live");
        let second = lanes.take(&buffer, "s", b"b".to_vec()).expect("take");
        assert!(
            matches!(second, Taken::Spilled { .. }),
            "queued behind the buffered one"
        );
        buffer.remove_through("s", u64::MAX).expect("drained");
        held(lanes.take(&buffer, "s", b"c".to_vec()).expect("take"));
        assert_eq!(lanes.count(), 1);
        assert!(buffered(&buffer, "s").is_empty(), "nothing written for it");
    }

    #[tokio::test]
    async fn a_spill_moves_the_whole_lane_to_the_buffer_in_arrival_order_and_settles_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, buffer) = open(dir.path());
        let mut lanes = Lanes::default();
        lanes
            .set_live(&buffer, "s", Some(Arc::default()))
            .expect("live");
        let (h1, rx1) = held(lanes.take(&buffer, "s", b"1".to_vec()).expect("take"));
        let (_h2, rx2) = held(lanes.take(&buffer, "s", b"2".to_vec()).expect("take"));
        let sent = lanes.next_to_send("s").expect("one to send");
        assert!(Arc::ptr_eq(&sent, &h1));
        let (how, dropped) = lanes.settle_now(&buffer, "s", &h1).expect("spilled");
        assert!(matches!(how, Settled::Spilled(seq) if seq > 0), "{how:?}");
        assert_eq!(dropped, 0);
        assert_eq!(buffered(&buffer, "s"), ["1", "2"]);
        assert!(matches!(rx1.await, Ok(Settled::Spilled(_))));
        assert!(matches!(rx2.await, Ok(Settled::Spilled(_))));
        assert_eq!(lanes.count(), 0);
        // New readings queue behind the spilled ones.
        let t = lanes.take(&buffer, "s", b"3".to_vec()).expect("take");
        assert!(matches!(t, Taken::Spilled { .. }));
        assert_eq!(buffered(&buffer, "s"), ["1", "2", "3"]);
    }

    #[tokio::test]
    async fn a_spilled_reading_qubitro_acknowledges_after_names_its_buffered_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, buffer) = open(dir.path());
        let mut lanes = Lanes::default();
        lanes
            .set_live(&buffer, "s", Some(Arc::default()))
            .expect("live");
        let (h1, _rx1) = held(lanes.take(&buffer, "s", b"1".to_vec()).expect("take"));
        let (h2, rx2) = held(lanes.take(&buffer, "s", b"2".to_vec()).expect("take"));
        lanes.next_to_send("s");
        lanes.next_to_send("s");
        // Forwarded in time: settled, nothing in the buffer.
        assert_eq!(lanes.forwarded("s", &h1), None);
        assert!(buffered(&buffer, "s").is_empty());
        // The uplink goes down with the second one out: spilled, and its late
        // PUBACK names the copy to remove.
        lanes.set_live(&buffer, "s", None).expect("down");
        assert!(matches!(rx2.await, Ok(Settled::Spilled(_))));
        let id = lanes.forwarded("s", &h2).expect("a buffered copy");
        assert_eq!(buffer.remove_through("s", id).expect("removed"), 1);
    }

    #[tokio::test]
    async fn past_the_memory_bound_readings_are_spilled_on_arrival() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, buffer) = open(dir.path());
        let mut lanes = Lanes::default();
        lanes
            .set_live(&buffer, "s", Some(Arc::default()))
            .expect("live");
        let mut tickets = Vec::new();
        for _ in 0..MAX_HELD {
            tickets.push(held(lanes.take(&buffer, "s", b"x".to_vec()).expect("take")));
        }
        let over = lanes.take(&buffer, "s", b"y".to_vec()).expect("take");
        assert!(matches!(over, Taken::Spilled { .. }));
        assert_eq!(lanes.count(), 0, "its held ones went first, in order");
        assert_eq!(buffer.count("s"), MAX_HELD as u64 + 1);
    }
}
