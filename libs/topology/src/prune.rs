//! Removing settled messages from the two streams once they are older than the retention. A
//! message is settled when its consumer has acknowledged it (the integrators acknowledge an ingest
//! message only after publishing its outcome; the persister acknowledges an outcome only after
//! committing it), so nothing is removed that has not reached its next stage, however old it is.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use futures::StreamExt as _;

use crate::{Names, RETENTION_METADATA};

#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {object}: {message}")]
pub struct PruneError {
    pub action: &'static str,
    pub object: String,
    pub message: String,
}

fn failed(action: &'static str, object: &str, err: impl std::fmt::Display) -> PruneError {
    PruneError {
        action,
        object: object.to_owned(),
        message: err.to_string(),
    }
}

/// What pruning did to one stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamPrune {
    pub stream: String,
    pub consumer: String,
    /// Every message at or below this sequence is settled.
    pub ack_floor: u64,
    /// Messages below this sequence were removed (or were already gone).
    pub pruned_below: u64,
    pub purged: u64,
    /// The retention applied.
    pub retention_secs: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    pub streams: Vec<StreamPrune>,
}

/// Removes, from the ingest and the results stream, every message that is both settled and older
/// than `retention` (None: the retention `syncctl setup` stored on the stream).
pub async fn prune_settled(
    js: &jetstream::Context,
    names: &Names,
    retention: Option<Duration>,
) -> Result<PruneReport, PruneError> {
    let mut report = PruneReport::default();
    for (stream, consumer) in [
        (names.ingest_stream(), names.integrators_consumer()),
        (names.results_stream(), names.persister_consumer()),
    ] {
        report
            .streams
            .push(prune_stream(js, &stream, consumer, retention).await?);
    }
    Ok(report)
}

async fn prune_stream(
    js: &jetstream::Context,
    stream_name: &str,
    consumer_name: &str,
    retention: Option<Duration>,
) -> Result<StreamPrune, PruneError> {
    let mut stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| failed("look up", stream_name, e))?;
    let info = stream
        .info()
        .await
        .map_err(|e| failed("read", stream_name, e))?
        .clone();
    let retention = retention.unwrap_or_else(|| {
        info.config
            .metadata
            .get(RETENTION_METADATA)
            .and_then(|secs| secs.parse().ok())
            .map_or(Duration::from_secs(7 * 24 * 3600), Duration::from_secs)
    });
    let object = format!("consumer {stream_name}/{consumer_name}");
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer(consumer_name)
        .await
        .map_err(|e| failed("look up", &object, e))?;
    let ack_floor = consumer
        .info()
        .await
        .map_err(|e| failed("read", &object, e))?
        .ack_floor
        .stream_sequence;
    let cutoff =
        chrono::Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let first_young = first_sequence_since(&stream, stream_name, cutoff).await?;
    let below = first_young
        .unwrap_or(info.state.last_sequence.saturating_add(1))
        .min(ack_floor.saturating_add(1));
    let mut purged = 0;
    if below > info.state.first_sequence && info.state.messages > 0 {
        purged = stream
            .purge()
            .sequence(below)
            .await
            .map_err(|e| failed("purge", stream_name, e))?
            .purged;
    }
    Ok(StreamPrune {
        stream: stream_name.to_owned(),
        consumer: consumer_name.to_owned(),
        ack_floor,
        pruned_below: below,
        purged,
        retention_secs: retention.as_secs(),
    })
}

/// The sequence of the first message stored at or after `since`, or None when there is none.
async fn first_sequence_since(
    stream: &jetstream::stream::Stream,
    stream_name: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Option<u64>, PruneError> {
    let nanos = since.timestamp_nanos_opt().unwrap_or(0);
    let start_time = async_nats::datetime::from_nanos(i128::from(nanos))
        .map_err(|e| failed("convert the cut-off time for", stream_name, e))?;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            num_replicas: 1,
            description: Some("prune: finds the first message younger than the retention".into()),
            ..Default::default()
        })
        .await
        .map_err(|e| failed("create a probe consumer on", stream_name, e))?;
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .map_err(|e| failed("probe", stream_name, e))?;
    let sequence = match batch.next().await {
        Some(Ok(message)) => Some(
            message
                .info()
                .map_err(|e| failed("read the probe message of", stream_name, e))?
                .stream_sequence,
        ),
        Some(Err(err)) => return Err(failed("probe", stream_name, err)),
        None => None,
    };
    let name = consumer.cached_info().name.clone();
    if let Err(err) = stream.delete_consumer(&name).await {
        tracing::debug!(%err, "the prune probe consumer expires by itself");
    }
    Ok(sequence)
}
