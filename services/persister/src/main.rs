//! The `persister` binary: parses flags and runs until SIGINT/SIGTERM.

use clap::Parser as _;
use persister::{Args, PersisterConfig};

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = PersisterConfig::from(Args::parse());
    service_kit::init_telemetry();
    let shutdown = service_kit::shutdown_on_signals();
    service_kit::exit_code(persister::run(config, shutdown).await.map(drop))
}
