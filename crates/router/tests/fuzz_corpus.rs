//! Replays the fuzz corpus (`fuzz/corpus/framing/`, minimised) through the
//! fuzz target's check, so that `cargo test` holds every input the fuzzer
//! found interesting, and every past finding, without a fuzzer.

#[path = "../fuzz/framing_check.rs"]
mod framing_check;

use std::path::Path;

#[test]
fn every_input_in_the_fuzz_corpus_frames_the_same_under_the_reference_reader() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/framing");
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| framing_check::check(&data));
        assert!(outcome.is_ok(), "{} fails the check", path.display());
        inputs += 1;
    }
    // The seeds alone are more than this: an empty or missing corpus fails.
    assert!(inputs >= 20, "only {inputs} inputs in {}", dir.display());
}

#[test]
fn the_reference_reader_refuses_what_the_codec_refuses_to_forward() {
    use framing_check::{reference_chunked, Chunked};
    for bad in [
        "5 \r\nhello\r\n0\r\n\r\n",
        "5;a=\"b\r\nhello\r\n0\r\n\r\n",
        "0\r\nGET / HTTP/1.1\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
    ] {
        assert!(
            matches!(reference_chunked(bad.as_bytes()), Chunked::Invalid(_)),
            "{bad:?}"
        );
    }
    match reference_chunked(b"5 ; a = \"x;\\\"y\"\r\nhello\r\n0\r\nX: 1\r\n\r\nGET") {
        Chunked::Complete { len, data } => {
            assert_eq!(data, b"hello");
            assert_eq!(len, 35);
        }
        other => panic!("{other:?}"),
    }
}
