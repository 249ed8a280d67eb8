//! The checks of fuzz target `announce` (fuzz/announce_check.rs) over a fixed,
//! seeded pseudo-random corpus: CI runs them on stable without cargo-fuzz or nightly.
//! The corpus mixes well-formed announces, values at and just past every limit,
//! mutations of announces, hostile JSON and raw bytes.

use serde_json::{json, Map, Value};

include!("../fuzz/announce_check.rs");

const SEED: u64 = 0x0b0a_2d5e_ed00_0001;
const INPUTS: usize = 20_000;

/// Characters a field value is drawn from: ASCII, multi-byte, control, and JSON-special.
const CHARS: &[char] = &[
    'a', 'Z', '0', '9', '_', '-', ' ', '.', ':', '/', '+', '#', 'é', 'ß', '日', '🌡', '\u{200b}',
    '\u{0}', '\n', '\t', '\u{7f}', '\u{85}', '"', '\\', '{', '}',
];

fn string_of(rng: &mut fastrand::Rng, len: usize, alphabet: &[char]) -> String {
    (0..len)
        .map(|_| alphabet[rng.usize(..alphabet.len())])
        .collect()
}

fn string_in(rng: &mut fastrand::Rng, lens: std::ops::Range<usize>, alphabet: &[char]) -> String {
    let n = rng.usize(lens);
    string_of(rng, n, alphabet)
}

/// A length near one of the interesting limits (or small).
fn len_near(rng: &mut fastrand::Rng, limits: &[usize]) -> usize {
    if rng.bool() {
        rng.usize(0..8)
    } else {
        let l = limits[rng.usize(..limits.len())];
        (l + rng.usize(0..3)).saturating_sub(1)
    }
}

fn field_value(rng: &mut fastrand::Rng, limit: usize) -> Value {
    match rng.u8(0..20) {
        0 => Value::Null,
        1 => json!(rng.i64(..)),
        2 => json!(rng.bool()),
        3 => json!(["x"]),
        4 => json!({"x": 1}),
        5..=9 => {
            // Clean ASCII, often right at the limit.
            let n = len_near(rng, &[limit]);
            Value::String(string_of(rng, n, &['a', 'b', 'Z', '1', '_', '-', ' ']))
        }
        10..=12 => {
            // Multi-byte: the limits are in characters, not bytes.
            let n = len_near(rng, &[limit]);
            Value::String(string_of(rng, n, &['é', '日', '🌡', 'a']))
        }
        _ => {
            let n = len_near(rng, &[limit, 4]);
            Value::String(string_of(rng, n, CHARS))
        }
    }
}

fn tag(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(0..10) {
        0 => json!(1),
        1 => Value::String(string_in(rng, 0..4, CHARS)),
        2 => Value::String(String::new()),
        3 => Value::String("a".repeat(len_near(rng, &[64]))),
        _ => {
            let n = rng.usize(1..12);
            Value::String(string_of(rng, n, &['a', 'Q', '7', '_']))
        }
    }
}

/// A structurally plausible announce, each field present, absent, wrong or at a limit.
fn announce(rng: &mut fastrand::Rng) -> Value {
    let mut o = Map::new();
    for (field, limit) in [
        ("name", 100),
        ("description", 500),
        ("brand", 100),
        ("model", 100),
        ("request_id", 128),
        ("proof", 128),
    ] {
        if rng.u8(0..3) != 0 {
            o.insert(field.into(), field_value(rng, limit));
        }
    }
    if rng.bool() {
        let n = len_near(rng, &[32]);
        let tags = (0..n).map(|_| tag(rng)).collect();
        o.insert(
            "tags".into(),
            if rng.u8(0..15) == 0 {
                json!("not-an-array")
            } else {
                Value::Array(tags)
            },
        );
    }
    if rng.bool() {
        let n = len_near(rng, &[32]);
        let mut m = Map::new();
        for i in 0..n {
            let key = match rng.u8(0..25) {
                0 => "sensor_id".to_string(),
                1 => "gateway_id".to_string(),
                2 => String::new(),
                4 => "device_id".to_string(),
                5 => "device_token".to_string(),
                6 => string_in(rng, 1..6, CHARS),
                3 => "k".repeat(len_near(rng, &[64])),
                _ => format!("k{i}"),
            };
            let value = match rng.u8(0..12) {
                0 => json!(3),
                1 => Value::String("v".repeat(len_near(rng, &[256]))),
                _ => Value::String(string_in(rng, 0..10, CHARS)),
            };
            m.insert(key, value);
        }
        o.insert("metadata".into(), Value::Object(m));
    }
    if rng.u8(0..4) == 0 {
        o.insert("unknown".into(), json!({"nested": [1, 2, {"x": null}]}));
    }
    Value::Object(o)
}

fn topic(rng: &mut fastrand::Rng) -> String {
    let id_chars = ['a', 'Z', '0', '.', '_', ':', '-'];
    match rng.u8(0..14) {
        0 => String::new(),
        1 => "onboard/announce/".into(),
        2 => "onboard/announce/+".into(),
        3 => "onboard/announce/#".into(),
        4 => "onboard/announce".into(),
        5 => format!("onboard/announce/{}/x", string_of(rng, 3, &id_chars)),
        6 => format!("other/announce/{}", string_of(rng, 3, &id_chars)),
        7 => format!("onboard/announce/{}", {
            let n = len_near(rng, &[64]);
            string_of(rng, n, &id_chars)
        }),
        8 => format!("onboard/announce/{}", string_in(rng, 1..6, CHARS)),
        9 => string_in(rng, 0..30, CHARS),
        _ => format!("onboard/announce/{}", string_in(rng, 1..20, &id_chars)),
    }
}

const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b",",
    b":",
    b"null",
    b"true",
    b"-0",
    b"1e999",
    b"\\u0000",
    b"\\ud800",
    b"\\udfff\\ud800",
    b"\xff",
    b"\xc3",
    b"\xf0\x9f",
    b"\n",
    b" ",
];

/// Byte-level damage: flips, insertions (random bytes or JSON tokens), deletions,
/// truncation, duplicated ranges.
fn mutate(rng: &mut fastrand::Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.usize(1..5) {
        let len = b.len();
        match rng.u8(0..6) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                b[i] ^= 1 << rng.u8(0..8);
            }
            1 => {
                let i = rng.usize(..=len);
                b.insert(i, rng.u8(..));
            }
            2 => {
                let i = rng.usize(..=len);
                let t = TOKENS[rng.usize(..TOKENS.len())];
                b.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let i = rng.usize(..len);
                let j = rng.usize(i..=len.min(i + 16));
                b.drain(i..j);
            }
            4 => b.truncate(rng.usize(..=len)),
            _ if len > 0 => {
                let i = rng.usize(..len);
                let j = rng.usize(i..=len.min(i + 32));
                let dup = b[i..j].to_vec();
                b.splice(j..j, dup);
            }
            _ => {}
        }
    }
    b
}

/// Pads a payload with JSON whitespace to exactly `n` bytes (when shorter).
fn pad_to(mut b: Vec<u8>, n: usize) -> Vec<u8> {
    while b.len() < n {
        b.push(b' ');
    }
    b
}

fn payload(rng: &mut fastrand::Rng) -> Vec<u8> {
    match rng.u8(0..20) {
        0 => Vec::new(),
        1 => b" \t\r\n".to_vec(),
        2 => {
            // Exactly at and just past max_payload_bytes.
            let b = serde_json::to_vec(&announce(rng)).unwrap();
            let n = FUZZ_MAX_PAYLOAD + rng.usize(0..2);
            if b.len() <= n {
                pad_to(b, n)
            } else {
                b
            }
        }
        3 => {
            // Deep nesting: serde_json's recursion limit must turn it into an error.
            let depth = rng.usize(100..3000);
            let mut b = vec![b'['; depth];
            b.extend(std::iter::repeat_n(b']', depth));
            b
        }
        4 => {
            let depth = rng.usize(100..1000);
            let mut s = String::new();
            for _ in 0..depth {
                s.push_str("{\"metadata\":");
            }
            s.push_str("null");
            s.push_str(&"}".repeat(depth));
            s.into_bytes()
        }
        5 => {
            // Another JSON type at the top.
            [&b"[1,2]"[..], b"\"s\"", b"42", b"null", b"true"][rng.usize(..5)].to_vec()
        }
        6 => (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect(),
        7 => {
            // Duplicate keys: the last one wins, whatever it is.
            let a = announce(rng);
            let b = announce(rng);
            let mut s = serde_json::to_string(&a).unwrap();
            let t = serde_json::to_string(&b).unwrap();
            if s.len() > 2 && t.len() > 2 {
                s.pop();
                s.push(',');
                s.push_str(&t[1..]);
            }
            s.into_bytes()
        }
        8..=13 => {
            let b = serde_json::to_vec(&announce(rng)).unwrap();
            mutate(rng, b)
        }
        _ => serde_json::to_vec(&announce(rng)).unwrap(),
    }
}

#[test]
fn the_announce_fuzz_checks_hold_over_a_fixed_corpus_of_20000_inputs() {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut accepted = 0;
    let mut codes = std::collections::BTreeMap::<&str, usize>::new();
    for _ in 0..INPUTS {
        let mut input = topic(&mut rng).into_bytes();
        if rng.u8(0..50) != 0 {
            input.push(b'\n');
            input.extend(payload(&mut rng));
        }
        match check_announce(&input) {
            Outcome::Accepted => accepted += 1,
            Outcome::Refused(code) => *codes.entry(code).or_default() += 1,
        }
    }
    eprintln!("{INPUTS} inputs: {accepted} accepted, refused: {codes:?}");
    // The corpus must reach both sides of every rule, not only the JSON parser.
    assert!(
        accepted >= INPUTS / 10,
        "only {accepted} accepted; {codes:?}"
    );
    for code in [
        "payload_too_large",
        "invalid_json",
        "not_an_object",
        "invalid_field",
    ] {
        assert!(
            codes.get(code).copied().unwrap_or(0) >= 50,
            "code {code} too rare: {codes:?} ({accepted} accepted)"
        );
    }
}

#[test]
fn values_at_each_limit_pass_the_fuzz_checks_and_one_past_is_refused() {
    let check = |field: &str, v: &Value| {
        let payload = json!({ field: v }).to_string();
        assert!(
            payload.len() <= FUZZ_MAX_PAYLOAD,
            "{field}: test value too large"
        );
        check_announce(&[&b"onboard/announce/s-1\n"[..], payload.as_bytes()].concat())
    };
    let tags = |n: usize, len: usize| -> Value {
        (0..n)
            .map(|i| format!("{i:_>len$}"))
            .collect::<Vec<_>>()
            .into()
    };
    let metadata = |n: usize, key_len: usize, value_len: usize| -> Value {
        (0..n)
            .map(|i| {
                (
                    format!("{i:0>key_len$}"),
                    Value::String("v".repeat(value_len)),
                )
            })
            .collect::<Map<_, _>>()
            .into()
    };
    // Limits count characters: multi-byte values at the limit are still accepted.
    for (field, at, past) in [
        ("name", json!("日".repeat(100)), json!("日".repeat(101))),
        (
            "description",
            json!("🌡".repeat(500)),
            json!("🌡".repeat(501)),
        ),
        ("brand", json!("é".repeat(100)), json!("é".repeat(101))),
        ("model", json!("m".repeat(100)), json!("m".repeat(101))),
        ("request_id", json!("r".repeat(128)), json!("r".repeat(129))),
        ("proof", json!("c".repeat(128)), json!("c".repeat(129))),
        ("tags", tags(32, 8), tags(33, 8)),
        ("tags", tags(1, 64), tags(1, 65)),
        ("tags", json!(["A_z_09"]), json!(["a-b"])),
        ("metadata", metadata(32, 8, 8), metadata(33, 8, 8)),
        ("metadata", metadata(1, 64, 256), metadata(1, 65, 1)),
        ("metadata", metadata(1, 8, 256), metadata(1, 8, 257)),
        (
            "metadata",
            json!({"floor": "2"}),
            json!({"sensor_id": "spoofed"}),
        ),
        ("name", json!("tab-free"), json!("line\nbreak")),
        (
            "metadata",
            json!({"device": "x"}),
            json!({"device_token": "forged"}),
        ),
        (
            "metadata",
            json!({"device": "x"}),
            json!({"device_id": "forged"}),
        ),
        ("metadata", json!({"k": "plain"}), json!({"k": "bell\u{7}"})),
        ("metadata", json!({"k": "plain"}), json!({"k\n": "v"})),
    ] {
        assert_eq!(check(field, &at), Outcome::Accepted, "{field} at its limit");
        assert_eq!(
            check(field, &past),
            Outcome::Refused("invalid_field"),
            "{field} one past its limit"
        );
    }
    for (n, outcome) in [
        (FUZZ_MAX_PAYLOAD, Outcome::Accepted),
        (FUZZ_MAX_PAYLOAD + 1, Outcome::Refused("payload_too_large")),
    ] {
        let payload = pad_to(b"{}".to_vec(), n);
        assert_eq!(
            check_announce(&[&b"onboard/announce/s-1\n"[..], &payload[..]].concat()),
            outcome,
            "payload of {n} bytes"
        );
    }
}
