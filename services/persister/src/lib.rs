//! The persister: consumes the outcomes stream (synced, rejected, dead) and writes it to PostgreSQL
//! in batches, one transaction each, acking a message only once its batch is committed.
//!
//! Writes are idempotent (see [`sync_store::write_batch`]), so a redelivery is harmless; that is
//! what lets acks be plain acks and lets a PostgreSQL outage be ridden out by holding the batch and
//! retrying. A message that cannot be stored as what it claims (a body that does not parse, a value
//! PostgreSQL refuses) is isolated by splitting its batch and kept in `poison_messages` with the
//! reason, then acked, so it never blocks the stream.

mod decode;
mod writer;

use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use deadpool_postgres::Pool;
use service_kit::{Health, NatsArgs};
use sync_topology::Names;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use decode::{Origin, decode};
pub use sync_store::{
    BatchReport, Outcome, PoisonMessage, StoreError, WriteStrategy, write_batch, write_batch_with,
};

use writer::{BatchWriter, Part, Persisted};

/// Default batch size, chosen by `deploy/local/bench.d/persister.sh`.
pub const DEFAULT_BATCH_SIZE: usize = 4000;
pub const DEFAULT_WRITERS: usize = 2;
pub const DEFAULT_BATCH_LINGER: Duration = Duration::from_millis(50);

/// Command line and environment of the `persister` binary.
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
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Durable consumer on the results stream to read from.
    #[arg(long, env = "PERSISTER_CONSUMER", default_value = "persister")]
    pub consumer: String,
    /// Most outcomes written in one transaction (at most the consumer's max ack pending).
    #[arg(long, env = "PERSISTER_BATCH_SIZE", default_value_t = DEFAULT_BATCH_SIZE as u32,
          value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub batch_size: u32,
    /// Concurrent writers (PostgreSQL connections). Outcomes are split among them by customer id,
    /// so each batch of up to `--batch-size` becomes one transaction per writer.
    #[arg(long, env = "PERSISTER_WRITERS", default_value_t = DEFAULT_WRITERS as u32,
          value_parser = clap::value_parser!(u32).range(1..=32))]
    pub writers: u32,
    /// How customer rows are written: `unnest` (array-parameter upsert) or `copy-merge` (binary
    /// COPY into a temporary table, then upsert from it). Same result; see BENCHMARKS.md for speed.
    #[arg(long, env = "PERSISTER_WRITE_STRATEGY", value_enum, default_value_t = StrategyArg::Unnest)]
    pub write_strategy: StrategyArg,
    /// Longest wait, after a batch's first outcome, for the batch to fill.
    #[arg(long, env = "PERSISTER_BATCH_LINGER_MS", default_value_t = 50)]
    pub batch_linger_ms: u64,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "PERSISTER_METRICS_ADDR", default_value = "127.0.0.1:9102")]
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

impl From<Args> for PersisterConfig {
    fn from(args: Args) -> Self {
        PersisterConfig {
            nats: args.nats,
            database_url: args.database_url,
            consumer: args.consumer,
            batch_size: args.batch_size as usize,
            writers: args.writers as usize,
            write_strategy: args.write_strategy.into(),
            batch_linger: Duration::from_millis(args.batch_linger_ms),
            metrics_addr: Some(args.metrics_addr),
            stop_when_drained: args.stop_when_drained,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PersisterConfig {
    pub nats: NatsArgs,
    pub database_url: String,
    /// Durable pull consumer on the results stream; `persister` for the service, another one for
    /// `syncctl replay --results`.
    pub consumer: String,
    pub batch_size: usize,
    /// Concurrent writers, each with its own PostgreSQL connection.
    pub writers: usize,
    pub write_strategy: WriteStrategy,
    pub batch_linger: Duration,
    /// None: no metrics endpoint (in-process callers such as `syncctl`).
    pub metrics_addr: Option<SocketAddr>,
    /// Return once the consumer has nothing pending or unacknowledged.
    pub stop_when_drained: bool,
}

impl PersisterConfig {
    /// Defaults for the `persister` consumer, without a metrics endpoint.
    pub fn new(nats: NatsArgs, database_url: impl Into<String>) -> Self {
        PersisterConfig {
            nats,
            database_url: database_url.into(),
            consumer: Names::default().persister_consumer().to_owned(),
            batch_size: DEFAULT_BATCH_SIZE,
            writers: DEFAULT_WRITERS,
            write_strategy: WriteStrategy::default(),
            batch_linger: DEFAULT_BATCH_LINGER,
            metrics_addr: None,
            stop_when_drained: false,
        }
    }
}

/// What a run wrote, for `syncctl replay --results` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunReport {
    /// Committed transactions (a split batch counts each part).
    pub batches: u64,
    pub messages_acked: u64,
    pub written: BatchReport,
    /// Writes retried because PostgreSQL was unavailable.
    pub retries: u64,
}

/// Runs until `shutdown` (or, with `stop_when_drained`, until the consumer is drained).
pub async fn run(
    config: PersisterConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunReport> {
    let names = Names::new(&config.nats.namespace)?;
    if config.batch_size == 0 {
        bail!("batch size must be at least 1");
    }
    let health = Health::default();
    if let Some(addr) = config.metrics_addr {
        let bound = service_kit::serve_metrics(addr, health.clone(), shutdown.clone()).await?;
        tracing::info!(%bound, "serving metrics and health");
    }

    // One connection more than the writers: the readiness check must not queue behind them.
    let pool = sync_store::connect_pool(&config.database_url, config.writers.max(1) + 1)?;
    let wait = config.nats.startup_wait;
    if !migrate_when_available(&pool, &config.database_url, wait, &shutdown).await? {
        return Ok(RunReport::default());
    }

    let Some(client) = service_kit::connect_nats(&config.nats, "persister", &shutdown).await?
    else {
        tracing::info!("stopped while waiting for NATS at start-up: nothing was consumed");
        return Ok(RunReport::default());
    };
    let js = jetstream::new(client.clone());
    let stream = names.results_stream();
    let mut consumer: PullConsumer = js
        .get_consumer_from_stream(&config.consumer, &stream)
        .await
        .with_context(|| {
            format!(
                "cannot bind to consumer {} on stream {stream} at {}: does it exist? \
                 (`syncctl setup --namespace {}` creates the layout)",
                config.consumer,
                config.nats.redacted_url(),
                names.namespace()
            )
        })?;
    let ack_wait = consumer.cached_info().config.ack_wait;
    // Two batches in flight per writer keep the writers busy while the next batch arrives.
    let max_ack_pending = usize::try_from(consumer.cached_info().config.max_ack_pending)
        .unwrap_or(usize::MAX)
        .max(1);
    let prefetch = (config.batch_size * 2).min(max_ack_pending).max(1);
    let messages = consumer
        .stream()
        .max_messages_per_batch(prefetch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .with_context(|| format!("cannot pull from consumer {}/{}", stream, config.consumer))?;
    let batches = messages.chunks_timeout(config.batch_size, config.batch_linger);
    tokio::pin!(batches);
    service_kit::watch_nats(
        client.clone(),
        &config.nats.nats_url,
        health.clone(),
        shutdown.clone(),
    );
    tokio::spawn(watch(
        pool.clone(),
        config.database_url.clone(),
        consumer.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    let ingest = js
        .get_stream_no_info(names.ingest_stream())
        .await
        .context("naming the ingest stream")?;
    let writer = Arc::new(BatchWriter {
        pool,
        database_url: config.database_url.clone(),
        names: names.clone(),
        stream: stream.clone(),
        ingest,
        ack_wait,
        strategy: config.write_strategy,
        shutdown: shutdown.clone(),
        retries: AtomicU64::new(0),
    });
    let writers = config.writers.max(1);
    let tracker = TaskTracker::new();
    let mut parts_to = Vec::with_capacity(writers);
    let mut totals = Vec::with_capacity(writers);
    for _ in 0..writers {
        let (send, mut receive) = mpsc::channel::<Part>(1);
        let writer = Arc::clone(&writer);
        totals.push(tracker.spawn(async move {
            let mut total = Persisted::default();
            while let Some(part) = receive.recv().await {
                let persisted = writer.persist(part).await;
                let interrupted = persisted.interrupted;
                total.add(persisted);
                if interrupted {
                    break;
                }
            }
            total
        }));
        parts_to.push(send);
    }
    tracker.close();

    tracing::info!(
        consumer = %config.consumer,
        %stream,
        batch_size = config.batch_size,
        writers,
        strategy = ?config.write_strategy,
        linger = ?config.batch_linger,
        "persisting outcomes"
    );
    health.set_ready(true);
    // Long enough that a chunk waiting for its linger is never mistaken for an idle stream.
    let idle = (config.batch_linger * 4).max(Duration::from_millis(250));
    let mut failure = None;
    'pulling: loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = tokio::time::timeout(idle, batches.next()) => next,
        };
        let items = match next {
            Err(_idle) => {
                if config.stop_when_drained {
                    match drained(&client, &mut consumer).await {
                        Ok(true) => {
                            tracing::info!("consumer drained; stopping");
                            break;
                        }
                        Ok(false) => {}
                        Err(err) => {
                            tracing::warn!(%err, "checking whether the consumer is drained")
                        }
                    }
                }
                continue;
            }
            Ok(None) => {
                failure = Some(anyhow::anyhow!(
                    "the pull subscription on consumer {}/{} ended (consumer deleted?)",
                    stream,
                    config.consumer
                ));
                break;
            }
            Ok(Some(items)) => items,
        };
        metrics::histogram!("persister_batch_size").record(items.len() as f64);
        let mut parts: Vec<Part> = (0..writers).map(|_| Part::default()).collect();
        for item in items {
            match item {
                Ok(message) => {
                    let Some(outcome) = writer.decode(&message).await else {
                        continue;
                    };
                    let index = partition(&outcome, writers);
                    parts[index].messages.push(message);
                    parts[index].outcomes.push(outcome);
                }
                Err(err) => tracing::warn!(%err, "pulling outcomes"),
            }
        }
        for (part, to) in parts.into_iter().zip(&parts_to) {
            if part.messages.is_empty() {
                continue;
            }
            if to.send(part).await.is_err() {
                // A writer stopped: it was interrupted by shutdown while PostgreSQL was away.
                break 'pulling;
            }
        }
    }
    health.set_ready(false);
    drop(parts_to);
    let mut report = RunReport::default();
    for total in totals {
        match total.await {
            Ok(total) => {
                report.written.add(&total.report);
                report.messages_acked += total.acked;
                report.batches += total.commits;
            }
            Err(err) => tracing::error!(%err, "a batch writer panicked"),
        }
    }
    tracker.wait().await;
    // Pulled but never handed to a writer: give them back now rather than after the ack wait.
    for message in batches.as_mut().into_remainder().into_iter().flatten() {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
    if let Err(err) = client.flush().await {
        tracing::warn!(%err, "flushing acks at shutdown");
    }
    report.retries = writer.retries.load(Ordering::Relaxed);
    let written = &report.written;
    tracing::info!(
        batches = report.batches,
        messages_acked = report.messages_acked,
        retries = report.retries,
        outcomes = written.outcomes,
        customers_written = written.customers_written,
        rejected_rows_written = written.rejected_rows_written,
        dead_letters_written = written.dead_letters_written,
        dead_letters_cleared = written.dead_letters_cleared,
        poison_written = written.poison_written,
        superseded = written.superseded,
        "persister stopped"
    );
    match failure {
        Some(err) => Err(err),
        None => Ok(report),
    }
}

/// Which writer takes an outcome: all outcomes of one customer go to the same writer, so its
/// customer row and dead letters are only ever changed by one transaction at a time, in stream
/// order, and concurrent writers never race on them.
fn partition(outcome: &Outcome, writers: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    match outcome {
        Outcome::Synced(s) => s.customer.id.hash(&mut hasher),
        Outcome::Superseded(s) => s.customer_id.hash(&mut hasher),
        Outcome::Dead(d) => d.customer_id.hash(&mut hasher),
        Outcome::Rejected(r) => (&r.source_file, r.line).hash(&mut hasher),
        Outcome::Poison(p) => p.stream_seq.hash(&mut hasher),
    }
    (hasher.finish() % writers as u64) as usize
}

/// True when the consumer has nothing left to deliver and nothing delivered awaits an ack.
async fn drained(client: &async_nats::Client, consumer: &mut PullConsumer) -> anyhow::Result<bool> {
    // Acks are fire-and-forget publishes: make sure ours reached the server before asking it.
    client.flush().await.context("flushing acks")?;
    let info = consumer
        .info()
        .await
        .context("reading the consumer's state")?;
    Ok(info.num_pending == 0 && info.num_ack_pending == 0)
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
    use super::*;
    use sync_topology::messages::DeadLetter;

    #[test]
    fn every_outcome_of_a_customer_goes_to_the_same_writer() {
        let customer = customer_record::CustomerRecord::normalised(
            "c-42",
            "Ada",
            "Lovelace",
            "ada@example.com",
            None,
            Default::default(),
        );
        let dead = Outcome::Dead(DeadLetter {
            customer_id: customer.id.clone(),
            content_hash: customer.content_hash(),
            version: None,
            ingest_seq: 1,
            reason: "refused".to_owned(),
            crm_status: Some(422),
            crm_body: None,
            attempts: 1,
            customer: Some(customer.clone()),
            source_file: None,
            source_line: None,
            dead_at: chrono::Utc::now(),
            malformed_body_base64: None,
        });
        let synced = Outcome::Synced(sync_topology::messages::SyncedOutcome {
            content_hash: customer.content_hash(),
            customer,
            version: None,
            ingest_seq: 2,
            crm_id: None,
            action: sync_topology::messages::SyncAction::Created,
            source_file: None,
            source_line: None,
            synced_at: chrono::Utc::now(),
        });
        for writers in 1..=8 {
            assert_eq!(partition(&dead, writers), partition(&synced, writers));
            assert!(partition(&synced, writers) < writers);
        }
    }
}
