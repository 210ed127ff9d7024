fn main() -> std::process::ExitCode {
    match signpost::cli::Cli::parse_and_run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("signpost: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
