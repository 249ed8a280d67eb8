//! Child processes (spawned with a log kept, waited on by line) and what /proc says about them: CPU,
//! RSS, bytes written, disk usage.

use anyhow::{Context, Result};
use harness::process::die_with_parent;
use harness::{LogLines, Proc};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What is kept of a child's output beyond its tail (onboardd logs a line per sensor).
pub(crate) const KEEP: &[&str] = &[
    "onboardd ready",
    "subscribed to announces",
    "listening on",
    "echo subscribed",
    "warn",
    "error",
    "stopped",
];
pub(crate) const KEEP_MAX: usize = 2000;

/// A child (the harness's [`Proc`]) that dies with the benchmark and keeps only [`KEEP`]
/// lines of its output.
pub(crate) fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
    Proc::spawn(
        name,
        die_with_parent(cmd),
        LogLines::keeping(KEEP, KEEP_MAX),
    )
    .with_context(|| format!("cannot start {name}"))
}

/// The first line of `p` containing `needle` and when it came, waiting at most `within`.
pub(crate) fn wait_line(p: &Proc, needle: &str, within: Duration) -> Result<(Instant, String)> {
    p.log
        .try_wait_for_n(needle, 1, within)
        .map_err(anyhow::Error::msg)
}

/// The first few warnings and errors among `lines`.
pub(crate) fn warnings(lines: &str) -> Vec<&str> {
    lines
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("warn") || l.contains("error")
        })
        .take(5)
        .collect()
}

pub(crate) fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(crate) fn write_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_secs(pid: u32) -> f64 {
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
pub(crate) fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// (blocks as du counts them, apparent size) of a directory tree, in bytes.
pub(crate) fn du(path: &Path) -> (u64, u64) {
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

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Which processes to charge CPU to in a phase.
#[derive(Clone, Copy)]
pub(crate) struct Pids {
    /// onboardd or the echo client.
    pub(crate) server: u32,
    pub(crate) server_is_echo: bool,
    pub(crate) broker: u32,
    pub(crate) clouds: [u32; 2],
}

pub(crate) struct CpuSnap {
    pub(crate) at: Instant,
    pub(crate) server: f64,
    pub(crate) broker: f64,
    pub(crate) cloud: f64,
    pub(crate) load: f64,
}

impl CpuSnap {
    pub(crate) fn take(p: &Pids) -> CpuSnap {
        CpuSnap {
            at: Instant::now(),
            server: cpu_secs(p.server),
            broker: cpu_secs(p.broker),
            cloud: p.clouds.iter().map(|&c| cpu_secs(c)).sum(),
            load: self_cpu_secs(),
        }
    }

    /// CPU of each process since `self`, in % of one core.
    pub(crate) fn since(&self, p: &Pids) -> String {
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
