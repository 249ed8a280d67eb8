// The checks of fuzz target `reading`, included (include!) by
// fuzz/fuzz_targets/reading.rs and by tests/fuzz_reading.rs, so the fuzzer and the
// stable CI smoke test assert exactly the same properties of the bridge's
// flattener (onboardd::bridge::flatten).
//
// Input: the whole input is one reading's payload.
// Properties: nothing panics; an accepted reading is a non-empty JSON object whose
// values are neither objects nor arrays, within MAX_GROWTH times the size limit,
// whose keys are all distinct paths of the input; a refused one has a stable code.

/// The default announce.max_payload_bytes, which bounds a reading too.
const FUZZ_MAX_READING: usize = 4096;

/// What check_reading found, for a corpus's coverage statistics.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadingOutcome {
    Forwarded,
    Dropped(&'static str),
}

fn check_reading(data: &[u8]) -> ReadingOutcome {
    use onboardd::bridge::flatten::{flatten, MAX_GROWTH, SEPARATOR};

    match flatten(data, FUZZ_MAX_READING) {
        Ok(f) => {
            assert!(data.len() <= FUZZ_MAX_READING);
            assert!(f.json.len() <= FUZZ_MAX_READING * MAX_GROWTH);
            let out: serde_json::Value =
                serde_json::from_slice(&f.json).expect("the flattened reading is JSON");
            let obj = out.as_object().expect("the flattened reading is an object");
            assert!(!obj.is_empty(), "an empty object is never forwarded");
            let input: serde_json::Value =
                serde_json::from_slice(data).expect("an accepted reading was JSON");
            for (k, v) in obj {
                assert!(!v.is_object() && !v.is_array(), "{k} is not flat: {v}");
                assert!(
                    !f.arrays_left_out.contains(k),
                    "{k} is both forwarded and left out"
                );
                // Walk the key back into the input: some split at separators
                // must lead to this very value.
                assert!(
                    reaches(&input, k, v, SEPARATOR),
                    "{k} = {v} is not a path of the input"
                );
            }
            ReadingOutcome::Forwarded
        }
        Err(r) => ReadingOutcome::Dropped(r.code()),
    }
}

/// Whether `key`, split at some of its separators, is a path through `at` to `want`.
fn reaches(at: &serde_json::Value, key: &str, want: &serde_json::Value, sep: char) -> bool {
    let Some(obj) = at.as_object() else {
        return false;
    };
    if obj.get(key) == Some(want) {
        return true;
    }
    key.match_indices(sep).any(|(i, _)| {
        obj.get(&key[..i])
            .is_some_and(|inner| reaches(inner, &key[i + 1..], want, sep))
    })
}
