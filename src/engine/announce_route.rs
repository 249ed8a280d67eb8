//! Where an announce is answered: its MQTT 5 Response Topic and Correlation Data.
//!
//! Read before the proof is checked, so that even a refusal reaches the sensor;
//! properties too large to honour are reported, not stored, and the caller refuses
//! them once the proof is known (so that refusal can carry a MAC).

use rumqttc::v5::mqttbytes::v5::PublishProperties;

use crate::reply::{allowed_response_topic, Route};

/// The longest MQTT 5 Response Topic honoured: a longer one gets `invalid_field`
/// on the default reply topic, and is never stored nor kept per waiting route.
pub const MAX_RESPONSE_TOPIC_BYTES: usize = 256;
/// The longest MQTT 5 Correlation Data honoured (same rule).
pub const MAX_CORRELATION_DATA_BYTES: usize = 64;

/// The route an announce's properties ask for, and the reason to refuse them
/// when one is too large (then the route is the default one, without either).
/// A response topic outside the sensor's reply namespace is ignored (logged):
/// answering there would let anyone direct a sensor's reply to a topic they read.
pub(super) fn route_from_properties(
    props: Option<&PublishProperties>,
    reply_topic: &str,
    sensor: &str,
) -> (Route, Option<String>) {
    let mut route = Route::default();
    let Some(props) = props else {
        return (route, None);
    };
    let topic_len = props.response_topic.as_ref().map_or(0, String::len);
    let corr_len = props.correlation_data.as_ref().map_or(0, |c| c.len());
    if topic_len > MAX_RESPONSE_TOPIC_BYTES {
        let why = format!("response topic (MQTT 5 property) is {topic_len} bytes, more than {MAX_RESPONSE_TOPIC_BYTES}");
        return (route, Some(why));
    }
    if corr_len > MAX_CORRELATION_DATA_BYTES {
        let why = format!("correlation data (MQTT 5 property) is {corr_len} bytes, more than {MAX_CORRELATION_DATA_BYTES}");
        return (route, Some(why));
    }
    if let Some(rt) = &props.response_topic {
        if allowed_response_topic(reply_topic, sensor, rt) {
            route.response_topic = Some(rt.clone());
        } else {
            tracing::warn!(
                sensor_id = sensor,
                "response topic of sensor {sensor} is outside its reply namespace; using the default reply topic"
            );
        }
    }
    route.correlation_data = props.correlation_data.as_ref().map(|c| c.to_vec());
    (route, None)
}
