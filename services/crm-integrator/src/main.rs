//! The `crm-integrator` binary: parses flags and environment, then runs the service until
//! SIGTERM/SIGINT. A failure ends it with one line on stderr: exit code 2 for a mistake in the
//! flags, 1 for anything at run time.

use std::process::ExitCode;

use crm_integrator::{Args, IntegratorConfig, SettingsError};

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROGRAM: &str = "crm-integrator";

#[tokio::main]
async fn main() -> ExitCode {
    service_kit::init_telemetry();
    let config = IntegratorConfig::from(service_kit::parse_args::<Args>(PROGRAM));
    if let Err(err) = config.settings.validate() {
        return service_kit::report_failure(PROGRAM, &err, service_kit::EXIT_USAGE);
    }
    let shutdown = service_kit::shutdown_on_signals();
    match crm_integrator::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let usage = err.chain().any(|cause| {
                cause.is::<SettingsError>() || cause.is::<sync_topology::InvalidNamespace>()
            });
            let code = if usage {
                service_kit::EXIT_USAGE
            } else {
                service_kit::EXIT_FAILURE
            };
            service_kit::report_failure(PROGRAM, err.as_ref(), code)
        }
    }
}
