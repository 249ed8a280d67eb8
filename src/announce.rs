//! An announce, from topic and payload bytes to a validated [`DeviceSpec`].
//!
//! Everything here is pure (no I/O), so every rule is unit-tested and fuzzed
//! (fuzz/fuzz_targets/announce.rs). Qubitro's documented limits are checked here,
//! before any cloud call, so a bad announce costs nothing but an error reply.

use std::collections::BTreeMap;

use crate::reply::ReplyCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Qubitro's documented limits (../shared/docs/qubitro-api.md).
pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_DESCRIPTION_CHARS: usize = 500;
/// Not Qubitro limits, but bounds that keep one announce small in memory and on disk.
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_CHARS: usize = 64;
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_KEY_CHARS: usize = 64;
pub const MAX_METADATA_VALUE_CHARS: usize = 256;
pub const MAX_REQUEST_ID_CHARS: usize = 128;
pub const MAX_BRAND_MODEL_CHARS: usize = 100;
/// A `proof` field inside an announce object is not protocol v2's (that one sits
/// beside the body); one longer than this is still a malformed field.
pub const MAX_PROOF_CHARS: usize = 128;

/// Metadata keys an announce may not set: onboardd sets `sensor_id` and
/// `gateway_id` itself, and `device_id`/`device_token` in a cloud answer's
/// `data.metadata` (an older documented shape) must only ever come from Qubitro.
pub const RESERVED_METADATA: [&str; 4] = ["sensor_id", "gateway_id", "device_id", "device_token"];

/// What onboardd asks Qubitro to create for one sensor. Stored while the create is pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub name: String,
    pub description: String,
    pub brand: String,
    pub model: String,
    pub tags: Vec<String>,
    /// Always holds `sensor_id` and `gateway_id` besides the announce's own entries.
    pub metadata: BTreeMap<String, String>,
}

/// A parsed, validated announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub sensor_id: String,
    pub spec: DeviceSpec,
    pub request_id: Option<String>,
    /// A `proof` field inside the announce object, as sent: bounded, and never
    /// checked. Protocol v2's proof sits beside the body, and the security module
    /// checks it before this parser reads the body (README "Security").
    pub proof: Option<String>,
    /// `"bridge": true`: the sensor asks the gateway to forward its readings (README
    /// "Bridge"); its replies then never carry the token.
    pub bridge: bool,
}

/// Why an announce can never succeed as sent. `code()` is the stable word in the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    #[error("payload is {size} bytes, more than the {max} allowed")]
    PayloadTooLarge { size: usize, max: usize },
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("payload must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    #[error("field `{field}` {problem}")]
    InvalidField { field: String, problem: String },
}

impl AnnounceError {
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            AnnounceError::PayloadTooLarge { .. } => ReplyCode::PayloadTooLarge,
            AnnounceError::InvalidJson(_) => ReplyCode::InvalidJson,
            AnnounceError::NotAnObject(_) => ReplyCode::NotAnObject,
            AnnounceError::InvalidField { .. } => ReplyCode::InvalidField,
        }
    }

    /// The reply code's word.
    pub fn code(&self) -> &'static str {
        self.reply_code().as_str()
    }
}

fn field_err(field: &str, problem: impl Into<String>) -> AnnounceError {
    AnnounceError::InvalidField {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// Matches `topic` against the announce pattern (one `+` level) and returns that
/// level when it is a valid sensor id. `None`: not an announce we can answer.
pub fn sensor_id_from_topic<'a>(pattern: &str, topic: &'a str) -> Option<&'a str> {
    let mut p = pattern.split('/');
    let mut t = topic.split('/');
    let mut found = None;
    loop {
        match (p.next(), t.next()) {
            (None, None) => break,
            (Some("+"), Some(level)) => found = Some(level),
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
    found.filter(|id| valid_id(id))
}

/// The sensor id rule, also used for the gateway id: 1–64 characters of
/// `A–Z a–z 0–9 . _ : -`, safe as one MQTT topic level and in URLs.
pub fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Best effort: the request_id of a payload, so that even an error reply can echo it.
pub fn peek_request_id(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    match v.get("request_id")? {
        Value::String(s) if s.chars().count() <= MAX_REQUEST_ID_CHARS => Some(s.clone()),
        _ => None,
    }
}

/// Parses and validates one announce payload for `sensor_id`.
pub fn parse(
    sensor_id: &str,
    payload: &[u8],
    max_payload: usize,
    gateway_id: &str,
) -> Result<Announce, AnnounceError> {
    if payload.len() > max_payload {
        return Err(AnnounceError::PayloadTooLarge {
            size: payload.len(),
            max: max_payload,
        });
    }
    let obj: Map<String, Value> = if payload.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(m)) => m,
            Ok(other) => return Err(AnnounceError::NotAnObject(kind(&other))),
            Err(e) => return Err(AnnounceError::InvalidJson(e.to_string())),
        }
    };

    let request_id = opt_string(&obj, "request_id", MAX_REQUEST_ID_CHARS)?;
    let proof = opt_string(&obj, "proof", MAX_PROOF_CHARS)?;
    let bridge = match obj.get("bridge") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(field_err(
                "bridge",
                format!("must be true or false, not {}", kind(other)),
            ))
        }
    };
    let name = opt_string(&obj, "name", MAX_NAME_CHARS)?.unwrap_or_else(|| sensor_id.to_string());
    if name.trim().is_empty() {
        return Err(field_err("name", "must not be empty"));
    }
    let description =
        opt_string(&obj, "description", MAX_DESCRIPTION_CHARS)?.unwrap_or_else(|| {
            format!("Sensor {sensor_id}, onboarded by onboardd on gateway {gateway_id}")
        });
    let brand = non_empty(opt_string(&obj, "brand", MAX_BRAND_MODEL_CHARS)?, "brand")?;
    let model = non_empty(opt_string(&obj, "model", MAX_BRAND_MODEL_CHARS)?, "model")?;

    let tags = match obj.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_TAGS {
                return Err(field_err(
                    "tags",
                    format!("has more than {MAX_TAGS} entries"),
                ));
            }
            let mut tags = Vec::with_capacity(items.len());
            for item in items {
                let Value::String(t) = item else {
                    return Err(field_err("tags", "must be an array of strings"));
                };
                if t.is_empty()
                    || t.len() > MAX_TAG_CHARS
                    || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(field_err(
                        "tags",
                        format!(
                            "entries must be 1-{MAX_TAG_CHARS} letters, digits or underscores (Qubitro's rule)"
                        ),
                    ));
                }
                tags.push(t.clone());
            }
            tags
        }
        Some(_) => return Err(field_err("tags", "must be an array of strings")),
    };

    let mut metadata = BTreeMap::new();
    match obj.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            if m.len() > MAX_METADATA_ENTRIES {
                return Err(field_err(
                    "metadata",
                    format!("has more than {MAX_METADATA_ENTRIES} entries"),
                ));
            }
            for (k, v) in m {
                if k.is_empty() || k.chars().count() > MAX_METADATA_KEY_CHARS {
                    return Err(field_err(
                        "metadata",
                        format!("keys must be 1-{MAX_METADATA_KEY_CHARS} characters"),
                    ));
                }
                if k.chars().any(char::is_control) {
                    return Err(field_err(
                        "metadata",
                        "keys must not contain control characters",
                    ));
                }
                if RESERVED_METADATA.contains(&k.as_str()) {
                    return Err(field_err(
                        "metadata",
                        format!("key `{k}` is reserved: onboardd sets it"),
                    ));
                }
                let Value::String(s) = v else {
                    return Err(field_err(
                        "metadata",
                        format!("value of `{k}` must be a string"),
                    ));
                };
                if s.chars().count() > MAX_METADATA_VALUE_CHARS {
                    return Err(field_err(
                        "metadata",
                        format!(
                            "value of `{k}` is longer than {MAX_METADATA_VALUE_CHARS} characters"
                        ),
                    ));
                }
                if s.chars().any(char::is_control) {
                    return Err(field_err(
                        "metadata",
                        format!("value of `{k}` must not contain control characters"),
                    ));
                }
                metadata.insert(k.clone(), s.clone());
            }
        }
        Some(_) => return Err(field_err("metadata", "must be an object of string values")),
    }
    metadata.insert("sensor_id".into(), sensor_id.to_string());
    metadata.insert("gateway_id".into(), gateway_id.to_string());

    Ok(Announce {
        sensor_id: sensor_id.to_string(),
        spec: DeviceSpec {
            name,
            description,
            brand,
            model,
            tags,
            metadata,
        },
        request_id,
        proof,
        bridge,
    })
}

fn non_empty(v: Option<String>, field: &str) -> Result<String, AnnounceError> {
    match v {
        None => Ok("Custom".to_string()),
        Some(s) if s.trim().is_empty() => Err(field_err(field, "must not be empty")),
        Some(s) => Ok(s),
    }
}

fn opt_string(
    obj: &Map<String, Value>,
    field: &str,
    max_chars: usize,
) -> Result<Option<String>, AnnounceError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            if s.chars().count() > max_chars {
                Err(field_err(
                    field,
                    format!("is longer than {max_chars} characters"),
                ))
            } else if s.chars().any(char::is_control) {
                Err(field_err(field, "must not contain control characters"))
            } else {
                Ok(Some(s.clone()))
            }
        }
        Some(other) => Err(field_err(
            field,
            format!("must be a string, not {}", kind(other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A plain spec for other modules' unit tests.
#[cfg(test)]
pub(crate) fn test_spec() -> DeviceSpec {
    DeviceSpec {
        name: "n".into(),
        description: "d".into(),
        brand: "Custom".into(),
        model: "Custom".into(),
        tags: vec![],
        metadata: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(payload: &str) -> Announce {
        parse("s-1", payload.as_bytes(), 4096, "gw").unwrap()
    }
    fn err(payload: &str) -> AnnounceError {
        parse("s-1", payload.as_bytes(), 4096, "gw").unwrap_err()
    }

    #[test]
    fn sensor_id_is_the_plus_level() {
        let p = "onboard/announce/+";
        assert_eq!(sensor_id_from_topic(p, "onboard/announce/abc"), Some("abc"));
        assert_eq!(sensor_id_from_topic(p, "onboard/announce/abc/x"), None);
        assert_eq!(sensor_id_from_topic(p, "onboard/announce"), None);
        assert_eq!(sensor_id_from_topic(p, "other/announce/abc"), None);
        assert_eq!(sensor_id_from_topic(p, "onboard/announce/a b"), None);
        assert_eq!(sensor_id_from_topic(p, "onboard/announce/"), None);
        assert_eq!(
            sensor_id_from_topic("site/+/hello", "site/x-1/hello"),
            Some("x-1")
        );
    }

    #[test]
    fn empty_payload_means_all_defaults() {
        let a = ok("");
        assert_eq!(a.spec.name, "s-1");
        assert_eq!(a.spec.brand, "Custom");
        assert_eq!(a.spec.model, "Custom");
        assert!(a.spec.description.contains("gw"));
        assert!(a.spec.tags.is_empty());
        assert_eq!(a.spec.metadata.get("sensor_id").unwrap(), "s-1");
        assert_eq!(a.spec.metadata.get("gateway_id").unwrap(), "gw");
        assert_eq!(a.request_id, None);
    }

    #[test]
    fn every_field_is_mapped() {
        let a = ok(
            r#"{"name":"N","description":"D","brand":"B","model":"M","tags":["t_1"],
            "metadata":{"k":"v"},"request_id":"r1","proof":"c","extra":5}"#,
        );
        assert_eq!(a.spec.name, "N");
        assert_eq!(a.spec.description, "D");
        assert_eq!(a.spec.brand, "B");
        assert_eq!(a.spec.model, "M");
        assert_eq!(a.spec.tags, vec!["t_1"]);
        assert_eq!(a.spec.metadata.get("k").unwrap(), "v");
        assert_eq!(a.request_id.as_deref(), Some("r1"));
        assert_eq!(a.proof.as_deref(), Some("c"));
    }

    #[test]
    fn the_old_claim_field_is_no_proof() {
        assert_eq!(ok(r#"{"claim":"00ff"}"#).proof, None);
    }

    #[test]
    fn bridge_is_a_boolean_that_defaults_to_false() {
        assert!(ok(r#"{"bridge":true}"#).bridge);
        assert!(!ok(r#"{"bridge":false}"#).bridge);
        assert!(!ok(r#"{"bridge":null}"#).bridge);
        assert!(!ok("{}").bridge);
        let err = parse("s", br#"{"bridge":"yes"}"#, 4096, "gw").unwrap_err();
        assert_eq!(err.code(), "invalid_field");
        assert!(err.to_string().contains("bridge"), "{err}");
    }

    #[test]
    fn bad_inputs_get_their_codes() {
        assert_eq!(err("{").code(), "invalid_json");
        assert_eq!(err("[1]").code(), "not_an_object");
        assert_eq!(err(r#"{"name":5}"#).code(), "invalid_field");
        assert_eq!(err(r#"{"tags":["a b"]}"#).code(), "invalid_field");
        assert_eq!(err(r#"{"tags":"x"}"#).code(), "invalid_field");
        assert_eq!(err(r#"{"metadata":{"a":1}}"#).code(), "invalid_field");
        assert_eq!(
            err(r#"{"metadata":{"sensor_id":"x"}}"#).code(),
            "invalid_field"
        );
        let long = format!(r#"{{"name":"{}"}}"#, "n".repeat(101));
        assert!(err(&long).to_string().contains("name"));
        let ok100 = format!(r#"{{"name":"{}"}}"#, "n".repeat(100));
        assert_eq!(ok(&ok100).spec.name.len(), 100);
        let desc = format!(r#"{{"description":"{}"}}"#, "d".repeat(501));
        assert!(err(&desc).to_string().contains("description"));
    }

    #[test]
    fn metadata_with_control_characters_is_an_invalid_field() {
        for payload in [
            r#"{"metadata":{"a\nb":"v"}}"#,
            r#"{"metadata":{"k":"line\u0000"}}"#,
            r#"{"metadata":{"k":"esc\u001b[31m"}}"#,
            r#"{"metadata":{"k":"del\u007f"}}"#,
            r#"{"metadata":{"k\t":"v"}}"#,
        ] {
            let e = err(payload);
            assert_eq!(e.code(), "invalid_field", "{payload}");
            assert!(e.to_string().contains("control characters"), "{e}");
        }
        assert_eq!(
            ok(r#"{"metadata":{"k":"üñí cödé"}}"#).spec.metadata["k"],
            "üñí cödé"
        );
    }

    #[test]
    fn every_reserved_metadata_key_is_an_invalid_field() {
        for key in ["sensor_id", "gateway_id", "device_id", "device_token"] {
            let e = err(&format!(r#"{{"metadata":{{"{key}":"x"}}}}"#));
            assert_eq!(e.code(), "invalid_field", "{key}");
            assert!(e.to_string().contains("reserved"), "{e}");
        }
        let a = ok(r#"{"metadata":{"device":"x"}}"#);
        assert!(!a.spec.metadata.contains_key("device_id"));
    }

    #[test]
    fn oversize_payload_is_refused_before_parsing() {
        let e = parse("s", &[b' '; 10], 9, "gw").unwrap_err();
        assert_eq!(e.code(), "payload_too_large");
    }

    #[test]
    fn request_id_is_peeked_from_invalid_announces() {
        assert_eq!(
            peek_request_id(br#"{"request_id":"r9","name":5}"#).as_deref(),
            Some("r9")
        );
        assert_eq!(peek_request_id(b"nope"), None);
    }
}
