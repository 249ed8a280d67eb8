//! onboardd's memory with a large store and busy uplinks: `fill_to` known sensors plus
//! `busy_uplinks` bridged devices forwarding readings at once (the default
//! `bridge.max_connections`, 64, so every one keeps its connection).

use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::bridge::{bridge_toml, onboard_bridged, Bridged};
use crate::bridge_flow::Feeders;
use crate::bridge_measure::ORDER_RSS_KNOWN;
use crate::env::Env;
use crate::procs::{mib, proc_status_kib};
use crate::report::{Bridge, Cell, Report, Rule};
use crate::services::{forget_session, start_onboardd, DaemonSpec};
use crate::sizes::Sizes;

const CLIENT: &str = "onboardd-bench-k";

/// A state dir whose store knows `sz.fill_to` sensors: the grown store A of a full run,
/// or (`--bridge-only`) one seeded now through the 0 ms cloud, as the full run grows A.
pub(crate) async fn store_of_known_sensors(
    env: &Env,
    sz: &Sizes,
    grown: Option<PathBuf>,
) -> Result<PathBuf> {
    if let Some(dir) = grown {
        return Ok(dir);
    }
    let spec = env.spec("k", &env.fake0, "after_failure", CLIENT);
    let mut d = start_onboardd(&spec)?;
    let ids: Arc<Vec<usize>> = Arc::new((0..sz.fill_to).collect());
    env.load
        .closed(
            "seeding known sensors",
            ids.clone(),
            Env::deadline(ids.len()),
        )
        .await?;
    d.proc.terminate(Duration::from_secs(10));
    forget_session(env.broker_port, CLIENT).await?;
    Ok(spec.state)
}

/// onboardd on `state` (a store of `fill_to` known sensors) with `busy_uplinks` new
/// bridged sensors `first..`, all forwarding readings: its resident memory while they
/// do (sampled every 20 ms) and its peak.
pub(crate) async fn bridge_with_known_sensors(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
    state: PathBuf,
    first: usize,
) -> Result<()> {
    let cloud = &br._cloud;
    let url = cloud.base_url();
    let spec = DaemonSpec {
        bins: &env.bins,
        state,
        broker_port: env.broker_port,
        cloud_url: &url,
        policy: "after_failure",
        client_id: CLIENT,
        extra: bridge_toml(cloud, br.qubitro.port(), ""),
    };
    let mut d = start_onboardd(&spec)?;
    let pid = d.proc.pid();
    let busy: Vec<usize> = (first..first + sz.busy_uplinks).collect();
    onboard_bridged(
        env,
        rep,
        cloud,
        &br.qubitro,
        &br.flow,
        &busy,
        "busy uplinks",
    )
    .await?;
    let f = Feeders::connect(env.broker_port, env.load.clients.len()).await?;
    let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    f.run("busy uplinks warm-up", &br.flow, &busy, 1, qos)
        .await?;
    let mut peak_rss = 0;
    let r = {
        let run = f.run("busy uplinks", &br.flow, &busy, sz.busy_rounds, qos);
        tokio::pin!(run);
        loop {
            tokio::select! {
                r = &mut run => break r?,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    peak_rss = peak_rss.max(proc_status_kib(pid, "VmRSS").unwrap_or(0));
                }
            }
        }
    };
    let hwm = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    rep.bridge.set(
        ORDER_RSS_KNOWN,
        &format!(
            "RSS with {} known sensors + {} busy uplinks",
            sz.fill_to, sz.busy_uplinks
        ),
        "≤ 40 MiB",
        Rule::AtMost(40.0 * 1024.0),
        Bridge::Onboardd,
        false,
        Cell {
            value: peak_rss as f64,
            text: format!(
                "{} at most while {} readings went through ({:.0}/s); peak VmHWM since start {}",
                mib(peak_rss),
                r.n,
                r.rate(),
                mib(hwm)
            ),
        },
    );
    drop(f);
    rep.check(
        d.proc.terminate(Duration::from_secs(10)),
        "onboardd (known sensors + busy uplinks): SIGTERM did not exit 0".into(),
    );
    forget_session(env.broker_port, CLIENT).await?;
    Ok(())
}
