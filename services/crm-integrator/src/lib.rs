//! crm-integrator: consumes customer records from the shared `integrators` consumer and syncs each
//! to the CRM, never applying a customer's data twice and never letting an older version overwrite
//! a newer one. It owns the ledger protocol (claim with compare-and-set, confirm, look up when in
//! doubt; the rules themselves live in `sync_topology::ledger`), retries and dead letters, the
//! fleet-wide CRM pause, the circuit breaker and the request concurrency (fixed or adaptive).

mod config;
mod consume;
mod fleet;
mod flow;
mod heartbeat;
mod integrator;
mod ledger;
mod policy;
mod process;
mod schedules;
mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::PullConsumer};
use governor::{Quota, RateLimiter};
use service_kit::Health;
use sync_topology::Names;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Totals;

pub use config::{Config, ConfigError};
pub use crm_client::{CrmClient, CrmCustomer, CrmReply, Transient, Write};
pub use fleet::{PAUSE_KEY, PauseNotice};
pub use flow::{Gate, Limiter};
pub use integrator::Integrator;
pub use policy::{BreakerSettings, PauseRequest, Signal};
pub use process::{ProcessError, Settled, process_message};

/// Wall-clock time in Unix milliseconds, as the ledger and pause notices write it.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Connects to NATS and the CRM and builds the shared state of one replica, without consuming.
/// Tests use it to call [`process_message`] directly.
pub async fn connect(
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Integrator>> {
    let connected = connect_with_consumer(config, shutdown).await?;
    Ok(connected.integrator)
}

/// One replica's state and what it reads and writes besides.
struct Connected {
    integrator: Arc<Integrator>,
    consumer: PullConsumer,
    client: async_nats::Client,
    control: async_nats::jetstream::kv::Store,
}

async fn connect_with_consumer(
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<Connected> {
    config
        .validate()
        .context("invalid crm-integrator configuration")?;
    let names = Names::new(&config.nats.namespace)?;
    // Before NATS: a CRM URL the client refuses (a token in clear text) is a configuration error.
    let request_timeout = config.request_timeout();
    let max_connections = config.concurrency.unwrap_or(config.max_concurrency);
    let crm = CrmClient::new(
        config.crm_url.clone(),
        config.crm_token.as_deref(),
        request_timeout,
        max_connections,
        config.allow_insecure_crm,
    )?;
    let client = service_kit::connect_nats(&config.nats, "crm-integrator", &shutdown)
        .await?
        .ok_or(StoppedWhileWaiting)?;
    let js = jetstream::new(client.clone());
    let ledger = js
        .get_key_value(names.ledger_bucket())
        .await
        .with_context(|| {
            format!(
                "cannot open the ledger bucket {} (run `syncctl setup`)",
                names.ledger_bucket()
            )
        })?;
    let control = js
        .get_key_value(names.control_bucket())
        .await
        .with_context(|| {
            format!(
                "cannot open the control bucket {} (run `syncctl setup`)",
                names.control_bucket()
            )
        })?;
    let stream = names.ingest_stream();
    let consumer: PullConsumer = js
        .get_consumer_from_stream(&config.consumer, &stream)
        .await
        .with_context(|| {
            format!(
                "cannot find consumer {} on stream {stream} (run `syncctl setup`)",
                config.consumer
            )
        })?;
    let ack_wait = consumer.cached_info().config.ack_wait;
    // A claim lives as long as an unacknowledged delivery, and always longer than one request, so
    // no one takes over while our request may still land.
    let claim_lease = ack_wait.max(request_timeout * 2 + Duration::from_secs(1));
    let limiter = Arc::new(
        match config.concurrency {
            Some(fixed) => Limiter::fixed(fixed),
            None => Limiter::adaptive(16, config.max_concurrency),
        }
        .with_deadlines(config.min_request_timeout(), request_timeout),
    );
    let gate = Arc::new(
        Gate::new(
            BreakerSettings {
                failure_share: config.breaker_failure_share,
                min_requests: config.breaker_min_requests,
                window: Duration::from_millis(config.breaker_window_ms.max(1)),
                cooldown: Duration::from_millis(config.breaker_cooldown_ms),
            },
            config.max_pause(),
            request_timeout + Duration::from_secs(1),
        )
        .naming_crm(config.crm_url.as_str()),
    );
    let replica = replica_name();
    let fleet = fleet::FleetPause::new(control.clone(), gate.clone(), replica.clone());
    let rate = config
        .rps
        .map(|rps| RateLimiter::direct(Quota::per_second(rps)));
    let integrator = Integrator {
        names,
        js,
        ledger: ledger::LedgerStore::new(
            ledger,
            replica,
            claim_lease,
            // As long as a claim's own lease assumes a request may still land after its deadline.
            request_timeout * 2 + Duration::from_secs(1),
        ),
        crm,
        gate,
        fleet,
        slots: flow::Slots::new(flow::message_capacity(limiter.limit())),
        limiter,
        rate,
        max_deliver: config.max_deliver,
        request_timeout,
        max_inline_wait: config.max_inline_wait(),
        shutdown,
        settled: Default::default(),
        totals: Default::default(),
    };
    Ok(Connected {
        integrator: Arc::new(integrator),
        consumer,
        client,
        control,
    })
}

/// Shutdown was asked for while NATS was still out of reach: nothing was started.
#[derive(Debug, thiserror::Error)]
#[error("stopped while waiting for NATS at start-up: nothing was consumed")]
pub struct StoppedWhileWaiting;

/// `integrator-{host}-{pid}-{random}`: the host tells replicas in containers apart (each is pid 1
/// there), the random part two runs of one process id. Used in ledger claims, pause notices and
/// the heartbeat key, so only characters a KV key allows.
fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let pid = std::process::id();
    let random = rand::random::<u16>();
    if host.is_empty() {
        format!("integrator-{pid}-{random:04x}")
    } else {
        format!("integrator-{host}-{pid}-{random:04x}")
    }
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
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningIntegrator> {
    let health = Health::default();
    // Serving first: while the replica waits for NATS, `/readyz` says what it waits for.
    let metrics_addr =
        service_kit::serve_metrics(config.metrics_addr, health.clone(), shutdown.clone()).await?;
    let Connected {
        integrator,
        consumer,
        client,
        control,
    } = connect_with_consumer(&config, shutdown.clone()).await?;
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
        config.fetch_batch,
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
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
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
