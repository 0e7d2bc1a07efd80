//! The `crm-mock` binary: parses flags and serves until SIGINT/SIGTERM.

use clap::{CommandFactory as _, Parser as _};
use crm_mock::{Args, CrmMockConfig};

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = CrmMockConfig::from(Args::parse());
    if let Err(err) = config.validate() {
        // Report it like any other bad flag: usage error, exit code 2, no backtrace.
        Args::command()
            .error(clap::error::ErrorKind::ValueValidation, err)
            .exit();
    }
    service_kit::init_telemetry();
    let shutdown = service_kit::shutdown_on_signals();
    service_kit::exit_code(crm_mock::run(config, shutdown).await)
}
