//! Creates or updates, idempotently, every stream, consumer and bucket of a namespace.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{
    self, ErrorCode, consumer,
    consumer::pull,
    context::{DeleteStreamErrorKind, GetStreamErrorKind, KeyValueErrorKind},
    kv,
    stream::{self, ConsumerErrorKind},
};

use crate::Names;

/// The tunable part of the layout. Defaults are chosen for a single-node development server; a
/// cluster raises `replicas` to 3.
#[derive(Debug, Clone)]
pub struct TopologySettings {
    /// How long a settled message stays in its stream (so it can be replayed) before `syncctl
    /// prune` may remove it. Streams never expire messages by age themselves: an age limit would
    /// delete an ingest message that never got its outcome (an outage longer than the limit).
    pub retention: Duration,
    /// Size limit of each of the two streams (-1: none but the server's JetStream store). A full
    /// stream refuses new messages (discard-new) rather than dropping old ones, so the reader stops
    /// with a clear error instead of the stream losing rows; `syncctl status` warns as a stream, or
    /// the server's store, fills.
    pub max_stream_bytes: i64,
    /// The window in which the stream drops a message whose `Nats-Msg-Id` it has seen. Long enough to
    /// cover the reader's retries and a quick re-run of the same file; not longer, since the server
    /// keeps every id of the window in memory. Beyond it the ledger still prevents a second send.
    pub dedup_window: Duration,
    /// How long an integrator may hold a message before the server redelivers it. Integrators send
    /// ack-progress while they retry in-process, so this bounds only the silence of a dead replica.
    pub integrator_ack_wait: Duration,
    /// Server-side delivery cap: -1, none. The integrator ends every message itself (dead letter
    /// at its own `--max-deliver` for failures); a cap here would make the server silently stop
    /// delivering a message that is only waiting, NAK after NAK, for an older version's claim.
    pub integrator_max_deliver: i64,
    pub integrator_max_ack_pending: i64,
    pub persister_ack_wait: Duration,
    /// Messages the persister may hold unacked: at least a few of its batches.
    pub persister_max_ack_pending: i64,
    pub replicas: usize,
}

/// Stream metadata key holding the retention (seconds) `syncctl prune` applies by default.
pub const RETENTION_METADATA: &str = "customer_sync.retention_secs";

/// No limit of its own: JetStream reserves a stream's `max_bytes` in the server's store up front, so
/// a fixed default would make several namespaces (and parallel tests) fail to fit. The server's
/// store limit (`max_file_store` in nats.conf) still bounds the streams, and a full store refuses
/// new messages, which is the discard-new behaviour wanted.
pub const DEFAULT_MAX_STREAM_BYTES: i64 = -1;

impl Default for TopologySettings {
    fn default() -> Self {
        TopologySettings {
            retention: Duration::from_secs(7 * 24 * 3600),
            max_stream_bytes: DEFAULT_MAX_STREAM_BYTES,
            dedup_window: Duration::from_secs(10 * 60),
            integrator_ack_wait: Duration::from_secs(30),
            integrator_max_deliver: -1,
            integrator_max_ack_pending: 20_000,
            persister_ack_wait: Duration::from_secs(60),
            persister_max_ack_pending: 50_000,
            replicas: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

/// What `ensure_topology` did to each object: a second run reports every object `Unchanged`.
#[derive(Debug, Clone, Default)]
pub struct SetupReport {
    pub objects: Vec<(String, Change)>,
}

impl SetupReport {
    pub fn changed(&self) -> bool {
        self.objects.iter().any(|(_, c)| *c != Change::Unchanged)
    }
}

impl fmt::Display for SetupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, change) in &self.objects {
            writeln!(f, "{change:?}: {name}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot {action} {object}: {message}")]
    JetStream {
        action: &'static str,
        object: String,
        message: String,
    },
}

fn failed(action: &'static str, object: &str, err: impl fmt::Display) -> SetupError {
    SetupError::JetStream {
        action,
        object: object.to_owned(),
        message: err.to_string(),
    }
}

/// What `teardown` removed, and what was not there to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TeardownReport {
    pub deleted: Vec<String>,
    pub absent: Vec<String>,
}

/// The namespace's JetStream objects: its two streams and the streams behind its three buckets.
pub fn namespace_streams(names: &Names) -> Vec<String> {
    let mut streams = vec![names.ingest_stream(), names.results_stream()];
    streams.extend(
        [
            names.ledger_bucket(),
            names.checkpoints_bucket(),
            names.control_bucket(),
        ]
        .map(|bucket| format!("KV_{bucket}")),
    );
    streams
}

/// Deletes every stream and bucket of the namespace, with their messages: what a benchmark or an
/// operator retiring a namespace wants. Objects already gone are reported, not failed on, so it
/// can be run again after a partial failure.
pub async fn teardown(
    js: &jetstream::Context,
    names: &Names,
) -> Result<TeardownReport, SetupError> {
    let mut report = TeardownReport::default();
    for stream in namespace_streams(names) {
        match js.delete_stream(&stream).await {
            Ok(_) => report.deleted.push(stream),
            Err(err)
                if matches!(err.kind(), DeleteStreamErrorKind::JetStream(ref e)
                    if e.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                report.absent.push(stream);
            }
            Err(err) => return Err(failed("delete", &stream, err)),
        }
    }
    Ok(report)
}

/// Brings the namespace's layout to `settings`, creating what is missing and updating what differs.
pub async fn ensure_topology(
    js: &jetstream::Context,
    names: &Names,
    settings: &TopologySettings,
) -> Result<SetupReport, SetupError> {
    let mut report = SetupReport::default();
    for config in stream_configs(names, settings) {
        let name = format!("stream {}", config.name);
        let change = ensure_stream(js, config).await?;
        report.objects.push((name, change));
    }
    for (stream, config) in consumer_configs(names, settings) {
        let name = format!(
            "consumer {}/{}",
            stream,
            config.durable_name.clone().unwrap_or_default()
        );
        let change = ensure_consumer(js, &stream, config).await?;
        report.objects.push((name, change));
    }
    for config in bucket_configs(names, settings) {
        let name = format!("bucket {}", config.bucket);
        let change = ensure_bucket(js, config).await?;
        report.objects.push((name, change));
    }
    Ok(report)
}

fn stream_configs(names: &Names, settings: &TopologySettings) -> [stream::Config; 2] {
    [
        stream_config(
            names.ingest_stream(),
            vec![names.ingest_subject()],
            "customer rows from csv-reader, one message per valid row",
            settings,
        ),
        stream_config(
            names.results_stream(),
            vec![
                names.synced_subject(),
                names.superseded_subject(),
                names.rejected_subject(),
                names.dead_subject(),
            ],
            "outcomes: synced, superseded, rejected, dead",
            settings,
        ),
    ]
}

/// The integrators' shared consumer on the ingest stream and the persister's on the results stream.
fn consumer_configs(names: &Names, settings: &TopologySettings) -> [(String, pull::Config); 2] {
    [
        (
            names.ingest_stream(),
            pull::Config {
                durable_name: Some(names.integrators_consumer().to_owned()),
                description: Some("shared by every crm-integrator replica".to_owned()),
                filter_subject: names.ingest_subject(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: settings.integrator_ack_wait,
                max_deliver: settings.integrator_max_deliver,
                max_ack_pending: settings.integrator_max_ack_pending,
                num_replicas: settings.replicas,
                ..Default::default()
            },
        ),
        (
            names.results_stream(),
            pull::Config {
                durable_name: Some(names.persister_consumer().to_owned()),
                description: Some("persister: writes outcomes to PostgreSQL".to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: settings.persister_ack_wait,
                // Unlimited on purpose: while PostgreSQL is down every batch is redelivered, and an
                // outcome must never be dropped for that. The persister isolates poison itself.
                max_deliver: -1,
                max_ack_pending: settings.persister_max_ack_pending,
                num_replicas: settings.replicas,
                ..Default::default()
            },
        ),
    ]
}

fn bucket_configs(names: &Names, settings: &TopologySettings) -> [kv::Config; 3] {
    [
        kv::Config {
            bucket: names.ledger_bucket(),
            description: "per customer: confirmed hash, ingest sequence, CRM id, claim".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            ..Default::default()
        },
        kv::Config {
            bucket: names.checkpoints_bucket(),
            description: "per input file identity: the line up to which every row is acked"
                .to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            ..Default::default()
        },
        kv::Config {
            bucket: names.control_bucket(),
            description: "fleet-wide control: CRM-requested pauses".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            ..Default::default()
        },
    ]
}

fn stream_config(
    name: String,
    subjects: Vec<String>,
    description: &str,
    settings: &TopologySettings,
) -> stream::Config {
    stream::Config {
        name,
        subjects,
        description: Some(description.to_owned()),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::ZERO,
        max_bytes: settings.max_stream_bytes,
        discard: stream::DiscardPolicy::New,
        duplicate_window: settings.dedup_window,
        num_replicas: settings.replicas,
        metadata: HashMap::from([(
            RETENTION_METADATA.to_owned(),
            settings.retention.as_secs().to_string(),
        )]),
        ..Default::default()
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    wanted: stream::Config,
) -> Result<Change, SetupError> {
    let name = wanted.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let current = existing
                .info()
                .await
                .map_err(|e| failed("read", &name, e))?
                .config
                .clone();
            let same = current.subjects == wanted.subjects
                && current.max_age == wanted.max_age
                && current.max_bytes == wanted.max_bytes
                && current.discard == wanted.discard
                && current.metadata.get(RETENTION_METADATA)
                    == wanted.metadata.get(RETENTION_METADATA)
                && current.duplicate_window == wanted.duplicate_window
                && current.retention == wanted.retention
                && current.storage == wanted.storage
                && current.num_replicas.max(1) == wanted.num_replicas.max(1)
                && current.description == wanted.description;
            if same {
                return Ok(Change::Unchanged);
            }
            // Keep what an operator tuned by hand and we do not manage (limits, placement), and
            // the server's own metadata beside ours.
            let mut metadata = current.metadata.clone();
            metadata.extend(wanted.metadata);
            let updated = stream::Config {
                metadata,
                subjects: wanted.subjects,
                max_age: wanted.max_age,
                max_bytes: wanted.max_bytes,
                discard: wanted.discard,
                duplicate_window: wanted.duplicate_window,
                num_replicas: wanted.num_replicas,
                description: wanted.description,
                ..current
            };
            js.update_stream(updated)
                .await
                .map_err(|e| failed("update", &name, e))?;
            Ok(Change::Updated)
        }
        Err(err)
            if matches!(err.kind(), GetStreamErrorKind::JetStream(ref e)
                if e.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            js.create_stream(wanted)
                .await
                .map_err(|e| failed("create", &name, e))?;
            Ok(Change::Created)
        }
        Err(err) => Err(failed("look up", &name, err)),
    }
}

async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    wanted: pull::Config,
) -> Result<Change, SetupError> {
    let durable = wanted.durable_name.clone().unwrap_or_default();
    let object = format!("consumer {stream}/{durable}");
    match js
        .get_consumer_from_stream::<pull::Config, _, _>(&durable, stream)
        .await
    {
        Ok(existing) => {
            let current = &existing.cached_info().config;
            let same = current.ack_policy == wanted.ack_policy
                && current.ack_wait == wanted.ack_wait
                && current.max_deliver == wanted.max_deliver
                && current.max_ack_pending == wanted.max_ack_pending
                && current.filter_subject == wanted.filter_subject
                && current.description == wanted.description
                && current.num_replicas.max(1) == wanted.num_replicas.max(1);
            if same {
                return Ok(Change::Unchanged);
            }
            js.update_consumer_on_stream(wanted, stream)
                .await
                .map_err(|e| failed("update", &object, e))?;
            Ok(Change::Updated)
        }
        Err(err)
            if matches!(err.kind(), ConsumerErrorKind::JetStream(ref e)
                if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND) =>
        {
            js.create_consumer_on_stream(wanted, stream)
                .await
                .map_err(|e| failed("create", &object, e))?;
            Ok(Change::Created)
        }
        Err(err) => Err(failed("look up", &object, err)),
    }
}

async fn ensure_bucket(js: &jetstream::Context, wanted: kv::Config) -> Result<Change, SetupError> {
    let object = format!("bucket {}", wanted.bucket);
    match js.get_key_value(&wanted.bucket).await {
        Ok(store) => {
            let mut backing = store.stream.clone();
            let current = backing
                .info()
                .await
                .map_err(|e| failed("read", &object, e))?
                .config
                .clone();
            let same = current.max_messages_per_subject == wanted.history
                && current.description.as_deref() == Some(wanted.description.as_str())
                && current.num_replicas.max(1) == wanted.num_replicas.max(1);
            if same {
                return Ok(Change::Unchanged);
            }
            js.update_key_value(wanted)
                .await
                .map_err(|e| failed("update", &object, e))?;
            Ok(Change::Updated)
        }
        Err(err) if err.kind() == KeyValueErrorKind::GetBucket => {
            js.create_key_value(wanted)
                .await
                .map_err(|e| failed("create", &object, e))?;
            Ok(Change::Created)
        }
        Err(err) => Err(failed("look up", &object, err)),
    }
}
