// The checks of fuzz target `announce`, included (include!) by
// fuzz/fuzz_targets/announce.rs and by tests/fuzz_corpus.rs, so the fuzzer and the
// stable CI smoke test assert exactly the same properties.
//
// Input: the bytes up to the first '\n' are the topic, the rest is the payload.
// Properties: nothing panics; a topic yields a sensor id only when it is exactly
// onboard/announce/<valid id>; an accepted announce respects every documented limit;
// a refused one has a stable error code.

/// The announce topic pattern of the default configuration.
const FUZZ_PATTERN: &str = "onboard/announce/+";
/// The default announce.max_payload_bytes.
const FUZZ_MAX_PAYLOAD: usize = 4096;
const FUZZ_GATEWAY: &str = "gw";

/// What check_announce found, for a corpus's coverage statistics.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Refused(&'static str),
}

fn check_announce(data: &[u8]) -> Outcome {
    use onboardd::announce::{self, AnnounceError};

    let (topic, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[data.len()..]),
    };

    // Topic → sensor id. MQTT topics are UTF-8; rumqttc hands the daemon a String.
    let topic = String::from_utf8_lossy(topic);
    let sensor = announce::sensor_id_from_topic(FUZZ_PATTERN, &topic);
    if let Some(id) = sensor {
        assert!(
            onboardd::announce::valid_id(id),
            "sensor id {id:?} from {topic:?} is not a valid topic level"
        );
        assert_eq!(
            topic,
            format!("onboard/announce/{id}"),
            "a sensor id only from exactly onboard/announce/<id>"
        );
    }
    // Any other topic is dropped by the daemon; the payload is still worth parsing.
    let sensor = sensor.unwrap_or("fuzz-sensor");

    let peeked = announce::peek_request_id(payload);
    if let Some(r) = &peeked {
        assert!(r.chars().count() <= announce::MAX_REQUEST_ID_CHARS);
    }

    let result = announce::parse(sensor, payload, FUZZ_MAX_PAYLOAD, FUZZ_GATEWAY);
    // Pure: the same input gives the same answer.
    assert_eq!(
        result,
        announce::parse(sensor, payload, FUZZ_MAX_PAYLOAD, FUZZ_GATEWAY)
    );
    match result {
        Ok(a) => {
            assert!(payload.len() <= FUZZ_MAX_PAYLOAD);
            assert_eq!(a.sensor_id, sensor);
            let spec = &a.spec;
            let chars = |s: &str| s.chars().count();
            assert!(
                chars(&spec.name) <= announce::MAX_NAME_CHARS,
                "name {:?}",
                spec.name
            );
            assert!(!spec.name.trim().is_empty(), "empty name accepted");
            assert!(
                chars(&spec.description) <= announce::MAX_DESCRIPTION_CHARS,
                "description of {} chars",
                chars(&spec.description)
            );
            for (field, v) in [("brand", &spec.brand), ("model", &spec.model)] {
                assert!(chars(v) <= announce::MAX_BRAND_MODEL_CHARS, "{field} {v:?}");
                assert!(!v.trim().is_empty(), "empty {field} accepted");
            }
            for (field, v) in [
                ("name", &spec.name),
                ("description", &spec.description),
                ("brand", &spec.brand),
                ("model", &spec.model),
            ] {
                assert!(
                    !v.chars().any(char::is_control),
                    "control char in {field}: {v:?}"
                );
            }
            assert!(spec.tags.len() <= announce::MAX_TAGS);
            for t in &spec.tags {
                assert!(
                    !t.is_empty()
                        && t.len() <= announce::MAX_TAG_CHARS
                        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "tag {t:?} is not [A-Za-z0-9_]{{1,{}}}",
                    announce::MAX_TAG_CHARS
                );
            }
            assert_eq!(
                spec.metadata.get("sensor_id").map(String::as_str),
                Some(sensor)
            );
            assert_eq!(
                spec.metadata.get("gateway_id").map(String::as_str),
                Some(FUZZ_GATEWAY)
            );
            assert!(spec.metadata.len() <= announce::MAX_METADATA_ENTRIES + 2);
            for (k, v) in &spec.metadata {
                assert!(
                    !k.is_empty() && chars(k) <= announce::MAX_METADATA_KEY_CHARS,
                    "key {k:?}"
                );
                assert!(
                    chars(v) <= announce::MAX_METADATA_VALUE_CHARS,
                    "value of {k:?}"
                );
                assert!(
                    !k.chars().any(char::is_control) && !v.chars().any(char::is_control),
                    "control char in metadata {k:?}: {v:?}"
                );
            }
            for reserved in ["device_id", "device_token"] {
                assert!(
                    !spec.metadata.contains_key(reserved),
                    "reserved metadata key {reserved} accepted"
                );
            }
            if let Some(r) = &a.request_id {
                assert!(chars(r) <= announce::MAX_REQUEST_ID_CHARS);
            }
            // An accepted announce's request id is what an error reply would have echoed.
            assert_eq!(a.request_id, peeked, "parse and peek_request_id disagree");
            // The spec is stored in sled as JSON while the create is pending: it must
            // survive the round trip.
            let stored = serde_json::to_vec(spec).expect("a spec serialises");
            let back: announce::DeviceSpec =
                serde_json::from_slice(&stored).expect("a stored spec deserialises");
            assert_eq!(&back, spec);
            Outcome::Accepted
        }
        Err(e) => {
            if payload.len() > FUZZ_MAX_PAYLOAD {
                assert!(
                    matches!(e, AnnounceError::PayloadTooLarge { .. }),
                    "an oversize payload is refused before parsing, got {e:?}"
                );
            }
            // The message goes to the log and the code into the reply.
            let _ = e.to_string();
            let code = e.code();
            assert!(
                [
                    "payload_too_large",
                    "invalid_json",
                    "not_an_object",
                    "invalid_field"
                ]
                .contains(&code),
                "undocumented code {code}"
            );
            Outcome::Refused(code)
        }
    }
}
