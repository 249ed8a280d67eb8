//! Scenarios: new devices on a fresh store (lookup "always", 0 ms cloud), with lookup only after a
//! failure, and through a 100 ms cloud.

use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;

use crate::env::{target100, Env, StartTime, TARGET_NEW0};
use crate::procs::{mib, proc_status_kib};
use crate::report::Report;
use crate::services::{forget_session, start_onboardd, Daemon};
use crate::sizes::MAX_IN_FLIGHT;

/// Phase A: a fresh database, lookup "always", cloud 0 ms; the idle RSS, then a normal
/// restart. Returns the restarted daemon and both start times.
pub(crate) async fn new_devices_on_a_fresh_store(
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

/// Phase B: a fresh database, lookup "after_failure", cloud 0 ms.
pub(crate) async fn new_devices_with_lookup_after_failure(
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
pub(crate) async fn new_devices_with_a_slow_cloud(
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
