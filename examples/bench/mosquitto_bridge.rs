//! Scenario: a plain mosquitto bridge forwarding readings to the stand-in broker, for comparison.

use anyhow::Result;
use harness::Mosquitto;

use crate::bridge::Bridged;
use crate::bridge_flow::{
    per_reading, quiet_write_bytes, trickle_written, Feeders, NamedCpu, MQ_BRIDGE_PASSWORD,
    MQ_BRIDGE_USER, SLOW_GAP, TRICKLE_GAP,
};
use crate::env::Env;
use crate::procs::{mib, proc_status_kib, write_bytes};
use crate::report::Report;
use crate::sizes::{Sizes, SLED_FLUSH_SETTLE};

/// (e) The same forwarding by a plain mosquitto bridge: a third mosquitto that the
/// sensors publish to, with a `connection` to the stand-in broker under ONE login
/// (`mqbridge`, allowed to write `onboard/data/#`), forwarding `onboard/data/#` out at
/// QoS 1 under the local topic names: no per-device login, no flattening. Persistence
/// off, or on (mosquitto saves its whole in-memory state every second, `autosave_interval
/// 1`: not a write per message).
pub(crate) async fn mosquitto_bridge(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
    persistent: bool,
) -> Result<()> {
    let mode = if persistent {
        "persistence on"
    } else {
        "persistence off"
    };
    let mut b = Mosquitto::builder().die_with_parent().conf(&format!(
        "max_queued_messages 1000000\n\
         max_queued_bytes 0\n\
         max_inflight_messages 1000\n\
         connection bench-bridge\n\
         address 127.0.0.1:{port}\n\
         remote_username {MQ_BRIDGE_USER}\n\
         remote_password {MQ_BRIDGE_PASSWORD}\n\
         remote_clientid {MQ_BRIDGE_USER}\n\
         cleansession false\n\
         notifications false\n\
         topic onboard/data/# out 1\n",
        port = br.qubitro.port()
    ));
    if persistent {
        b = b.persistent();
    }
    let mut mq = b.start();
    let pid = mq.pid();
    let f = Feeders::connect(mq.port, env.load.clients.len()).await?;
    // The bridge connects by itself; the first reading waits for it.
    f.run("mosquitto bridge warm-up", &br.flow, &br.devices, 1)
        .await?;
    let procs = [
        ("bridging mosquitto", pid),
        ("stand-in broker", br.qubitro.broker.pid()),
    ];
    let w0 = quiet_write_bytes(pid).await;
    let cpu = NamedCpu::take(&procs);
    let one = f
        .run(
            &format!("mosquitto bridge ({mode}), 1 topic"),
            &br.flow,
            &[0],
            sz.bridge_one,
        )
        .await?;
    let one_cpu = cpu.since();
    let cpu = NamedCpu::take(&procs);
    let many = f
        .run(
            &format!("mosquitto bridge ({mode}), all topics"),
            &br.flow,
            &br.devices,
            sz.bridge_rounds,
        )
        .await?;
    let many_cpu = cpu.since();
    tokio::time::sleep(SLED_FLUSH_SETTLE).await;
    let w1 = write_bytes(pid);
    let (rss, hwm) = (
        proc_status_kib(pid, "VmRSS").unwrap_or(0),
        proc_status_kib(pid, "VmHWM").unwrap_or(0),
    );
    let p = u32::from(persistent);
    let vs = |theirs: f64, ours: f64| {
        if ours > 0.0 {
            format!(" = {:.2} × onboardd's bridge", theirs / ours)
        } else {
            String::new()
        }
    };
    rep.row(
        102 + 2 * p,
        &format!("Plain mosquitto bridge ({mode}), 1 topic: readings forwarded"),
        format!(
            "{:.0} readings/s ({} readings){}",
            one.rate(),
            one.n,
            vs(one.rate(), br.one_rate)
        ),
        "",
        None,
        one_cpu,
    );
    rep.row(
        103 + 2 * p,
        &format!(
            "Plain mosquitto bridge ({mode}), {} topics: readings forwarded (aggregate)",
            sz.bridge_devices
        ),
        format!(
            "{:.0} readings/s ({} readings){}",
            many.rate(),
            many.n,
            vs(many.rate(), br.many_rate)
        ),
        "",
        None,
        many_cpu,
    );
    rep.row(
        111 + p,
        &format!(
            "RSS, bridging mosquitto ({mode}) after {} topics",
            sz.bridge_devices
        ),
        format!("{} (peak VmHWM {})", mib(rss), mib(hwm)),
        "",
        None,
        String::new(),
    );
    let written = match (w0, w1) {
        (Some(w0), Some(w1)) => format!(
            "{:.1} B ({} B over {} readings, until 1.5 s after the last)",
            (w1 - w0) as f64 / (one.n + many.n) as f64,
            w1 - w0,
            one.n + many.n
        ),
        _ => "/proc/PID/io unreadable".into(),
    };
    for (order, count, gap, pace) in [
        (124 + p, sz.bridge_trickle, TRICKLE_GAP, "10 readings/s"),
        (127 + p, sz.bridge_slow, SLOW_GAP, "1 reading/s"),
    ] {
        if count == 0 {
            continue;
        }
        let w = trickle_written(&f, "mosquitto bridge trickle", &br.flow, pid, count, gap).await?;
        rep.row(
            order,
            &format!(
                "Bytes written per reading, plain mosquitto bridge ({mode}), 1 topic at {pace}"
            ),
            format!("{} (until 1.5 s after the last)", per_reading(w)),
            "",
            None,
            String::new(),
        );
    }
    rep.row(
        121 + p,
        &format!("Bytes written per reading, plain mosquitto bridge ({mode})"),
        written,
        "",
        None,
        String::new(),
    );
    drop(f);
    mq.stop();
    Ok(())
}
