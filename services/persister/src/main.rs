//! The `persister` binary: parses flags and runs until SIGINT/SIGTERM.

use clap::Parser as _;
use persister::{Args, PersisterConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = PersisterConfig::from(Args::parse());
    service_kit::init_telemetry();
    let shutdown = service_kit::shutdown_on_signals();
    persister::run(config, shutdown).await?;
    Ok(())
}
