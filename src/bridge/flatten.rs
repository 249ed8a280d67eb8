//! A sensor's reading, as it arrives on its data topic, turned into what Qubitro's
//! broker takes: one flat JSON object (nested values are not supported there).
//!
//! Pure and total: any bytes give either the flat object or a [`Rejection`] saying
//! why the reading is dropped, never a panic (the same checks run over seeded
//! random inputs in `tests/fuzz_corpus.rs`). Nested objects are joined with `_`
//! (`{"env":{"hum":40}}` → `{"env_hum":40}`); a key whose value is an array is left
//! out and reported, so the caller can log it once per sensor and key; a flattening
//! that yields a key twice is rejected rather than silently keeping one value.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// Joins the keys of a nested object with its parent's.
pub const SEPARATOR: char = '_';

/// A flattened reading can be longer than the reading (each leaf repeats its
/// parents' keys). Past this many times the size limit it is refused, so one
/// reading of `max_bytes` can never turn into megabytes in the buffer.
pub const MAX_GROWTH: usize = 4;

/// A reading ready to forward.
#[derive(Debug, Clone, PartialEq)]
pub struct Flattened {
    /// The flat object, serialized: exactly what is published to Qubitro.
    pub json: Vec<u8>,
    /// Flat keys whose value was an array and which were left out, in key order.
    pub arrays_left_out: Vec<String>,
}

/// Why a reading is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("empty payload")]
    Empty,
    #[error("{size} bytes, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("not JSON: {0}")]
    InvalidJson(String),
    #[error("not a JSON object")]
    NotAnObject,
    /// `{}`, or an object in which every value was an array or an empty object.
    #[error("nothing to forward (an empty object)")]
    NothingToForward,
    /// Two paths flatten to the same key: `{"a_b":1,"a":{"b":2}}`.
    #[error("flattening yields the key {0:?} twice")]
    DuplicateKey(String),
    #[error("flattened, {size} bytes, over {MAX_GROWTH} times the limit of {max}")]
    FlattenedTooLarge { size: usize, max: usize },
}

impl Rejection {
    /// A short stable name, for counters and log fields.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::InvalidJson(_) => "invalid_json",
            Rejection::NotAnObject => "not_an_object",
            Rejection::NothingToForward => "empty_object",
            Rejection::DuplicateKey(_) => "duplicate_key",
            Rejection::FlattenedTooLarge { .. } => "flattened_too_large",
        }
    }
}

/// Flattens one reading of at most `max_bytes` bytes.
pub fn flatten(payload: &[u8], max_bytes: usize) -> Result<Flattened, Rejection> {
    // The size first: a huge payload is refused before any parsing work.
    if payload.len() > max_bytes {
        return Err(Rejection::TooLarge {
            size: payload.len(),
            max: max_bytes,
        });
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(Rejection::Empty);
    }
    // serde_json refuses nesting deeper than 128, so the recursion below is bounded.
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| Rejection::InvalidJson(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(Rejection::NotAnObject);
    };
    let mut flat = Map::new();
    // Every flat key produced, arrays included: an array at `a_b` and a number at
    // `a_b` are still the same key twice.
    let mut seen = BTreeSet::new();
    let mut arrays = Vec::new();
    let mut grown = 0usize;
    let limit = max_bytes.saturating_mul(MAX_GROWTH);
    walk(
        &mut String::new(),
        true,
        object,
        &mut Out {
            flat: &mut flat,
            seen: &mut seen,
            arrays: &mut arrays,
            grown: &mut grown,
            limit,
        },
    )?;
    if flat.is_empty() {
        return Err(Rejection::NothingToForward);
    }
    let json = serde_json::to_vec(&Value::Object(flat)).expect("a JSON value always serializes");
    if json.len() > limit {
        return Err(Rejection::FlattenedTooLarge {
            size: json.len(),
            max: max_bytes,
        });
    }
    arrays.sort();
    Ok(Flattened {
        json,
        arrays_left_out: arrays,
    })
}

struct Out<'a> {
    flat: &'a mut Map<String, Value>,
    seen: &'a mut BTreeSet<String>,
    arrays: &'a mut Vec<String>,
    /// Key bytes produced so far: stops a pathological reading (a long parent key
    /// over many leaves) early instead of building a huge map first.
    grown: &'a mut usize,
    limit: usize,
}

/// `top`: the reading itself, whose keys get no separator in front (an inner
/// object's keys always do, even under an empty key: `{"":{"a":1}}` → `_a`).
fn walk(
    prefix: &mut String,
    top: bool,
    object: Map<String, Value>,
    out: &mut Out<'_>,
) -> Result<(), Rejection> {
    let base = prefix.len();
    for (key, value) in object {
        prefix.truncate(base);
        if !top {
            prefix.push(SEPARATOR);
        }
        prefix.push_str(&key);
        if let Value::Object(inner) = value {
            walk(prefix, false, inner, out)?;
            continue;
        }
        *out.grown = out.grown.saturating_add(prefix.len());
        if *out.grown > out.limit {
            return Err(Rejection::FlattenedTooLarge {
                size: *out.grown,
                max: out.limit / MAX_GROWTH,
            });
        }
        if !out.seen.insert(prefix.clone()) {
            return Err(Rejection::DuplicateKey(prefix.clone()));
        }
        if value.is_array() {
            out.arrays.push(prefix.clone());
        } else {
            out.flat.insert(prefix.clone(), value);
        }
    }
    prefix.truncate(base);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(input: &str) -> (Value, Vec<String>) {
        let f = flatten(input.as_bytes(), 4096).expect("accepted");
        (
            serde_json::from_slice(&f.json).expect("output is JSON"),
            f.arrays_left_out,
        )
    }

    fn err(input: &[u8]) -> Rejection {
        flatten(input, 4096).expect_err("rejected")
    }

    #[test]
    fn a_flat_object_is_forwarded_as_it_is() {
        let (v, arrays) = ok(r#"{"temp":21.5,"ok":true,"label":"x","none":null}"#);
        assert_eq!(v, json!({"temp":21.5,"ok":true,"label":"x","none":null}));
        assert!(arrays.is_empty());
    }

    #[test]
    fn nested_objects_are_joined_with_underscores() {
        let (v, _) = ok(r#"{"env":{"hum":40,"air":{"co2":400}},"t":1}"#);
        assert_eq!(v, json!({"env_hum":40,"env_air_co2":400,"t":1}));
        // An empty key is a level like any other.
        let (v, _) = ok(r#"{"":{"a":1},"b":{"":2}}"#);
        assert_eq!(v, json!({"_a":1,"b_":2}));
    }

    #[test]
    fn array_values_are_left_out_and_reported_and_the_rest_forwarded() {
        let (v, arrays) = ok(r#"{"t":1,"samples":[1,2],"env":{"list":[],"hum":3}}"#);
        assert_eq!(v, json!({"t":1,"env_hum":3}));
        assert_eq!(arrays, vec!["env_list".to_string(), "samples".to_string()]);
    }

    #[test]
    fn a_flattening_that_yields_a_key_twice_is_rejected() {
        assert_eq!(
            err(br#"{"a_b":1,"a":{"b":2}}"#),
            Rejection::DuplicateKey("a_b".into())
        );
        // An array at the colliding key counts too.
        assert!(matches!(
            err(br#"{"a_b":[1],"a":{"b":2}}"#),
            Rejection::DuplicateKey(_)
        ));
    }

    #[test]
    fn empty_payloads_and_empty_objects_are_rejected() {
        assert_eq!(err(b""), Rejection::Empty);
        assert_eq!(err(b"  \n"), Rejection::Empty);
        assert_eq!(err(b"{}"), Rejection::NothingToForward);
        assert_eq!(err(br#"{"a":{}}"#), Rejection::NothingToForward);
        assert_eq!(err(br#"{"a":[1]}"#), Rejection::NothingToForward);
    }

    #[test]
    fn invalid_json_and_non_objects_are_rejected() {
        assert!(matches!(err(b"{\"a\":"), Rejection::InvalidJson(_)));
        assert!(matches!(err(b"\xff\xfe"), Rejection::InvalidJson(_)));
        assert!(matches!(err(br#"{"a":1} x"#), Rejection::InvalidJson(_)));
        for v in ["[1,2]", "42", "\"s\"", "null", "true"] {
            assert_eq!(err(v.as_bytes()), Rejection::NotAnObject, "{v}");
        }
    }

    #[test]
    fn a_reading_over_the_size_limit_is_rejected_before_parsing() {
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(100));
        assert_eq!(
            flatten(big.as_bytes(), 50),
            Err(Rejection::TooLarge {
                size: big.len(),
                max: 50
            })
        );
        assert!(flatten(big.as_bytes(), big.len()).is_ok());
    }

    #[test]
    fn a_flattening_that_grows_far_past_the_limit_is_rejected() {
        // One long parent key over many leaves.
        let leaves: Vec<String> = (0..200).map(|i| format!("\"k{i}\":1")).collect();
        let input = format!(r#"{{"{}":{{{}}}}}"#, "p".repeat(300), leaves.join(","));
        assert!(input.len() < 4096);
        assert!(matches!(
            flatten(input.as_bytes(), 4096),
            Err(Rejection::FlattenedTooLarge { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}1{}", "{\"a\":".repeat(5000), "}".repeat(5000));
        assert!(matches!(
            flatten(deep.as_bytes(), 1 << 20),
            Err(Rejection::InvalidJson(_))
        ));
        let ok_depth = format!("{}1{}", "{\"a\":".repeat(100), "}".repeat(100));
        let f = flatten(ok_depth.as_bytes(), 1 << 20).expect("100 levels are fine");
        let v: Value = serde_json::from_slice(&f.json).expect("json");
        let key = vec!["a"; 100].join("_");
        assert_eq!(v, json!({ key: 1 }));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(12);
        let alphabet = b"{}[]\":,_ab01.-e\\ntrufalsn";
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            if let Ok(f) = flatten(&input, 4096) {
                let v: Value = serde_json::from_slice(&f.json).expect("output is JSON");
                let obj = v.as_object().expect("an object");
                assert!(!obj.is_empty());
                assert!(obj.values().all(|v| !v.is_object() && !v.is_array()));
            }
        }
    }
}
