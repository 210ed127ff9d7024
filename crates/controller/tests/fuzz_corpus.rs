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
