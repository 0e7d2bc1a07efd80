//! The `crm-mock` binary: parses flags and serves until SIGINT/SIGTERM. A failure ends it with one
//! line on stderr: exit code 2 for a mistake in the flags, 1 for anything at run time.

use std::process::ExitCode;

use clap::CommandFactory as _;
use crm_mock::CrmMockConfig;

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROGRAM: &str = "crm-mock";

#[tokio::main]
async fn main() -> ExitCode {
    let config: CrmMockConfig = service_kit::parse_args(PROGRAM);
    if let Err(err) = config.validate() {
        // Reported like any other bad flag: a usage error, exit code 2.
        let err = CrmMockConfig::command().error(clap::error::ErrorKind::ValueValidation, err);
        service_kit::exit_on_usage_error(PROGRAM, &err);
    }
    service_kit::init_telemetry();
    let shutdown = service_kit::shutdown_on_signals();
    match crm_mock::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => service_kit::report_failure(PROGRAM, err.as_ref(), service_kit::EXIT_FAILURE),
    }
}
