//! Telemetry bridge tooling: reading payloads, the observer on the stand-in for Qubitro's broker,
//! the feeders that publish readings, per-process CPU and write counters.

use anyhow::{bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use crate::env::Env;
use crate::loadgen::{join_senders, PhaseResult};
use crate::procs::{cpu_secs, self_cpu_secs, write_bytes};
use crate::services::mqtt_options;
use crate::sizes::SLED_FLUSH_SETTLE;

/// Between two readings of the trickles: 10 readings/s and 1 reading/s.
pub(crate) const TRICKLE_GAP: Duration = Duration::from_millis(100);
pub(crate) const SLOW_GAP: Duration = Duration::from_secs(1);

/// Bytes written over a trickle of `count` readings `gap` apart by `pid`: from settled
/// (nothing written for `settle`) to quiet (nothing written for 1.5 s). (bytes, readings)
pub(crate) async fn trickle_written(
    f: &Feeders,
    flow: &Arc<Flow>,
    pid: u32,
    count: usize,
    gap: Duration,
    qos: QoS,
    settle: Duration,
) -> Result<Option<(u64, usize)>> {
    let w0 = settled_write_bytes(pid, settle).await;
    f.trickle("bridge trickle", flow, count, gap, qos).await?;
    let w1 = quiet_write_bytes(pid).await;
    Ok(w0.zip(w1).map(|(a, b)| (b - a, count)))
}

/// The plain mosquitto bridge's one login on the stand-in broker (a Qubitro device
/// could write only the topic equal to its own id).
pub(crate) const MQ_BRIDGE_USER: &str = "mqbridge";
pub(crate) const MQ_BRIDGE_PASSWORD: &str = "mqbridge-password";

/// A reading as a small sensor would send it: ≈ 40 bytes, flat (the flattener has
/// nothing to do, so both bridges forward the same bytes).
pub(crate) fn reading_payload(n: u64) -> Vec<u8> {
    format!(r#"{{"n":{n},"temp":21.5,"hum":40.2}}"#).into_bytes()
}

pub(crate) fn data_topic(idx: usize) -> String {
    format!("onboard/data/s{idx}")
}

/// Readings in flight, from the publishers on a local broker to the observer on the
/// stand-in for Qubitro's broker: one closed-loop window, and per device the next
/// reading expected (readings of one device must arrive in the order they were sent).
pub(crate) struct Flow {
    pub(crate) base: Instant,
    pub(crate) window: Semaphore,
    /// Arrivals give the window a permit back (closed loop); off while an open loop runs.
    pub(crate) windowed: AtomicBool,
    pub(crate) st: Mutex<FlowState>,
}

#[derive(Default)]
pub(crate) struct FlowState {
    /// Topic on the stand-in broker → device index (a device id for onboardd's
    /// bridge, the local topic name for mosquitto's).
    pub(crate) topics: std::collections::HashMap<String, usize>,
    /// Per device: the `n` of the next reading expected (= readings sent so far once
    /// a run is complete).
    pub(crate) next: Vec<u64>,
    pub(crate) arrived: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) unknown: u64,
    pub(crate) samples: Vec<String>,
    pub(crate) last_ns: u64,
    /// Open-loop latency phases: when each reading (device, n) was handed to its
    /// feeder, and the latencies of those that arrived.
    pub(crate) sent_ns: std::collections::HashMap<(usize, u64), u64>,
    pub(crate) latencies_us: Vec<u32>,
}

impl FlowState {
    /// Forgets the counters of the previous run (not where each device is).
    pub(crate) fn reset(&mut self) {
        self.arrived = 0;
        self.duplicates = 0;
        self.out_of_order = 0;
        self.unknown = 0;
        self.samples.clear();
        self.last_ns = 0;
        self.sent_ns.clear();
        self.latencies_us.clear();
    }
}

impl Flow {
    pub(crate) fn new(window: usize, devices: usize) -> Arc<Flow> {
        Arc::new(Flow {
            base: Instant::now(),
            window: Semaphore::new(window),
            windowed: AtomicBool::new(true),
            st: Mutex::new(FlowState {
                next: vec![0; devices],
                ..FlowState::default()
            }),
        })
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn on_arrival(&self, topic: &str, payload: &[u8]) {
        let now = self.now_ns();
        let mut st = self.state();
        let Some(&i) = st.topics.get(topic) else {
            st.unknown += 1;
            return;
        };
        let n = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v["n"].as_u64());
        let Some(n) = n else {
            st.unknown += 1;
            return;
        };
        let want = st.next[i];
        if n < want {
            // At least once: a reading sent again after a lost PUBACK.
            st.duplicates += 1;
            return;
        }
        if n > want {
            st.out_of_order += 1;
            if st.samples.len() < 5 {
                st.samples.push(format!(
                    "{topic}: reading {n} arrived while {want} was expected"
                ));
            }
        }
        st.next[i] = n + 1;
        st.arrived += 1;
        st.last_ns = now;
        if let Some(sent) = st.sent_ns.remove(&(i, n)) {
            let us = (now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32;
            st.latencies_us.push(us);
        }
        drop(st);
        if self.windowed.load(Ordering::Relaxed) {
            self.window.add_permits(1);
        }
    }
}

/// The observer on the stand-in broker: every topic, QoS 1, a persistent session, so
/// what arrives while it reconnects after an outage of the stand-in is kept for it.
pub(crate) async fn connect_observer(port: u16, flow: Arc<Flow>) -> Result<AsyncClient> {
    use harness::qubitro_broker::{OBSERVER, OBSERVER_PASSWORD};
    let mut opts = mqtt_options(OBSERVER.to_string(), port);
    opts.set_credentials(OBSERVER, OBSERVER_PASSWORD);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(3600));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let sub = client.clone();
    let subscribed = Arc::new(AtomicBool::new(false));
    let done = subscribed.clone();
    tokio::spawn(async move {
        let mut errors = 0u32;
        // Each outage of the stand-in costs up to ~10 errors a second.
        while errors < 100_000 {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    flow.on_arrival(&String::from_utf8_lossy(&p.topic), &p.payload)
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Err(e) = sub.try_subscribe("#", QoS::AtLeastOnce) {
                        eprintln!("bench: observer cannot subscribe: {e}");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => done.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => {
                    errors += 1;
                    if errors < 5 {
                        eprintln!("bench: observer: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !subscribed.load(Ordering::Relaxed) {
        if Instant::now() > deadline {
            bail!("the observer on the stand-in broker did not subscribe in 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(client)
}

/// The sensors' side: `k` connections to a local broker, device `i` always on
/// connection `i % k` (so its readings stay in order).
pub(crate) struct Feeders {
    pub(crate) clients: Vec<AsyncClient>,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Feeders {
    pub(crate) async fn connect(port: u16, k: usize) -> Result<Feeders> {
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for c in 0..k {
            let opts = mqtt_options(format!("bench-feed-{}-{c}", std::process::id()), port);
            let (client, mut el) = AsyncClient::new(opts, 20_000);
            let (stop, connected) = (stop.clone(), connected.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connected.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("bench: feeder {c}: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            clients.push(client);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while connected.load(Ordering::Relaxed) < k as u64 {
            if Instant::now() > deadline {
                bail!("the sensors' connections did not connect in 10 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Feeders { clients, stop })
    }

    /// Closed loop: `rounds` readings from each of `devices`, QoS 1, at most the flow's
    /// window not yet arrived at the observer. Throughput = readings ÷ (last arrival −
    /// first publish). A reading missing or out of order fails the run.
    pub(crate) async fn run(
        &self,
        what: &str,
        flow: &Arc<Flow>,
        devices: &[usize],
        rounds: usize,
        qos: QoS,
    ) -> Result<PhaseResult> {
        let n = devices.len() * rounds;
        let starts: Vec<(usize, u64)> = {
            let mut st = flow.state();
            st.reset();
            devices.iter().map(|&d| (d, st.next[d])).collect()
        };
        let first = flow.now_ns();
        let k = self.clients.len();
        let mut tasks = Vec::new();
        for c in 0..k {
            let client = self.clients[c].clone();
            let flow = flow.clone();
            let mine: Vec<(usize, u64)> =
                starts.iter().filter(|(d, _)| d % k == c).copied().collect();
            tasks.push(tokio::spawn(async move {
                for r in 0..rounds as u64 {
                    for &(d, start) in &mine {
                        flow.window.acquire().await?.forget();
                        client
                            .publish(data_topic(d), qos, false, reading_payload(start + r))
                            .await
                            .context("queue a reading")?;
                    }
                }
                anyhow::Ok(())
            }));
        }
        let until = Instant::now() + Env::deadline(n);
        loop {
            if flow.state().arrived as usize >= n || Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        join_senders(what, tasks).await?;
        let r = PhaseResult {
            n,
            wall_s: flow.state().last_ns.saturating_sub(first) as f64 / 1e9,
            latencies_us: Vec::new(),
        };
        check_arrivals(what, flow, n, Env::deadline(n))?;
        if n > 1 {
            eprintln!(
                "bench: {what}: {n} readings in {:.2} s = {:.0}/s",
                r.wall_s,
                r.rate()
            );
        }
        Ok(r)
    }

    /// Open loop: readings of `devices` in turn at `rate` readings/s in all, for
    /// `secs`, whatever arrives; each one's send time is kept for its latency. Returns
    /// how many were sent (the arrivals are the flow's to count).
    pub(crate) async fn open(
        &self,
        flow: &Arc<Flow>,
        devices: &[usize],
        rate: f64,
        secs: f64,
        qos: QoS,
    ) -> Result<usize> {
        let n = ((rate * secs) as usize).max(1);
        flow.windowed.store(false, Ordering::Relaxed);
        let starts: Vec<u64> = {
            let mut st = flow.state();
            st.reset();
            devices.iter().map(|&d| st.next[d]).collect()
        };
        let k = self.clients.len();
        let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
        let mut tasks = Vec::new();
        for c in 0..k {
            let client = self.clients[c].clone();
            let flow = flow.clone();
            let devices = devices.to_vec();
            let starts = starts.clone();
            tasks.push(tokio::spawn(async move {
                for j in (0..n).filter(|j| devices[j % devices.len()] % k == c) {
                    let d = devices[j % devices.len()];
                    let seq = starts[j % devices.len()] + (j / devices.len()) as u64;
                    tokio::time::sleep_until(t0 + Duration::from_secs_f64(j as f64 / rate)).await;
                    flow.state().sent_ns.insert((d, seq), flow.now_ns());
                    client
                        .publish(data_topic(d), qos, false, reading_payload(seq))
                        .await
                        .context("queue a reading")?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await.context("a feeder task")??;
        }
        Ok(n)
    }

    /// A sensor's pace rather than a burst: `count` readings of device 0, each sent
    /// once the previous one arrived, `gap` apart.
    pub(crate) async fn trickle(
        &self,
        what: &str,
        flow: &Arc<Flow>,
        count: usize,
        gap: Duration,
        qos: QoS,
    ) -> Result<()> {
        for _ in 0..count {
            self.run(what, flow, &[0], 1, qos).await?;
            tokio::time::sleep(gap).await;
        }
        Ok(())
    }
}

/// Waits until `n` readings of an open loop arrived, or nothing new came for
/// `quiet` (what is lost stays lost), or `limit` passed. Gives the window back.
pub(crate) async fn settle_open(flow: &Flow, n: usize, quiet: Duration, limit: Duration) {
    let start = Instant::now();
    let mut last = (0u64, Instant::now());
    while start.elapsed() < limit {
        let arrived = flow.state().arrived;
        if arrived as usize >= n {
            break;
        }
        if arrived != last.0 {
            last = (arrived, Instant::now());
        } else if last.1.elapsed() > quiet {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    flow.windowed.store(true, Ordering::Relaxed);
}

/// The run's arrivals: an error when one is missing or out of order.
pub(crate) fn check_arrivals(what: &str, flow: &Flow, n: usize, within: Duration) -> Result<()> {
    {
        let st = flow.state();
        if st.out_of_order > 0 {
            bail!(
                "{what}: {} readings arrived out of order (missing earlier ones), e.g. {}",
                st.out_of_order,
                st.samples.join("; ")
            );
        }
        if (st.arrived as usize) < n {
            bail!(
                "{what}: only {} of {n} readings reached the stand-in broker within {within:?} ({} on unknown topics)",
                st.arrived,
                st.unknown
            );
        }
        if st.duplicates > 0 || st.unknown > 0 {
            eprintln!(
                "bench: {what}: {} duplicate readings (at least once), {} on unknown topics",
                st.duplicates, st.unknown
            );
        }
    }
    Ok(())
}

impl Drop for Feeders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in &self.clients {
            let _ = c.try_disconnect();
        }
    }
}

/// CPU of named processes (and of this one, the load generator) over a phase.
pub(crate) struct NamedCpu {
    pub(crate) at: Instant,
    pub(crate) procs: Vec<(&'static str, u32, f64)>,
    pub(crate) load: f64,
}

impl NamedCpu {
    pub(crate) fn take(procs: &[(&'static str, u32)]) -> NamedCpu {
        NamedCpu {
            at: Instant::now(),
            procs: procs.iter().map(|&(n, p)| (n, p, cpu_secs(p))).collect(),
            load: self_cpu_secs(),
        }
    }

    pub(crate) fn since(&self) -> String {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let pct = |now: f64, before: f64| ((now - before) / wall * 100.0).round();
        let mut parts: Vec<String> = self
            .procs
            .iter()
            .map(|&(n, p, c)| format!("{n} {}%", pct(cpu_secs(p), c)))
            .collect();
        parts.push(format!(
            "load gen + observer {}%",
            pct(self_cpu_secs(), self.load)
        ));
        parts.join(" · ")
    }
}

/// Waits until `pid` has written nothing for [`SLED_FLUSH_SETTLE`] (at most ~30 s);
/// returns its `write_bytes` then.
pub(crate) async fn quiet_write_bytes(pid: u32) -> Option<u64> {
    let mut before = write_bytes(pid);
    for _ in 0..20 {
        tokio::time::sleep(SLED_FLUSH_SETTLE).await;
        let now = write_bytes(pid);
        if now == before {
            break;
        }
        before = now;
    }
    before
}

/// Before a measurement: waits until `pid` has written nothing for `settle` (at most
/// 2 min); returns its `write_bytes` then. After a large burst sled goes on cleaning
/// segments for tens of seconds, in bursts that can be more than 1.5 s apart: a longer
/// quiet keeps that out of the next measurement's count.
pub(crate) async fn settled_write_bytes(pid: u32, settle: Duration) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut before = write_bytes(pid);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = write_bytes(pid);
        if now != before {
            before = now;
            since = Instant::now();
        } else if since.elapsed() >= settle {
            break;
        }
    }
    before
}

/// Established TCP connections from this host to `port` (both ends are local: the
/// client ends are the ones whose remote port is `port`).
pub(crate) fn connections_to(port: u16) -> usize {
    let mut n = 0;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let rem_port = cols
                .get(2)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if rem_port == Some(port) && cols.get(3) == Some(&"01") {
                n += 1;
            }
        }
    }
    n
}
