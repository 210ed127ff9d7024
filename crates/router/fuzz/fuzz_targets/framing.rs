//! Coverage-guided fuzzing of the request-head, response-head and chunked-body
//! parsers: every input goes through `framing_check::check`, which panics when
//! what the codec would forward frames otherwise under the reference reader.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../framing_check.rs"]
mod framing_check;

fuzz_target!(|data: &[u8]| framing_check::check(data));
