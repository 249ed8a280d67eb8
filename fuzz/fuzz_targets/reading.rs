//! Fuzz target `reading`: arbitrary bytes as one bridged sensor's reading through
//! the bridge's flattener. The checks live in fuzz/reading_check.rs, shared with
//! tests/fuzz_reading.rs, which runs them on stable over a fixed pseudo-random corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../reading_check.rs");

fuzz_target!(|data: &[u8]| {
    check_reading(data);
});
