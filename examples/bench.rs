//! Benchmark: onboarding throughput, latency and footprint, measured against the
//! broker's own limit in the same run (see BENCHMARKS.md for results and method).
//!
//! ```sh
//! cargo build --release --workspace --bins --examples && cargo run --release --example bench -- [--quick]
//! ```
//!
//! It builds nothing itself: it runs the release `onboardd` and `fake-qubitro` found
//! next to its own binary (`target/release/`, or `--bin-dir`). It starts mosquitto on
//! a free port, two fake Qubitro clouds (0 ms and 100 ms per answer) and onboardd with
//! a temporary state dir, drives simulated sensors from several MQTT connections
//! (rumqttc v5, TCP_NODELAY, one event-loop task each, replies taken through the shared
//! subscription `$share/bench/onboard/reply/+` so each reply reaches exactly one
//! connection), and prints ONE markdown table on stdout (progress goes to stderr).
//!
//! The broker's own limit is measured with a trivial echo client (this same binary
//! with `--echo-port`, so its CPU is counted apart): it subscribes to the announce
//! topic and publishes a fixed reply of the size of onboardd's on the reply topic,
//! driven by the same load generator.
//!
//! The 100 000 known sensors are onboarded through the 0 ms cloud in the run itself
//! (lookup_before_create = "after_failure" for that fill: it is the fastest policy).
//! Durability is checked after every new-device phase: kill -9 right after the last
//! reply, restart, every sensor re-announces and must be answered from the store with
//! not one request to the cloud.
//!
//! `--quick` (CI smoke) runs every phase with a few hundred sensors. No run asserts
//! anything about speed: the exit code is non-zero only when something is functionally
//! broken (a reply missing or not `ok`, a device not durably stored, a duplicate device).
//!
//! Bounded: every wait has a deadline, every loop a count. Every child is killed on
//! exit: by each process guard's `Drop`, by a panic hook (release builds abort on
//! panic, so `Drop` would not run), and by `PR_SET_PDEATHSIG` if this process dies.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use harness::process::die_with_parent;
use harness::{LogLines, Mosquitto, Proc};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;
use serde::Deserialize;
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "onboardd benchmark: throughput, latency, footprint vs the broker's own limit"
)]
struct Args {
    /// CI smoke: a few hundred sensors, ~1 s phases; asserts nothing about speed.
    #[arg(long)]
    quick: bool,
    /// Directory with the release `onboardd` and `fake-qubitro` (default: the
    /// `release` directory this example was built into).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// MQTT connections of the load generator.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Announces in flight (published, not yet answered) in the throughput phases.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Keep the temporary state dir (databases, configs) for profiling; prints its path.
    #[arg(long)]
    keep: bool,
    /// Run only the telemetry bridge phases (onboardd's bridge and a plain mosquitto
    /// bridge forwarding readings to a stand-in for Qubitro's broker).
    #[arg(long)]
    bridge_only: bool,
    /// Internal: run as the echo client against the broker on this port.
    #[arg(long, hide = true)]
    echo_port: Option<u16>,
    /// Profiling aid: only drive announces of sensors `s<START>`…`s<END-1>` (closed
    /// loop) at a broker already running on this port (onboardd under valgrind…).
    #[arg(long, requires = "drive_ids")]
    drive_port: Option<u16>,
    /// START..END for --drive-port.
    #[arg(long, value_parser = parse_range)]
    drive_ids: Option<(usize, usize)>,
    /// Rounds of --drive-ids.
    #[arg(long, default_value_t = 1)]
    drive_rounds: usize,
}

fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once("..").ok_or("expected START..END")?;
    let a: usize = a.parse().map_err(|e| format!("{e}"))?;
    let b: usize = b.parse().map_err(|e| format!("{e}"))?;
    if a >= b {
        return Err("START must be below END".into());
    }
    Ok((a, b))
}

/// `--drive-port`: announces only, against whatever answers on that broker.
async fn drive(args: &Args, port: u16, (start, end): (usize, usize)) -> Result<()> {
    let load = LoadGen::connect(port, args.connections, args.window, end).await?;
    let ids: Arc<Vec<usize>> = Arc::new((0..args.drive_rounds).flat_map(|_| start..end).collect());
    let deadline = Duration::from_secs(600) + Duration::from_millis(20 * ids.len() as u64);
    let r = load.closed("drive", ids, deadline).await?;
    println!(
        "{} announces answered in {:.2} s: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        r.n,
        r.wall_s,
        r.rate(),
        r.pct_ms(50.0),
        r.pct_ms(99.0)
    );
    load.stop();
    Ok(())
}

/// How much each phase does.
struct Sizes {
    /// New devices per 0 ms phase (per lookup policy).
    new0: usize,
    /// New devices per 100 ms phase (per lookup policy).
    new100: usize,
    /// Sensors known after the fill (the "100 000 known" measurement).
    fill_to: usize,
    /// Times each known sensor re-announces in the re-announce throughput phase.
    rounds: usize,
    /// Offered rate and length of the latency phases.
    latency_rate: f64,
    latency_secs: f64,
    /// Readings of the one-device bridge phase.
    bridge_one: usize,
    /// Bridged devices of the many-device phase, and readings per device in it.
    bridge_devices: usize,
    bridge_rounds: usize,
    /// Readings of the trickle (one device, 10/s) for bytes written at a sensor's pace.
    bridge_trickle: usize,
    /// Readings at 1/s, the same (none in --quick: it would take seconds).
    bridge_slow: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                new0: 200,
                new100: 100,
                fill_to: 500,
                rounds: 2,
                latency_rate: 1000.0,
                latency_secs: 1.0,
                bridge_one: 200,
                bridge_devices: 20,
                bridge_rounds: 10,
                bridge_trickle: 5,
                bridge_slow: 0,
            }
        } else {
            Sizes {
                new0: 10_000,
                new100: 2_000,
                fill_to: 100_000,
                rounds: 5,
                latency_rate: 1000.0,
                latency_secs: 10.0,
                bridge_one: 100_000,
                bridge_devices: 100,
                bridge_rounds: 1_000,
                bridge_trickle: 50,
                bridge_slow: 10,
            }
        }
    }
}

/// Must match onboardd's defaults, which the bench config does not change.
const MAX_IN_FLIGHT: f64 = 32.0;
const RECEIVE_MAXIMUM: u16 = 256;
/// sled's background flush runs every second: wait this long to see its writes.
const SLED_FLUSH_SETTLE: Duration = Duration::from_millis(1500);
const API_KEY: &str = "QB_bench";
const PROJECT: &str = "bench-project";
const REPLY_FILTER: &str = "$share/bench/onboard/reply/+";
/// The echo client's fixed reply: the shape and size of onboardd's ok reply.
const ECHO_REPLY: &[u8] = br#"{"status":"ok","sensor_id":"s00000","device_id":"3f1c2a4e-8b7d-4c21-9e0f-5a6b7c8d9e0f","device_token":"c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00","request_id":"r00000","broker":{"host":"broker.qubitro.com","port":8883}}"#;

// ------------------------------------------------------------------ child processes

/// What is kept of a child's output beyond its tail (onboardd logs a line per sensor).
const KEEP: &[&str] = &[
    "onboardd ready",
    "subscribed to announces",
    "listening on",
    "echo subscribed",
    "warn",
    "error",
    "stopped",
];
const KEEP_MAX: usize = 2000;

/// A child (the harness's [`Proc`]) that dies with the benchmark and keeps only [`KEEP`]
/// lines of its output.
fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
    Proc::spawn(
        name,
        die_with_parent(cmd),
        LogLines::keeping(KEEP, KEEP_MAX),
    )
    .with_context(|| format!("cannot start {name}"))
}

/// The first line of `p` containing `needle` and when it came, waiting at most `within`.
fn wait_line(p: &Proc, needle: &str, within: Duration) -> Result<(Instant, String)> {
    p.log
        .try_wait_for_n(needle, 1, within)
        .map_err(anyhow::Error::msg)
}

/// The first few warnings and errors among `lines`.
fn warnings(lines: &str) -> Vec<&str> {
    lines
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("warn") || l.contains("error")
        })
        .take(5)
        .collect()
}

// ------------------------------------------------------------------ /proc readings

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn write_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may contain spaces: fields start after the last ')'.
    let Some(rest) = text.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // After ')': state(3) … utime(14) stime(15) → indexes 11 and 12.
    (ticks(11) + ticks(12)) / hz
}

/// CPU used by this process (all its threads: the load generator), in seconds.
fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// (blocks as du counts them, apparent size) of a directory tree, in bytes.
fn du(path: &Path) -> (u64, u64) {
    let mut blocks = 0;
    let mut apparent = 0;
    let mut stack = vec![path.to_path_buf()];
    let mut budget = 100_000; // entries: sled keeps a handful of files
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        blocks += meta.blocks() * 512;
        apparent += meta.len();
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                for e in rd.flatten().take(budget) {
                    budget -= 1;
                    stack.push(e.path());
                }
            }
        }
    }
    (blocks, apparent)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Which processes to charge CPU to in a phase.
#[derive(Clone, Copy)]
struct Pids {
    /// onboardd or the echo client.
    server: u32,
    server_is_echo: bool,
    broker: u32,
    clouds: [u32; 2],
}

struct CpuSnap {
    at: Instant,
    server: f64,
    broker: f64,
    cloud: f64,
    load: f64,
}

impl CpuSnap {
    fn take(p: &Pids) -> CpuSnap {
        CpuSnap {
            at: Instant::now(),
            server: cpu_secs(p.server),
            broker: cpu_secs(p.broker),
            cloud: p.clouds.iter().map(|&c| cpu_secs(c)).sum(),
            load: self_cpu_secs(),
        }
    }

    /// CPU of each process since `self`, in % of one core.
    fn since(&self, p: &Pids) -> String {
        let now = CpuSnap::take(p);
        let wall = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let pct = |a: f64, b: f64| ((a - b) / wall * 100.0).round();
        format!(
            "{} {}% · broker {}% · load gen {}% · cloud {}%",
            if p.server_is_echo { "echo" } else { "onboardd" },
            pct(now.server, self.server),
            pct(now.broker, self.broker),
            pct(now.load, self.load),
            pct(now.cloud, self.cloud),
        )
    }
}

// ------------------------------------------------------------------ services

/// mosquitto on a free port: Nagle off (the harness sets it), generous queues and
/// in-flight windows.
fn start_mosquitto() -> Mosquitto {
    Mosquitto::builder()
        .die_with_parent()
        .conf(
            "max_queued_messages 1000000\n\
             max_queued_bytes 0\n\
             max_inflight_messages 1000\n",
        )
        .start()
}

struct Fake {
    proc: Proc,
    url: String,
}

#[derive(Deserialize, Default, Clone, Copy, Debug)]
struct FakeStats {
    create: u64,
    list: u64,
    get: u64,
}

impl FakeStats {
    fn requests(&self) -> u64 {
        self.create + self.list + self.get
    }
}

impl Fake {
    fn start(bins: &Path, delay_ms: u64) -> Result<Fake> {
        let proc = spawn(
            "fake-qubitro",
            Command::new(bins.join("fake-qubitro"))
                .args(["--listen", "127.0.0.1:0", "--api-key", API_KEY])
                .args(["--project-id", PROJECT, "--quiet"])
                .args(["--delay-ms", &delay_ms.to_string()])
                .env_remove("RUST_LOG"),
        )?;
        let (_, line) = wait_line(&proc, "listening on", Duration::from_secs(20))?;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .ok_or_else(|| anyhow!("no URL in {line:?}"))?
            .to_string();
        Ok(Fake { proc, url })
    }

    async fn stats(&self, http: &reqwest::Client) -> Result<FakeStats> {
        let r = http
            .get(format!("{}/_fake/stats", self.url))
            .send()
            .await?
            .error_for_status()?;
        Ok(r.json().await?)
    }

    async fn reset(&self, http: &reqwest::Client) -> Result<()> {
        http.post(format!("{}/_fake/reset", self.url))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

/// One onboardd process and what its start looked like.
struct Daemon {
    proc: Proc,
    ready_ms: u64,
    /// From spawn to both the "subscribed to announces" and the "ready" lines.
    wall_ms: f64,
}

struct DaemonSpec<'a> {
    bins: &'a Path,
    state: PathBuf,
    broker_port: u16,
    cloud_url: &'a str,
    policy: &'a str,
    client_id: &'a str,
    /// More config (TOML), overlaid table by table on the bench's own.
    extra: String,
}

fn field_u64(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The load generator's announces carry no proof (issue 11): `require_claim = false`,
/// so the figures measure onboarding without the cost of checking a proof.
fn start_onboardd(s: &DaemonSpec) -> Result<Daemon> {
    std::fs::create_dir_all(&s.state)?;
    let config = s.state.join("onboardd.toml");
    std::fs::write(
        &config,
        format!(
            r#"gateway_id = "bench-gw"
[log]
level = "info"
stats_interval_s = 0
[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "{client}"
[qubitro]
base_url = "{url}"
project_id = "{PROJECT}"
api_key = "{API_KEY}"
max_in_flight = {inflight}
lookup_before_create = "{policy}"
[store]
path = "{state}/db"
[security]
require_claim = false
new_sensor_cooldown_s = 0
max_new_devices_per_hour = 1000000000
[control]
socket = "{state}/onboardd.sock"
"#,
            port = s.broker_port,
            client = s.client_id,
            url = s.cloud_url,
            inflight = MAX_IN_FLIGHT as u32,
            policy = s.policy,
            state = s.state.display(),
        ),
    )?;
    if !s.extra.is_empty() {
        let merged = harness::merge_toml(&std::fs::read_to_string(&config)?, &s.extra);
        std::fs::write(&config, merged)?;
    }
    // Owner-only, or onboardd warns about a readable secret.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))?;
    let proc = spawn(
        "onboardd",
        Command::new(s.bins.join("onboardd"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET"),
    )?;
    // Both lines, whichever comes last: the subscription can be granted before the
    // ready line is logged when the start is slow.
    let (subscribed, _) = wait_line(&proc, "subscribed to announces", Duration::from_secs(30))?;
    let (logged, ready) = wait_line(&proc, "onboardd ready", Duration::from_secs(30))?;
    Ok(Daemon {
        wall_ms: subscribed
            .max(logged)
            .duration_since(proc.spawned)
            .as_secs_f64()
            * 1000.0,
        ready_ms: field_u64(&ready, "ready_ms")
            .ok_or_else(|| anyhow!("no ready_ms in {ready:?}"))?,
        proc,
    })
}

fn start_echo(port: u16) -> Result<Proc> {
    let me = std::env::current_exe().context("own executable")?;
    let p = spawn(
        "echo client",
        Command::new(me).args(["--echo-port", &port.to_string()]),
    )?;
    wait_line(&p, "echo subscribed", Duration::from_secs(20))?;
    Ok(p)
}

fn mqtt_options(client_id: String, port: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(true);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    opts.set_network_options(net);
    opts
}

/// Ends onboardd's persistent session, so the broker stops queueing announces for a
/// daemon that is gone (they would load the broker in the next phases).
async fn forget_session(port: u16, client_id: &str) -> Result<()> {
    let (client, mut el) = AsyncClient::new(mqtt_options(client_id.to_string(), port), 16);
    tokio::time::timeout(Duration::from_secs(5), async {
        for _ in 0..100 {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => client.try_disconnect()?,
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!("connecting as {client_id}: {e}"),
            }
        }
        bail!("no disconnect after 100 events")
    })
    .await
    .context("forgetting a session")?
}

// ------------------------------------------------------------------ load generator

/// State shared by the load generator's senders and event loops.
struct Shared {
    base: Instant,
    /// Per sensor: send time in ns since `base`, plus one; 0 when nothing is owed.
    slots: Vec<AtomicU64>,
    /// Announces in flight in the closed-loop phases.
    window: Semaphore,
    windowed: AtomicBool,
    replies: AtomicU64,
    /// Replies nobody waited for (republished ok replies after a kill -9, …).
    extras: AtomicU64,
    not_ok: AtomicU64,
    not_ok_samples: Mutex<Vec<String>>,
    /// A sensor announced again before its previous reply came (open loop only).
    overlaps: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    first_send_ns: AtomicU64,
    last_reply_ns: AtomicU64,
    conn_errors: AtomicU64,
    subscribed: AtomicU64,
    stop: AtomicBool,
    /// Announce with `"bridge": true` (the bridge phases).
    bridged: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn on_reply(&self, topic: &[u8], payload: &[u8]) {
        let now = self.now_ns();
        let idx = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| t.strip_prefix("onboard/reply/s"))
            .and_then(|n| n.parse::<usize>().ok());
        let Some(slot) = idx.and_then(|i| self.slots.get(i)) else {
            self.extras.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let sent = slot.swap(0, Ordering::AcqRel);
        if sent == 0 {
            self.extras.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let us = (now.saturating_sub(sent - 1) / 1000).min(u32::MAX as u64) as u32;
        self.latencies_us.lock().expect("latency lock").push(us);
        if !payload.starts_with(br#"{"status":"ok""#) {
            self.not_ok.fetch_add(1, Ordering::Relaxed);
            let mut s = self.not_ok_samples.lock().expect("sample lock");
            if s.len() < 5 {
                s.push(String::from_utf8_lossy(payload).chars().take(300).collect());
            }
        }
        self.last_reply_ns.fetch_max(now, Ordering::Relaxed);
        self.replies.fetch_add(1, Ordering::Release);
        if self.windowed.load(Ordering::Relaxed) {
            self.window.add_permits(1);
        }
    }
}

#[derive(Clone)]
struct LoadGen {
    shared: Arc<Shared>,
    clients: Arc<Vec<AsyncClient>>,
    /// Permits of `Shared::window` when no closed-loop phase runs.
    window: usize,
}

/// One phase's outcome.
struct PhaseResult {
    n: usize,
    wall_s: f64,
    latencies_us: Vec<u32>,
}

impl PhaseResult {
    fn rate(&self) -> f64 {
        self.n as f64 / self.wall_s.max(1e-9)
    }

    fn pct_ms(&self, p: f64) -> f64 {
        let v = &self.latencies_us;
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() as f64 * p / 100.0).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    }
}

fn announce_payload(idx: usize) -> Vec<u8> {
    format!(
        r#"{{"name":"Bench sensor {idx}","brand":"Acme","model":"T1000","tags":["bench"],"metadata":{{"floor":"2"}},"request_id":"r{idx}"}}"#
    )
    .into_bytes()
}

/// A sensor that cannot reach Qubitro itself: the gateway forwards its readings.
fn bridged_announce_payload(idx: usize) -> Vec<u8> {
    format!(
        r#"{{"bridge":true,"name":"Bridged sensor {idx}","brand":"Acme","model":"T1000","request_id":"r{idx}"}}"#
    )
    .into_bytes()
}

impl LoadGen {
    async fn connect(
        port: u16,
        connections: usize,
        window: usize,
        sensors: usize,
    ) -> Result<LoadGen> {
        let shared = Arc::new(Shared {
            base: Instant::now(),
            slots: (0..sensors).map(|_| AtomicU64::new(0)).collect(),
            window: Semaphore::new(window),
            windowed: AtomicBool::new(false),
            replies: AtomicU64::new(0),
            extras: AtomicU64::new(0),
            not_ok: AtomicU64::new(0),
            not_ok_samples: Mutex::new(Vec::new()),
            overlaps: AtomicU64::new(0),
            latencies_us: Mutex::new(Vec::new()),
            first_send_ns: AtomicU64::new(u64::MAX),
            last_reply_ns: AtomicU64::new(0),
            conn_errors: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            bridged: AtomicBool::new(false),
        });
        let mut clients = Vec::new();
        for c in 0..connections {
            let opts = mqtt_options(format!("bench-load-{}-{c}", std::process::id()), port);
            let (client, mut el) = AsyncClient::new(opts, 20_000);
            let sub = client.clone();
            let sh = shared.clone();
            // Lives until the bench stops (`stop`) or the runtime ends with the process.
            tokio::spawn(async move {
                while !sh.stop.load(Ordering::Relaxed) {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            sh.on_reply(&p.topic, &p.payload)
                        }
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            if c == 0 {
                                let rm = ack.properties.as_ref().and_then(|p| p.receive_max);
                                eprintln!(
                                    "bench: broker's receive maximum for our publishes: {rm:?}"
                                );
                            }
                            if let Err(e) = sub.try_subscribe(REPLY_FILTER, QoS::AtLeastOnce) {
                                eprintln!("bench: cannot subscribe: {e}");
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            sh.subscribed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if sh.conn_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("bench: load connection {c}: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            clients.push(client);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.subscribed.load(Ordering::Relaxed) < connections as u64 {
            if Instant::now() > deadline {
                bail!("the load generator's connections did not subscribe in 10 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(LoadGen {
            shared,
            clients: Arc::new(clients),
            window,
        })
    }

    fn reset(&self, windowed: bool) {
        let s = &self.shared;
        s.windowed.store(windowed, Ordering::Relaxed);
        s.replies.store(0, Ordering::Relaxed);
        s.extras.store(0, Ordering::Relaxed);
        s.not_ok.store(0, Ordering::Relaxed);
        s.overlaps.store(0, Ordering::Relaxed);
        s.latencies_us.lock().expect("latency lock").clear();
        s.not_ok_samples.lock().expect("sample lock").clear();
        s.first_send_ns.store(u64::MAX, Ordering::Relaxed);
        s.last_reply_ns.store(0, Ordering::Relaxed);
    }

    async fn send(&self, conn: usize, idx: usize) -> Result<()> {
        let topic = format!("onboard/announce/s{idx}");
        let s = &self.shared;
        let payload = if s.bridged.load(Ordering::Relaxed) {
            bridged_announce_payload(idx)
        } else {
            announce_payload(idx)
        };
        let now = s.now_ns();
        s.first_send_ns.fetch_min(now, Ordering::Relaxed);
        if s.slots[idx].swap(now + 1, Ordering::AcqRel) != 0 {
            s.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        self.clients[conn]
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .context("queue an announce")
    }

    /// Closed loop: every entry of `ids` is one announce, at most `window` unanswered
    /// (when sensors repeat, at most half the distinct ones, so that a sensor's next
    /// announce does not overtake its previous one).
    async fn closed(
        &self,
        what: &str,
        ids: Arc<Vec<usize>>,
        deadline: Duration,
    ) -> Result<PhaseResult> {
        self.reset(true);
        let mut seen = vec![false; self.shared.slots.len()];
        let distinct = ids
            .iter()
            .filter(|&&i| !std::mem::replace(&mut seen[i], true))
            .count();
        let window = if distinct < ids.len() {
            self.window.min((distinct / 2).max(1))
        } else {
            self.window
        };
        let held = self.shared.window.forget_permits(self.window - window);
        let k = self.clients.len();
        let mut tasks = Vec::new();
        for c in 0..k {
            let me = self.clone();
            let ids = ids.clone();
            tasks.push(tokio::spawn(async move {
                for j in (c..ids.len()).step_by(k) {
                    me.shared.window.acquire().await?.forget();
                    // Bounded wait in the rare case this sensor is still owed a reply.
                    for _ in 0..10_000 {
                        if me.shared.slots[ids[j]].load(Ordering::Acquire) == 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    me.send(c, ids[j]).await?;
                }
                anyhow::Ok(())
            }));
        }
        let r = self.finish(what, ids.len(), tasks, deadline).await;
        self.shared.window.add_permits(held);
        r
    }

    /// Open loop: announces at a fixed offered `rate`, whatever the answers do.
    async fn open(
        &self,
        what: &str,
        ids: Arc<Vec<usize>>,
        rate: f64,
        deadline: Duration,
    ) -> Result<PhaseResult> {
        self.reset(false);
        let k = self.clients.len();
        let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
        let mut tasks = Vec::new();
        for c in 0..k {
            let me = self.clone();
            let ids = ids.clone();
            tasks.push(tokio::spawn(async move {
                for j in (c..ids.len()).step_by(k) {
                    tokio::time::sleep_until(t0 + Duration::from_secs_f64(j as f64 / rate)).await;
                    me.send(c, ids[j]).await?;
                }
                anyhow::Ok(())
            }));
        }
        self.finish(what, ids.len(), tasks, deadline).await
    }

    async fn finish(
        &self,
        what: &str,
        n: usize,
        tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
        deadline: Duration,
    ) -> Result<PhaseResult> {
        let s = &self.shared;
        let until = Instant::now() + deadline;
        while (s.replies.load(Ordering::Acquire) as usize) < n && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut send_error = None;
        for t in tasks {
            if !t.is_finished() {
                t.abort();
                continue;
            }
            if let Ok(Err(e)) = t.await {
                send_error = Some(e);
            }
        }
        if let Some(e) = send_error {
            return Err(e.context(format!("{what}: sending")));
        }
        let got = s.replies.load(Ordering::Acquire) as usize;
        if got < n {
            bail!(
                "{what}: only {got} of {n} replies within {deadline:?} ({} connection errors)",
                s.conn_errors.load(Ordering::Relaxed)
            );
        }
        let not_ok = s.not_ok.load(Ordering::Relaxed);
        if not_ok > 0 {
            let samples = s.not_ok_samples.lock().expect("sample lock").join("\n  ");
            bail!("{what}: {not_ok} of {n} replies were not ok, e.g.:\n  {samples}");
        }
        let extras = s.extras.load(Ordering::Relaxed);
        let overlaps = s.overlaps.load(Ordering::Relaxed);
        if extras > 0 || overlaps > 0 {
            eprintln!(
                "bench: {what}: {extras} unexpected replies, {overlaps} overlapping announces"
            );
        }
        let first = s.first_send_ns.load(Ordering::Relaxed);
        let last = s.last_reply_ns.load(Ordering::Relaxed);
        let mut latencies_us = std::mem::take(&mut *s.latencies_us.lock().expect("latency lock"));
        latencies_us.sort_unstable();
        let r = PhaseResult {
            n,
            wall_s: last.saturating_sub(first) as f64 / 1e9,
            latencies_us,
        };
        eprintln!(
            "bench: {what}: {n} in {:.2} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
            r.wall_s,
            r.rate(),
            r.pct_ms(50.0),
            r.pct_ms(99.0)
        );
        Ok(r)
    }

    fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for c in self.clients.iter() {
            let _ = c.try_disconnect();
        }
    }
}

// ------------------------------------------------------------------ report

struct Row {
    order: u32,
    what: String,
    result: String,
    target: String,
    met: Option<bool>,
    cpu: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    failures: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        order: u32,
        what: &str,
        result: String,
        target: &str,
        met: Option<bool>,
        cpu: String,
    ) {
        eprintln!("bench: [{what}] {result}");
        self.rows.push(Row {
            order,
            what: what.to_string(),
            result,
            target: target.to_string(),
            met,
            cpu,
        });
    }

    /// A functional check: failing it makes the exit code non-zero.
    fn check(&mut self, ok: bool, what: String) -> bool {
        if !ok {
            eprintln!("bench: FUNCTIONAL FAILURE: {what}");
            self.failures.push(what);
        }
        ok
    }

    fn print(&mut self, quick: bool) {
        self.rows.sort_by_key(|r| r.order);
        println!();
        if quick {
            println!("(--quick: tiny N and ~1 s phases, a smoke test; the numbers mean nothing about speed)");
            println!();
        }
        println!("| measurement | result | target | met | CPU, % of one core (same phase) |");
        println!("| --- | --- | --- | --- | --- |");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            println!(
                "| {} | {} | {} | {} | {} |",
                r.what,
                r.result,
                if r.target.is_empty() {
                    "—"
                } else {
                    &r.target
                },
                met,
                if r.cpu.is_empty() { "—" } else { &r.cpu }
            );
        }
        println!();
    }
}

// ------------------------------------------------------------------ the run

struct Env {
    bins: PathBuf,
    work: PathBuf,
    broker_port: u16,
    broker_pid: u32,
    http: reqwest::Client,
    load: LoadGen,
    fake0: Fake,
    fake100: Fake,
}

impl Env {
    fn pids(&self, server: u32, server_is_echo: bool) -> Pids {
        Pids {
            server,
            server_is_echo,
            broker: self.broker_pid,
            clouds: [self.fake0.proc.pid(), self.fake100.proc.pid()],
        }
    }

    fn spec<'a>(
        &'a self,
        name: &str,
        cloud: &'a Fake,
        policy: &'a str,
        client_id: &'a str,
    ) -> DaemonSpec<'a> {
        DaemonSpec {
            bins: &self.bins,
            state: self.work.join(name),
            broker_port: self.broker_port,
            cloud_url: &cloud.url,
            policy,
            client_id,
            extra: String::new(),
        }
    }

    fn deadline(n: usize) -> Duration {
        Duration::from_secs(30) + Duration::from_millis(2 * n as u64)
    }

    /// Onboards `ids` as new devices; checks one create each and that every one was
    /// stored durably before its reply (kill -9 right after the last reply, restart,
    /// every sensor re-announces: each must be answered from the store, with not one
    /// request to the cloud). Returns the restarted daemon.
    #[allow(clippy::too_many_arguments)]
    async fn new_devices(
        &self,
        rep: &mut Report,
        order: u32,
        what: &str,
        d: Daemon,
        spec: &DaemonSpec<'_>,
        cloud: &Fake,
        ids: Arc<Vec<usize>>,
        target_rate: f64,
        target: &str,
    ) -> Result<(Daemon, PhaseResult)> {
        let mut d = d;
        let pids = self.pids(d.proc.pid(), false);
        let s0 = cloud.stats(&self.http).await?;
        let cpu = CpuSnap::take(&pids);
        let r = self
            .load
            .closed(what, ids.clone(), Env::deadline(ids.len()))
            .await?;
        let cpu = cpu.since(&pids);
        let s1 = cloud.stats(&self.http).await?;
        let creates = s1.create - s0.create;
        rep.check(
            creates == ids.len() as u64,
            format!("{what}: {creates} creates for {} new sensors", ids.len()),
        );
        let req_rate = (s1.requests() - s0.requests()) as f64 / r.wall_s.max(1e-9);
        d.proc.kill9();
        let d = start_onboardd(spec)?;
        let (durable, _) = self
            .answered_from_store(rep, what, cloud, ids.clone())
            .await?;
        let rate = r.rate();
        rep.row(
            order,
            what,
            format!(
                "{rate:.0} devices/s ({req_rate:.0} requests/s); {n}/{n} stored durably (kill -9 after the last reply, restart, all re-announce: 0 cloud requests)",
                n = ids.len(),
            ),
            target,
            Some(rate >= target_rate && durable),
            cpu,
        );
        Ok((d, r))
    }

    /// Every sensor in `ids` re-announces once; true if all got ok without a single
    /// cloud request (so each one's credentials came from the store).
    async fn answered_from_store(
        &self,
        rep: &mut Report,
        what: &str,
        cloud: &Fake,
        ids: Arc<Vec<usize>>,
    ) -> Result<(bool, PhaseResult)> {
        let s0 = cloud.stats(&self.http).await?;
        let label = format!("{what}: re-announce after kill -9");
        let r = self
            .load
            .closed(&label, ids.clone(), Env::deadline(ids.len()))
            .await?;
        let s1 = cloud.stats(&self.http).await?;
        let asked = s1.requests() - s0.requests();
        let ok = rep.check(
            asked == 0,
            format!("{label}: {asked} cloud requests, so not every sensor was stored"),
        );
        Ok((ok, r))
    }
}

/// Sensor ids of each phase: s0… in disjoint ranges.
struct Ids {
    /// Phase A (new devices, 0 ms cloud, lookup always), later the known sensors.
    a: Arc<Vec<usize>>,
    /// Phase B (new devices, 0 ms cloud, lookup after_failure).
    b: Vec<usize>,
    /// Phases C and D (new devices, 100 ms cloud, both policies).
    c: Vec<usize>,
    d: Vec<usize>,
    /// Grows A's store to `fill_to` sensors.
    fill: Vec<usize>,
    /// One past the highest id.
    total: usize,
}

impl Ids {
    fn new(sz: &Sizes) -> Ids {
        let c_start = 2 * sz.new0;
        let f_start = c_start + 2 * sz.new100;
        let fill: Vec<usize> = (f_start..f_start + (sz.fill_to - sz.new0)).collect();
        Ids {
            a: Arc::new((0..sz.new0).collect()),
            b: (sz.new0..2 * sz.new0).collect(),
            c: (c_start..c_start + sz.new100).collect(),
            d: (c_start + sz.new100..c_start + 2 * sz.new100).collect(),
            total: f_start + fill.len(),
            fill,
        }
    }
}

/// A daemon start as measured: (ready_ms it logged, spawn → ready and subscribed in ms).
type StartTime = (u64, f64);

const TARGET_NEW0: &str = "≥ 2 000 devices/s, each durably stored before its reply";

/// What the 100 ms cloud allows with onboardd's in-flight limit, with a 20 % margin.
fn target100() -> f64 {
    0.8 * MAX_IN_FLIGHT / 0.1
}

/// The release binaries' directory: `--bin-dir`, else the profile directory above this
/// example (`target/release/examples/bench` → `target/release`).
fn bin_dir(args: &Args) -> Result<PathBuf> {
    let bins = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| anyhow!("cannot locate the release directory"))?
            .to_path_buf(),
    };
    for b in ["onboardd", "fake-qubitro"] {
        if !bins.join(b).exists() {
            bail!(
                "{} not found: build the release binaries first (cargo build --release --workspace --bins)",
                bins.join(b).display()
            );
        }
    }
    eprintln!("bench: binaries from {}", bins.display());
    Ok(bins)
}

async fn bench(args: &Args, rep: &mut Report) -> Result<()> {
    let sz = Sizes::new(args.quick);
    let bins = bin_dir(args)?;
    let work_dir = tempfile::Builder::new()
        .prefix("onboardd-bench-")
        .tempdir()?;
    let work = work_dir.path().to_path_buf();
    eprintln!("bench: state in {}", work.display());
    let _work_dir = if args.keep {
        let _ = work_dir.keep();
        None
    } else {
        Some(work_dir)
    };

    let mut broker = start_mosquitto();
    let fake0 = Fake::start(&bins, 0)?;
    let fake100 = Fake::start(&bins, 100)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let ids = Ids::new(&sz);
    let sensors = ids.total.max(sz.bridge_devices);
    let load = LoadGen::connect(broker.port, args.connections, args.window, sensors).await?;
    let env = Env {
        bins: bins.clone(),
        work,
        broker_port: broker.port,
        broker_pid: broker.pid(),
        http,
        load,
        fake0,
        fake100,
    };

    if !args.bridge_only {
        let (a, ready_empty, ready_known) = new_devices_on_a_fresh_store(&env, rep, &ids.a).await?;
        let known = known_sensors_re_announce(&env, rep, &sz, a, &ids.a).await?;
        let echo = the_brokers_own_limit(&env, &known).await?;
        report_against_the_broker(rep, &sz, &known, &echo);
        new_devices_with_lookup_after_failure(&env, rep, ids.b.clone()).await?;
        new_devices_with_a_slow_cloud(&env, rep, ids.c.clone(), ids.d.clone()).await?;
        let ready_grown = grow_the_store(&env, rep, &sz, &ids).await?;
        report_start_times(rep, &sz, [ready_empty, ready_known, ready_grown]);
        report_binary_sizes(rep, &bins)?;
    }
    let mut br = bridged_devices_onboarded(&env, rep, &sz).await?;
    bridge_one_device(&env, rep, &sz, &mut br).await?;
    bridge_many_devices(&env, rep, &sz, &mut br).await?;
    bridge_rss_with_devices_connected(rep, &sz, &br);
    bridge_bytes_written_per_reading(rep, &sz, &mut br).await?;
    bridge_stop(&env, rep, &mut br).await?;
    for persistent in [false, true] {
        mosquitto_bridge(&env, rep, &sz, &mut br, persistent).await?;
    }

    let log = broker.log();
    for w in warnings(&log) {
        eprintln!("bench: mosquitto said: {w}");
    }
    env.load.stop();
    broker.stop();
    Ok(())
}

/// Phase A: a fresh database, lookup "always", cloud 0 ms; the idle RSS, then a normal
/// restart. Returns the restarted daemon and both start times.
async fn new_devices_on_a_fresh_store(
    env: &Env,
    rep: &mut Report,
    a_ids: &Arc<Vec<usize>>,
) -> Result<(Daemon, StartTime, StartTime)> {
    env.fake0.reset(&env.http).await?;
    let a_spec = env.spec("a", &env.fake0, "always", "onboardd-bench-a");
    let a = start_onboardd(&a_spec)?;
    let ready_empty = (a.ready_ms, a.wall_ms);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = a.proc.pid();
    let (idle_rss, idle_hwm) = (
        proc_status_kib(pid, "VmRSS").unwrap_or(0),
        proc_status_kib(pid, "VmHWM").unwrap_or(0),
    );
    rep.row(
        60,
        "RSS idle (empty database, after ready + 1 s)",
        format!("{} (peak VmHWM {})", mib(idle_rss), mib(idle_hwm)),
        "≤ 15 MiB",
        Some(idle_hwm <= 15 * 1024),
        String::new(),
    );
    let (mut a, _) = env
        .new_devices(
            rep,
            10,
            "New devices, cloud 0 ms, lookup_before_create = always",
            a,
            &a_spec,
            &env.fake0,
            a_ids.clone(),
            2000.0,
            TARGET_NEW0,
        )
        .await?;
    // Then a normal restart (SIGTERM, start): its start time is the one that counts, and
    // the database is quiet after it (after a kill -9 sled rewrites pages for a while).
    rep.check(
        a.proc.terminate(Duration::from_secs(10)),
        "onboardd A: SIGTERM did not exit 0".into(),
    );
    let a = start_onboardd(&a_spec)?;
    let ready_known = (a.ready_ms, a.wall_ms);
    // Republished unacknowledged ok replies arrive right after the restart.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((a, ready_empty, ready_known))
}

/// What the known-sensor phase measured, for the comparison with the echo client.
struct Known {
    re_ids: Arc<Vec<usize>>,
    lat_ids: Arc<Vec<usize>>,
    lat_n: usize,
    lat_rate: f64,
    re: PhaseResult,
    re_cpu: String,
    lat: PhaseResult,
    lat_cpu: String,
}

/// Re-announces of the known sensors on daemon A: throughput, disk writes, latency, RSS
/// and database size. Stops A.
async fn known_sensors_re_announce(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    mut a: Daemon,
    a_ids: &Arc<Vec<usize>>,
) -> Result<Known> {
    let pid = a.proc.pid();
    let pids = env.pids(pid, false);
    let re_ids: Arc<Vec<usize>> =
        Arc::new((0..sz.rounds).flat_map(|_| a_ids.iter().copied()).collect());
    let creates_before = env.fake0.stats(&env.http).await?.create;
    // Wait until the daemon writes nothing for a whole flush window: after a kill -9
    // and restart, sled goes on writing in the background for a while (delivery marks
    // of republished replies, segment cleaning), which is no re-announce's doing.
    let settle_from = Instant::now();
    let wb_start = write_bytes(pid);
    let mut wb0 = wb_start;
    for _ in 0..20 {
        tokio::time::sleep(SLED_FLUSH_SETTLE).await;
        let now = write_bytes(pid);
        if now == wb0 {
            break;
        }
        wb0 = now;
    }
    let settle_s = settle_from.elapsed().as_secs_f64();
    let idle_written = wb0.zip(wb_start).map_or(0, |(b, a)| b - a);
    let cpu = CpuSnap::take(&pids);
    let re = env
        .load
        .closed(
            "re-announce burst (onboardd)",
            re_ids.clone(),
            Env::deadline(re_ids.len()),
        )
        .await?;
    let re_cpu = cpu.since(&pids);
    tokio::time::sleep(SLED_FLUSH_SETTLE).await;
    let wb1 = write_bytes(pid);
    let creates_after = env.fake0.stats(&env.http).await?.create;
    rep.check(
        creates_after == creates_before,
        format!(
            "re-announces created {} devices",
            creates_after - creates_before
        ),
    );
    let lat_n = (sz.latency_rate * sz.latency_secs) as usize;
    let lat_ids: Arc<Vec<usize>> = Arc::new((0..lat_n).map(|j| a_ids[j % a_ids.len()]).collect());
    let cpu = CpuSnap::take(&pids);
    let lat = env
        .load
        .open(
            "latency at 1 000/s (onboardd)",
            lat_ids.clone(),
            sz.latency_rate,
            Env::deadline(lat_n),
        )
        .await?;
    let lat_cpu = cpu.since(&pids);
    let (rss_10k, hwm_10k) = (
        proc_status_kib(pid, "VmRSS").unwrap_or(0),
        proc_status_kib(pid, "VmHWM").unwrap_or(0),
    );
    let (du_10k, _) = du(&env.work.join("a"));
    rep.check(
        a.proc.terminate(Duration::from_secs(10)),
        "onboardd A: SIGTERM did not exit 0".into(),
    );
    forget_session(env.broker_port, "onboardd-bench-a").await?;

    match (wb0, wb1) {
        (Some(w0), Some(w1)) => {
            let per = (w1 - w0) as f64 / re.n as f64;
            rep.row(
                50,
                "Bytes written to disk per re-announce",
                format!(
                    "{per:.1} B ({} B over {} re-announces, incl. 1.5 s after; before it, {idle_written} B written while idle for {settle_s:.1} s until quiet)",
                    w1 - w0,
                    re.n,
                ),
                "0",
                Some(w1 == w0),
                String::new(),
            );
        }
        _ => rep.row(
            50,
            "Bytes written to disk per re-announce",
            "/proc/PID/io unreadable".into(),
            "0",
            None,
            String::new(),
        ),
    }
    rep.row(
        61,
        &format!(
            "RSS, {} sensors known (restarted, after the re-announce and latency phases)",
            sz.new0
        ),
        format!("{} (peak VmHWM {})", mib(rss_10k), mib(hwm_10k)),
        "",
        None,
        String::new(),
    );
    rep.row(
        70,
        &format!("Database size per sensor, {} known", sz.new0),
        format!(
            "{:.0} B ({:.1} MiB in all)",
            du_10k as f64 / sz.new0 as f64,
            du_10k as f64 / 1048576.0
        ),
        "",
        None,
        String::new(),
    );
    Ok(Known {
        re_ids,
        lat_ids,
        lat_n,
        lat_rate: sz.latency_rate,
        re,
        re_cpu,
        lat,
        lat_cpu,
    })
}

/// The echo client's results under the same load as the known-sensor phase.
struct Echo {
    re: PhaseResult,
    re_cpu: String,
    lat: PhaseResult,
    lat_cpu: String,
}

/// The broker's own limit: the trivial echo client under the known-sensor phase's load.
async fn the_brokers_own_limit(env: &Env, known: &Known) -> Result<Echo> {
    let mut echo = start_echo(env.broker_port)?;
    let epids = env.pids(echo.pid(), true);
    let cpu = CpuSnap::take(&epids);
    let re = env
        .load
        .closed(
            "re-announce burst (echo client)",
            known.re_ids.clone(),
            Env::deadline(known.re_ids.len()),
        )
        .await?;
    let re_cpu = cpu.since(&epids);
    let cpu = CpuSnap::take(&epids);
    let lat = env
        .load
        .open(
            "latency at 1 000/s (echo client)",
            known.lat_ids.clone(),
            known.lat_rate,
            Env::deadline(known.lat_n),
        )
        .await?;
    let lat_cpu = cpu.since(&epids);
    echo.terminate(Duration::from_secs(5));
    Ok(Echo {
        re,
        re_cpu,
        lat,
        lat_cpu,
    })
}

/// Rows comparing onboardd with the echo client: throughput and latency.
fn report_against_the_broker(rep: &mut Report, sz: &Sizes, known: &Known, echo: &Echo) {
    let ratio = known.re.rate() / echo.re.rate();
    rep.row(
        30,
        "Broker's own limit: echo client, re-announce burst",
        format!("{:.0} replies/s ({} announces)", echo.re.rate(), echo.re.n),
        "",
        None,
        echo.re_cpu.clone(),
    );
    rep.row(
        31,
        &format!("Re-announce throughput, {} known sensors", sz.new0),
        format!(
            "{:.0} replies/s = {ratio:.2} × echo client",
            known.re.rate()
        ),
        "≥ 0.5 × echo client",
        Some(ratio >= 0.5),
        known.re_cpu.clone(),
    );
    rep.row(
        40,
        "Latency, echo client, 1 000 announces/s offered",
        format!(
            "p50 {:.2} ms, p99 {:.2} ms ({} samples)",
            echo.lat.pct_ms(50.0),
            echo.lat.pct_ms(99.0),
            echo.lat.n
        ),
        "",
        None,
        echo.lat_cpu.clone(),
    );
    rep.row(
        41,
        "Latency, onboardd re-announce, 1 000 announces/s offered",
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            known.lat.pct_ms(50.0),
            known.lat.pct_ms(99.0),
            known.lat.pct_ms(100.0),
            known.lat.n
        ),
        "p99 ≤ 1.5 ms",
        Some(known.lat.pct_ms(99.0) <= 1.5),
        known.lat_cpu.clone(),
    );
}

/// Phase B: a fresh database, lookup "after_failure", cloud 0 ms.
async fn new_devices_with_lookup_after_failure(
    env: &Env,
    rep: &mut Report,
    b_ids: Vec<usize>,
) -> Result<()> {
    env.fake0.reset(&env.http).await?;
    let b_spec = env.spec("b", &env.fake0, "after_failure", "onboardd-bench-b");
    let b = start_onboardd(&b_spec)?;
    let (mut b, _) = env
        .new_devices(
            rep,
            11,
            "New devices, cloud 0 ms, lookup_before_create = after_failure",
            b,
            &b_spec,
            &env.fake0,
            Arc::new(b_ids),
            2000.0,
            TARGET_NEW0,
        )
        .await?;
    b.proc.terminate(Duration::from_secs(10));
    forget_session(env.broker_port, "onboardd-bench-b").await?;
    let _ = std::fs::remove_dir_all(env.work.join("b"));
    Ok(())
}

/// Phases C and D: cloud 100 ms, both lookup policies.
async fn new_devices_with_a_slow_cloud(
    env: &Env,
    rep: &mut Report,
    c_ids: Vec<usize>,
    d_ids: Vec<usize>,
) -> Result<()> {
    let target100 = target100();
    let target_new100 =
        format!("≥ {target100:.0} devices/s (0.8 × {MAX_IN_FLIGHT} in flight ÷ 0.1 s)");
    for (order, policy, ids, name) in [
        (12, "always", c_ids, "c"),
        (13, "after_failure", d_ids, "d"),
    ] {
        let client = format!("onboardd-bench-{name}");
        let spec = env.spec(name, &env.fake100, policy, &client);
        let d = start_onboardd(&spec)?;
        let what = format!("New devices, cloud 100 ms, lookup_before_create = {policy}");
        let (mut d, r) = env
            .new_devices(
                rep,
                order,
                &what,
                d,
                &spec,
                &env.fake100,
                Arc::new(ids),
                target100,
                &target_new100,
            )
            .await?;
        if policy == "always" {
            // Two requests per device: say what the in-flight limit allows in requests.
            let req = 2.0 * r.rate();
            eprintln!(
                "bench: {what}: ≈{req:.0} requests/s against a limit of {:.0}",
                MAX_IN_FLIGHT / 0.1
            );
        }
        d.proc.terminate(Duration::from_secs(10));
        forget_session(env.broker_port, &client).await?;
        let _ = std::fs::remove_dir_all(env.work.join(name));
    }
    Ok(())
}

/// Grows A's store to `fill_to` sensors through the 0 ms cloud, checks it durably, then
/// every known sensor re-announces after a restart. Returns that restart's start time.
async fn grow_the_store(env: &Env, rep: &mut Report, sz: &Sizes, ids: &Ids) -> Result<StartTime> {
    let f_spec = env.spec("a", &env.fake0, "after_failure", "onboardd-bench-a");
    let mut a = start_onboardd(&f_spec)?;
    let pid = a.proc.pid();
    let wb0 = write_bytes(pid);
    let fill_ids = Arc::new(ids.fill.clone());
    let fill_n = fill_ids.len();
    let pids = env.pids(pid, false);
    let cpu = CpuSnap::take(&pids);
    let s0 = env.fake0.stats(&env.http).await?;
    let fill = env
        .load
        .closed("fill", fill_ids.clone(), Env::deadline(fill_n))
        .await?;
    let fill_cpu = cpu.since(&pids);
    let s1 = env.fake0.stats(&env.http).await?;
    rep.check(
        s1.create - s0.create == fill_n as u64,
        format!(
            "fill: {} creates for {fill_n} new sensors",
            s1.create - s0.create
        ),
    );
    tokio::time::sleep(SLED_FLUSH_SETTLE).await;
    let wb1 = write_bytes(pid);
    let hwm_fill = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    let per_new = match (wb0, wb1) {
        (Some(a), Some(b)) => format!(
            "; {:.0} B written per new device",
            (b - a) as f64 / fill_n as f64
        ),
        _ => String::new(),
    };
    rep.row(
        14,
        &format!(
            "New devices, cloud 0 ms, after_failure, growing the store {} → {}",
            sz.new0, sz.fill_to
        ),
        format!("{:.0} devices/s{per_new}", fill.rate()),
        "",
        None,
        fill_cpu,
    );
    rep.row(
        62,
        &format!(
            "RSS peak while onboarding {} → {} sensors",
            sz.new0, sz.fill_to
        ),
        format!("peak VmHWM {}", mib(hwm_fill)),
        "≤ 40 MiB",
        Some(hwm_fill <= 40 * 1024),
        String::new(),
    );
    a.proc.kill9();
    let mut a = start_onboardd(&f_spec)?;
    let all_known: Arc<Vec<usize>> =
        Arc::new(ids.a.iter().chain(fill_ids.iter()).copied().collect());
    // The durability check of the fill: answered from the store, or not at all.
    env.answered_from_store(rep, "fill", &env.fake0, all_known.clone())
        .await?;
    rep.check(
        a.proc.terminate(Duration::from_secs(10)),
        "onboardd A: SIGTERM did not exit 0".into(),
    );
    let mut a = start_onboardd(&f_spec)?;
    let ready_grown = (a.ready_ms, a.wall_ms);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = a.proc.pid();
    let pids = env.pids(pid, false);
    let cpu = CpuSnap::take(&pids);
    let re_all = env
        .load
        .closed(
            "re-announce of every known sensor",
            all_known.clone(),
            Env::deadline(all_known.len()),
        )
        .await?;
    let re_all_cpu = cpu.since(&pids);
    let (rss_100k, hwm_100k) = (
        proc_status_kib(pid, "VmRSS").unwrap_or(0),
        proc_status_kib(pid, "VmHWM").unwrap_or(0),
    );
    rep.row(
        32,
        &format!(
            "Re-announce throughput, {} known sensors (each once, after a restart)",
            sz.fill_to
        ),
        format!("{:.0} replies/s", re_all.rate()),
        "",
        None,
        re_all_cpu,
    );
    rep.row(
        63,
        &format!(
            "RSS, {} sensors known (restarted, after every one re-announced)",
            sz.fill_to
        ),
        format!("{} (peak VmHWM {})", mib(rss_100k), mib(hwm_100k)),
        "≤ 40 MiB",
        Some(hwm_100k <= 40 * 1024),
        String::new(),
    );
    let (du_all, _) = du(&env.work.join("a"));
    rep.row(
        71,
        &format!("Database size per sensor, {} known", sz.fill_to),
        format!(
            "{:.0} B ({:.1} MiB in all)",
            du_all as f64 / sz.fill_to as f64,
            du_all as f64 / 1048576.0
        ),
        "",
        None,
        String::new(),
    );
    rep.check(
        a.proc.terminate(Duration::from_secs(10)),
        "onboardd A: SIGTERM did not exit 0".into(),
    );
    forget_session(env.broker_port, "onboardd-bench-a").await?;
    Ok(ready_grown)
}

/// Start-to-ready rows: empty database, `new0` known, `fill_to` known.
fn report_start_times(rep: &mut Report, sz: &Sizes, [empty, known, grown]: [StartTime; 3]) {
    for (order, what, (ready, wall)) in [
        (80, "Start to ready, empty database".to_string(), empty),
        (
            81,
            format!("Start to ready, {} sensors known", sz.new0),
            known,
        ),
        (
            82,
            format!("Start to ready, {} sensors known", sz.fill_to),
            grown,
        ),
    ] {
        rep.row(
            order,
            &what,
            format!("ready_ms {ready}; spawn → ready and subscribed {wall:.1} ms"),
            "≤ 50 ms",
            Some(ready <= 50 && wall <= 50.0),
            String::new(),
        );
    }
}

/// Binary sizes (the release profile strips them): host, and aarch64 if cross-built.
fn report_binary_sizes(rep: &mut Report, bins: &Path) -> Result<()> {
    let host = std::fs::metadata(bins.join("onboardd"))?.len();
    rep.row(
        90,
        "Release binary, host (x86_64)",
        format!("{:.2} MiB ({host} B)", host as f64 / 1048576.0),
        "",
        None,
        String::new(),
    );
    let cross_dir = std::env::var_os("CROSS_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target-cross"));
    let cross = cross_dir.join("aarch64-unknown-linux-gnu/release/onboardd");
    match Some(cross).filter(|p| p.exists()) {
        Some(p) => {
            let n = std::fs::metadata(&p)?.len();
            rep.row(
                91,
                "Release binary, aarch64 (scripts/cross-build.sh)",
                format!("{:.2} MiB ({n} B)", n as f64 / 1048576.0),
                "≤ 4 MiB",
                Some(n <= 4 * 1024 * 1024),
                String::new(),
            );
        }
        None => rep.row(
            91,
            "Release binary, aarch64",
            "not built (scripts/cross-build.sh aarch64)".into(),
            "≤ 4 MiB",
            None,
            String::new(),
        ),
    }
    Ok(())
}

// ------------------------------------------------------------------ telemetry bridge

/// Between two readings of the trickles: 10 readings/s and 1 reading/s.
const TRICKLE_GAP: Duration = Duration::from_millis(100);
const SLOW_GAP: Duration = Duration::from_secs(1);

/// Bytes written over a trickle of `count` readings `gap` apart by `pid`: from quiet
/// to 1.5 s after the last. (bytes, readings)
async fn trickle_written(
    f: &Feeders,
    what: &str,
    flow: &Arc<Flow>,
    pid: u32,
    count: usize,
    gap: Duration,
) -> Result<Option<(u64, usize)>> {
    let w0 = quiet_write_bytes(pid).await;
    f.trickle(what, flow, count, gap).await?;
    tokio::time::sleep(SLED_FLUSH_SETTLE).await;
    Ok(w0.zip(write_bytes(pid)).map(|(a, b)| (b - a, count)))
}

fn per_reading(w: Option<(u64, usize)>) -> String {
    match w {
        Some((b, n)) => format!("{:.0} B ({b} B over {n} readings)", b as f64 / n as f64),
        None => "/proc/PID/io unreadable".into(),
    }
}

/// The plain mosquitto bridge's one login on the stand-in broker (a Qubitro device
/// could write only the topic equal to its own id).
const MQ_BRIDGE_USER: &str = "mqbridge";
const MQ_BRIDGE_PASSWORD: &str = "mqbridge-password";

/// A reading as a small sensor would send it: ≈ 40 bytes, flat (the flattener has
/// nothing to do, so both bridges forward the same bytes).
fn reading_payload(n: u64) -> Vec<u8> {
    format!(r#"{{"n":{n},"temp":21.5,"hum":40.2}}"#).into_bytes()
}

fn data_topic(idx: usize) -> String {
    format!("onboard/data/s{idx}")
}

/// Readings in flight, from the publishers on a local broker to the observer on the
/// stand-in for Qubitro's broker: one closed-loop window, and per device the next
/// reading expected (readings of one device must arrive in the order they were sent).
struct Flow {
    base: Instant,
    window: Semaphore,
    st: Mutex<FlowState>,
}

#[derive(Default)]
struct FlowState {
    /// Topic on the stand-in broker → device index (a device id for onboardd's
    /// bridge, the local topic name for mosquitto's).
    topics: std::collections::HashMap<String, usize>,
    /// Per device: the `n` of the next reading expected (= readings sent so far once
    /// a run is complete).
    next: Vec<u64>,
    arrived: u64,
    duplicates: u64,
    out_of_order: u64,
    unknown: u64,
    samples: Vec<String>,
    last_ns: u64,
}

impl Flow {
    fn new(window: usize, devices: usize) -> Arc<Flow> {
        Arc::new(Flow {
            base: Instant::now(),
            window: Semaphore::new(window),
            st: Mutex::new(FlowState {
                next: vec![0; devices],
                ..FlowState::default()
            }),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on_arrival(&self, topic: &str, payload: &[u8]) {
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
        drop(st);
        self.window.add_permits(1);
    }
}

/// The observer on the stand-in broker: every topic, QoS 1, a clean session.
async fn connect_observer(port: u16, flow: Arc<Flow>) -> Result<AsyncClient> {
    use harness::qubitro_broker::{OBSERVER, OBSERVER_PASSWORD};
    let mut opts = mqtt_options(OBSERVER.to_string(), port);
    opts.set_credentials(OBSERVER, OBSERVER_PASSWORD);
    let (client, mut el) = AsyncClient::new(opts, 64);
    let sub = client.clone();
    let subscribed = Arc::new(AtomicBool::new(false));
    let done = subscribed.clone();
    tokio::spawn(async move {
        let mut errors = 0u32;
        while errors < 1000 {
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
struct Feeders {
    clients: Vec<AsyncClient>,
    stop: Arc<AtomicBool>,
}

impl Feeders {
    async fn connect(port: u16, k: usize) -> Result<Feeders> {
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
    async fn run(
        &self,
        what: &str,
        flow: &Arc<Flow>,
        devices: &[usize],
        rounds: usize,
    ) -> Result<PhaseResult> {
        let n = devices.len() * rounds;
        let starts: Vec<(usize, u64)> = {
            let mut st = flow.state();
            st.arrived = 0;
            st.duplicates = 0;
            st.out_of_order = 0;
            st.unknown = 0;
            st.samples.clear();
            st.last_ns = 0;
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
                            .publish(
                                data_topic(d),
                                QoS::AtLeastOnce,
                                false,
                                reading_payload(start + r),
                            )
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
        let mut send_error = None;
        for t in tasks {
            if !t.is_finished() {
                t.abort();
                continue;
            }
            if let Ok(Err(e)) = t.await {
                send_error = Some(e);
            }
        }
        if let Some(e) = send_error {
            return Err(e.context(format!("{what}: sending")));
        }
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
                "{what}: only {} of {n} readings reached the stand-in broker within {:?} ({} on unknown topics)",
                st.arrived,
                Env::deadline(n),
                st.unknown
            );
        }
        if st.duplicates > 0 || st.unknown > 0 {
            eprintln!(
                "bench: {what}: {} duplicate readings (at least once), {} on unknown topics",
                st.duplicates, st.unknown
            );
        }
        let r = PhaseResult {
            n,
            wall_s: st.last_ns.saturating_sub(first) as f64 / 1e9,
            latencies_us: Vec::new(),
        };
        if n > 1 {
            eprintln!(
                "bench: {what}: {n} readings in {:.2} s = {:.0}/s",
                r.wall_s,
                r.rate()
            );
        }
        Ok(r)
    }

    /// A sensor's pace rather than a burst: `count` readings of device 0, each sent
    /// once the previous one arrived, `gap` apart.
    async fn trickle(
        &self,
        what: &str,
        flow: &Arc<Flow>,
        count: usize,
        gap: Duration,
    ) -> Result<()> {
        for _ in 0..count {
            self.run(what, flow, &[0], 1).await?;
            tokio::time::sleep(gap).await;
        }
        Ok(())
    }
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
struct NamedCpu {
    at: Instant,
    procs: Vec<(&'static str, u32, f64)>,
    load: f64,
}

impl NamedCpu {
    fn take(procs: &[(&'static str, u32)]) -> NamedCpu {
        NamedCpu {
            at: Instant::now(),
            procs: procs.iter().map(|&(n, p)| (n, p, cpu_secs(p))).collect(),
            load: self_cpu_secs(),
        }
    }

    fn since(&self) -> String {
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
async fn quiet_write_bytes(pid: u32) -> Option<u64> {
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

/// Established TCP connections from this host to `port` (both ends are local: the
/// client ends are the ones whose remote port is `port`).
fn connections_to(port: u16) -> usize {
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

/// Everything the bridge phases share: the stand-in for Qubitro's broker, the fake
/// cloud whose devices become its logins, the observer, and onboardd with its
/// bridged devices.
struct Bridged {
    /// Kept alive: it serves onboardd's requests and makes the stand-in's logins.
    _cloud: fake_qubitro::FakeQubitro,
    qubitro: harness::qubitro_broker::QubitroBroker,
    flow: Arc<Flow>,
    _observer: AsyncClient,
    daemon: Option<Daemon>,
    feeders: Option<Feeders>,
    devices: Vec<usize>,
    /// Readings/s of onboardd's bridge, 1 device and all devices, for the comparison.
    one_rate: f64,
    many_rate: f64,
}

impl Bridged {
    fn onboardd_pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, |d| d.proc.pid())
    }
    fn feeders(&self) -> &Feeders {
        self.feeders.as_ref().expect("feeders connected")
    }
}

const BRIDGE_CLIENT: &str = "onboardd-bench-br";

/// The bridge phases' setup: a stand-in for Qubitro's broker with one login per device
/// the (in-process) fake cloud creates, onboardd pointed at it, and `bridge_devices`
/// sensors onboarded with `"bridge": true` (each exactly one device, each login
/// accepted before any reading is sent).
async fn bridged_devices_onboarded(env: &Env, rep: &mut Report, sz: &Sizes) -> Result<Bridged> {
    let cloud = fake_qubitro::FakeQubitro::start(fake_qubitro::FakeOptions::default()).await?;
    let qubitro = harness::qubitro_broker::QubitroBroker::start(&cloud);
    qubitro
        .add_writer(MQ_BRIDGE_USER, MQ_BRIDGE_PASSWORD, "onboard/data/#")
        .await;
    let flow = Flow::new(env.load.window, sz.bridge_devices);
    let observer = connect_observer(qubitro.port(), flow.clone()).await?;
    let url = cloud.base_url();
    let spec = DaemonSpec {
        bins: &env.bins,
        state: env.work.join("br"),
        broker_port: env.broker_port,
        cloud_url: &url,
        policy: "after_failure",
        client_id: BRIDGE_CLIENT,
        extra: format!(
            "[qubitro]\nproject_id = \"{}\"\napi_key = \"{}\"\nbroker_host = \"127.0.0.1\"\nbroker_port = {}\nbroker_tls = false\n\
             [bridge]\nmax_connections = {}\n",
            cloud.project_id(),
            cloud.api_key(),
            qubitro.port(),
            sz.bridge_devices.max(64),
        ),
    };
    let daemon = start_onboardd(&spec)?;
    let devices: Vec<usize> = (0..sz.bridge_devices).collect();
    env.load.shared.bridged.store(true, Ordering::Relaxed);
    let onboarded = env
        .load
        .closed(
            "bridged devices onboarding",
            Arc::new(devices.clone()),
            Env::deadline(devices.len()),
        )
        .await;
    env.load.shared.bridged.store(false, Ordering::Relaxed);
    onboarded?;
    let all = cloud.devices();
    {
        let mut st = flow.state();
        for &i in &devices {
            let sensor = format!("s{i}");
            let mine: Vec<_> = all
                .iter()
                .filter(|d| d.metadata.get("sensor_id") == Some(&sensor))
                .collect();
            if !rep.check(
                mine.len() == 1,
                format!(
                    "bridged sensor {sensor}: {} devices in the cloud",
                    mine.len()
                ),
            ) {
                continue;
            }
            st.topics.insert(mine[0].id.clone(), i);
            // mosquitto's bridge forwards under the local topic names.
            st.topics.insert(data_topic(i), i);
        }
    }
    for d in &all {
        qubitro.wait_for_login(d).await;
    }
    let feeders = Feeders::connect(env.broker_port, env.load.clients.len()).await?;
    Ok(Bridged {
        _cloud: cloud,
        qubitro,
        flow,
        _observer: observer,
        daemon: Some(daemon),
        feeders: Some(feeders),
        devices,
        one_rate: 0.0,
        many_rate: 0.0,
    })
}

/// (a) One bridged device: `bridge_one` readings as fast as the window allows.
async fn bridge_one_device(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
) -> Result<()> {
    let f = br.feeders();
    // Its uplink connection opens with the first reading: not part of the figure.
    f.run("bridge warm-up, 1 device", &br.flow, &[0], 1).await?;
    let cpu = NamedCpu::take(&[
        ("onboardd", br.onboardd_pid()),
        ("local broker", env.broker_pid),
        ("stand-in broker", br.qubitro.broker.pid()),
    ]);
    let r = f
        .run("bridge, 1 device", &br.flow, &[0], sz.bridge_one)
        .await?;
    br.one_rate = r.rate();
    rep.row(
        100,
        "Bridge (onboardd), 1 device: readings forwarded",
        format!(
            "{:.0} readings/s ({} readings, QoS 1 on both legs, window {})",
            r.rate(),
            r.n,
            env.load.window
        ),
        "",
        None,
        cpu.since(),
    );
    Ok(())
}

/// (b) Every bridged device at once, `bridge_rounds` readings each, interleaved.
async fn bridge_many_devices(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
) -> Result<()> {
    let f = br.feeders();
    f.run("bridge warm-up, all devices", &br.flow, &br.devices, 1)
        .await?;
    let cpu = NamedCpu::take(&[
        ("onboardd", br.onboardd_pid()),
        ("local broker", env.broker_pid),
        ("stand-in broker", br.qubitro.broker.pid()),
    ]);
    let r = f
        .run(
            "bridge, all devices",
            &br.flow,
            &br.devices,
            sz.bridge_rounds,
        )
        .await?;
    br.many_rate = r.rate();
    rep.row(
        101,
        &format!(
            "Bridge (onboardd), {} devices: readings forwarded (aggregate)",
            sz.bridge_devices
        ),
        format!(
            "{:.0} readings/s ({} readings, {} per device, interleaved)",
            r.rate(),
            r.n,
            sz.bridge_rounds
        ),
        "",
        None,
        cpu.since(),
    );
    Ok(())
}

/// (c) onboardd's RSS with every bridged device's uplink connected, idle after (b).
fn bridge_rss_with_devices_connected(rep: &mut Report, sz: &Sizes, br: &Bridged) {
    let pid = br.onboardd_pid();
    // The observer is the one other client of the stand-in broker.
    let uplinks = connections_to(br.qubitro.port()).saturating_sub(1);
    rep.row(
        110,
        &format!(
            "RSS, onboardd with {} bridged devices connected (idle after the burst)",
            sz.bridge_devices
        ),
        format!(
            "{} (peak VmHWM {}); {uplinks} uplink connections open",
            mib(proc_status_kib(pid, "VmRSS").unwrap_or(0)),
            mib(proc_status_kib(pid, "VmHWM").unwrap_or(0)),
        ),
        "",
        None,
        String::new(),
    );
}

/// (d) Bytes onboardd writes per forwarded reading: `write_bytes` before (once it has
/// been quiet for 1.5 s) and 1.5 s after a burst over every device, and again once
/// it is quiet, which includes sled's background segment rewrites.
async fn bridge_bytes_written_per_reading(
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
) -> Result<()> {
    let pid = br.onboardd_pid();
    let f = br.feeders();
    let w0 = quiet_write_bytes(pid).await;
    let r = f
        .run(
            "bridge, bytes written",
            &br.flow,
            &br.devices,
            sz.bridge_rounds,
        )
        .await?;
    tokio::time::sleep(SLED_FLUSH_SETTLE).await;
    let w1 = write_bytes(pid);
    let w2 = quiet_write_bytes(pid).await;
    let result = match (w0, w1, w2) {
        (Some(w0), Some(w1), Some(w2)) => {
            format!(
                "{:.0} B ({} B over {} readings of {} devices, until 1.5 s after the last); {:.0} B counted until quiet (incl. sled's background segment rewrites)",
                (w1 - w0) as f64 / r.n as f64,
                w1 - w0,
                r.n,
                sz.bridge_devices,
                (w2 - w0) as f64 / r.n as f64,
            )
        }
        _ => "/proc/PID/io unreadable".into(),
    };
    rep.row(
        120,
        "Bytes written per reading, onboardd's bridge, burst",
        result,
        "",
        None,
        String::new(),
    );
    for (order, count, gap, pace) in [
        (123, sz.bridge_trickle, TRICKLE_GAP, "10 readings/s"),
        (126, sz.bridge_slow, SLOW_GAP, "1 reading/s"),
    ] {
        if count == 0 {
            continue;
        }
        let w = trickle_written(f, "bridge trickle", &br.flow, pid, count, gap).await?;
        rep.row(
            order,
            &format!("Bytes written per reading, onboardd's bridge, 1 device at {pace}"),
            format!("{} (until 1.5 s after the last)", per_reading(w)),
            "",
            None,
            String::new(),
        );
    }
    Ok(())
}

/// Stops onboardd (SIGTERM) and its sensors' connections; nothing more for it is queued.
async fn bridge_stop(env: &Env, rep: &mut Report, br: &mut Bridged) -> Result<()> {
    br.feeders = None;
    if let Some(mut d) = br.daemon.take() {
        rep.check(
            d.proc.terminate(Duration::from_secs(10)),
            "onboardd (bridge): SIGTERM did not exit 0".into(),
        );
    }
    forget_session(env.broker_port, BRIDGE_CLIENT).await?;
    Ok(())
}

/// (e) The same forwarding by a plain mosquitto bridge: a third mosquitto that the
/// sensors publish to, with a `connection` to the stand-in broker under ONE login
/// (`mqbridge`, allowed to write `onboard/data/#`), forwarding `onboard/data/#` out at
/// QoS 1 under the local topic names: no per-device login, no flattening. Persistence
/// off, or on (mosquitto saves its whole in-memory state every second, `autosave_interval
/// 1`: not a write per message).
async fn mosquitto_bridge(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
    persistent: bool,
) -> Result<()> {
    let mode = if persistent {
        "persistence on"
    } else {
        "persistence off"
    };
    let mut b = Mosquitto::builder().die_with_parent().conf(&format!(
        "max_queued_messages 1000000\n\
         max_queued_bytes 0\n\
         max_inflight_messages 1000\n\
         connection bench-bridge\n\
         address 127.0.0.1:{port}\n\
         remote_username {MQ_BRIDGE_USER}\n\
         remote_password {MQ_BRIDGE_PASSWORD}\n\
         remote_clientid {MQ_BRIDGE_USER}\n\
         cleansession false\n\
         notifications false\n\
         topic onboard/data/# out 1\n",
        port = br.qubitro.port()
    ));
    if persistent {
        b = b.persistent();
    }
    let mut mq = b.start();
    let pid = mq.pid();
    let f = Feeders::connect(mq.port, env.load.clients.len()).await?;
    // The bridge connects by itself; the first reading waits for it.
    f.run("mosquitto bridge warm-up", &br.flow, &br.devices, 1)
        .await?;
    let procs = [
        ("bridging mosquitto", pid),
        ("stand-in broker", br.qubitro.broker.pid()),
    ];
    let w0 = quiet_write_bytes(pid).await;
    let cpu = NamedCpu::take(&procs);
    let one = f
        .run(
            &format!("mosquitto bridge ({mode}), 1 topic"),
            &br.flow,
            &[0],
            sz.bridge_one,
        )
        .await?;
    let one_cpu = cpu.since();
    let cpu = NamedCpu::take(&procs);
    let many = f
        .run(
            &format!("mosquitto bridge ({mode}), all topics"),
            &br.flow,
            &br.devices,
            sz.bridge_rounds,
        )
        .await?;
    let many_cpu = cpu.since();
    tokio::time::sleep(SLED_FLUSH_SETTLE).await;
    let w1 = write_bytes(pid);
    let (rss, hwm) = (
        proc_status_kib(pid, "VmRSS").unwrap_or(0),
        proc_status_kib(pid, "VmHWM").unwrap_or(0),
    );
    let p = u32::from(persistent);
    let vs = |theirs: f64, ours: f64| {
        if ours > 0.0 {
            format!(" = {:.2} × onboardd's bridge", theirs / ours)
        } else {
            String::new()
        }
    };
    rep.row(
        102 + 2 * p,
        &format!("Plain mosquitto bridge ({mode}), 1 topic: readings forwarded"),
        format!(
            "{:.0} readings/s ({} readings){}",
            one.rate(),
            one.n,
            vs(one.rate(), br.one_rate)
        ),
        "",
        None,
        one_cpu,
    );
    rep.row(
        103 + 2 * p,
        &format!(
            "Plain mosquitto bridge ({mode}), {} topics: readings forwarded (aggregate)",
            sz.bridge_devices
        ),
        format!(
            "{:.0} readings/s ({} readings){}",
            many.rate(),
            many.n,
            vs(many.rate(), br.many_rate)
        ),
        "",
        None,
        many_cpu,
    );
    rep.row(
        111 + p,
        &format!(
            "RSS, bridging mosquitto ({mode}) after {} topics",
            sz.bridge_devices
        ),
        format!("{} (peak VmHWM {})", mib(rss), mib(hwm)),
        "",
        None,
        String::new(),
    );
    let written = match (w0, w1) {
        (Some(w0), Some(w1)) => format!(
            "{:.1} B ({} B over {} readings, until 1.5 s after the last)",
            (w1 - w0) as f64 / (one.n + many.n) as f64,
            w1 - w0,
            one.n + many.n
        ),
        _ => "/proc/PID/io unreadable".into(),
    };
    for (order, count, gap, pace) in [
        (124 + p, sz.bridge_trickle, TRICKLE_GAP, "10 readings/s"),
        (127 + p, sz.bridge_slow, SLOW_GAP, "1 reading/s"),
    ] {
        if count == 0 {
            continue;
        }
        let w = trickle_written(&f, "mosquitto bridge trickle", &br.flow, pid, count, gap).await?;
        rep.row(
            order,
            &format!(
                "Bytes written per reading, plain mosquitto bridge ({mode}), 1 topic at {pace}"
            ),
            format!("{} (until 1.5 s after the last)", per_reading(w)),
            "",
            None,
            String::new(),
        );
    }
    rep.row(
        121 + p,
        &format!("Bytes written per reading, plain mosquitto bridge ({mode})"),
        written,
        "",
        None,
        String::new(),
    );
    drop(f);
    mq.stop();
    Ok(())
}

// ------------------------------------------------------------------ echo client

/// The trivial echo client: the broker's limit with a subscriber that does nothing.
async fn echo_main(port: u16) -> Result<()> {
    let mut opts = mqtt_options(format!("bench-echo-{}", std::process::id()), port);
    // The same window of unacknowledged announces as onboardd's default.
    opts.set_receive_maximum(Some(RECEIVE_MAXIMUM));
    let (client, mut el) = AsyncClient::new(opts, 65_536);
    let reply = Bytes::from_static(ECHO_REPLY);
    let until = Instant::now() + Duration::from_secs(3600);
    let mut errors = 0u32;
    while Instant::now() < until && errors < 100 {
        match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let id = p.topic.strip_prefix(b"onboard/announce/").unwrap_or(b"");
                let topic = format!("onboard/reply/{}", String::from_utf8_lossy(id));
                // Never await inside the event-loop task (rumqtt#263); the channel
                // is far larger than the broker's in-flight window.
                if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, reply.clone()) {
                    eprintln!("echo: ERROR cannot queue a reply: {e}");
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.try_subscribe("onboard/announce/+", QoS::AtLeastOnce)?;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => eprintln!("echo subscribed"),
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                eprintln!("echo: connection error: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ main

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(port) = args.echo_port {
        return match echo_main(port).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("echo: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let (Some(port), Some(range)) = (args.drive_port, args.drive_ids) {
        return match drive(&args, port, range).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: drive: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        harness::process::kill_all_children();
        default_hook(info);
    }));
    let _ = rustls::crypto::ring::default_provider().install_default();

    let started = Instant::now();
    let load_before = loadavg();
    let mut rep = Report::default();
    let result = bench(&args, &mut rep).await;
    rep.print(args.quick);
    println!(
        "{} CPUs, load average {load_before} before and {} after; {:.0} s in all.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    harness::process::kill_all_children();
    match result {
        Err(e) => {
            eprintln!("bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
        Ok(()) if !rep.failures.is_empty() => {
            eprintln!("bench: {} functional failure(s):", rep.failures.len());
            for f in &rep.failures {
                eprintln!("  - {f}");
            }
            ExitCode::FAILURE
        }
        Ok(()) => ExitCode::SUCCESS,
    }
}
