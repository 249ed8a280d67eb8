//! A plain mosquitto bridge forwarding readings to the stand-in broker, for comparison.

use anyhow::Result;
use harness::Mosquitto;

use crate::bridge::{Bridged, RECONNECT_MS};
use crate::bridge_flow::{Feeders, MQ_BRIDGE_PASSWORD, MQ_BRIDGE_USER};
use crate::bridge_measure::{measure_all, UnderTest};
use crate::env::Env;
use crate::report::{Bridge, Report};
use crate::sizes::Sizes;

/// The same measurements through a plain mosquitto bridge: a third mosquitto that the
/// sensors publish to, with a `connection` to the stand-in broker under ONE login
/// (`mqbridge`, allowed to write `onboard/data/#`), forwarding `onboard/data/#` out at
/// QoS 1 (a QoS 0 reading stays QoS 0) under the local topic names: no per-device login,
/// no flattening. Persistence off, or on (mosquitto saves its whole in-memory state every
/// second, `autosave_interval 1`: not a write per message).
pub(crate) async fn mosquitto_bridge(
    env: &Env,
    rep: &mut Report,
    sz: &Sizes,
    br: &mut Bridged,
    bridge: Bridge,
) -> Result<()> {
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
         restart_timeout {secs}\n\
         topic onboard/data/# out 1\n",
        port = br.qubitro.port(),
        secs = RECONNECT_MS.div_ceil(1000),
    ));
    if bridge == Bridge::MosquittoOn {
        b = b.persistent();
    }
    let mut mq = b.start();
    let ut = UnderTest {
        bridge,
        pid: mq.pid(),
        local_broker: None,
        feeders: Feeders::connect(mq.port, env.load.clients.len()).await?,
    };
    let measured = measure_all(rep, sz, br, &ut).await;
    // What the bridge said of its connection: why an outage's readings came late or not.
    for l in mq.log().lines().filter(|l| l.contains("bridge")).take(12) {
        eprintln!("bench: {}: {l}", bridge.name());
    }
    measured?;
    drop(ut);
    mq.stop();
    Ok(())
}
