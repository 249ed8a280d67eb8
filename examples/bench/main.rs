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
//!
//! Layout: this file parses the arguments and runs the phases in order ([`bench`]); one
//! module per scenario (`new_devices`, `known_sensors`, `broker_limit`, `grow`, `bridge`,
//! `mosquitto_bridge`), and the parts they share: `sizes` (how much each phase does),
//! `env` (the services of one run), `services` (starting them), `loadgen` (the simulated
//! sensors), `bridge_flow` (readings and their observer), `procs` (children and /proc)
//! and `report` (the table).

mod bridge;
mod bridge_flow;
mod bridge_known;
mod bridge_measure;
mod broker_limit;
mod env;
mod grow;
mod known_sensors;
mod loadgen;
mod mosquitto_bridge;
mod new_devices;
mod one_by_one;
mod procs;
mod proofs;
mod report;
mod services;
mod sizes;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bridge::{bridged_devices_onboarded, onboardd_bridge};
use crate::bridge_known::{bridge_with_known_sensors, store_of_known_sensors};
use crate::broker_limit::{echo_main, report_against_the_broker, the_brokers_own_limit};
use crate::env::{Env, Ids};
use crate::grow::{grow_the_store, report_binary_sizes, report_start_times};
use crate::known_sensors::known_sensors_re_announce;
use crate::loadgen::LoadGen;
use crate::mosquitto_bridge::mosquitto_bridge;
use crate::new_devices::{
    new_devices_on_a_fresh_store, new_devices_with_a_slow_cloud,
    new_devices_with_lookup_after_failure,
};
use crate::one_by_one::new_devices_one_at_a_time;
use crate::procs::warnings;
use crate::proofs::re_announce_with_proofs;
use crate::report::{Bridge, Report};
use crate::services::{start_mosquitto, Fake};
use crate::sizes::Sizes;

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "onboardd benchmark: throughput, latency, footprint vs the broker's own limit"
)]
pub(crate) struct Args {
    /// CI smoke: a few hundred sensors, ~1 s phases; asserts nothing about speed.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Directory with the release `onboardd` and `fake-qubitro` (default: the
    /// `release` directory this example was built into).
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,
    /// MQTT connections of the load generator.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// Announces in flight (published, not yet answered) in the throughput phases.
    #[arg(long, default_value_t = 1000)]
    pub(crate) window: usize,
    /// Keep the temporary state dir (databases, configs) for profiling; prints its path.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Run only the telemetry bridge phases (onboardd's bridge and a plain mosquitto
    /// bridge forwarding readings to a stand-in for Qubitro's broker).
    #[arg(long)]
    pub(crate) bridge_only: bool,
    /// Run only onboardd's uplink outages (QoS 1 and QoS 0): the spill buffer's write
    /// cost, without the other bridge phases or the mosquitto bridges.
    #[arg(long)]
    pub(crate) outage_only: bool,
    /// Run only the bridge's readings/s, latency and RSS, onboardd's and a mosquitto
    /// bridge's without persistence side by side: no bytes written, no outages, no store
    /// of known sensors (a few minutes; for profiling those three misses).
    #[arg(long)]
    pub(crate) rates_only: bool,
    /// Run only the announce phases (new devices, re-announces, proofs, slow clouds,
    /// the grown store, start times, binary sizes), without the bridge.
    #[arg(long, conflicts_with_all = ["bridge_only", "outage_only", "rates_only"])]
    pub(crate) announce_only: bool,
    /// Internal: run as the echo client against the broker on this port.
    #[arg(long, hide = true)]
    pub(crate) echo_port: Option<u16>,
    /// Profiling aid: only drive announces of sensors `s<START>`…`s<END-1>` (closed
    /// loop) at a broker already running on this port (onboardd under valgrind…).
    #[arg(long, requires = "drive_ids")]
    pub(crate) drive_port: Option<u16>,
    /// START..END for --drive-port.
    #[arg(long, value_parser = parse_range)]
    pub(crate) drive_ids: Option<(usize, usize)>,
    /// Rounds of --drive-ids.
    #[arg(long, default_value_t = 1)]
    pub(crate) drive_rounds: usize,
}

pub(crate) fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once("..").ok_or("expected START..END")?;
    let a: usize = a.parse().map_err(|e| format!("{e}"))?;
    let b: usize = b.parse().map_err(|e| format!("{e}"))?;
    if a >= b {
        return Err("START must be below END".into());
    }
    Ok((a, b))
}

/// `--drive-port`: announces only, against whatever answers on that broker.
pub(crate) async fn drive(args: &Args, port: u16, (start, end): (usize, usize)) -> Result<()> {
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

/// The release binaries' directory: `--bin-dir`, else the profile directory above this
/// example (`target/release/examples/bench` → `target/release`).
pub(crate) fn bin_dir(args: &Args) -> Result<PathBuf> {
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

pub(crate) async fn bench(args: &Args, rep: &mut Report) -> Result<()> {
    let mut sz = Sizes::new(args.quick);
    sz.outage_only = args.outage_only;
    sz.rates_only = args.rates_only;
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
    // The busy uplinks next to the known sensors are new sensors after every other id.
    let busy_first = ids.total.max(sz.bridge_devices);
    let sensors = busy_first + sz.busy_uplinks;
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

    let mut grown = None;
    if !args.bridge_only && !args.outage_only && !args.rates_only {
        let (a, ready_empty, ready_known) = new_devices_on_a_fresh_store(&env, rep, &ids.a).await?;
        let known = known_sensors_re_announce(&env, rep, &sz, a, &ids.a).await?;
        let echo = the_brokers_own_limit(&env, &known).await?;
        report_against_the_broker(rep, &sz, &known, &echo);
        re_announce_with_proofs(&env, rep, &sz, &known, &ids.a).await?;
        new_devices_with_lookup_after_failure(&env, rep, ids.b.clone()).await?;
        new_devices_with_a_slow_cloud(&env, rep, ids.c.clone(), ids.d.clone()).await?;
        new_devices_one_at_a_time(&env, rep, ids.one.clone()).await?;
        let ready_grown = grow_the_store(&env, rep, &sz, &ids).await?;
        report_start_times(rep, &sz, [ready_empty, ready_known, ready_grown]);
        report_binary_sizes(rep, &bins)?;
        grown = Some(env.work.join("a"));
    }
    if !args.announce_only {
        let mut br = bridged_devices_onboarded(&env, rep, &sz).await?;
        onboardd_bridge(&env, rep, &sz, &mut br).await?;
        if args.rates_only {
            mosquitto_bridge(&env, rep, &sz, &mut br, Bridge::MosquittoOff).await?;
        } else if !args.outage_only {
            for b in [Bridge::MosquittoOff, Bridge::MosquittoOn] {
                mosquitto_bridge(&env, rep, &sz, &mut br, b).await?;
            }
            let known = store_of_known_sensors(&env, &sz, grown).await?;
            bridge_with_known_sensors(&env, rep, &sz, &mut br, known, busy_first).await?;
        }
    }

    let log = broker.log();
    for w in warnings(&log) {
        eprintln!("bench: mosquitto said: {w}");
    }
    env.load.stop();
    broker.stop();
    Ok(())
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main]
pub(crate) async fn main() -> ExitCode {
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
