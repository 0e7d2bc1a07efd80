//! One batch from the results stream to PostgreSQL: decode, write in one transaction (retrying while
//! the database is unavailable), split a batch PostgreSQL refuses for its data until the culprit is
//! alone and store that one as poison, and ack only what is committed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, AckKind};
use backon::{ExponentialBuilder, Retryable as _};
use deadpool_postgres::Pool;
use sync_store::{BatchReport, Outcome, StoreError, WriteStrategy};
use sync_topology::Names;
use tokio_util::sync::CancellationToken;

use crate::decode::{self, Origin, Provenance};

/// Writes batches for one consumer. Holds no state between batches but counters.
#[derive(Debug)]
pub(crate) struct BatchWriter {
    pub pool: Pool,
    pub database_url: String,
    pub names: Names,
    pub stream: String,
    /// The ingest stream, which vouches for outcomes that cannot be taken at their word.
    pub ingest: jetstream::stream::Stream<()>,
    /// Progress acks go out three times per ack wait while a write is retried, so the server does
    /// not redeliver the batch to someone else meanwhile.
    pub ack_wait: Duration,
    pub strategy: WriteStrategy,
    pub shutdown: CancellationToken,
    pub retries: AtomicU64,
}

/// Part of a pulled batch for one writer: messages and their decoded outcomes, index for index.
#[derive(Debug, Default)]
pub(crate) struct Part {
    pub messages: Vec<jetstream::Message>,
    pub outcomes: Vec<Outcome>,
}

/// What became of a batch.
#[derive(Debug, Default)]
pub(crate) struct Persisted {
    pub report: BatchReport,
    pub acked: u64,
    /// Transactions committed: one, or more when the batch was split.
    pub commits: u64,
    /// Shutdown came while PostgreSQL was unavailable: what was committed is acked, the rest is
    /// left for redelivery.
    pub interrupted: bool,
}

impl Persisted {
    pub fn add(&mut self, other: Persisted) {
        self.report.add(&other.report);
        self.acked += other.acked;
        self.commits += other.commits;
        self.interrupted |= other.interrupted;
    }
}

enum Commit {
    Done(BatchReport),
    DataError(StoreError),
    Interrupted,
}

impl BatchWriter {
    pub async fn persist(&self, part: Part) -> Persisted {
        let Part {
            messages,
            mut outcomes,
        } = part;
        let mut done = Persisted::default();
        // Ranges still to write, last one first: a refused range is replaced by its two halves.
        let mut pending = Vec::with_capacity(8);
        pending.push(0..outcomes.len());
        while let Some(range) = pending.pop() {
            let started = Instant::now();
            match self
                .commit(&outcomes[range.clone()], &messages[range.clone()])
                .await
            {
                Commit::Done(written) => {
                    tracing::debug!(outcomes = range.len(), took = ?started.elapsed(), "committed");
                    record_batch(&written, started.elapsed());
                    done.report.add(&written);
                    done.commits += 1;
                    done.acked += ack_all(&messages[range]).await;
                }
                Commit::Interrupted => {
                    done.interrupted = true;
                    return done;
                }
                Commit::DataError(err) if range.len() == 1 => {
                    let index = range.start;
                    if matches!(outcomes[index], Outcome::Poison(_)) {
                        // Even the verbatim copy was refused: log everything and let it go, since
                        // retrying cannot help and an unacked message would come back forever.
                        tracing::error!(
                            stream_seq = self.stream_seq(&messages[index]),
                            subject = %messages[index].message.subject,
                            body = %String::from_utf8_lossy(&messages[index].message.payload),
                            %err,
                            "cannot store even the poison record of this message; acking it anyway"
                        );
                        done.acked += ack_all(&messages[range]).await;
                        continue;
                    }
                    let origin = self.origin(&messages[index]);
                    tracing::warn!(
                        stream = origin.stream,
                        stream_seq = origin.stream_seq,
                        subject = origin.subject,
                        %err,
                        "PostgreSQL refused this outcome; storing it in poison_messages"
                    );
                    metrics::counter!("persister_poison_messages_total").increment(1);
                    outcomes[index] = decode::poison(
                        origin,
                        format!("PostgreSQL refused it: {err}"),
                        &messages[index].message.payload,
                    );
                    pending.push(range);
                }
                Commit::DataError(err) => {
                    tracing::warn!(
                        outcomes = range.len(),
                        %err,
                        "PostgreSQL refused a batch for its data; splitting it to isolate the culprit"
                    );
                    let middle = range.start + range.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
            }
        }
        done
    }

    fn origin<'a>(&'a self, message: &'a jetstream::Message) -> Origin<'a> {
        Origin {
            stream: &self.stream,
            stream_seq: self.stream_seq(message),
            subject: message.message.subject.as_str(),
        }
    }

    fn stream_seq(&self, message: &jetstream::Message) -> u64 {
        message.info().map(|info| info.stream_sequence).unwrap_or(0)
    }

    /// The outcome a message carries, or poison that says why it cannot be stored as what it
    /// claims (undecodable, or made by no integrator: see [`decode::provenance`]). None when whether
    /// to believe it cannot be checked now (NATS did not answer): the message is handed back.
    pub async fn decode(&self, message: &jetstream::Message) -> Option<Outcome> {
        let origin = self.origin(message);
        let payload = &message.message.payload;
        let outcome = decode::decode(&self.names, origin, payload);
        if let Outcome::Poison(p) = &outcome {
            tracing::warn!(
                stream_seq = p.stream_seq,
                subject = %p.subject,
                reason = %p.reason,
                "undecodable outcome; storing it in poison_messages"
            );
            metrics::counter!("persister_poison_messages_total").increment(1);
            return Some(outcome);
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let refusal = match decode::provenance(&outcome, now_ms) {
            Provenance::Plausible => None,
            Provenance::Refused(reason) => Some(reason),
            check => match self.vouch(&check).await {
                Ok(refusal) => refusal,
                Err(err) => {
                    tracing::warn!(
                        stream_seq = origin.stream_seq,
                        %err,
                        "cannot check this outcome against its ingest message; handing it back"
                    );
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                        .await;
                    return None;
                }
            },
        };
        let Some(reason) = refusal else {
            return Some(outcome);
        };
        tracing::warn!(
            stream_seq = origin.stream_seq,
            subject = origin.subject,
            %reason,
            "refusing an outcome no integrator made; storing it in poison_messages"
        );
        metrics::counter!("persister_poison_messages_total").increment(1);
        Some(decode::poison(
            origin,
            format!("refused, no integrator made it: {reason}"),
            payload,
        ))
    }

    /// Whether the ingest stream vouches for `check` (None) or why not.
    async fn vouch(&self, check: &Provenance) -> Result<Option<String>, String> {
        let Provenance::MustMatchIngest { ingest_seq, .. } = check else {
            return Ok(None);
        };
        match self.ingest.get_raw_message(*ingest_seq).await {
            Ok(found) => Ok(decode::ingest_mismatch(check, &found)),
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => {
                let info = self.ingest.get_info().await.map_err(|e| e.to_string())?;
                if *ingest_seq < info.state.first_sequence {
                    // Pruned, which happens only to settled messages: nothing left to compare.
                    return Ok(None);
                }
                Ok(Some(format!(
                    "it names ingest message {ingest_seq}, which the ingest stream {} does not hold",
                    info.config.name
                )))
            }
            Err(err) => Err(err.to_string()),
        }
    }

    /// Writes until committed or refused for its data. Connection and server failures are retried
    /// with backoff for as long as it takes (nothing is acked meanwhile), until shutdown.
    async fn commit(&self, outcomes: &[Outcome], messages: &[jetstream::Message]) -> Commit {
        let attempt = || async {
            let mut conn = sync_store::connection(&self.pool, &self.database_url).await?;
            sync_store::write_batch_with(&mut conn, outcomes, self.strategy).await
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let retrying = attempt
            .retry(backoff)
            .when(|err: &StoreError| !err.is_data_error() && !self.shutdown.is_cancelled())
            .notify(|err: &StoreError, pause: Duration| {
                self.retries.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("persister_write_retries_total").increment(1);
                tracing::warn!(
                    outcomes = outcomes.len(),
                    %err,
                    retry_in = ?pause,
                    "cannot write the batch to PostgreSQL; retrying (nothing of it is acked)"
                );
            });
        tokio::pin!(retrying);
        let every = (self.ack_wait / 3).max(Duration::from_millis(100));
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                result = &mut retrying => {
                    return match result {
                        Ok(report) => Commit::Done(report),
                        Err(err) if err.is_data_error() => Commit::DataError(err),
                        Err(err) => {
                            tracing::warn!(
                                outcomes = outcomes.len(),
                                %err,
                                "shutting down before PostgreSQL came back; the batch stays \
                                 unacked and will be redelivered"
                            );
                            Commit::Interrupted
                        }
                    };
                }
                _ = progress.tick() => {
                    for message in messages {
                        if let Err(err) = message.ack_with(AckKind::Progress).await {
                            tracing::debug!(%err, "progress ack failed");
                        }
                    }
                }
            }
        }
    }
}

/// Acks after commit. A lost ack only means a redelivery, which the idempotent writes absorb, so a
/// plain ack is enough and no double-ack round trip is paid per message.
async fn ack_all(messages: &[jetstream::Message]) -> u64 {
    let mut acked = 0;
    for message in messages {
        match message.ack().await {
            Ok(()) => acked += 1,
            Err(err) => tracing::warn!(%err, "ack failed; the message will be redelivered"),
        }
    }
    metrics::counter!("persister_messages_acked_total").increment(acked);
    acked
}

fn record_batch(report: &BatchReport, took: Duration) {
    metrics::counter!("persister_batches_total").increment(1);
    metrics::histogram!("persister_batch_duration_seconds").record(took.as_secs_f64());
    for (table, rows) in [
        ("customers", report.customers_written),
        ("rejected_rows", report.rejected_rows_written),
        ("dead_letters", report.dead_letters_written),
        ("poison_messages", report.poison_written),
    ] {
        metrics::counter!("persister_rows_written_total", "table" => table).increment(rows);
    }
    metrics::counter!("persister_dead_letters_cleared_total")
        .increment(report.dead_letters_cleared);
}
