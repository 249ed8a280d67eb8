//! Two gateways meet one sensor at the same instant (a BLE sensor heard by both, a
//! sensor moved while both were up): each has its own broker and `gateway_id`, and
//! Qubitro (the fake) holds both creates until both are in flight, so both create.
//! After its create each gateway lists the sensor's devices: the oldest wins
//! everywhere, the loser deletes its own device and adopts the winner, and both
//! serve the sensor the same device. Whatever `lookup_before_create` says.
//!
//! Qubitro's list carries `created_at`, set when a device comes to be: a gateway
//! that lists before the other's device exists sees only its own, and that one is
//! then the older. (Without `created_at` the smallest id decides, and such an early
//! list can keep two devices: the README says so.)

mod common;

use common::*;
use fake_qubitro::{Endpoint, FakeOptions, FakeQubitro};

async fn two_gateways_that_create_at_once_end_on_one_device(lookup: &str) {
    let cloud = FakeQubitro::start(FakeOptions {
        created_at_field: true,
        ..FakeOptions::default()
    })
    .await
    .expect("start the fake Qubitro");
    let sensor = "race-1";
    let (broker_a, broker_b) = (Mosquitto::start(), Mosquitto::start());
    let extra =
        |gw: &str| format!("gateway_id = \"{gw}\"\n[qubitro]\nlookup_before_create = \"{lookup}\"");
    let a = Daemon::start(&broker_a, &cloud, &extra("gw-a"));
    let b = Daemon::start(&broker_b, &cloud, &extra("gw-b"));
    let mut at_a = a.sensor(broker_a.port, sensor).await;
    let mut at_b = b.sensor(broker_b.port, sensor).await;

    cloud.hold_creates();
    at_a.announce("{}").await;
    at_b.announce("{}").await;
    wait_for_cloud_requests(&cloud, Endpoint::Create, 2).await;
    cloud.release_creates();

    let ok_a = at_a.reply_with_status("ok").await;
    let ok_b = at_b.reply_with_status("ok").await;
    assert_opens_to_the_clouds_token(&cloud, &ok_a);
    assert_opens_to_the_clouds_token(&cloud, &ok_b);
    assert_eq!(
        ok_a["device_id"], ok_b["device_id"],
        "{lookup}: both serve the same device"
    );
    let left = cloud_devices_of(&cloud, sensor);
    assert_eq!(
        left.len(),
        1,
        "{lookup}: Qubitro holds one device: {left:?}"
    );
    assert_eq!(left[0].id, ok_a["device_id"].as_str().expect("an id"));
    assert_eq!(
        cloud.count(Endpoint::Delete),
        1,
        "the loser deleted its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_creating_one_sensor_at_once_converge_on_one_device_with_lookup_always() {
    two_gateways_that_create_at_once_end_on_one_device("always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_creating_one_sensor_at_once_converge_on_one_device_with_lookup_after_failure()
{
    two_gateways_that_create_at_once_end_on_one_device("after_failure").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_creating_one_sensor_at_once_converge_on_one_device_with_lookup_never() {
    two_gateways_that_create_at_once_end_on_one_device("never").await;
}
