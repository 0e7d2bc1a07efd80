//! outcome-writer: owns writing the results stream (synced, superseded, rejected, dead) to
//! PostgreSQL. It consumes a durable pull consumer of the results stream, decodes each message,
//! checks what cannot be taken at its word against the ingest stream (provenance), and writes in
//! batches, one transaction each per writer, acking a message only once its batch is committed.
//! The `persister` service runs it for good; `syncctl replay --results` runs it once to rebuild the
//! tables, so both write exactly the same rows.
//!
//! Writes are idempotent (see [`sync_store::write_batch`]), so a redelivery is harmless; that is
//! what lets acks be plain acks and lets a PostgreSQL outage be ridden out by holding the batch and
//! retrying. A message that cannot be stored as what it claims (a body that does not parse, a value
//! PostgreSQL refuses) is isolated by splitting its batch and kept in `poison_messages` with the
//! reason, then acked, so it never blocks the stream.
//!
//! The metrics it exports keep the `persister_` prefix the dashboard queries.

mod decode;
mod pull;
mod writer;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use deadpool_postgres::Pool;
use service_kit::Health;
use sync_store::{BatchReport, WriteStrategy};
use sync_topology::Names;
use tokio_util::sync::CancellationToken;

pub use decode::{Origin, decode};

use writer::BatchWriter;

/// Default batch size, chosen by `deploy/local/bench.d/persister.sh`.
pub const DEFAULT_BATCH_SIZE: usize = 4000;
/// Default number of concurrent writers (PostgreSQL connections).
pub const DEFAULT_WRITERS: usize = 2;
/// Default longest wait, after a batch's first outcome, for the batch to fill.
pub const DEFAULT_BATCH_LINGER: Duration = Duration::from_millis(50);

/// How outcomes are consumed and written. `Default` is the persister's: its durable consumer and
/// the benchmarked batch size.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Durable pull consumer on the results stream; `persister` for the service, another one for
    /// `syncctl replay --results`.
    pub consumer: String,
    /// Most outcomes written in one transaction (at least 1).
    pub batch_size: usize,
    /// Concurrent writers, each with its own PostgreSQL connection.
    pub writers: usize,
    pub write_strategy: WriteStrategy,
    pub batch_linger: Duration,
    /// Return once the consumer has nothing pending or unacknowledged.
    pub stop_when_drained: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            consumer: Names::default().persister_consumer().to_owned(),
            batch_size: DEFAULT_BATCH_SIZE,
            writers: DEFAULT_WRITERS,
            write_strategy: WriteStrategy::default(),
            batch_linger: DEFAULT_BATCH_LINGER,
            stop_when_drained: false,
        }
    }
}

/// What a run wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunReport {
    /// Committed transactions (a split batch counts each part).
    pub batches: u64,
    pub messages_acked: u64,
    pub written: BatchReport,
    /// Writes retried because PostgreSQL was unavailable.
    pub retries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("batch size must be at least 1")]
    BatchSize,
    #[error(
        "cannot bind to consumer {consumer} on stream {stream} at {server}: does it exist? \
         (`syncctl setup --namespace {namespace}` creates the layout)"
    )]
    Bind {
        consumer: String,
        stream: String,
        /// The NATS servers, credentials redacted.
        server: String,
        namespace: String,
        source: async_nats::jetstream::stream::ConsumerError,
    },
    #[error("naming the ingest stream")]
    IngestStream {
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("cannot pull from consumer {stream}/{consumer}")]
    Pull {
        stream: String,
        consumer: String,
        source: async_nats::jetstream::consumer::StreamError,
    },
    #[error("the pull subscription on consumer {stream}/{consumer} ended (consumer deleted?)")]
    SubscriptionEnded { stream: String, consumer: String },
}

/// Where outcomes come from and go to.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub client: async_nats::Client,
    pub names: Names,
    /// The NATS servers as a message may show them (credentials redacted).
    pub nats_shown: String,
    /// At least one connection per writer.
    pub pool: Pool,
    pub database_url: String,
}

/// A results-stream consumer bound and ready to be written to PostgreSQL by [`OutcomeWriter::run`].
#[derive(Debug)]
pub struct OutcomeWriter {
    client: async_nats::Client,
    settings: Settings,
    consumer: PullConsumer,
    names: Names,
    stream: String,
    ingest: jetstream::stream::Stream<()>,
    pool: Pool,
    database_url: String,
}

impl OutcomeWriter {
    /// Binds to `settings.consumer` on the results stream, and to the ingest stream that vouches
    /// for outcomes which cannot be taken at their word.
    pub async fn bind(endpoints: Endpoints, settings: Settings) -> Result<Self, WriteError> {
        if settings.batch_size == 0 {
            return Err(WriteError::BatchSize);
        }
        let Endpoints {
            client,
            names,
            nats_shown,
            pool,
            database_url,
        } = endpoints;
        let js = jetstream::new(client.clone());
        let stream = names.results_stream();
        let consumer: PullConsumer = js
            .get_consumer_from_stream(&settings.consumer, &stream)
            .await
            .map_err(|source| WriteError::Bind {
                consumer: settings.consumer.clone(),
                stream: stream.clone(),
                server: nats_shown,
                namespace: names.namespace().to_owned(),
                source,
            })?;
        let ingest = js
            .get_stream_no_info(names.ingest_stream())
            .await
            .map_err(|source| WriteError::IngestStream { source })?;
        Ok(OutcomeWriter {
            client,
            settings,
            consumer,
            names,
            stream,
            ingest,
            pool,
            database_url,
        })
    }

    /// The bound consumer, for a caller that watches its backlog.
    pub fn consumer(&self) -> &PullConsumer {
        &self.consumer
    }

    /// Writes until `shutdown` (or, with `stop_when_drained`, until the consumer is drained).
    /// `health` is ready while outcomes are being consumed.
    pub async fn run(
        self,
        health: &Health,
        shutdown: CancellationToken,
    ) -> Result<RunReport, WriteError> {
        let writer = Arc::new(BatchWriter {
            pool: self.pool,
            database_url: self.database_url,
            names: self.names,
            stream: self.stream,
            ingest: self.ingest,
            ack_wait: self.consumer.cached_info().config.ack_wait,
            strategy: self.settings.write_strategy,
            shutdown: shutdown.clone(),
            retries: AtomicU64::new(0),
        });
        let pulling = pull::Pulling {
            client: self.client,
            settings: self.settings,
            consumer: self.consumer,
            writer,
        };
        pulling.run(health, shutdown).await
    }
}
