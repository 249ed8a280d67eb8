//! Scenario: known sensors re-announce and are answered from the store, without one cloud request.

use anyhow::Result;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::env::Env;
use crate::loadgen::PhaseResult;
use crate::procs::{du, mib, proc_status_kib, write_bytes, CpuSnap};
use crate::report::Report;
use crate::services::{forget_session, Daemon};
use crate::sizes::{Sizes, SLED_FLUSH_SETTLE};

/// What the known-sensor phase measured, for the comparison with the echo client.
pub(crate) struct Known {
    pub(crate) re_ids: Arc<Vec<usize>>,
    pub(crate) lat_ids: Arc<Vec<usize>>,
    pub(crate) lat_n: usize,
    pub(crate) lat_rate: f64,
    pub(crate) re: PhaseResult,
    pub(crate) re_cpu: String,
    pub(crate) lat: PhaseResult,
    pub(crate) lat_cpu: String,
}

/// Re-announces of the known sensors on daemon A: throughput, disk writes, latency, RSS
/// and database size. Stops A.
pub(crate) async fn known_sensors_re_announce(
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
                    "{per:.1} B ({} B over {} re-announces, incl. 1.5 s after; before it, \
                        {idle_written} B written while idle for {settle_s:.1} s until quiet)",
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
