//! `signpost`: one binary for the controller and the data plane. The
//! command line lives in `cli`; the parts live in their crates
//! (`signpost-controller`, `signpost-router`, `signpost-protocol`).

mod cli;

fn main() -> std::process::ExitCode {
    match cli::Cli::parse_and_run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("signpost: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
