//! Scenario: new devices one at a time (a gateway's sensors arrive one by one, so no group
//! commit shares a flush): bytes written per new device, and with strace the write and sync
//! calls each onboarding makes.

use anyhow::Result;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::bridge_flow::quiet_write_bytes;
use crate::env::Env;
use crate::report::Report;
use crate::services::{forget_session, start_onboardd};

const CLIENT: &str = "onboardd-bench-e";

/// Syscalls that put bytes on the disk or wait for them to be there (sled writes its
/// log with `pwrite64` and syncs it with `sync_file_range`; `write` is left out: it is
/// mostly sockets and wake-ups).
const COUNTED: &[&str] = &[
    "fsync",
    "fdatasync",
    "sync_file_range",
    "pwrite64",
    "pwritev",
];

/// A fresh store, lookup "always", cloud 0 ms: `ids` announce one after the other, each
/// once the previous one was answered. `write_bytes` from quiet to quiet ÷ devices; and
/// `strace -f -c` attached meanwhile, when it can be (calls ÷ devices).
pub(crate) async fn new_devices_one_at_a_time(
    env: &Env,
    rep: &mut Report,
    ids: Vec<usize>,
) -> Result<()> {
    let spec = env.spec("e", &env.fake0, "always", CLIENT);
    let mut d = start_onboardd(&spec)?;
    let pid = d.proc.pid();
    let n = ids.len();
    let w0 = quiet_write_bytes(pid).await;
    let strace_out = spec.state.join("strace.txt");
    let tracer = attach_strace(pid, &strace_out);
    // strace needs a moment to attach to every thread; its summary says if it did not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = env
        .load
        .closed_in_window(
            "new devices one at a time",
            Arc::new(ids),
            Env::deadline(n),
            1,
        )
        .await?;
    let w1 = quiet_write_bytes(pid).await;
    let calls = tracer.map(|t| stop_strace(t, &strace_out));
    let bytes = match (w0, w1) {
        (Some(a), Some(b)) => format!(
            "{:.0} B written per new device ({} B / {n})",
            (b - a) as f64 / n as f64,
            b - a
        ),
        _ => "/proc/PID/io unreadable".into(),
    };
    let syscalls = match calls {
        Some(Some(c)) if !c.is_empty() => {
            let per: Vec<String> = c
                .iter()
                .map(|(name, k)| format!("{name} {:.1}", *k as f64 / n as f64))
                .collect();
            format!(
                "; per new device (strace -f -c, incl. sled's own flushes): {}",
                per.join(", ")
            )
        }
        _ => "; strace not available here (no syscall counts)".into(),
    };
    rep.row(
        15,
        "New devices one at a time (each announce after the previous reply), cloud 0 ms, always",
        format!("{:.0} devices/s; {bytes}{syscalls}", r.rate()),
        "",
        None,
        String::new(),
    );
    rep.check(
        d.proc.terminate(Duration::from_secs(10)),
        "onboardd E: SIGTERM did not exit 0".into(),
    );
    forget_session(env.broker_port, CLIENT).await?;
    Ok(())
}

fn attach_strace(pid: u32, out: &std::path::Path) -> Option<Child> {
    let trace = format!("trace={}", COUNTED.join(","));
    Command::new("strace")
        .args(["-f", "-c", "-e", &trace, "-o"])
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// Detaches strace (SIGINT makes it write its summary) and reads the calls per syscall.
fn stop_strace(mut t: Child, out: &std::path::Path) -> Option<Vec<(String, u64)>> {
    // SAFETY: kill(2) on the child we spawned, with a valid signal.
    unsafe { libc::kill(t.id() as libc::pid_t, libc::SIGINT) };
    let _ = t.wait();
    let text = std::fs::read_to_string(out).ok()?;
    // Summary lines: % time, seconds, usecs/call, calls, [errors,] syscall.
    let calls = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.last()?;
            let k = f.get(3)?.parse::<u64>().ok()?;
            COUNTED.contains(&name).then(|| (name.to_string(), k))
        })
        .collect();
    Some(calls)
}
