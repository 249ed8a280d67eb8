//! The scheduler: opens a device's uplink when it has data and credentials, keeps
//! at most `bridge.max_connections` open (the least recently used is closed first
//! when another device needs a slot, after its [`TURN`]) and learns when each ends;
//! a device Qubitro refused waits here until its retry is due.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::shared::{lock, Inner};
use super::status::DeviceState;
use super::uplink::{Connect, DeviceTask, End, CLOSE_GRACE};
use crate::config::Secret;

/// A connection that still has readings to send keeps its slot at least this long
/// when another device waits for one: without it, devices taking turns would each
/// be closed before sending anything.
const TURN: Duration = Duration::from_secs(5);

struct Conn {
    /// The device id and token it logs in with.
    login: (String, Secret),
    cancel: CancellationToken,
    notify: Arc<Notify>,
    last_used: Instant,
    started: Instant,
}

pub(super) struct Scheduler {
    inner: Arc<Inner>,
    /// How each uplink connects (rumqttc in the daemon).
    connect: Arc<Connect>,
    conns: HashMap<String, Conn>,
    /// Devices with data and credentials but no connection slot, oldest first.
    waiting: VecDeque<String>,
    /// Paused devices and when each is retried. An entry left behind by a resume
    /// only makes the scheduler look at that device once more.
    retries: HashMap<String, Instant>,
    /// Each connection task says here how it ended.
    ended_tx: mpsc::UnboundedSender<(String, End)>,
    ended_rx: mpsc::UnboundedReceiver<(String, End)>,
    stop: CancellationToken,
}

impl Scheduler {
    /// Forwards until `shutdown` is cancelled, then closes every connection (each
    /// gets [`CLOSE_GRACE`] to send its DISCONNECT).
    pub(super) async fn run(inner: Arc<Inner>, connect: Arc<Connect>, shutdown: CancellationToken) {
        // Readings buffered before a restart: their sensors are due as soon as
        // their devices are set.
        lock(&inner.dirty).extend(inner.buffer.sensors());
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let mut sched = Scheduler {
            inner: inner.clone(),
            connect,
            conns: HashMap::new(),
            waiting: VecDeque::new(),
            retries: HashMap::new(),
            ended_tx,
            ended_rx,
            stop: shutdown.child_token(),
        };
        loop {
            let again = sched.schedule();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = inner.wake.notified() => {}
                Some((sensor, end)) = sched.ended_rx.recv() => sched.on_end(sensor, end),
                _ = sleep_until_opt(again) => {}
            }
        }
        sched.stop.cancel();
        let deadline = Instant::now() + CLOSE_GRACE * 2;
        while !sched.conns.is_empty() {
            match tokio::time::timeout_at(deadline, sched.ended_rx.recv()).await {
                Ok(Some((sensor, _))) => {
                    sched.conns.remove(&sensor);
                    inner.connections.fetch_sub(1, Ordering::Relaxed);
                }
                _ => break,
            }
        }
    }

    /// Opens connections for waiting devices, closing others to make room; returns
    /// when to look again if a device still waits for a busy connection's turn.
    fn schedule(&mut self) -> Option<Instant> {
        let mut dirty: Vec<String> = lock(&self.inner.dirty).drain().collect();
        let now = Instant::now();
        // Paused devices whose retry is due look for a slot like any other.
        self.retries.retain(|sensor, at| {
            let due = *at <= now;
            if due {
                dirty.push(sensor.clone());
            }
            !due
        });
        for sensor in dirty {
            if let Some(c) = self.conns.get_mut(&sensor) {
                let ready = self.inner.ready(&sensor);
                if ready.as_ref() != Some(&c.login) {
                    // Forgotten, paused, or new credentials: close it; a
                    // connection with the new ones follows if there is data.
                    c.cancel.cancel();
                } else {
                    c.last_used = now;
                    c.notify.notify_one();
                }
                continue;
            }
            if self.inner.ready(&sensor).is_some()
                && self.inner.buffer.count(&sensor) > 0
                && !self.waiting.contains(&sensor)
            {
                self.waiting.push_back(sensor);
            }
        }
        let max = self.inner.settings.max_connections;
        let closing = self
            .conns
            .values()
            .filter(|c| c.cancel.is_cancelled())
            .count();
        let mut to_close = self.waiting.len().saturating_sub(closing);
        while let Some(sensor) = self.waiting.front().cloned() {
            if self.conns.len() < max {
                self.waiting.pop_front();
                self.start(sensor);
                continue;
            }
            if to_close == 0 {
                break;
            }
            // The least recently used open connection makes room: one with nothing
            // left to send, or else one whose turn is over.
            let now = Instant::now();
            let lanes = lock(&self.inner.lanes);
            let open = self.conns.iter().filter(|(_, c)| !c.cancel.is_cancelled());
            let lru = open
                .filter(|(s, c)| {
                    let idle = self.inner.buffer.count(s) == 0 && !lanes.holds(s);
                    idle || now.duration_since(c.started) >= TURN
                })
                // Readings held for a live uplink wake it without the scheduler, so
                // its last use is the later of the two.
                .min_by_key(|(s, c)| {
                    lanes
                        .last_taken(s)
                        .map_or(c.last_used, |t| t.max(c.last_used))
                })
                .map(|(s, _)| s.clone());
            drop(lanes);
            let Some(lru) = lru else {
                break;
            };
            tracing::debug!(sensor_id = %lru, "bridge: closing the least recently used uplink for another device");
            self.conns[&lru].cancel.cancel();
            to_close -= 1;
        }
        for s in &self.waiting {
            self.inner.set_state(s, DeviceState::Waiting);
        }
        let retry = self.retries.values().min().copied();
        if self.waiting.is_empty() {
            return retry;
        }
        // Look again when the first busy connection's turn is over.
        let turn = self
            .conns
            .values()
            .filter(|c| !c.cancel.is_cancelled())
            .map(|c| c.started + TURN)
            .min()
            .map(|t| t.max(Instant::now() + Duration::from_millis(100)));
        turn.into_iter().chain(retry).min()
    }

    fn start(&mut self, sensor: String) {
        let Some((device_id, token)) = self.inner.ready(&sensor) else {
            return;
        };
        let cancel = self.stop.child_token();
        let notify = Arc::new(Notify::new());
        self.conns.insert(
            sensor.clone(),
            Conn {
                login: (device_id.clone(), token.clone()),
                cancel: cancel.clone(),
                notify: notify.clone(),
                last_used: Instant::now(),
                started: Instant::now(),
            },
        );
        self.inner.connections.fetch_add(1, Ordering::Relaxed);
        let task = DeviceTask {
            connect: self.connect.clone(),
            inner: self.inner.clone(),
            sensor: sensor.clone(),
            device_id,
            token,
            notify,
            cancel,
        };
        let ended = self.ended_tx.clone();
        tokio::spawn(async move {
            let end = task.run().await;
            let _ = ended.send((sensor, end));
        });
    }

    fn on_end(&mut self, sensor: String, end: End) {
        self.conns.remove(&sensor);
        self.inner.connections.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Paused(retry_at) => {
                self.retries.insert(sensor, retry_at);
            }
            End::Idle | End::Closed => {
                self.inner.set_state(&sensor, DeviceState::Idle);
                // Still has data (closed for another device, or data came in as it
                // closed): it queues again, behind the others.
                lock(&self.inner.dirty).insert(sensor);
            }
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
