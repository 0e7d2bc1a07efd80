//! The `crm-mock` binary: parses flags and serves until SIGINT/SIGTERM.

use clap::Parser as _;
use crm_mock::{Args, CrmMockConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = CrmMockConfig::from(Args::parse());
    service_kit::init_telemetry();
    let shutdown = service_kit::shutdown_on_signals();
    crm_mock::run(config, shutdown).await
}
