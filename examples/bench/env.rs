//! What one run shares: the services every phase uses, the sensor ids of each phase, the targets
//! the results are held against.

use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::loadgen::{LoadGen, PhaseResult};
use crate::procs::{CpuSnap, Pids};
use crate::report::Report;
use crate::services::{start_onboardd, Daemon, DaemonSpec, Fake};
use crate::sizes::{Sizes, MAX_IN_FLIGHT};

pub(crate) struct Env {
    pub(crate) bins: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) broker_port: u16,
    pub(crate) broker_pid: u32,
    pub(crate) http: reqwest::Client,
    pub(crate) load: LoadGen,
    pub(crate) fake0: Fake,
    pub(crate) fake100: Fake,
}

impl Env {
    pub(crate) fn pids(&self, server: u32, server_is_echo: bool) -> Pids {
        Pids {
            server,
            server_is_echo,
            broker: self.broker_pid,
            clouds: [self.fake0.proc.pid(), self.fake100.proc.pid()],
        }
    }

    pub(crate) fn spec<'a>(
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

    pub(crate) fn deadline(n: usize) -> Duration {
        Duration::from_secs(30) + Duration::from_millis(2 * n as u64)
    }

    /// Onboards `ids` as new devices; checks one create each and that every one was
    /// stored durably before its reply (kill -9 right after the last reply, restart,
    /// every sensor re-announces: each must be answered from the store, with not one
    /// request to the cloud). Returns the restarted daemon.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn new_devices(
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
                "{rate:.0} devices/s ({req_rate:.0} requests/s); {n}/{n} stored durably (kill -9 \
                    after the last reply, restart, all re-announce: 0 cloud requests)",
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
    pub(crate) async fn answered_from_store(
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
pub(crate) struct Ids {
    /// Phase A (new devices, 0 ms cloud, lookup always), later the known sensors.
    pub(crate) a: Arc<Vec<usize>>,
    /// Phase B (new devices, 0 ms cloud, lookup after_failure).
    pub(crate) b: Vec<usize>,
    /// Phases C and D (new devices, 100 ms cloud, both policies).
    pub(crate) c: Vec<usize>,
    pub(crate) d: Vec<usize>,
    /// Grows A's store to `fill_to` sensors.
    pub(crate) fill: Vec<usize>,
    /// New devices one at a time, on a store of their own.
    pub(crate) one: Vec<usize>,
    /// One past the highest id.
    pub(crate) total: usize,
}

impl Ids {
    pub(crate) fn new(sz: &Sizes) -> Ids {
        let c_start = 2 * sz.new0;
        let f_start = c_start + 2 * sz.new100;
        let fill: Vec<usize> = (f_start..f_start + (sz.fill_to - sz.new0)).collect();
        let o_start = f_start + fill.len();
        Ids {
            one: (o_start..o_start + sz.new_one).collect(),
            a: Arc::new((0..sz.new0).collect()),
            b: (sz.new0..2 * sz.new0).collect(),
            c: (c_start..c_start + sz.new100).collect(),
            d: (c_start + sz.new100..c_start + 2 * sz.new100).collect(),
            total: o_start + sz.new_one,
            fill,
        }
    }
}

/// A daemon start as measured: (ready_ms it logged, spawn → ready and subscribed in ms).
pub(crate) type StartTime = (u64, f64);

pub(crate) const TARGET_NEW0: &str = "≥ 2 000 devices/s, each durably stored before its reply";

/// What the 100 ms cloud allows with onboardd's in-flight limit, with a 20 % margin.
pub(crate) fn target100() -> f64 {
    0.8 * MAX_IN_FLIGHT / 0.1
}
