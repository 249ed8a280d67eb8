//! Fuzz target `announce`: arbitrary bytes as one announce (first line: the topic,
//! the rest: the payload) through sensor_id_from_topic, peek_request_id and parse.
//! The checks live in fuzz/announce_check.rs, shared with tests/fuzz_corpus.rs,
//! which runs them on stable over a fixed pseudo-random corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../announce_check.rs");

fuzz_target!(|data: &[u8]| {
    check_announce(data);
});
