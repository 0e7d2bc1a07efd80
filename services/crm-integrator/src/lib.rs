//! crm-integrator: consumes customer records from the shared `integrators` consumer and syncs each
//! to the CRM, never applying a customer's data twice and never letting an older version overwrite
//! a newer one. It owns the ledger protocol (claim with compare-and-set, confirm, look up when in
//! doubt; the rules themselves live in `sync_topology::ledger`), retries and dead letters, the
//! fleet-wide CRM pause, the circuit breaker and the request concurrency (fixed or adaptive).
//!
//! Where each part lives: `settings.rs` (every default) and `args.rs` (the command line);
//! `integrator.rs` (one replica's shared state, built from the settings) and `consume.rs` (the
//! pull loop); `process/` (one message's steps: judge against the ledger, send, publish its
//! outcome); `ledger.rs` (the ledger store and claim); `flow/` (limiter, gate, slots);
//! `policy.rs` (what an answer says); `schedules.rs` (every retry wait); `fleet.rs` (the shared
//! pause); `heartbeat.rs` and `telemetry.rs` (what the operator sees).

mod args;
mod consume;
mod fleet;
mod flow;
mod heartbeat;
mod integrator;
mod ledger;
mod policy;
mod process;
mod schedules;
mod settings;
mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use service_kit::Health;
use tokio_util::sync::CancellationToken;

use crate::integrator::Connected;
use crate::telemetry::Totals;

pub use args::Args;
pub use crm_client::{CrmClient, CrmCustomer, CrmReply, Transient, Write};
pub use fleet::{PAUSE_KEY, PauseNotice};
pub use flow::{Gate, Limiter};
pub use integrator::{Integrator, StoppedWhileWaiting};
pub use policy::{BreakerSettings, PauseRequest, Signal};
pub use process::{ProcessError, Settled, process_message};
pub use settings::{CrmUrl, IntegratorConfig, Settings, SettingsError};

/// Wall-clock time in Unix milliseconds, as the ledger and pause notices write it.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Connects to NATS and the CRM and builds the shared state of one replica, without consuming.
/// Tests use it to call [`process_message`] directly.
pub async fn connect(
    config: &IntegratorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Integrator>> {
    let connected = integrator::connect(config, shutdown).await?;
    Ok(connected.integrator)
}

/// A replica consuming in the background.
#[derive(Debug)]
pub struct RunningIntegrator {
    pub metrics_addr: SocketAddr,
    pub integrator: Arc<Integrator>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningIntegrator {
    /// Waits until the replica has stopped fetching and settled its in-flight messages.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("the consume loop panicked")?
    }
}

/// Connects (waiting up to `--startup-wait` for NATS), serves metrics and health, and consumes in
/// the background until `shutdown`.
pub async fn start(
    config: IntegratorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningIntegrator> {
    let health = Health::default();
    // Serving first: while the replica waits for NATS, `/readyz` says what it waits for.
    let metrics_addr = service_kit::serve_metrics(
        config.settings.metrics_addr,
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    let Connected {
        integrator,
        consumer,
        client,
        control,
    } = integrator::connect(&config, shutdown.clone()).await?;
    tracing::info!(
        replica = %integrator.replica(),
        %metrics_addr,
        limiter = if integrator.limiter().is_adaptive() { "adaptive" } else { "fixed" },
        config = ?config,
        "crm-integrator consuming"
    );
    service_kit::watch_nats(
        client,
        &config.nats.nats_url,
        health.clone(),
        shutdown.clone(),
    );
    // A pause announced before this replica started must hold its very first request.
    integrator.fleet.load_current().await;
    tokio::spawn(integrator.fleet.clone().follow(shutdown.clone()));
    let beating = tokio::spawn(heartbeat::run(
        integrator.clone(),
        control,
        consumer.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let consuming = tokio::spawn(consume::consume(
        integrator.clone(),
        consumer,
        config.settings.fetch_batch,
        health,
        shutdown,
    ));
    let done = tokio::spawn(async move {
        let consumed = consuming.await.context("the consume loop panicked")?;
        // The heartbeat is removed once the replica stops.
        let _ = beating.await;
        consumed
    });
    Ok(RunningIntegrator {
        metrics_addr,
        integrator,
        done,
    })
}

/// What `main` runs: [`start`], then wait for the drain after `shutdown`, and log the totals.
pub async fn run(config: IntegratorConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let running = match start(config, shutdown).await {
        Ok(running) => running,
        Err(err) if err.is::<StoppedWhileWaiting>() => {
            tracing::info!("{err}");
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    let integrator = running.integrator.clone();
    running.wait().await?;
    let totals = &integrator.totals;
    let (pauses, breaker_openings) = integrator.gate().totals();
    tracing::info!(
        replica = %integrator.replica(),
        synced = Totals::get(&totals.synced),
        superseded = Totals::get(&totals.superseded),
        dead = Totals::get(&totals.dead),
        handed_back = Totals::get(&totals.handed_back),
        not_settled = Totals::get(&totals.not_settled),
        retries = Totals::get(&totals.retries),
        pauses,
        breaker_openings,
        "crm-integrator stopped: in-flight messages settled"
    );
    Ok(())
}
