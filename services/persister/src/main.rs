//! The `persister` binary: parses flags and runs until SIGINT/SIGTERM. A failure ends it with one
//! line on stderr: exit code 2 for a mistake in the flags, 1 for anything at run time.

use std::process::ExitCode;

use persister::{Args, PersisterConfig};

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROGRAM: &str = "persister";

#[tokio::main]
async fn main() -> ExitCode {
    service_kit::init_telemetry();
    let config = PersisterConfig::from(service_kit::parse_args::<Args>(PROGRAM));
    let shutdown = service_kit::shutdown_on_signals();
    match persister::run(config, shutdown).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            let usage = err
                .chain()
                .any(|cause| cause.is::<sync_topology::InvalidNamespace>());
            let code = if usage {
                service_kit::EXIT_USAGE
            } else {
                service_kit::EXIT_FAILURE
            };
            service_kit::report_failure(PROGRAM, err.as_ref(), code)
        }
    }
}
