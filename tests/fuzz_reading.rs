//! The checks of fuzz target `reading` (fuzz/reading_check.rs) over a fixed, seeded
//! pseudo-random corpus, on stable in every `cargo test`: nested readings with keys
//! that collide once flattened, arrays, deep nesting, sizes around the limit,
//! mutations of valid readings and raw bytes.

use serde_json::{Map, Value};

include!("../fuzz/reading_check.rs");

const SEED: u64 = 0x0b0a_2d5e_ed00_0012;
const INPUTS: usize = 20_000;

/// Few, short keys with separators in them, so flattened keys often collide.
const KEYS: &[&str] = &[
    "a", "b", "a_b", "b_a", "_", "a_", "_a", "t", "é", "", "x_y_z",
];

fn value(rng: &mut fastrand::Rng, depth: usize) -> Value {
    match rng.u8(0..12) {
        0 => Value::Null,
        1 => Value::from(rng.i64(..)),
        2 => Value::from(rng.f64()),
        3 => Value::Bool(rng.bool()),
        4 => Value::from("s".repeat(rng.usize(0..8))),
        5 => Value::Array(
            (0..rng.usize(0..3))
                .map(|_| value(rng, depth + 1))
                .collect(),
        ),
        _ if depth < 6 => object(rng, depth + 1),
        _ => Value::from(1),
    }
}

fn object(rng: &mut fastrand::Rng, depth: usize) -> Value {
    let mut m = Map::new();
    for _ in 0..rng.usize(0..5) {
        m.insert(KEYS[rng.usize(..KEYS.len())].to_string(), value(rng, depth));
    }
    Value::Object(m)
}

fn input(rng: &mut fastrand::Rng) -> Vec<u8> {
    match rng.u8(0..10) {
        0..=4 => serde_json::to_vec(&object(rng, 0)).expect("serializes"),
        5 => {
            // Around the size limit.
            let pad = FUZZ_MAX_READING - 10 + rng.usize(0..20);
            format!(r#"{{"p":"{}"}}"#, "x".repeat(pad.saturating_sub(8))).into_bytes()
        }
        6 => {
            let n = rng.usize(1..300);
            format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)).into_bytes()
        }
        7 | 8 => {
            // A valid reading, mutated.
            let mut b = serde_json::to_vec(&object(rng, 0)).expect("serializes");
            for _ in 0..rng.usize(1..4) {
                if b.is_empty() {
                    break;
                }
                let i = rng.usize(..b.len());
                match rng.u8(0..3) {
                    0 => b[i] = rng.u8(..),
                    1 => {
                        b.remove(i);
                    }
                    _ => b.truncate(i),
                }
            }
            b
        }
        _ => (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect(),
    }
}

#[test]
fn the_flattener_holds_its_properties_over_a_seeded_corpus() {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut forwarded = 0;
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..INPUTS {
        match check_reading(&input(&mut rng)) {
            ReadingOutcome::Forwarded => forwarded += 1,
            ReadingOutcome::Dropped(code) => *codes.entry(code).or_insert(0) += 1,
        }
    }
    // The corpus reaches every outcome, so a change that makes one unreachable shows.
    assert!(forwarded > 1000, "forwarded {forwarded}");
    for code in [
        "empty_object",
        "duplicate_key",
        "invalid_json",
        "too_large",
        "not_an_object",
    ] {
        assert!(codes.contains_key(code), "{code} never seen: {codes:?}");
    }
}
