//! The `crm-integrator` binary: parses flags and environment, then runs the service until
//! SIGTERM/SIGINT.

use clap::Parser as _;

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    service_kit::init_telemetry();
    let config = crm_integrator::Config::parse();
    let shutdown = service_kit::shutdown_on_signals();
    service_kit::exit_code(crm_integrator::run(config, shutdown).await)
}
