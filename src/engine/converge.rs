//! The step after a create: converge when several gateways created the same
//! sensor's device at the same instant (a sensor heard by two gateways, one moved
//! while both were up). Qubitro's API cannot make a create conditional, so two
//! creates in the same instant are converged after, not prevented.
//!
//! Every gateway lists the sensor's devices after its create and takes the one the
//! lookup already chooses everywhere (the oldest by `created_at`, then the smallest
//! id). A gateway whose own new device lost deletes it, but only a device whose
//! `gateway_id` metadata is its own, and adopts the winner: each gateway in the race
//! ends on the same device, and Qubitro holds one. When the list or the winner
//! cannot be read, the gateway keeps its own device (said in the log): a second
//! device is billed, but no sensor is left without one.

use crate::announce::DeviceSpec;
use crate::cloud::Cloud;
use crate::device::Credentials;
use crate::onboarding::owner::owner_of;
use crate::onboarding::Origin;

/// The device `sensor` ends on after this gateway created `ours` from `spec`, and
/// its owner when another gateway's (its readings are then bridged by that one).
pub(super) async fn converge(
    cloud: &Cloud,
    gateway_id: &str,
    sensor: &str,
    spec: &DeviceSpec,
    ours: Credentials,
) -> (Credentials, Origin, Option<String>) {
    let keep = |ours: Credentials| (ours, Origin::Created, None);
    let (winner, owner) = match cloud.find_device(sensor).await {
        Ok(Some(found)) if found.id != ours.device_id => {
            let owner = owner_of(found.gateway_id.as_deref(), gateway_id);
            (found.id, owner)
        }
        Ok(_) => return keep(ours),
        Err(e) => {
            tracing::warn!(sensor_id = sensor, error = %e, "cannot list the devices of {sensor} after creating one: \
                keeping device {} (another gateway may have created one too)", ours.device_id);
            return keep(ours);
        }
    };
    if spec.metadata.get("gateway_id").map(String::as_str) != Some(gateway_id) {
        return keep(ours);
    }
    let theirs = match cloud.get(&winner).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(sensor_id = sensor, error = %e, "device {winner} of {sensor} is older than the one this gateway \
                created, but cannot be read: keeping device {}", ours.device_id);
            return keep(ours);
        }
    };
    match cloud.delete(&ours.device_id).await {
        Ok(_) => {
            tracing::info!(sensor_id = sensor, device_id = %winner, "another gateway created a device of {sensor} \
            first: this gateway deleted its own ({}) and adopts {winner}", ours.device_id)
        }
        Err(e) => {
            tracing::warn!(sensor_id = sensor, device_id = %winner, "another gateway created a device of {sensor} \
            first: this gateway adopts {winner}, but its own device {} is NOT deleted ({e}); delete it in Qubitro's \
            portal", ours.device_id)
        }
    }
    (theirs, Origin::Adopted, owner)
}
