//! The operator's CLI as a library: one module per subcommand (`setup`, `status`, `wait`, `verify`,
//! `show`, `replay`, `rebuild` for `replay --results`, `dlq`, `prune`, `gen_csv`), each a plain async fn taking a typed config
//! and returning a typed result, so tests drive them in-process and `main.rs` only parses flags and
//! prints.

pub mod dlq;
pub mod gen_csv;
pub mod prune;
pub mod rebuild;
pub mod replay;
pub mod setup;
pub mod show;
pub mod status;
pub mod teardown;
pub mod verify;
pub mod wait;

use async_nats::jetstream;
use service_kit::NatsArgs;
use sync_topology::Names;

/// Everything that can make a subcommand fail, each naming what failed and with which input.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Namespace(#[from] sync_topology::InvalidNamespace),
    #[error(transparent)]
    Connect(#[from] sync_topology::ConnectError),
    #[error(transparent)]
    Setup(#[from] sync_topology::SetupError),
    #[error(transparent)]
    Store(#[from] sync_store::StoreError),
    #[error("stream {stream} missing: run `syncctl setup --namespace {namespace}`")]
    StreamMissing { stream: String, namespace: String },
    #[error("consumer {stream}/{consumer} missing: run `syncctl setup --namespace {namespace}`")]
    ConsumerMissing {
        stream: String,
        consumer: String,
        namespace: String,
    },
    #[error("KV bucket {bucket} missing: run `syncctl setup --namespace {namespace}`")]
    BucketMissing { bucket: String, namespace: String },
    #[error("database {url} has no schema yet: run `syncctl setup`")]
    SchemaMissing { url: String },
    #[error("{action} failed: {message}")]
    Nats { action: String, message: String },
    #[error("{what} is not valid JSON: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("{action} failed: {source}")]
    Io {
        action: String,
        source: std::io::Error,
    },
    #[error("rebuilding the tables from the results stream failed: {message}")]
    Rebuild { message: String },
    #[error("{0}")]
    Usage(String),
    #[error("timed out after {waited:?}: still {what}")]
    Timeout {
        waited: std::time::Duration,
        what: String,
    },
}

impl CtlError {
    /// The process exit code: 2 for a usage mistake, 1 for anything that failed at run time.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) | CtlError::Namespace(_) => 2,
            _ => 1,
        }
    }
}

fn nats_error(action: impl Into<String>, err: impl std::fmt::Display) -> CtlError {
    CtlError::Nats {
        action: action.into(),
        message: err.to_string(),
    }
}

/// A connection to one namespace's pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
}

impl Pipeline {
    /// Validates the namespace, then connects (refusing servers that are too old), waiting up to
    /// `--startup-wait` for a NATS that does not answer yet.
    pub async fn connect(nats: &NatsArgs) -> Result<Self, CtlError> {
        let names = Names::new(&nats.namespace)?;
        // Nothing cancels the wait but the operator's Ctrl-C, which ends the process.
        let patience = tokio_util::sync::CancellationToken::new();
        let client = service_kit::connect_nats(nats, "syncctl", &patience)
            .await?
            .ok_or_else(|| nats_error("connecting to NATS", "cancelled"))?;
        let js = jetstream::new(client.clone());
        Ok(Pipeline { client, js, names })
    }

    /// The stream, or an error telling the operator to run `syncctl setup`.
    pub async fn stream(&self, name: &str) -> Result<jetstream::stream::Stream, CtlError> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        match self.js.get_stream(name).await {
            Ok(stream) => Ok(stream),
            Err(err)
                if matches!(err.kind(), GetStreamErrorKind::JetStream(ref e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Err(CtlError::StreamMissing {
                    stream: name.to_owned(),
                    namespace: self.names.namespace().to_owned(),
                })
            }
            Err(err) => Err(nats_error(format!("looking up stream {name}"), err)),
        }
    }

    /// Current state of a durable consumer, or an error telling the operator to run `syncctl setup`.
    pub async fn consumer_info(
        &self,
        stream: &str,
        consumer: &str,
    ) -> Result<jetstream::consumer::Info, CtlError> {
        use async_nats::jetstream::stream::ConsumerErrorKind;
        match self
            .js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(consumer, stream)
            .await
        {
            Ok(found) => Ok(found.cached_info().clone()),
            Err(err)
                if matches!(err.kind(), ConsumerErrorKind::JetStream(ref e)
                    if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                        || e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Err(CtlError::ConsumerMissing {
                    stream: stream.to_owned(),
                    consumer: consumer.to_owned(),
                    namespace: self.names.namespace().to_owned(),
                })
            }
            Err(err) => Err(nats_error(
                format!("reading consumer {stream}/{consumer}"),
                err,
            )),
        }
    }
}

/// A one-pass, in-order read of (part of) a stream, with an ephemeral consumer that takes no acks
/// and pulls in large batches: what replay, verify and prune read with.
pub(crate) struct StreamRead {
    pub messages: jetstream::consumer::pull::Stream,
    /// Messages the consumer had to deliver when it was created: a read that counts this many is
    /// at its end, without waiting for a silence.
    pub pending_at_start: u64,
}

/// Messages asked for per pull request.
const READ_BATCH: usize = 1000;

pub(crate) async fn read_stream(
    pipeline: &Pipeline,
    stream_name: &str,
    filter_subject: String,
    deliver_policy: jetstream::consumer::DeliverPolicy,
    purpose: &str,
) -> Result<StreamRead, CtlError> {
    use jetstream::consumer::{AckPolicy, pull};
    let stream = pipeline.stream(stream_name).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject,
            deliver_policy,
            ack_policy: AckPolicy::None,
            description: Some(format!("syncctl {purpose}: reads once")),
            inactive_threshold: std::time::Duration::from_secs(60),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_error(format!("creating a {purpose} consumer on {stream_name}"), e))?;
    let pending_at_start = consumer.cached_info().num_pending;
    let messages = consumer
        .stream()
        .max_messages_per_batch(READ_BATCH)
        .messages()
        .await
        .map_err(|e| nats_error(format!("reading {stream_name}"), e))?;
    Ok(StreamRead {
        messages,
        pending_at_start,
    })
}

/// A time as the NATS client reports it, in the chrono type the rest of syncctl uses; None when
/// it does not fit (outside the years 1677..2262).
pub(crate) fn utc(time: async_nats::datetime::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    i64::try_from(time.unix_timestamp_nanos())
        .ok()
        .map(chrono::DateTime::from_timestamp_nanos)
}

/// RFC 3339 with as many fraction digits as the time has, `Z` for UTC.
pub(crate) fn rfc3339(time: chrono::DateTime<chrono::Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// One message of the ingest stream, read from start to end: where it is, when it was stored,
/// and what it decodes to.
pub(crate) struct StoredIngest {
    pub seq: u64,
    pub stored_at: Option<chrono::DateTime<chrono::Utc>>,
    pub decoded: Result<sync_topology::Decoded, sync_topology::Malformed>,
}

/// Every message of the ingest stream as it is now, in order, decoded (a one-pass read: replay's
/// range reads keep their own consumer).
pub(crate) async fn ingest_messages(
    pipeline: &Pipeline,
    purpose: &str,
) -> Result<impl futures::Stream<Item = Result<StoredIngest, CtlError>> + use<>, CtlError> {
    use futures::StreamExt as _;
    let stream_name = pipeline.names.ingest_stream();
    let read = read_stream(
        pipeline,
        &stream_name,
        pipeline.names.ingest_subject(),
        jetstream::consumer::DeliverPolicy::All,
        purpose,
    )
    .await?;
    Ok(read
        .messages
        .take(read.pending_at_start as usize)
        .map(move |message| {
            let failed =
                |e: &dyn std::fmt::Display| nats_error(format!("reading {stream_name}"), e);
            let message = message.map_err(|e| failed(&e))?;
            let info = message.info().map_err(|e| failed(&e))?;
            let (seq, stored_at) = (info.stream_sequence, utc(info.published));
            Ok(StoredIngest {
                seq,
                stored_at,
                decoded: sync_topology::IngestMessage::decode(
                    message.headers.as_ref(),
                    &message.payload,
                    seq,
                ),
            })
        }))
}

/// Connects to PostgreSQL with a single connection (the CLI never needs more), over TLS as the
/// URL's `sslmode` asks; waits up to `wait` (`--startup-wait`) for a database that does not answer
/// yet.
pub async fn connect_database(
    database_url: &str,
    wait: std::time::Duration,
) -> Result<tokio_postgres::Client, CtlError> {
    let server = format!("PostgreSQL at {}", service_kit::host_port(database_url));
    // Nothing cancels the wait but the operator's Ctrl-C, which ends the process.
    let patience = tokio_util::sync::CancellationToken::new();
    let connected = service_kit::retry_until_up(
        &server,
        wait,
        &patience,
        // Refused credentials or a missing database do not get better by waiting.
        |err: &sync_store::StoreError| matches!(err, sync_store::StoreError::Connect { .. }),
        || sync_store::connect_one(database_url),
    )
    .await?;
    connected.ok_or_else(|| nats_error("connecting to PostgreSQL", "cancelled"))
}

/// Fails with "run `syncctl setup`" on a database that was never migrated, rather than with
/// PostgreSQL's "relation does not exist"; returns the schema version otherwise.
pub async fn require_schema(
    client: &tokio_postgres::Client,
    database_url: &str,
) -> Result<i32, CtlError> {
    match sync_store::schema_version(client).await? {
        0 => Err(CtlError::SchemaMissing {
            url: sync_store::redact(database_url),
        }),
        version => Ok(version),
    }
}

/// A table for the terminal: plain columns two spaces apart, each as wide as its longest cell so
/// long names are never cut, wrapped to the terminal's width when there is one. The columns at
/// `numbers` are right-aligned.
pub(crate) fn table(header: &[&str], numbers: &[usize], rows: Vec<Vec<String>>) -> String {
    use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    for (index, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if numbers.contains(&index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.trim_fmt()
}

/// A random suffix for message ids we mint, so a second replay or redrive of the same record is not
/// dropped by the stream's dedup window.
pub(crate) fn nonce() -> String {
    format!("{:016x}", rand::random::<u64>())
}
