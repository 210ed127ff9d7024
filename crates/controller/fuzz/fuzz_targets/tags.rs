//! Coverage-guided fuzzing of one controller input; the property is
//! `checks::tags` (`../checks.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| signpost_controller_fuzz::checks::tags(data));
