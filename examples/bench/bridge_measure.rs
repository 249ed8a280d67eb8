//! The measurements every bridge gets, onboardd's and a plain mosquitto's alike, at one QoS:
//! readings/s (one device, every device), latency, RSS, bytes written (burst, 10/s, 1/s) and
//! an outage of the uplink, each a cell of the bridge table.

use anyhow::Result;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

use crate::bridge::Bridged;
use crate::bridge_flow::{
    connections_to, quiet_write_bytes, reading_payload, settle_open, settled_write_bytes,
    trickle_written, Feeders, NamedCpu, SLOW_GAP, TRICKLE_GAP,
};
use crate::loadgen::PhaseResult;
use crate::procs::{mib, proc_status_kib};
use crate::report::{Bridge, Cell, Report, Rule};
use crate::sizes::Sizes;

/// One bridge as measured: which column it fills, its process (whose writes and memory
/// count), the local broker its sensors publish to, and their connections.
pub(crate) struct UnderTest {
    pub(crate) bridge: Bridge,
    pub(crate) pid: u32,
    pub(crate) local_broker: Option<u32>,
    pub(crate) feeders: Feeders,
}

impl UnderTest {
    fn cpu(&self, br: &Bridged) -> NamedCpu {
        let me = match self.bridge {
            Bridge::Onboardd => "onboardd",
            _ => "bridging mosquitto",
        };
        let mut procs = vec![(me, self.pid)];
        if let Some(b) = self.local_broker {
            procs.push(("local broker", b));
        }
        procs.push(("stand-in broker", br.qubitro.broker.pid()));
        NamedCpu::take(&procs)
    }
}

/// What every measurement of one bridge works with: the table it fills, how much each
/// phase does, the bridged devices and their stand-in broker, and the bridge under test.
struct Measuring<'a> {
    rep: &'a mut Report,
    sz: &'a Sizes,
    br: &'a mut Bridged,
    ut: &'a UnderTest,
}

pub(crate) const ORDER_RATE_ONE: u32 = 200;
pub(crate) const ORDER_RSS_CONNECTED: u32 = 220;
pub(crate) const ORDER_RSS_KNOWN: u32 = 221;

fn qos_of(qos0: bool) -> QoS {
    if qos0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

impl Measuring<'_> {
    /// The healthy uplink's measurements of `ut` at one QoS, in the order the table shows them.
    async fn measure(&mut self, qos0: bool) -> Result<()> {
        let Measuring { rep, sz, br, ut } = self;
        let (sz, ut) = (*sz, *ut);
        let qos = qos_of(qos0);
        let f = &ut.feeders;
        // Opens every device's uplink (onboardd) or the bridge's one connection: not timed.
        f.run("bridge warm-up", &br.flow, &br.devices, 1, qos)
            .await?;
        let cell = |r: &PhaseResult, cpu: &NamedCpu| Cell {
            value: r.rate(),
            text: format!("{:.0}/s ({} readings; CPU {})", r.rate(), r.n, cpu.since()),
        };
        let cpu = ut.cpu(br);
        let r = f
            .run("bridge, 1 device", &br.flow, &[0], sz.bridge_one, qos)
            .await?;
        rep.bridge.set(
            ORDER_RATE_ONE,
            "Readings/s forwarded, 1 device (closed loop)",
            "≥ 0.8 × mosquitto bridge",
            Rule::RatioAtLeast(0.8),
            ut.bridge,
            qos0,
            cell(&r, &cpu),
        );
        let cpu = ut.cpu(br);
        let r = f
            .run(
                "bridge, all devices",
                &br.flow,
                &br.devices,
                sz.bridge_rounds,
                qos,
            )
            .await?;
        rep.bridge.set(
            ORDER_RATE_ONE + 1,
            &format!(
                "Readings/s forwarded, {} devices interleaved (closed loop)",
                br.devices.len()
            ),
            "≥ 0.8 × mosquitto bridge",
            Rule::RatioAtLeast(0.8),
            ut.bridge,
            qos0,
            cell(&r, &cpu),
        );
        let (rss, hwm) = (
            proc_status_kib(ut.pid, "VmRSS").unwrap_or(0),
            proc_status_kib(ut.pid, "VmHWM").unwrap_or(0),
        );
        rep.bridge.set(
            ORDER_RSS_CONNECTED,
            &format!(
                "RSS with {} bridged devices connected (idle after the burst)",
                br.devices.len()
            ),
            "≤ 20 MiB",
            Rule::AtMost(20.0 * 1024.0),
            ut.bridge,
            qos0,
            Cell {
                value: rss as f64,
                text: format!(
                    "{} (peak {}); {} connection(s) to Qubitro's broker",
                    mib(rss),
                    mib(hwm),
                    // The observer is the one other client of the stand-in broker.
                    connections_to(br.qubitro.port()).saturating_sub(1)
                ),
            },
        );
        self.latency(qos0).await?;
        if sz.rates_only || (ut.bridge != Bridge::Onboardd && !sz.mosquitto_writes) {
            return Ok(());
        }
        self.bytes_written(qos0).await
    }

    /// Open loop at `bridge_lat_rate` readings/s over every device: published → at the
    /// stand-in broker.
    async fn latency(&mut self, qos0: bool) -> Result<()> {
        let Measuring { rep, sz, br, ut } = self;
        let (sz, ut) = (*sz, *ut);
        let n = ut
            .feeders
            .open(
                &br.flow,
                &br.devices,
                sz.bridge_lat_rate,
                sz.bridge_lat_secs,
                qos_of(qos0),
            )
            .await?;
        settle_open(&br.flow, n, Duration::from_secs(5), Duration::from_secs(60)).await;
        let (arrived, out_of_order, mut lat) = {
            let mut st = br.flow.state();
            (
                st.arrived as usize,
                st.out_of_order,
                std::mem::take(&mut st.latencies_us),
            )
        };
        lat.sort_unstable();
        let r = PhaseResult {
            n: lat.len(),
            wall_s: 0.0,
            latencies_us: lat,
        };
        complete(rep, ut, "latency phase", n, arrived, out_of_order);
        let lost = if arrived < n {
            format!("; **{} of {n} lost**", n - arrived)
        } else {
            String::new()
        };
        let what = format!(
            "Latency published → at Qubitro's broker, {:.0} readings/s over {} devices",
            sz.bridge_lat_rate,
            br.devices.len()
        );
        rep.bridge.set(
            210,
            &format!("{what}: p50"),
            "",
            Rule::None,
            ut.bridge,
            qos0,
            Cell {
                value: r.pct_ms(50.0),
                text: format!("{:.2} ms", r.pct_ms(50.0)),
            },
        );
        rep.bridge.set(
            211,
            &format!("{what}: p99"),
            "p99 ≤ 1.5 × mosquitto bridge",
            Rule::RatioAtMost(1.5),
            ut.bridge,
            qos0,
            Cell {
                value: r.pct_ms(99.0),
                text: format!(
                    "{:.2} ms (max {:.2} ms, {} samples{lost})",
                    r.pct_ms(99.0),
                    r.pct_ms(100.0),
                    r.n
                ),
            },
        );
        Ok(())
    }

    /// `write_bytes` of the bridging process from settled (nothing written for `write_settle`)
    /// to quiet (nothing written for 1.5 s, so sled's background work is included): a burst over every device, then one
    /// device at 10 readings/s and at 1 reading/s.
    async fn bytes_written(&mut self, qos0: bool) -> Result<()> {
        let Measuring { rep, sz, br, ut } = self;
        let (sz, ut) = (*sz, *ut);
        let qos = qos_of(qos0);
        let w0 = settled_write_bytes(ut.pid, sz.write_settle).await;
        let r = ut
            .feeders
            .run(
                "bridge, bytes written",
                &br.flow,
                &br.devices,
                sz.bridge_rounds,
                qos,
            )
            .await?;
        let w1 = quiet_write_bytes(ut.pid).await;
        let burst = w0.zip(w1).map(|(a, b)| (b - a, r.n));
        let target = "0 B";
        let rule = Rule::AtMost(0.0);
        rep.bridge.set(
            230,
            &format!(
            "Bytes written per reading, healthy uplink, burst over {} devices (settled to quiet)",
            br.devices.len()
        ),
            target,
            rule,
            ut.bridge,
            qos0,
            written(burst),
        );
        for (order, count, gap, pace) in [
            (231, sz.bridge_trickle, TRICKLE_GAP, "10 readings/s"),
            (232, sz.bridge_slow, SLOW_GAP, "1 reading/s"),
        ] {
            if count == 0 {
                continue;
            }
            let w = trickle_written(
                &ut.feeders,
                &br.flow,
                ut.pid,
                count,
                gap,
                qos,
                sz.write_settle,
            )
            .await?;
            rep.bridge.set(
                order,
                &format!("Bytes written per reading, healthy uplink, 1 device at {pace}"),
                target,
                rule,
                ut.bridge,
                qos0,
                written(w),
            );
        }
        Ok(())
    }

    /// The stand-in for Qubitro's broker stopped for `outage_secs` while every device sends
    /// one reading a second; then started again. Bytes written from quiet before to quiet
    /// after everything was forwarded, per reading; every reading must arrive, in order.
    async fn outage(&mut self, qos0: bool) -> Result<()> {
        let Measuring { rep, sz, br, ut } = self;
        let (sz, ut) = (*sz, *ut);
        let w0 = settled_write_bytes(ut.pid, sz.write_settle).await;
        br.qubitro.stop();
        let sent = ut
            .feeders
            .open(
                &br.flow,
                &br.devices,
                br.devices.len() as f64,
                sz.outage_secs,
                qos_of(qos0),
            )
            .await;
        br.qubitro.start_again();
        let back_ns = br.flow.now_ns();
        let n = sent?;
        settle_open(&br.flow, n, sz.outage_quiet, Duration::from_secs(180)).await;
        let w1 = quiet_write_bytes(ut.pid).await;
        let (arrived, out_of_order, last_ns) = {
            let st = br.flow.state();
            (st.arrived as usize, st.out_of_order, st.last_ns)
        };
        let last = if arrived == 0 {
            "none arrived".to_string()
        } else {
            let after = (last_ns as f64 - back_ns as f64) / 1e9;
            format!("the last {after:.1} s after the uplink was back")
        };
        complete(rep, ut, "uplink outage", n, arrived, out_of_order);
        let payload = reading_payload(1000).len();
        let mut cell = written(w0.zip(w1).map(|(a, b)| (b - a, n)));
        cell.text = format!(
            "{}; {arrived}/{n} arrived{}, {last}",
            cell.text,
            match (n - arrived.min(n), out_of_order) {
                (0, 0) => ", in order per device".to_string(),
                (lost, gaps) => format!(", **{lost} lost, {gaps} out of order or after a gap**"),
            }
        );
        rep.bridge.set(
        240,
        &format!(
            "Uplink outage of {:.0} s, {} devices at 1 reading/s: bytes written per reading (until forwarded and quiet); arrivals",
            sz.outage_secs,
            br.devices.len()
        ),
        &format!("≤ 2 × payload ({} B), all arrive in order", 2 * payload),
        Rule::AtMost(2.0 * payload as f64),
        ut.bridge,
        qos0,
        cell,
    );
        Ok(())
    }
}

/// Every measurement of `ut`, QoS 1 then QoS 0, and the outages last: the tens of MB an
/// outage spills keep sled cleaning segments for a while, which would be counted
/// against the healthy uplink's readings measured after it.
pub(crate) async fn measure_all(
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
    ut: &UnderTest,
) -> Result<()> {
    let mut m = Measuring { rep, sz, br, ut };
    for qos0 in [false, true].into_iter().filter(|_| !sz.outage_only) {
        m.measure(qos0).await?;
    }
    // Without persistence an outage costs mosquitto no write: nothing to compare.
    if sz.rates_only
        || ut.bridge == Bridge::MosquittoOff
        || (ut.bridge != Bridge::Onboardd && !sz.mosquitto_writes)
    {
        return Ok(());
    }
    for qos0 in [false, true] {
        m.outage(qos0).await?;
    }
    Ok(())
}

/// A run whose readings must all arrive in order: a functional failure for onboardd
/// when not (at-least-once, order per device), a figure for mosquitto.
fn complete(
    rep: &mut Report,
    ut: &UnderTest,
    what: &str,
    n: usize,
    arrived: usize,
    out_of_order: u64,
) {
    if ut.bridge == Bridge::Onboardd {
        rep.check(
            arrived >= n && out_of_order == 0,
            format!(
                "onboardd's bridge, {what}: {arrived} of {n} readings arrived, {out_of_order} out of order"
            ),
        );
    }
}

fn written(w: Option<(u64, usize)>) -> Cell {
    match w {
        Some((b, n)) => Cell {
            value: b as f64 / n.max(1) as f64,
            text: format!("{:.0} B ({b} B / {n})", b as f64 / n.max(1) as f64),
        },
        None => Cell {
            value: f64::NAN,
            text: "/proc/PID/io unreadable".into(),
        },
    }
}
