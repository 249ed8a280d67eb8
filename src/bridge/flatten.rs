//! A sensor's reading, as it arrives on its data topic, turned into what Qubitro's
//! broker takes: one flat JSON object (nested values are not supported there).
//!
//! Pure and total: any bytes give either the flat object or a [`Rejection`] saying
//! why the reading is dropped, never a panic (the same checks run over seeded
//! random inputs in `tests/fuzz_corpus.rs`). Nested objects are joined with `_`
//! (`{"env":{"hum":40}}` → `{"env_hum":40}`); a key whose value is an array is left
//! out and reported, so the caller can log it once per sensor and key; a flattening
//! that yields a key twice is rejected rather than silently keeping one value.
//!
//! A reading that is flat already (the common case: `{"temp":21.5,"hum":40}`) is
//! checked by a parse that builds nothing and forwarded byte for byte; only nested
//! readings go through a `Value` and are written out again (see [`already_flat`]).

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
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
    if already_flat(payload) {
        return Ok(Flattened {
            json: payload.trim_ascii().to_vec(),
            arrays_left_out: Vec::new(),
        });
    }
    restructure(payload, max_bytes)
}

/// The general path: parsed into a `Value`, walked, and written out again.
fn restructure(payload: &[u8], max_bytes: usize) -> Result<Flattened, Rejection> {
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

/// Past this many keys a reading takes the general path (the duplicate check here
/// compares each key with those before it).
const MAX_FAST_KEYS: usize = 32;

/// Whether `payload` is a JSON object of 1 to [`MAX_FAST_KEYS`] keys, each once, whose
/// values are all scalars: then it is already what Qubitro takes, and forwarding its
/// bytes gives what [`restructure`] would give (the same keys and values; key order,
/// whitespace and number spelling as the sensor wrote them). The parse is serde_json's
/// own, through the same `deserialize_any` as a `Value`, so it accepts exactly what
/// the general path accepts (numbers out of range, bad escapes, trailing bytes are
/// errors); it only allocates for keys with escapes. Anything else (an error, nesting,
/// an array, a repeated key) answers `false` and the general path decides, with its
/// own error. Measured: this was ~9.7 k of the ~45 k instructions per bridged reading.
fn already_flat(payload: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<FlatObject>(payload),
        Ok(FlatObject(true))
    )
}

/// `true`: an object of 1 to [`MAX_FAST_KEYS`] distinct keys with scalar values.
struct FlatObject(bool);

impl<'de> Deserialize<'de> for FlatObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FlatObjectVisitor)
    }
}

struct FlatObjectVisitor;

impl<'de> Visitor<'de> for FlatObjectVisitor {
    type Value = FlatObject;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a flat JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FlatObject, A::Error> {
        let mut keys: Vec<Key<'de>> = Vec::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if keys.len() == MAX_FAST_KEYS || keys.iter().any(|k| k.as_str() == key.as_str()) {
                return Err(de::Error::custom("not plainly flat"));
            }
            map.next_value::<Scalar>()?;
            keys.push(key);
        }
        Ok(FlatObject(!keys.is_empty()))
    }
}

/// An object key, borrowed from the payload unless it has escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v.to_string()))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A scalar value (string, number, boolean, null); an object or array is an error.
struct Scalar;

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Scalar, E> {
                Ok(Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Scalar, E> {
                Ok(Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Scalar, E> {
                Ok(Scalar)
            }
            fn visit_str<E>(self, _: &str) -> Result<Scalar, E> {
                Ok(Scalar)
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar)
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
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
    fn a_flat_reading_is_forwarded_byte_for_byte_less_surrounding_whitespace() {
        let f = flatten(b" {\"temp\" : 21.50, \"n\":1}\n", 4096).expect("accepted");
        assert_eq!(f.json, br#"{"temp" : 21.50, "n":1}"#);
        assert!(already_flat(
            br#"{"a":1,"b":"x","c":null,"d":true,"e":-1.5e3}"#
        ));
        // Not plainly flat: the general path decides.
        for v in [
            r#"{"a":{"b":1}}"#,
            r#"{"a":[1]}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"\u0061":2}"#,
            "{}",
            "[1]",
            r#"{"a":1e400}"#,
            r#"{"a":1} x"#,
        ] {
            assert!(!already_flat(v.as_bytes()), "{v}");
        }
        let many: Vec<String> = (0..=MAX_FAST_KEYS).map(|i| format!("\"k{i}\":1")).collect();
        assert!(!already_flat(format!("{{{}}}", many.join(",")).as_bytes()));
    }

    /// The fast path is only a shortcut: over random readings, flat ones above all,
    /// `flatten` gives what the general path alone gives (the same object, or the
    /// same refusal), and the fast path was taken often enough to matter.
    #[test]
    fn flat_or_not_flatten_agrees_with_the_general_path() {
        let mut rng = fastrand::Rng::with_seed(7);
        let keys = ["a", "b", "a_b", "t\\u00e9", "\\u0061", "", "x y"];
        let values = [
            "1",
            "-0",
            "2.5e3",
            "1e400",
            "\"s\"",
            "\"\\ud800\"",
            "null",
            "true",
            "[1]",
            "{}",
            "{\"b\":2}",
            "01",
            "\"\\u00e9\"",
        ];
        let mut fast = 0;
        for _ in 0..20_000 {
            let n = rng.usize(0..5);
            let members: Vec<String> = (0..n)
                .map(|_| {
                    let k = keys[rng.usize(..keys.len())];
                    let v = values[rng.usize(..values.len())];
                    format!("\"{k}\":{v}")
                })
                .collect();
            let mut input = format!("{}{{{}}}", " ".repeat(rng.usize(0..2)), members.join(","));
            if rng.usize(0..20) == 0 {
                input.push_str(" x");
            }
            let input = input.as_bytes();
            fast += usize::from(already_flat(input));
            let (got, want) = (flatten(input, 4096), restructure(input, 4096));
            match (&got, &want) {
                (Ok(g), Ok(w)) => {
                    let g: Value = serde_json::from_slice(&g.json).expect("JSON");
                    let w: Value = serde_json::from_slice(&w.json).expect("JSON");
                    assert_eq!(g, w, "{}", String::from_utf8_lossy(input));
                }
                (Err(g), Err(w)) => assert_eq!(g.code(), w.code()),
                _ => panic!(
                    "{}: {got:?} against {want:?}",
                    String::from_utf8_lossy(input)
                ),
            }
            if let (Ok(g), Ok(w)) = (got, want) {
                assert_eq!(g.arrays_left_out, w.arrays_left_out);
            }
        }
        assert!(fast > 2_000, "the fast path was taken {fast} times");
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
