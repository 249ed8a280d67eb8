//! Scenario: the broker's own limit, measured with a trivial echo client (this binary with
//! `--echo-port`) driven by the same load generator.

use anyhow::Result;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use std::time::{Duration, Instant};

use crate::env::Env;
use crate::known_sensors::Known;
use crate::loadgen::PhaseResult;
use crate::procs::CpuSnap;
use crate::report::Report;
use crate::services::{mqtt_options, start_echo};
use crate::sizes::{Sizes, ECHO_REPLY, RECEIVE_MAXIMUM};

/// The echo client's results under the same load as the known-sensor phase.
pub(crate) struct Echo {
    pub(crate) re: PhaseResult,
    pub(crate) re_cpu: String,
    pub(crate) lat: PhaseResult,
    pub(crate) lat_cpu: String,
}

/// The broker's own limit: the trivial echo client under the known-sensor phase's load.
pub(crate) async fn the_brokers_own_limit(env: &Env, known: &Known) -> Result<Echo> {
    let mut echo = start_echo(env.broker_port)?;
    let epids = env.pids(echo.pid(), true);
    let cpu = CpuSnap::take(&epids);
    let re = env
        .load
        .closed(
            "re-announce burst (echo client)",
            known.re_ids.clone(),
            Env::deadline(known.re_ids.len()),
        )
        .await?;
    let re_cpu = cpu.since(&epids);
    let cpu = CpuSnap::take(&epids);
    let lat = env
        .load
        .open(
            "latency at 1 000/s (echo client)",
            known.lat_ids.clone(),
            known.lat_rate,
            Env::deadline(known.lat_n),
        )
        .await?;
    let lat_cpu = cpu.since(&epids);
    echo.terminate(Duration::from_secs(5));
    Ok(Echo {
        re,
        re_cpu,
        lat,
        lat_cpu,
    })
}

/// Rows comparing onboardd with the echo client: throughput and latency.
pub(crate) fn report_against_the_broker(rep: &mut Report, sz: &Sizes, known: &Known, echo: &Echo) {
    let ratio = known.re.rate() / echo.re.rate();
    rep.row(
        30,
        "Broker's own limit: echo client, re-announce burst",
        format!("{:.0} replies/s ({} announces)", echo.re.rate(), echo.re.n),
        "",
        None,
        echo.re_cpu.clone(),
    );
    rep.row(
        31,
        &format!("Re-announce throughput, {} known sensors", sz.new0),
        format!(
            "{:.0} replies/s = {ratio:.2} × echo client",
            known.re.rate()
        ),
        "≥ 0.5 × echo client",
        Some(ratio >= 0.5),
        known.re_cpu.clone(),
    );
    rep.row(
        40,
        "Latency, echo client, 1 000 announces/s offered",
        format!(
            "p50 {:.2} ms, p99 {:.2} ms ({} samples)",
            echo.lat.pct_ms(50.0),
            echo.lat.pct_ms(99.0),
            echo.lat.n
        ),
        "",
        None,
        echo.lat_cpu.clone(),
    );
    rep.row(
        41,
        "Latency, onboardd re-announce, 1 000 announces/s offered",
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            known.lat.pct_ms(50.0),
            known.lat.pct_ms(99.0),
            known.lat.pct_ms(100.0),
            known.lat.n
        ),
        "p99 ≤ 1.5 ms",
        Some(known.lat.pct_ms(99.0) <= 1.5),
        known.lat_cpu.clone(),
    );
}

/// The trivial echo client: the broker's limit with a subscriber that does nothing.
pub(crate) async fn echo_main(port: u16) -> Result<()> {
    let mut opts = mqtt_options(format!("bench-echo-{}", std::process::id()), port);
    // The same window of unacknowledged announces as onboardd's default.
    opts.set_receive_maximum(Some(RECEIVE_MAXIMUM));
    let (client, mut el) = AsyncClient::new(opts, 65_536);
    let reply = Bytes::from_static(ECHO_REPLY);
    let until = Instant::now() + Duration::from_secs(3600);
    let mut errors = 0u32;
    while Instant::now() < until && errors < 100 {
        match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let id = p.topic.strip_prefix(b"onboard/announce/").unwrap_or(b"");
                let topic = format!("onboard/reply/{}", String::from_utf8_lossy(id));
                // Never await inside the event-loop task (rumqtt#263); the channel
                // is far larger than the broker's in-flight window.
                if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, reply.clone()) {
                    eprintln!("echo: ERROR cannot queue a reply: {e}");
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.try_subscribe("onboard/announce/+", QoS::AtLeastOnce)?;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => eprintln!("echo subscribed"),
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                eprintln!("echo: connection error: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}
