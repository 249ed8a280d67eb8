//! `onboardd run`: opens the store, connects, starts the tasks, reports to systemd,
//! and shuts down in order (stop taking announces → finish acks → let workers reach
//! a safe point → flush → "offline" → disconnect).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cloud::Cloud;
use crate::config::Config;
use crate::engine::{Engine, Fatal};
use crate::store::{OpenOutcome, Store};
use crate::{control, metrics, mqtt, systemd};

/// Proof of life from the MQTT event loop, read by the watchdog.
pub struct Heartbeat {
    start: Instant,
    mqtt_ms: AtomicU64,
    dispatcher_ms: AtomicU64,
}

impl Heartbeat {
    pub fn new() -> Self {
        Heartbeat {
            start: Instant::now(),
            mqtt_ms: AtomicU64::new(0),
            dispatcher_ms: AtomicU64::new(0),
        }
    }
    pub fn beat_dispatcher(&self) {
        self.dispatcher_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn dispatcher_silence(&self) -> Duration {
        let last = self.dispatcher_ms.load(Ordering::Relaxed);
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
    pub fn beat_mqtt(&self) {
        self.mqtt_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn mqtt_silence(&self) -> Duration {
        let last = self.mqtt_ms.load(Ordering::Relaxed);
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs the daemon until `shutdown` resolves (exit 0) or a fatal error (Err: exit 1).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    crate::failpoint::refuse_if_requested_but_compiled_out()?;
    let started = Instant::now();
    let cfg = Arc::new(cfg);
    // rumqttc's TLS uses the process-wide provider; ring builds for every Pi.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let (store, outcome) = Store::open(&cfg.store)?;
    if let OpenOutcome::RebuiltAfterCorruption { moved_to } = &outcome {
        tracing::error!(moved_to = %moved_to.display(), "started with an EMPTY database after corruption; sensors are re-adopted from Qubitro as they announce");
    }
    let cloud = Cloud::new(&cfg.qubitro).context("cannot build the HTTP client")?;
    let session = mqtt::connect(&cfg)?;
    let mqtt = session.mqtt.clone();

    let stop = CancellationToken::new();
    let fatal = Fatal::default();
    let engine = Engine::new(
        cfg.clone(),
        store.clone(),
        cloud,
        mqtt.clone(),
        stop.clone(),
        fatal.clone(),
    );

    let cap = cfg.announce.queue_capacity;
    let (announce_tx, announce_rx) = mpsc::channel(cap);
    let (ack_tx, ack_rx) = mpsc::channel(cap);
    let (event_tx, event_rx) = mpsc::channel(1024);
    let heartbeat = Arc::new(Heartbeat::new());
    let mqtt_stop = CancellationToken::new();

    // Before any announce can arrive: resuming after the dispatcher started could
    // pick up a record the dispatcher just made and onboard it twice.
    let resumed = engine.resume_from_store()?;
    let event_loop = tokio::spawn(session.event_loop.run(
        announce_tx,
        event_tx,
        mqtt_stop.clone(),
        heartbeat.clone(),
    ));
    let dispatcher = tokio::spawn(engine.clone().run_dispatcher(
        announce_rx,
        ack_tx,
        heartbeat.clone(),
    ));
    let acker = tokio::spawn(engine.clone().run_acker(ack_rx));
    let session_events = tokio::spawn(engine.clone().run_session_events(event_rx));
    let control = control::serve(&cfg.control, engine.clone(), stop.clone())?;

    systemd::ready();
    tracing::info!(
        gateway_id = %cfg.gateway_id,
        broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
        store = %cfg.store.path,
        resumed,
        ready_ms = started.elapsed().as_millis() as u64,
        "onboardd ready"
    );
    let reporter = tokio::spawn(report(
        cfg.clone(),
        engine.clone(),
        mqtt.clone(),
        heartbeat.clone(),
        stop.clone(),
    ));

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        _ = fatal.token().cancelled() => {}
    }
    systemd::stopping();
    let t0 = Instant::now();
    stop.cancel();
    reporter.abort();
    if let Some(c) = control {
        c.abort();
    }
    // The dispatcher stops taking announces; those it never took stay unacknowledged
    // at the broker (persistent session) and come back on the next start.
    let _ = dispatcher.await;
    // The acker drains: every announce already recorded gets its ack.
    let _ = tokio::time::timeout(Duration::from_secs(3), acker).await;
    if !engine.wind_down(Duration::from_secs(3)).await {
        tracing::warn!("some onboardings were still in a cloud call; they resume from their stored state at the next start");
    }
    if let Err(e) = store.flush_all().await {
        fatal.trigger(e.to_string());
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), mqtt.publish_status("offline")).await;
    mqtt_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), event_loop).await;
    session_events.abort();
    tracing::info!(took_ms = t0.elapsed().as_millis() as u64, "stopped");
    match fatal.reason() {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}

/// Watchdog pings, STATUS= lines and periodic counters.
async fn report(
    cfg: Arc<Config>,
    engine: Arc<Engine>,
    mqtt: mqtt::Mqtt,
    heartbeat: Arc<Heartbeat>,
    stop: CancellationToken,
) {
    let watchdog = systemd::watchdog_interval();
    let stats_every = Duration::from_secs(cfg.log.stats_interval_s);
    let mut tick = watchdog
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    if !stats_every.is_zero() {
        tick = tick.min(stats_every);
    }
    // The event loop wakes at least once per keep-alive when connected, and once per
    // reconnect attempt when not: longer silence means it is stuck.
    let stall = cfg.keep_alive() * 2
        + Duration::from_millis(cfg.mqtt.reconnect_max_ms)
        + Duration::from_secs(cfg.mqtt.connect_timeout_s);
    let mut last_stats = Instant::now();
    let mut last_status = String::new();
    let mut interval = tokio::time::interval(tick);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.cancelled() => return,
        }
        if watchdog.is_some() {
            let mqtt_ok = heartbeat.mqtt_silence() < stall;
            // The dispatcher beats at least every second while it is free to take
            // announces; silence means it is stuck behind acks, flushes or the broker.
            let dispatcher_ok = heartbeat.dispatcher_silence() < Duration::from_secs(15);
            // A flush round trip proves the store, its flusher and the blocking pool work.
            let store_ok = tokio::time::timeout(Duration::from_secs(5), engine.store().flush_all())
                .await
                .is_ok_and(|r| r.is_ok());
            if mqtt_ok && store_ok && dispatcher_ok {
                systemd::watchdog_ping();
            } else {
                tracing::error!(
                    mqtt_ok,
                    store_ok,
                    dispatcher_ok,
                    "not making progress; withholding the watchdog ping"
                );
            }
        }
        let broker = if mqtt.is_connected() {
            "connected"
        } else {
            "disconnected"
        };
        let cloud = if engine.cloud_paused() {
            "paused (API key refused)"
        } else {
            "ok"
        };
        let status = format!(
            // No count of known sensors here: sled's len() reads every record.
            "broker {broker}; cloud {cloud}; {} onboarded since start, {} pending",
            metrics::snapshot(0).onboarded,
            engine.pending_now()
        );
        if status != last_status {
            systemd::status(&status);
            last_status = status;
        }
        if !stats_every.is_zero() && last_stats.elapsed() >= stats_every {
            last_stats = Instant::now();
            let snap = metrics::snapshot(engine.pending_now());
            tracing::info!(
                announces = snap.announces,
                onboarded = snap.onboarded,
                pending = snap.pending_now,
                errors = snap.errors,
                cloud_latency_ms_avg = snap.cloud_latency_ms_avg,
                "stats"
            );
            if let Ok(json) = serde_json::to_vec(&snap) {
                mqtt.try_publish_qos0(&cfg.mqtt.stats_topic, json);
            }
        }
    }
}
