//! The persister service: consumes the outcomes stream (synced, rejected, dead) and writes it to
//! PostgreSQL with [`outcome_writer`], which owns the consuming, decoding, provenance checks and
//! batch writes. What is the service's own: its settings and flags, waiting for PostgreSQL and NATS
//! at start-up (migrating the schema), and its health and metrics endpoint.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::PullConsumer;
use deadpool_postgres::Pool;
use outcome_writer::{Endpoints, OutcomeWriter};
use service_kit::{Health, NatsArgs};
use sync_store::{StoreError, WriteStrategy};
use sync_topology::Names;
use tokio_util::sync::CancellationToken;

pub use outcome_writer::RunReport;

/// Where the binary serves `/metrics`, `/healthz` and `/readyz` unless told otherwise.
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9102));

/// Everything the persister is told besides how to reach NATS. `Default` holds every default of
/// its command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// PostgreSQL to write to; the schema is migrated at start.
    pub database_url: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; None: nowhere (in-process runs).
    pub metrics_addr: Option<SocketAddr>,
    /// The consumer, batches and writers.
    pub writer: outcome_writer::Settings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database_url: sync_store::DEFAULT_DATABASE_URL.to_owned(),
            metrics_addr: Some(DEFAULT_METRICS_ADDR),
            writer: outcome_writer::Settings::default(),
        }
    }
}

/// Command line and environment of the `persister` binary; its defaults are [`Settings`]'.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "persister",
    version,
    about = "Writes pipeline outcomes (synced, rejected, dead) to PostgreSQL in batches, acking \
             after commit"
)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// PostgreSQL to write to (URL or key-value DSN; `sslmode` and `sslrootcert` turn TLS on);
    /// the schema is migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value_t = Settings::default().database_url,
        hide_env_values = true
    )]
    pub database_url: String,
    /// Durable consumer on the results stream to read from.
    #[arg(long, env = "PERSISTER_CONSUMER", default_value_t = Settings::default().writer.consumer)]
    pub consumer: String,
    /// Most outcomes written in one transaction (at most the consumer's max ack pending).
    #[arg(long, env = "PERSISTER_BATCH_SIZE",
          default_value_t = u32::try_from(Settings::default().writer.batch_size).unwrap_or(u32::MAX),
          value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub batch_size: u32,
    /// Concurrent writers (PostgreSQL connections). Outcomes are split among them by customer id,
    /// so each batch of up to `--batch-size` becomes one transaction per writer.
    #[arg(long, env = "PERSISTER_WRITERS",
          default_value_t = u32::try_from(Settings::default().writer.writers).unwrap_or(u32::MAX),
          value_parser = clap::value_parser!(u32).range(1..=32))]
    pub writers: u32,
    /// How customer rows are written: `unnest` (array-parameter upsert) or `copy-merge` (binary
    /// COPY into a temporary table, then upsert from it). Same result; see BENCHMARKS.md for speed.
    #[arg(long, env = "PERSISTER_WRITE_STRATEGY", value_enum,
          default_value_t = Settings::default().writer.write_strategy.into())]
    pub write_strategy: StrategyArg,
    /// Longest wait, after a batch's first outcome, for the batch to fill (`50ms`, `1s`).
    #[arg(long, env = "PERSISTER_BATCH_LINGER",
          default_value_t = Settings::default().writer.batch_linger.into())]
    pub batch_linger: humantime::Duration,
    /// --batch-linger in milliseconds (its older spelling).
    #[arg(
        long,
        env = "PERSISTER_BATCH_LINGER_MS",
        conflicts_with = "batch_linger"
    )]
    pub batch_linger_ms: Option<u64>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "PERSISTER_METRICS_ADDR", default_value_t = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Exit once the consumer has nothing pending (for rebuilding tables and benchmarks).
    #[arg(long)]
    pub stop_when_drained: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    Unnest,
    CopyMerge,
}

impl From<StrategyArg> for WriteStrategy {
    fn from(arg: StrategyArg) -> Self {
        match arg {
            StrategyArg::Unnest => WriteStrategy::Unnest,
            StrategyArg::CopyMerge => WriteStrategy::CopyMerge,
        }
    }
}

impl From<WriteStrategy> for StrategyArg {
    fn from(strategy: WriteStrategy) -> Self {
        match strategy {
            WriteStrategy::Unnest => StrategyArg::Unnest,
            WriteStrategy::CopyMerge => StrategyArg::CopyMerge,
        }
    }
}

impl From<Args> for PersisterConfig {
    fn from(args: Args) -> Self {
        let batch_linger = match args.batch_linger_ms {
            Some(ms) => Duration::from_millis(ms),
            None => args.batch_linger.into(),
        };
        PersisterConfig {
            nats: args.nats,
            settings: Settings {
                database_url: args.database_url,
                metrics_addr: Some(args.metrics_addr),
                writer: outcome_writer::Settings {
                    consumer: args.consumer,
                    batch_size: args.batch_size as usize,
                    writers: args.writers as usize,
                    write_strategy: args.write_strategy.into(),
                    batch_linger,
                    stop_when_drained: args.stop_when_drained,
                },
            },
        }
    }
}

/// How to reach NATS, and the rest.
#[derive(Debug, Clone)]
pub struct PersisterConfig {
    pub nats: NatsArgs,
    pub settings: Settings,
}

impl PersisterConfig {
    /// The default settings writing to `database_url`, without a metrics endpoint: for tests and
    /// other in-process runs.
    pub fn new(nats: NatsArgs, database_url: impl Into<String>) -> Self {
        PersisterConfig {
            nats,
            settings: Settings {
                database_url: database_url.into(),
                metrics_addr: None,
                ..Settings::default()
            },
        }
    }
}

/// Runs until `shutdown` (or, with `stop_when_drained`, until the consumer is drained).
pub async fn run(
    config: PersisterConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunReport> {
    let PersisterConfig { nats, settings } = config;
    let names = Names::new(&nats.namespace)?;
    if settings.writer.batch_size == 0 {
        return Err(outcome_writer::WriteError::BatchSize.into());
    }
    let health = Health::default();
    if let Some(addr) = settings.metrics_addr {
        let bound = service_kit::serve_metrics(addr, health.clone(), shutdown.clone()).await?;
        tracing::info!(%bound, "serving metrics and health");
    }

    // One connection more than the writers: the readiness check must not queue behind them.
    let database_url = settings.database_url;
    let pool = sync_store::connect_pool(&database_url, settings.writer.writers.max(1) + 1)?;
    if !migrate_when_available(&pool, &database_url, nats.startup_wait, &shutdown).await? {
        return Ok(RunReport::default());
    }
    let Some(client) = service_kit::connect_nats(&nats, "persister", &shutdown).await? else {
        tracing::info!("stopped while waiting for NATS at start-up: nothing was consumed");
        return Ok(RunReport::default());
    };
    let endpoints = Endpoints {
        client: client.clone(),
        names,
        nats_shown: nats.redacted_url(),
        pool: pool.clone(),
        database_url: database_url.clone(),
    };
    let writer = OutcomeWriter::bind(endpoints, settings.writer).await?;
    service_kit::watch_nats(client, &nats.nats_url, health.clone(), shutdown.clone());
    tokio::spawn(watch(
        pool,
        database_url,
        writer.consumer().clone(),
        health.clone(),
        shutdown.clone(),
    ));
    Ok(writer.run(&health, shutdown).await?)
}

/// Applies the embedded migrations, waiting up to `wait` (`--startup-wait`) while PostgreSQL is
/// unreachable: a persister started with or before its database must not crash-loop. False on
/// shutdown.
async fn migrate_when_available(
    pool: &Pool,
    database_url: &str,
    wait: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let server = format!("PostgreSQL at {}", service_kit::host_port(database_url));
    let migrated = service_kit::retry_until_up(
        &server,
        wait,
        shutdown,
        |err: &StoreError| matches!(err, StoreError::Connect { .. }),
        || async {
            let mut conn = sync_store::connection(pool, database_url).await?;
            sync_store::migrate(&mut conn, None).await
        },
    )
    .await;
    let report = match migrated {
        Ok(Some(report)) => report,
        Ok(None) => return Ok(false),
        Err(err) => {
            return Err(err).with_context(|| {
                format!(
                    "cannot migrate the schema of {}",
                    sync_store::redact(database_url)
                )
            });
        }
    };
    if report.applied.is_empty() {
        tracing::info!(version = report.version, "schema up to date");
    } else {
        tracing::info!(version = report.version, applied = ?report.applied, "schema migrated");
    }
    Ok(true)
}

/// How often PostgreSQL and the consumer's backlog are looked at.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Until `shutdown`: keeps the `postgres` check of `health` current (one `SELECT 1` on a pooled
/// connection, failing with what PostgreSQL or the network said) and exports
/// `persister_consumer_pending`, what the consumer still has to settle.
async fn watch(
    pool: Pool,
    database_url: String,
    consumer: PullConsumer,
    health: Health,
    shutdown: CancellationToken,
) {
    // Exported from the start, so a dashboard shows 0 rather than no data.
    metrics::counter!("persister_write_retries_total").increment(0);
    metrics::counter!("persister_poison_messages_total").increment(0);
    let mut every = tokio::time::interval(WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let ping = async {
            let conn = sync_store::connection(&pool, &database_url).await?;
            conn.simple_query("SELECT 1")
                .await
                .map_err(StoreError::query("checking PostgreSQL"))?;
            Ok::<_, StoreError>(())
        };
        let problem = match tokio::time::timeout(WATCH_EVERY * 2, ping).await {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(service_kit::one_line(&err)),
            Err(_) => Some(format!(
                "PostgreSQL at {} did not answer SELECT 1 within {:?}",
                service_kit::host_port(&database_url),
                WATCH_EVERY * 2
            )),
        };
        health.set_problem("postgres", problem);
        if let Ok(info) = consumer.get_info().await {
            metrics::gauge!("persister_consumer_pending")
                .set((info.num_pending + info.num_ack_pending as u64) as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    fn parse(flags: &[&str]) -> Result<PersisterConfig, clap::Error> {
        let argv = std::iter::once("persister").chain(flags.iter().copied());
        Args::try_parse_from(argv).map(PersisterConfig::from)
    }

    #[test]
    fn the_command_line_defaults_are_the_settings_defaults() {
        let config = parse(&[]).expect("parses");
        let defaults = Settings::default();
        assert_eq!(config.settings.writer, defaults.writer);
        assert_eq!(config.settings.metrics_addr, defaults.metrics_addr);
        // Read from the command itself: the environment running the tests may set DATABASE_URL.
        let command = Args::command();
        let database_url = command
            .get_arguments()
            .find(|arg| arg.get_id() == "database_url")
            .map(|arg| {
                let values = arg.get_default_values().iter();
                values.map(|v| v.to_string_lossy().into_owned()).collect()
            });
        assert_eq!(
            database_url,
            Some(vec![defaults.database_url]),
            "--database-url defaults to the store's URL"
        );
    }

    #[test]
    fn the_batch_linger_is_a_duration_or_the_older_milliseconds() {
        let linger = |flags: &[&str]| parse(flags).map(|c| c.settings.writer.batch_linger);
        assert_eq!(
            linger(&["--batch-linger", "1s"]).ok(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            linger(&["--batch-linger-ms", "20"]).ok(),
            Some(Duration::from_millis(20))
        );
        assert!(linger(&["--batch-linger", "1s", "--batch-linger-ms", "20"]).is_err());
        assert!(
            linger(&["--batch-linger", "20"]).is_err(),
            "a unit is needed"
        );
    }
}
