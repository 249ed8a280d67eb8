//! Scenarios of onboardd's telemetry bridge: one device, many devices, RSS with devices connected,
//! bytes written per reading, stop.

use anyhow::Result;
use rumqttc::v5::AsyncClient;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::bridge_flow::{
    connect_observer, connections_to, data_topic, per_reading, quiet_write_bytes, trickle_written,
    Feeders, Flow, NamedCpu, MQ_BRIDGE_PASSWORD, MQ_BRIDGE_USER, SLOW_GAP, TRICKLE_GAP,
};
use crate::env::Env;
use crate::procs::{mib, proc_status_kib, write_bytes};
use crate::report::Report;
use crate::services::{forget_session, start_onboardd, Daemon, DaemonSpec};
use crate::sizes::{Sizes, SLED_FLUSH_SETTLE};

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
    pub(crate) feeders: Option<Feeders>,
    pub(crate) devices: Vec<usize>,
    /// Readings/s of onboardd's bridge, 1 device and all devices, for the comparison.
    pub(crate) one_rate: f64,
    pub(crate) many_rate: f64,
}

impl Bridged {
    pub(crate) fn onboardd_pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, |d| d.proc.pid())
    }
    pub(crate) fn feeders(&self) -> &Feeders {
        self.feeders.as_ref().expect("feeders connected")
    }
}

pub(crate) const BRIDGE_CLIENT: &str = "onboardd-bench-br";

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
    let flow = Flow::new(env.load.window, sz.bridge_devices);
    let observer = connect_observer(qubitro.port(), flow.clone()).await?;
    let url = cloud.base_url();
    let spec = DaemonSpec {
        bins: &env.bins,
        state: env.work.join("br"),
        broker_port: env.broker_port,
        cloud_url: &url,
        policy: "after_failure",
        client_id: BRIDGE_CLIENT,
        extra: format!(
            "[qubitro]\nproject_id = \"{}\"\napi_key = \"{}\"\nbroker_host = \"127.0.0.1\"\nbroker_port = {}\nbroker_tls = false\n\
             [bridge]\nmax_connections = {}\nmax_readings_per_s = 1000000\n",
            cloud.project_id(),
            cloud.api_key(),
            qubitro.port(),
            sz.bridge_devices.max(64),
        ),
    };
    let daemon = start_onboardd(&spec)?;
    let devices: Vec<usize> = (0..sz.bridge_devices).collect();
    env.load.shared.bridged.store(true, Ordering::Relaxed);
    let onboarded = env
        .load
        .closed(
            "bridged devices onboarding",
            Arc::new(devices.clone()),
            Env::deadline(devices.len()),
        )
        .await;
    env.load.shared.bridged.store(false, Ordering::Relaxed);
    onboarded?;
    let all = cloud.devices();
    {
        let mut st = flow.state();
        for &i in &devices {
            let sensor = format!("s{i}");
            let mine: Vec<_> = all
                .iter()
                .filter(|d| d.metadata.get("sensor_id") == Some(&sensor))
                .collect();
            if !rep.check(
                mine.len() == 1,
                format!(
                    "bridged sensor {sensor}: {} devices in the cloud",
                    mine.len()
                ),
            ) {
                continue;
            }
            st.topics.insert(mine[0].id.clone(), i);
            // mosquitto's bridge forwards under the local topic names.
            st.topics.insert(data_topic(i), i);
        }
    }
    for d in &all {
        qubitro.wait_for_login(d).await;
    }
    let feeders = Feeders::connect(env.broker_port, env.load.clients.len()).await?;
    Ok(Bridged {
        _cloud: cloud,
        qubitro,
        flow,
        _observer: observer,
        daemon: Some(daemon),
        feeders: Some(feeders),
        devices,
        one_rate: 0.0,
        many_rate: 0.0,
    })
}

/// (a) One bridged device: `bridge_one` readings as fast as the window allows.
pub(crate) async fn bridge_one_device(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
) -> Result<()> {
    let f = br.feeders();
    // Its uplink connection opens with the first reading: not part of the figure.
    f.run("bridge warm-up, 1 device", &br.flow, &[0], 1).await?;
    let cpu = NamedCpu::take(&[
        ("onboardd", br.onboardd_pid()),
        ("local broker", env.broker_pid),
        ("stand-in broker", br.qubitro.broker.pid()),
    ]);
    let r = f
        .run("bridge, 1 device", &br.flow, &[0], sz.bridge_one)
        .await?;
    br.one_rate = r.rate();
    rep.row(
        100,
        "Bridge (onboardd), 1 device: readings forwarded",
        format!(
            "{:.0} readings/s ({} readings, QoS 1 on both legs, window {})",
            r.rate(),
            r.n,
            env.load.window
        ),
        "",
        None,
        cpu.since(),
    );
    Ok(())
}

/// (b) Every bridged device at once, `bridge_rounds` readings each, interleaved.
pub(crate) async fn bridge_many_devices(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
) -> Result<()> {
    let f = br.feeders();
    f.run("bridge warm-up, all devices", &br.flow, &br.devices, 1)
        .await?;
    let cpu = NamedCpu::take(&[
        ("onboardd", br.onboardd_pid()),
        ("local broker", env.broker_pid),
        ("stand-in broker", br.qubitro.broker.pid()),
    ]);
    let r = f
        .run(
            "bridge, all devices",
            &br.flow,
            &br.devices,
            sz.bridge_rounds,
        )
        .await?;
    br.many_rate = r.rate();
    rep.row(
        101,
        &format!(
            "Bridge (onboardd), {} devices: readings forwarded (aggregate)",
            sz.bridge_devices
        ),
        format!(
            "{:.0} readings/s ({} readings, {} per device, interleaved)",
            r.rate(),
            r.n,
            sz.bridge_rounds
        ),
        "",
        None,
        cpu.since(),
    );
    Ok(())
}

/// (c) onboardd's RSS with every bridged device's uplink connected, idle after (b).
pub(crate) fn bridge_rss_with_devices_connected(rep: &mut Report, sz: &Sizes, br: &Bridged) {
    let pid = br.onboardd_pid();
    // The observer is the one other client of the stand-in broker.
    let uplinks = connections_to(br.qubitro.port()).saturating_sub(1);
    rep.row(
        110,
        &format!(
            "RSS, onboardd with {} bridged devices connected (idle after the burst)",
            sz.bridge_devices
        ),
        format!(
            "{} (peak VmHWM {}); {uplinks} uplink connections open",
            mib(proc_status_kib(pid, "VmRSS").unwrap_or(0)),
            mib(proc_status_kib(pid, "VmHWM").unwrap_or(0)),
        ),
        "",
        None,
        String::new(),
    );
}

/// (d) Bytes onboardd writes per forwarded reading: `write_bytes` before (once it has
/// been quiet for 1.5 s) and 1.5 s after a burst over every device, and again once
/// it is quiet, which includes sled's background segment rewrites.
pub(crate) async fn bridge_bytes_written_per_reading(
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
) -> Result<()> {
    let pid = br.onboardd_pid();
    let f = br.feeders();
    let w0 = quiet_write_bytes(pid).await;
    let r = f
        .run(
            "bridge, bytes written",
            &br.flow,
            &br.devices,
            sz.bridge_rounds,
        )
        .await?;
    tokio::time::sleep(SLED_FLUSH_SETTLE).await;
    let w1 = write_bytes(pid);
    let w2 = quiet_write_bytes(pid).await;
    let result = match (w0, w1, w2) {
        (Some(w0), Some(w1), Some(w2)) => {
            format!(
                "{:.0} B ({} B over {} readings of {} devices, until 1.5 s after the last); {:.0} B \
                    counted until quiet (incl. sled's background segment rewrites)",
                (w1 - w0) as f64 / r.n as f64,
                w1 - w0,
                r.n,
                sz.bridge_devices,
                (w2 - w0) as f64 / r.n as f64,
            )
        }
        _ => "/proc/PID/io unreadable".into(),
    };
    rep.row(
        120,
        "Bytes written per reading, onboardd's bridge, burst",
        result,
        "",
        None,
        String::new(),
    );
    for (order, count, gap, pace) in [
        (123, sz.bridge_trickle, TRICKLE_GAP, "10 readings/s"),
        (126, sz.bridge_slow, SLOW_GAP, "1 reading/s"),
    ] {
        if count == 0 {
            continue;
        }
        let w = trickle_written(f, "bridge trickle", &br.flow, pid, count, gap).await?;
        rep.row(
            order,
            &format!("Bytes written per reading, onboardd's bridge, 1 device at {pace}"),
            format!("{} (until 1.5 s after the last)", per_reading(w)),
            "",
            None,
            String::new(),
        );
    }
    Ok(())
}

/// Stops onboardd (SIGTERM) and its sensors' connections; nothing more for it is queued.
pub(crate) async fn bridge_stop(env: &Env, rep: &mut Report, br: &mut Bridged) -> Result<()> {
    br.feeders = None;
    if let Some(mut d) = br.daemon.take() {
        rep.check(
            d.proc.terminate(Duration::from_secs(10)),
            "onboardd (bridge): SIGTERM did not exit 0".into(),
        );
    }
    forget_session(env.broker_port, BRIDGE_CLIENT).await?;
    Ok(())
}
