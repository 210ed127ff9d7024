//! Replays the controller's fuzz corpora (`fuzz/corpus/<target>/`) through
//! the fuzz targets' checks, so that `cargo test` holds every input the
//! fuzzer found interesting, and every past finding, without a fuzzer and
//! against the controller's own modules (the fuzz build pulls their source
//! files in by path).

// The paths `fuzz/checks.rs` names (`crate::events`, ...).
use signpost_controller::{config, events, model, routers, tags, xds};

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

#[test]
fn every_input_in_the_fuzz_corpora_passes_its_targets_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in checks::TARGETS {
        let dir = root.join(target);
        let mut inputs = 0;
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails the check", path.display());
            inputs += 1;
        }
        // The seeds alone are more than this: an empty or missing corpus fails.
        assert!(inputs >= 5, "only {inputs} inputs in {}", dir.display());
    }
}

#[test]
fn the_fuzz_builds_copy_of_valid_id_is_the_controllers() {
    // fuzz/src/lib.rs copies `auth::valid_id` (the auth module is not built
    // there); the copy must say what the original says.
    let copy =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/src/lib.rs"))
            .unwrap();
    let original =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/auth/mod.rs"))
            .unwrap();
    // From `fn valid_id(` to its closing brace, indentation aside.
    let body = |text: &str| -> Vec<String> {
        let start = text.find("fn valid_id(").expect("valid_id");
        let mut lines = Vec::new();
        for line in text[start..].lines().map(str::trim) {
            lines.push(line.to_owned());
            if line == "}" {
                break;
            }
        }
        lines
    };
    assert_eq!(body(&copy), body(&original));
}
