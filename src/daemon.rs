//! `onboardd run`: opens the store, connects, starts the tasks, reports to systemd,
//! and shuts down in order within one deadline (stop taking announces → finish
//! acks → let workers reach a safe point → flush → "offline" → disconnect).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::clock::Clock;
use crate::cloud::Cloud;
use crate::config::Config;
use crate::engine::{Engine, Shutdown};
use crate::heartbeat::Heartbeat;
use crate::open_broker::{self, Verdict};
use crate::store::{OpenOutcome, Store};
use crate::{claim_key, control, metrics, mqtt, systemd};

/// What shows that sensors were onboarded in this store: the database when it
/// holds records, else a database moved aside.
fn onboarding_evidence(
    store: &Store,
    store_path: &str,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    let dir = std::path::Path::new(store_path);
    if store.holds_records()? {
        return Ok(Some(dir.join(crate::store::DB_DIR)));
    }
    let aside = crate::store::moved_aside(dir)
        .with_context(|| format!("cannot read the store directory {}", dir.display()))?;
    Ok(aside.into_iter().next())
}

/// From SIGTERM to exit, in every state (broker down and cloud hanging included):
/// under systemd's default 10 s and the unit's TimeoutStopSec.
const STOP_BUDGET: Duration = Duration::from_secs(8);

/// Runs the daemon until `shutdown` resolves (exit 0) or a fatal error (Err: exit 1).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Before anything is created: the store holds every device token, and run by
    // hand (umask 022, no systemd UMask=) its files would be world-readable.
    // SAFETY: umask(2) cannot fail and touches no memory.
    unsafe { libc::umask(0o077) };
    crate::failpoint::refuse_if_requested_but_compiled_out()?;
    let started = Instant::now();
    let mut cfg = cfg;
    prepare_store_dir(std::path::Path::new(&cfg.store.path))?;
    crate::config::warn_if_loose_secret_files(&cfg);
    let (store, outcome) = Store::open(&cfg.store)?;
    if let OpenOutcome::RebuiltAfterCorruption { moved_to } = &outcome {
        tracing::error!(
            moved_to = %moved_to.display(),
            concat!(
                "started with an EMPTY database after corruption (old one moved to {}); ",
                "sensors are re-adopted from Qubitro as they announce"
            ),
            moved_to.display()
        );
    }
    // Before anything is served: a fresh install needs a key before its first
    // announce, and a lost key must not silently become a new one (the store,
    // opened first, tells whether sensors were onboarded with the old one).
    let evidence = onboarding_evidence(&store, &cfg.store.path)?;
    let (claim_key, key_origin) = claim_key::load_or_generate(
        &cfg.security.claim_key,
        &cfg.store.path,
        evidence.as_deref(),
    )?;
    cfg.security.claim_key = claim_key;
    match &key_origin {
        claim_key::Origin::Generated(path) => tracing::info!(
            path = %path.display(),
            "generated this gateway's claim key at {}; `onboardd claim SENSOR_ID` prints each sensor's key",
            path.display()
        ),
        claim_key::Origin::Stored(path) => {
            tracing::debug!(path = %path.display(), "claim key read from {}", path.display())
        }
        claim_key::Origin::Configured => {}
    }
    if !cfg.security.require_claim {
        tracing::warn!(
            "security.require_claim = false: announces without a proof are served and their device tokens are \
                 published in clear, readable by any client of the broker; set security.require_claim = true \
                 once the sensors carry proofs"
        );
    }
    let cfg = Arc::new(cfg);
    // rumqttc's TLS uses the process-wide provider; ring builds for every Pi.
    crate::tls::install_ring_provider();

    if crate::config::generic_gateway_id(&cfg.gateway_id) {
        tracing::warn!(
            gateway_id = %cfg.gateway_id,
            "gateway_id {:?} is a host name many machines share: gateways left at it look like one gateway in \
                 Qubitro's metadata and on the status topic; set gateway_id in the config",
            cfg.gateway_id
        );
    }
    let cloud = Cloud::new(&cfg.qubitro).context("cannot build the HTTP client")?;
    let session = mqtt::connect(&cfg, subscriptions(&cfg))?;
    let mqtt = session.mqtt.clone();

    let bridge = if cfg.bridge.enabled {
        let bridge = Bridge::new(&cfg, &store)?;
        // Every bridged sensor already onboarded: its readings may flow at once
        // (an index read per bridged sensor, not a scan of the fleet).
        let mut known = 0;
        for (sensor, rec) in store.bridged()? {
            if crate::engine::bridge_device(Some(&bridge), &sensor, &rec) {
                known += 1;
            }
        }
        if known > 0 {
            tracing::info!(bridged = known, "bridging the readings of {known} sensors");
        }
        Some(bridge)
    } else {
        None
    };

    let stops = Shutdown::default();
    let fatal = stops.fatal.clone();
    let engine = Engine::new(
        cfg.clone(),
        Clock::System,
        store.clone(),
        cloud,
        Arc::new(mqtt.clone()),
        bridge.clone(),
        stops.clone(),
    )?;
    let bridge_stop = CancellationToken::new();
    let uplink = bridge.clone().map(|b| {
        let stop = bridge_stop.clone();
        tokio::spawn(async move { b.run(stop).await })
    });

    let (ack_tx, ack_rx) = mpsc::channel(cfg.announce.queue_capacity.max(1));
    let (event_tx, event_rx) = mpsc::unbounded_channel();
    let heartbeat = Arc::new(Heartbeat::new());
    let mqtt_stop = CancellationToken::new();

    // Before any announce can arrive: resuming after the dispatcher started could
    // pick up a record the dispatcher just made and onboard it twice.
    let resumed = engine.resume_from_store()?;
    // Before the first ConnAck, so its subscriptions include them.
    let followed = engine.follow_discovered();
    if cfg.discovery.enabled() {
        tracing::info!(
            homeassistant = cfg.discovery.homeassistant,
            tasmota = cfg.discovery.tasmota,
            followed,
            "discovery on: devices published under the discovery prefixes are onboarded; following {followed} state topics"
        );
    }
    let event_loop = tokio::spawn(session.event_loop.run(
        event_tx,
        mqtt_stop.clone(),
        heartbeat.clone(),
    ));
    let dispatcher = tokio::spawn(engine.clone().run_dispatcher(
        session.inbox,
        ack_tx,
        heartbeat.clone(),
    ));
    let acker = tokio::spawn(engine.clone().run_acker(ack_rx));
    let session_events = tokio::spawn(engine.clone().run_session_events(event_rx));
    let control = control::serve(&cfg.control, engine.clone(), stops.stop.clone())?;
    // Before READY, so the journal says at start when it cannot bind. Sensors come
    // first: a port taken by another program costs the status page, not onboarding.
    // At each connection of the session, off its event loop: whether anyone else
    // may connect too (before the listener, whose page shows it).
    let open = open_broker::watch(cfg.mqtt.clone(), mqtt.connection(), stops.stop.clone());
    let gateway = crate::http::Gateway {
        gateway_id: cfg.gateway_id.clone(),
        broker: format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
        started: started.into_std(),
        claim_fingerprint: claim_key::fingerprint(&cfg.security.claim_key),
        open: open.clone(),
    };
    let http = match crate::http::serve(
        &cfg.http,
        engine.clone(),
        mqtt.clone(),
        gateway,
        open.clone(),
        stops.stop.clone(),
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(
                "{e}; serving sensors without the gateway page, /healthz and /metrics (set http.listen to a free \
                 address, or \"\" to turn it off)"
            );
            None
        }
    };
    let reaper = crate::lifecycle::spawn_reaper(
        cfg.discovery.delete_retired_after_s,
        engine.clone(),
        stops.stop.clone(),
    );

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
        session.dropped_qos0.clone(),
        open,
        stops.stop.clone(),
    ));

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        _ = fatal.token().cancelled() => {}
    }
    systemd::stopping();
    let t0 = Instant::now();
    // Every step below shares one deadline; each also has its own share of it, so a
    // step that hangs (broker down, cloud hanging) leaves time for the later ones.
    let deadline = t0 + STOP_BUDGET;
    let by = |left: Duration| deadline.checked_sub(left).unwrap_or(deadline);
    stops.stop.cancel();
    reporter.abort();
    if let Some(r) = reaper {
        r.abort();
    }
    if let Some(c) = control {
        c.abort();
    }
    if let Some(h) = http {
        h.abort();
    }
    // The dispatcher stops taking announces; those it never took stay unacknowledged
    // at the broker (persistent session) and come back on the next start.
    let _ = tokio::time::timeout_at(by(Duration::from_secs(7)), dispatcher).await;
    // The acker drains: every announce already recorded gets its ack.
    let _ = tokio::time::timeout_at(by(Duration::from_secs(5)), acker).await;
    let workers_left = by(Duration::from_secs(3)).saturating_duration_since(Instant::now());
    bridge_stop.cancel();
    if !engine.wind_down(workers_left).await {
        tracing::warn!("some onboardings were still in a cloud call; they resume from their stored state at the next start");
    }
    if let Some(u) = uplink {
        // Readings not acknowledged by Qubitro stay buffered for the next start.
        let _ = tokio::time::timeout_at(by(Duration::from_millis(2500)), u).await;
    }
    match tokio::time::timeout_at(by(Duration::from_secs(2)), store.close_cleanly()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => fatal.trigger(e),
        Err(_) => tracing::error!(
            "the final flush did not finish in time; the next start recovers from the last one"
        ),
    }
    let _ = tokio::time::timeout_at(
        by(Duration::from_millis(1500)),
        mqtt.publish_status("offline"),
    )
    .await;
    mqtt_stop.cancel();
    let _ = tokio::time::timeout_at(deadline, event_loop).await;
    session_events.abort();
    tracing::info!(took_ms = t0.elapsed().as_millis() as u64, "stopped");
    match fatal.reason() {
        Some(reason) => Err(anyhow::Error::new(ArcError(reason))),
        None => Ok(()),
    }
}

/// What the session subscribes to at every ConnAck: announces, bridged sensors'
/// readings (live only: a retained reading is not forwarded again at each
/// subscribe), and discovery configs (retained ones re-read at every subscribe:
/// handling one again creates nothing). Discovered state topics are added at run
/// time by the engine.
fn subscriptions(cfg: &Config) -> mqtt::Subscriptions {
    let mut subs = mqtt::Subscriptions::new(&cfg.mqtt.announce_topic);
    if cfg.bridge.enabled {
        subs = subs.live(&crate::bridge::DataTopic::new(&cfg.bridge.data_topic).filter());
    }
    let d = &cfg.discovery;
    for (on, prefix) in [
        (d.homeassistant, &d.homeassistant_prefix),
        (d.tasmota, &d.tasmota_prefix),
    ] {
        if on {
            subs = subs.with_retained(&format!("{prefix}/#"));
        }
    }
    subs
}

/// Lets the shared fatal error travel as the daemon's error, sources included.
#[derive(Debug)]
struct ArcError(Arc<crate::engine::EngineError>);

impl std::fmt::Display for ArcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ArcError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

/// Watchdog pings, STATUS= lines and periodic counters.
async fn report(
    cfg: Arc<Config>,
    engine: Arc<Engine>,
    mqtt: mqtt::Mqtt,
    heartbeat: Arc<Heartbeat>,
    dropped_qos0: Arc<std::sync::atomic::AtomicU64>,
    open: Arc<Verdict>,
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
    let mut session = mqtt.connection();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            // STATUS= follows the session at once, not at the next tick.
            r = session.changed() => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
        if watchdog.is_some() {
            let mqtt_ok = heartbeat.mqtt_silence() < stall;
            // The dispatcher beats at least every second while it is free to take
            // announces; silence means it is stuck behind acks, flushes or the broker.
            // While the broker is down it may wait for it, which is no fault of ours.
            let dispatcher_ok =
                heartbeat.dispatcher_silence() < Duration::from_secs(15) || !mqtt.is_connected();
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
        let cloud = engine.cloud_status();
        let mut status = format!(
            // No count of known sensors here: sled's len() reads every record.
            "broker {broker}; cloud {cloud}; {} onboarded since start, {} pending",
            metrics::snapshot(0).onboarded,
            engine.pending_now()
        );
        if let Some(b) = engine.bridge().map(|b| b.stats()) {
            if b.bridged_devices > 0 || b.buffered > 0 {
                status.push_str(&format!(
                    "; bridge {} devices, {} forwarded, {} buffered, {} dropped",
                    b.bridged_devices, b.forwarded, b.buffered, b.dropped
                ));
            }
        }
        let elsewhere = metrics::owned_elsewhere_count();
        if elsewhere > 0 {
            status.push_str(&format!("; {elsewhere} owned by other gateways"));
        }
        if open.open() == Some(true) {
            status.push_str("; open broker");
        }
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
                owned_by_other_gateways = snap.owned_by_other_gateways,
                qos0_dropped = dropped_qos0.load(std::sync::atomic::Ordering::Relaxed),
                "stats"
            );
            let mut json = serde_json::to_value(&snap).unwrap_or_default();
            if let Some(obj) = json.as_object_mut() {
                obj.insert("open_broker".into(), open.open().into());
            }
            if let (Some(b), Some(obj)) = (engine.bridge().map(|b| b.stats()), json.as_object_mut())
            {
                tracing::info!(
                    bridged_devices = b.bridged_devices,
                    forwarded = b.forwarded,
                    buffered = b.buffered,
                    dropped = b.dropped,
                    refused = b.rejected,
                    "bridge stats"
                );
                for (k, v) in [
                    ("bridged_devices", b.bridged_devices),
                    ("bridge_forwarded", b.forwarded),
                    ("bridge_buffered", b.buffered),
                    ("bridge_held", b.held),
                    ("bridge_dropped", b.dropped),
                    ("bridge_refused", b.rejected),
                    ("bridge_rate_limited", b.rate_limited),
                ] {
                    obj.insert(k.into(), v.into());
                }
            }
            if let Ok(bytes) = serde_json::to_vec(&json) {
                mqtt.try_publish_qos0(&cfg.mqtt.stats_topic, bytes);
            }
        }
    }
}

/// Creates the store directory owner-only (0700) when it is missing, and warns
/// when an existing one (or a file in it) is open to group or others.
fn prepare_store_dir(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !path.exists() {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("store.path: cannot create {}", parent.display()))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .with_context(|| format!("store.path: cannot create {}", path.display()))?;
        return Ok(());
    }
    let loose = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
            .filter(|mode| mode & 0o077 != 0)
    };
    if let Some(mode) = loose(path) {
        tracing::warn!(
            path = %path.display(),
            mode = %format!("{mode:o}"),
            "the store {} is open to group or others (mode {mode:o}) and holds every device token: chmod 700 \
                 {} (and chmod 600 the files in it)",
            path.display(),
            path.display()
        );
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let p = entry.path();
            if let Some(mode) = loose(&p) {
                tracing::warn!(
                    path = %p.display(),
                    mode = %format!("{mode:o}"),
                    "{} in the store is readable by group or others (mode {mode:o}): chmod 700 {} and chmod -R go-rwx it",
                    p.display(),
                    path.display()
                );
                break;
            }
        }
    }
    Ok(())
}
