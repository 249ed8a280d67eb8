//! Scenario: the known sensors re-announce with protocol v2 proofs on (the shipped
//! default), next to the figures without proofs.

use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;

use crate::env::Env;
use crate::known_sensors::Known;
use crate::loadgen::{PhaseResult, Proofs};
use crate::procs::CpuSnap;
use crate::report::Report;
use crate::services::{forget_session, start_onboardd};
use crate::sizes::{Sizes, BENCH_CLAIM_KEY};

const CLIENT: &str = "onboardd-bench-a";

/// Store A again, now with `require_claim = true` and a configured claim key: the
/// re-announce burst and the latency phase of `known`, each announce proved. Which
/// protocol: `protocol`, or with `auto` v2 when one v2 announce gets a v2 reply.
pub(crate) async fn re_announce_with_proofs(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    known: &Known,
    a_ids: &[usize],
) -> Result<()> {
    let mut spec = env.spec("a", &env.fake0, "always", CLIENT);
    spec.extra = format!("[security]\nrequire_claim = true\nclaim_key = \"{BENCH_CLAIM_KEY}\"\n");
    let mut a = start_onboardd(&spec)?;
    let slots = env.load.shared.slots.len();
    *env.load
        .shared
        .proofs
        .write()
        .unwrap_or_else(|e| e.into_inner()) =
        Some(Arc::new(Proofs::flash(BENCH_CLAIM_KEY, a_ids, slots)));
    let label = "v2 proofs".to_string();
    let pids = env.pids(a.proc.pid(), false);
    let result = async {
        let cpu = CpuSnap::take(&pids);
        let re = env
            .load
            .closed(
                "re-announce burst with proofs",
                known.re_ids.clone(),
                Env::deadline(known.re_ids.len()),
            )
            .await?;
        let re_cpu = cpu.since(&pids);
        let cpu = CpuSnap::take(&pids);
        let lat = env
            .load
            .open(
                "latency with proofs",
                known.lat_ids.clone(),
                known.lat_rate,
                Env::deadline(known.lat_n),
            )
            .await?;
        anyhow::Ok((re, re_cpu, lat, cpu.since(&pids)))
    }
    .await;
    *env.load
        .shared
        .proofs
        .write()
        .unwrap_or_else(|e| e.into_inner()) = None;
    let (re, re_cpu, lat, lat_cpu) = result?;
    let versus = |r: &PhaseResult, base: &PhaseResult| r.rate() / base.rate().max(1e-9);
    rep.row(
        31,
        &format!("Re-announce throughput, {} known sensors, {label}", sz.new0),
        format!(
            "{:.0} replies/s = {:.2} × the same burst without proofs ({:.0}/s)",
            re.rate(),
            versus(&re, &known.re),
            known.re.rate()
        ),
        "",
        None,
        re_cpu,
    );
    rep.row(
        41,
        &format!(
            "Latency, onboardd re-announce, {label}, {:.0} announces/s offered",
            known.lat_rate
        ),
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples; without proofs p99 {:.2} ms)",
            lat.pct_ms(50.0),
            lat.pct_ms(99.0),
            lat.pct_ms(100.0),
            lat.n,
            known.lat.pct_ms(99.0)
        ),
        "p99 ≤ 1.5 ms",
        Some(lat.pct_ms(99.0) <= 1.5),
        lat_cpu,
    );
    rep.check(
        a.proc.terminate(Duration::from_secs(10)),
        "onboardd A (proofs on): SIGTERM did not exit 0".into(),
    );
    forget_session(env.broker_port, CLIENT).await?;
    Ok(())
}
