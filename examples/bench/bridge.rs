//! onboardd's telemetry bridge: the setup every bridge phase shares (the stand-in for
//! Qubitro's broker, the observer, the bridged devices), onboardd's measurements, its stop.

use anyhow::Result;
use rumqttc::v5::AsyncClient;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::bridge_flow::{
    connect_observer, data_topic, Feeders, Flow, MQ_BRIDGE_PASSWORD, MQ_BRIDGE_USER,
};
use crate::bridge_measure::{measure_all, UnderTest};
use crate::env::Env;
use crate::report::{Bridge, Report};
use crate::services::{forget_session, start_onboardd, Daemon, DaemonSpec};
use crate::sizes::Sizes;

/// Everything the bridge phases share: the stand-in for Qubitro's broker, the fake
/// cloud whose devices become its logins, the observer, and onboardd with its
/// bridged devices.
pub(crate) struct Bridged {
    /// Kept alive: it serves onboardd's requests and makes the stand-in's logins.
    pub(crate) _cloud: fake_qubitro::FakeQubitro,
    pub(crate) qubitro: harness::qubitro_broker::QubitroBroker,
    pub(crate) flow: Arc<Flow>,
    pub(crate) _observer: AsyncClient,
    pub(crate) daemon: Option<Daemon>,
    pub(crate) devices: Vec<usize>,
}

impl Bridged {
    pub(crate) fn onboardd_pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, |d| d.proc.pid())
    }
}

pub(crate) const BRIDGE_CLIENT: &str = "onboardd-bench-br";

/// The longest wait between reconnects, onboardd's and the mosquitto bridge's alike, so
/// that what an outage costs is not hidden behind a 30 s backoff.
pub(crate) const RECONNECT_MS: u64 = 1000;

/// The bridge phases' setup: a stand-in for Qubitro's broker with one login per device
/// the (in-process) fake cloud creates, onboardd pointed at it, and `bridge_devices`
/// sensors onboarded with `"bridge": true` (each exactly one device, each login
/// accepted before any reading is sent).
pub(crate) async fn bridged_devices_onboarded(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
) -> Result<Bridged> {
    let cloud = fake_qubitro::FakeQubitro::start(fake_qubitro::FakeOptions::default()).await?;
    let qubitro = harness::qubitro_broker::QubitroBroker::start(&cloud);
    qubitro
        .add_writer(MQ_BRIDGE_USER, MQ_BRIDGE_PASSWORD, "onboard/data/#")
        .await;
    let flow = Flow::new(env.load.window, env.load.shared.slots.len());
    let observer = connect_observer(qubitro.port(), flow.clone()).await?;
    let url = cloud.base_url();
    let spec = DaemonSpec {
        bins: &env.bins,
        state: env.work.join("br"),
        broker_port: env.broker_port,
        cloud_url: &url,
        policy: "after_failure",
        client_id: BRIDGE_CLIENT,
        extra: bridge_toml(
            &cloud,
            qubitro.port(),
            &format!("max_connections = {}\n", sz.bridge_devices.max(64)),
        ),
    };
    let daemon = start_onboardd(&spec)?;
    let devices: Vec<usize> = (0..sz.bridge_devices).collect();
    onboard_bridged(
        env,
        rep,
        &cloud,
        &qubitro,
        &flow,
        &devices,
        "bridged devices",
    )
    .await?;
    Ok(Bridged {
        _cloud: cloud,
        qubitro,
        flow,
        _observer: observer,
        daemon: Some(daemon),
        devices,
    })
}

/// onboardd's config for the bridge: `cloud`'s project and key, the stand-in broker on
/// `port`, plus `bridge` (lines of the `[bridge]` table). The per-sensor rate limit
/// (`bridge.max_readings_per_s`, 10 by default) is lifted: the bench pushes bursts
/// far above any sensor's pace to find the bridge's own limit.
pub(crate) fn bridge_toml(cloud: &fake_qubitro::FakeQubitro, port: u16, bridge: &str) -> String {
    format!(
        "[qubitro]\nproject_id = \"{}\"\napi_key = \"{}\"\nbroker_host = \"127.0.0.1\"\nbroker_port = {port}\n\
         broker_tls = false\n[bridge]\nreconnect_max_ms = {RECONNECT_MS}\nmax_readings_per_s = 1000000\n{bridge}",
        cloud.project_id(),
        cloud.api_key(),
    )
}

/// Sensors `ids` announce with `"bridge": true` (each must become exactly one device in
/// `cloud`); the observer learns their topics, and each login works on the stand-in
/// before this returns.
pub(crate) async fn onboard_bridged(
    env: &Env,
    rep: &mut Report,
    cloud: &fake_qubitro::FakeQubitro,
    qubitro: &harness::qubitro_broker::QubitroBroker,
    flow: &Flow,
    ids: &[usize],
    what: &str,
) -> Result<()> {
    env.load.shared.bridged.store(true, Ordering::Relaxed);
    let onboarded = env
        .load
        .closed(
            &format!("{what} onboarding"),
            Arc::new(ids.to_vec()),
            Env::deadline(ids.len()),
        )
        .await;
    env.load.shared.bridged.store(false, Ordering::Relaxed);
    onboarded?;
    let all = cloud.devices();
    for &i in ids {
        let sensor = format!("s{i}");
        let mine: Vec<_> = all
            .iter()
            .filter(|d| d.metadata.get("sensor_id") == Some(&sensor))
            .collect();
        if !rep.check(
            mine.len() == 1,
            format!("{what}: {sensor} has {} devices in the cloud", mine.len()),
        ) {
            continue;
        }
        {
            let mut st = flow.state();
            st.topics.insert(mine[0].id.clone(), i);
            // mosquitto's bridge forwards under the local topic names.
            st.topics.insert(data_topic(i), i);
        }
        qubitro.wait_for_login(mine[0]).await;
    }
    Ok(())
}

/// onboardd's bridge, every measurement at QoS 1 then QoS 0; then it is stopped.
pub(crate) async fn onboardd_bridge(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
) -> Result<()> {
    let ut = UnderTest {
        bridge: Bridge::Onboardd,
        pid: br.onboardd_pid(),
        local_broker: Some(env.broker_pid),
        feeders: Feeders::connect(env.broker_port, env.load.clients.len()).await?,
    };
    measure_all(rep, sz, br, &ut).await?;
    drop(ut);
    bridge_stop(env, rep, br).await
}

/// Stops onboardd (SIGTERM) and its sensors' connections; nothing more for it is queued.
pub(crate) async fn bridge_stop(env: &Env, rep: &mut Report, br: &mut Bridged) -> Result<()> {
    if let Some(mut d) = br.daemon.take() {
        rep.check(
            d.proc.terminate(Duration::from_secs(10)),
            "onboardd (bridge): SIGTERM did not exit 0".into(),
        );
    }
    forget_session(env.broker_port, BRIDGE_CLIENT).await?;
    Ok(())
}
