//! The acker: acknowledges messages to the local broker in arrival order.
//!
//! Each ack waits until the write it depends on is durable and its bridged
//! readings are forwarded (Qubitro's PUBACK) or spilled durably: a message is
//! either recorded or still the broker's to deliver again, so none is lost.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pacer::SpillPacer;
use super::publisher::Publisher;
use super::Fatal;
use crate::bridge::{Settled, Ticket};
use crate::failpoint;
use crate::store::{Store, StoreError};

/// A message waiting for its acknowledgement.
pub struct AckItem {
    pub(super) publish: Publish,
    /// Write that must be on disk first (0: none).
    pub(super) seq: u64,
    /// Its bridged readings: each forwarded to Qubitro, or spilled and durable, first.
    pub(super) tickets: Vec<Ticket>,
}

/// Acknowledges messages in arrival order, each once its write is durable and its
/// bridged readings are forwarded or spilled durably. A held reading keeps the acks
/// after it waiting until Qubitro acknowledges it or its deadline spills it (MQTT 5
/// §4.6 wants PUBACKs in arrival order). Runs until the dispatcher is gone and every
/// queued ack is sent, or `abort`.
pub(super) async fn acknowledge(
    store: &Store,
    publisher: &dyn Publisher,
    mut acks: mpsc::Receiver<AckItem>,
    spill_flush: Duration,
    abort: &CancellationToken,
    fatal: &Fatal,
) {
    let mut pacer = SpillPacer::new(spill_flush);
    loop {
        let item = tokio::select! {
            i = acks.recv() => match i { Some(i) => i, None => return },
            _ = abort.cancelled() => return,
        };
        let mut spilled = 0;
        for ticket in item.tickets {
            let settled = tokio::select! {
                s = ticket.settle() => s,
                _ = abort.cancelled() => return,
            };
            match settled {
                Ok(Settled::Forwarded) => {}
                Ok(Settled::Spilled(seq)) => spilled = spilled.max(seq),
                Err(e) => {
                    fatal.trigger(e);
                    return;
                }
            }
        }
        if item.publish.qos == QoS::AtMostOnce {
            // Nothing to acknowledge: a spilled QoS 0 reading is made durable by
            // the next flush.
            continue;
        }
        let durable = async {
            if spilled > 0 {
                pacer.durable(store, spilled).await?;
            }
            if item.seq > 0 {
                store.durable(item.seq).await?;
            }
            Ok::<(), StoreError>(())
        };
        let durable = tokio::select! {
            d = durable => d,
            _ = abort.cancelled() => return,
        };
        if let Err(e) = durable {
            // Not acknowledged: the broker will deliver it again.
            fatal.trigger(e);
            return;
        }
        tokio::select! {
            r = publisher.ack(&item.publish) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "cannot queue an ack: {e}");
                }
            }
            _ = abort.cancelled() => return,
        }
        failpoint::hit("after_announce_acked");
    }
}
