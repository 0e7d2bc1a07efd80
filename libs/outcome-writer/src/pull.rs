//! The pulling side of a run: batches from the consumer, decoded and split among the writers by
//! customer, until shutdown, a drained consumer or the end of the subscription.

use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use service_kit::Health;
use sync_store::Outcome;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::adapters::ChunksTimeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::writer::{BatchWriter, Part, Persisted};
use crate::{RunReport, Settings, WriteError};

type Batches = ChunksTimeout<pull::Stream>;

/// A bound consumer and the writer its batches go to.
pub(crate) struct Pulling {
    pub client: async_nats::Client,
    pub settings: Settings,
    pub consumer: PullConsumer,
    pub writer: Arc<BatchWriter>,
}

impl Pulling {
    pub async fn run(
        mut self,
        health: &Health,
        shutdown: CancellationToken,
    ) -> Result<RunReport, WriteError> {
        let batches = self.batches().await?;
        tokio::pin!(batches);
        let writers = Writers::spawn(&self.writer, self.settings.writers.max(1));
        tracing::info!(
            consumer = %self.settings.consumer,
            stream = %self.writer.stream,
            batch_size = self.settings.batch_size,
            writers = writers.count(),
            strategy = ?self.settings.write_strategy,
            linger = ?self.settings.batch_linger,
            "persisting outcomes"
        );
        health.set_ready(true);
        let failure = self.pull(batches.as_mut(), &writers, &shutdown).await;
        health.set_ready(false);
        let mut report = writers.finish().await;
        self.give_back(batches).await;
        report.retries = self.writer.retries.load(Ordering::Relaxed);
        log_stopped(&report);
        match failure {
            Some(err) => Err(err),
            None => Ok(report),
        }
    }

    /// The consumer's messages in chunks of up to a batch, each cut after the linger.
    async fn batches(&self) -> Result<Batches, WriteError> {
        // Two batches in flight per writer keep the writers busy while the next batch arrives.
        let max_ack_pending = usize::try_from(self.consumer.cached_info().config.max_ack_pending)
            .unwrap_or(usize::MAX)
            .max(1);
        let prefetch = (self.settings.batch_size * 2).min(max_ack_pending).max(1);
        let messages = self
            .consumer
            .stream()
            .max_messages_per_batch(prefetch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|source| WriteError::Pull {
                stream: self.writer.stream.clone(),
                consumer: self.settings.consumer.clone(),
                source,
            })?;
        Ok(messages.chunks_timeout(self.settings.batch_size, self.settings.batch_linger))
    }

    /// Hands batches to the writers until shutdown, a drained consumer (when asked to stop there)
    /// or a writer that stopped; the failure that ended it, if any.
    async fn pull(
        &mut self,
        mut batches: Pin<&mut Batches>,
        writers: &Writers,
        shutdown: &CancellationToken,
    ) -> Option<WriteError> {
        // Long enough that a chunk waiting for its linger is never mistaken for an idle stream.
        let idle = (self.settings.batch_linger * 4).max(Duration::from_millis(250));
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                next = tokio::time::timeout(idle, batches.next()) => next,
            };
            match next {
                Err(_idle) => {
                    if self.settings.stop_when_drained && self.drained().await {
                        return None;
                    }
                }
                Ok(None) => {
                    return Some(WriteError::SubscriptionEnded {
                        stream: self.writer.stream.clone(),
                        consumer: self.settings.consumer.clone(),
                    });
                }
                Ok(Some(items)) => {
                    let parts = self.split(items, writers.count()).await;
                    if !writers.hand_over(parts).await {
                        // A writer stopped: it was interrupted by shutdown while PostgreSQL was away.
                        return None;
                    }
                }
            }
        }
    }

    /// Decodes a pulled batch and splits it among `writers` by customer.
    async fn split<E: std::fmt::Display>(
        &self,
        items: Vec<Result<jetstream::Message, E>>,
        writers: usize,
    ) -> Vec<Part> {
        metrics::histogram!("persister_batch_size").record(items.len() as f64);
        let mut parts: Vec<Part> = (0..writers).map(|_| Part::default()).collect();
        for item in items {
            match item {
                Ok(message) => {
                    let Some(outcome) = self.writer.decode(&message).await else {
                        continue;
                    };
                    let index = partition(&outcome, writers);
                    parts[index].messages.push(message);
                    parts[index].outcomes.push(outcome);
                }
                Err(err) => tracing::warn!(%err, "pulling outcomes"),
            }
        }
        parts
    }

    /// True when the consumer has nothing left to deliver and nothing delivered awaits an ack; a
    /// check that fails counts as not drained.
    async fn drained(&mut self) -> bool {
        // Acks are fire-and-forget publishes: make sure ours reached the server before asking it.
        let checked = match self.client.flush().await {
            Err(err) => Err(format!("flushing acks: {err}")),
            Ok(()) => self
                .consumer
                .info()
                .await
                .map(|info| info.num_pending == 0 && info.num_ack_pending == 0)
                .map_err(|err| format!("reading the consumer's state: {err}")),
        };
        match checked {
            Ok(true) => {
                tracing::info!("consumer drained; stopping");
                true
            }
            Ok(false) => false,
            Err(err) => {
                tracing::warn!(%err, "checking whether the consumer is drained");
                false
            }
        }
    }

    /// Pulled but never handed to a writer: give them back now rather than after the ack wait.
    async fn give_back(&self, batches: Pin<&mut Batches>) {
        for message in batches.into_remainder().into_iter().flatten() {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
        if let Err(err) = self.client.flush().await {
            tracing::warn!(%err, "flushing acks at shutdown");
        }
    }
}

/// The writer tasks, each fed its parts of the batches through its own channel.
struct Writers {
    parts_to: Vec<mpsc::Sender<Part>>,
    totals: Vec<JoinHandle<Persisted>>,
    tracker: TaskTracker,
}

impl Writers {
    fn spawn(writer: &Arc<BatchWriter>, count: usize) -> Self {
        let tracker = TaskTracker::new();
        let mut parts_to = Vec::with_capacity(count);
        let mut totals = Vec::with_capacity(count);
        for _ in 0..count {
            let (send, receive) = mpsc::channel::<Part>(1);
            totals.push(tracker.spawn(write_parts(Arc::clone(writer), receive)));
            parts_to.push(send);
        }
        tracker.close();
        Writers {
            parts_to,
            totals,
            tracker,
        }
    }

    fn count(&self) -> usize {
        self.parts_to.len()
    }

    /// Gives each writer its part, in writer order; false when a writer has stopped.
    async fn hand_over(&self, parts: Vec<Part>) -> bool {
        for (part, to) in parts.into_iter().zip(&self.parts_to) {
            if part.messages.is_empty() {
                continue;
            }
            if to.send(part).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Lets the writers finish what they were given; what they wrote, together.
    async fn finish(self) -> RunReport {
        drop(self.parts_to);
        let mut report = RunReport::default();
        for total in self.totals {
            match total.await {
                Ok(total) => {
                    report.written.add(&total.report);
                    report.messages_acked += total.acked;
                    report.batches += total.commits;
                }
                Err(err) => tracing::error!(%err, "a batch writer panicked"),
            }
        }
        self.tracker.wait().await;
        report
    }
}

/// One writer: persists its parts in order until its channel closes or shutdown interrupts it.
async fn write_parts(writer: Arc<BatchWriter>, mut receive: mpsc::Receiver<Part>) -> Persisted {
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
}

fn log_stopped(report: &RunReport) {
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
