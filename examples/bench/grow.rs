//! Scenario: grow the store to 100 000 devices and measure start times and binary sizes.

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::env::{Env, Ids, StartTime};
use crate::procs::{du, mib, proc_status_kib, write_bytes, CpuSnap};
use crate::report::Report;
use crate::services::{forget_session, start_onboardd};
use crate::sizes::{Sizes, SLED_FLUSH_SETTLE};

/// Grows A's store to `fill_to` sensors through the 0 ms cloud, checks it durably, then
/// every known sensor re-announces after a restart. Returns that restart's start time.
pub(crate) async fn grow_the_store(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    ids: &Ids,
) -> Result<StartTime> {
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
pub(crate) fn report_start_times(
    rep: &mut Report,
    sz: &Sizes,
    [empty, known, grown]: [StartTime; 3],
) {
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
pub(crate) fn report_binary_sizes(rep: &mut Report, bins: &Path) -> Result<()> {
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
                // The budget since the gateway page and HTTPS (issue 22; README).
                "≤ 4.5 MiB",
                Some(n <= 9 * 512 * 1024),
                String::new(),
            );
        }
        None => rep.row(
            91,
            "Release binary, aarch64",
            "not built (scripts/cross-build.sh aarch64)".into(),
            "≤ 4.5 MiB",
            None,
            String::new(),
        ),
    }
    Ok(())
}
