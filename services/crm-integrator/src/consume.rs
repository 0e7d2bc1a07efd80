//! The consume loop of one replica: take a place in hand, wait while the gate holds sending,
//! pull the next message from the shared consumer, and hand it to its own task; on shutdown, stop
//! pulling and let the started tasks settle.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt as _;
use metrics::Gauge;
use service_kit::Health;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::flow::{Slot, message_capacity};
use crate::integrator::Integrator;
use crate::process::process_message;
use crate::schedules;

/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// Consumes until `shutdown`, then waits for every started message to settle.
pub(crate) async fn consume(
    integrator: Arc<Integrator>,
    consumer: PullConsumer,
    fetch_batch: usize,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let mut puller = Puller::new(consumer, fetch_batch);
    let gauges = Gauges::new();
    health.set_ready(true);
    while let Some((slot, message)) = next_message(&integrator, &mut puller, &shutdown).await {
        gauges.update(&integrator);
        tracker.spawn(settle(integrator.clone(), message, slot));
    }
    health.set_ready(false);
    // Messages pulled but not started come back after the ack wait; the ones we started finish.
    drop(puller);
    tracker.close();
    tracing::info!(
        in_flight = tracker.len(),
        "stopped fetching; draining in-flight messages"
    );
    tracker.wait().await;
    Ok(())
}

/// One message's task: processed to settlement, counted, and its place in hand freed.
async fn settle(integrator: Arc<Integrator>, message: jetstream::Message, slot: Slot) {
    match process_message(&integrator, message).await {
        Ok(settled) => {
            integrator.totals.count(&settled);
            tracing::trace!(?settled, "message settled");
        }
        Err(err) => {
            integrator
                .totals
                .not_settled
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%err, "message not settled; it will be redelivered")
        }
    }
    drop(slot);
}

/// The next message with a place in hand for it, once the gate lets requests go. `None` on
/// shutdown.
async fn next_message(
    integrator: &Integrator,
    puller: &mut Puller,
    shutdown: &CancellationToken,
) -> Option<(Slot, jetstream::Message)> {
    let slots = &integrator.slots;
    loop {
        slots.resize(message_capacity(integrator.limiter().limit()));
        let slot = tokio::select! {
            () = shutdown.cancelled() => return None,
            slot = slots.acquire() => slot,
        };
        hold_while_gated(integrator, puller, shutdown).await?;
        let wait = match puller.next(shutdown).await? {
            Pulled::Message(message) => return Some((slot, message)),
            Pulled::Again => continue,
            Pulled::After(wait) => wait,
        };
        drop(slot);
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Pulling while the CRM is off limits would only age messages in our hands: waits while the
/// gate holds sending. `None` on shutdown.
async fn hold_while_gated(
    integrator: &Integrator,
    puller: &mut Puller,
    shutdown: &CancellationToken,
) -> Option<()> {
    // A short hold keeps the pull: what it buffered is processed right after. A hold long enough
    // to eat into the ack wait drops it, so those messages come back once, after the ack wait,
    // rather than being processed beside their redelivery.
    if integrator
        .gate()
        .holding()
        .is_some_and(|wait| wait > puller.ack_wait / 4)
    {
        puller.messages = None;
    }
    while let Some(wait) = integrator.gate().holding() {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
        }
    }
    Some(())
}

/// The pull subscription to the shared consumer, started again when it breaks.
struct Puller {
    consumer: PullConsumer,
    fetch_batch: usize,
    ack_wait: Duration,
    messages: Option<pull::Stream>,
}

/// What one pull gave.
// Returned once and unpacked at once: boxing the message would only add an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Pulled {
    Message(jetstream::Message),
    /// The subscription ended: start another at once.
    Again,
    /// Pulling failed: try again after this long.
    After(Duration),
}

impl Puller {
    fn new(consumer: PullConsumer, fetch_batch: usize) -> Self {
        Puller {
            ack_wait: consumer.cached_info().config.ack_wait,
            consumer,
            fetch_batch,
            messages: None,
        }
    }

    /// The next message, subscribing first if needed. `None` on shutdown.
    async fn next(&mut self, shutdown: &CancellationToken) -> Option<Pulled> {
        let stream = match &mut self.messages {
            Some(stream) => stream,
            None => match self
                .consumer
                .stream()
                .max_messages_per_batch(self.fetch_batch)
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_HEARTBEAT)
                .messages()
                .await
            {
                Ok(stream) => self.messages.insert(stream),
                Err(err) => {
                    tracing::warn!(%err, "cannot start pulling from the consumer; retrying");
                    return Some(Pulled::After(schedules::PULL_RESTART));
                }
            },
        };
        let next = tokio::select! {
            () = shutdown.cancelled() => return None,
            next = stream.next() => next,
        };
        Some(match next {
            Some(Ok(message)) => Pulled::Message(message),
            Some(Err(err)) => {
                tracing::warn!(%err, "pulling messages failed; re-subscribing");
                self.messages = None;
                Pulled::After(schedules::PULL_RETRY)
            }
            None => {
                self.messages = None;
                Pulled::Again
            }
        })
    }
}

/// The gauges set as each message starts (handles built once: the macros look the series up on
/// every call).
struct Gauges {
    in_hand: Gauge,
    waiting: Gauge,
    in_flight: Gauge,
}

impl Gauges {
    fn new() -> Self {
        Gauges {
            in_hand: metrics::gauge!("crm_integrator_messages_in_hand"),
            waiting: metrics::gauge!("crm_integrator_messages_waiting"),
            in_flight: metrics::gauge!("crm_integrator_requests_in_flight"),
        }
    }

    fn update(&self, integrator: &Integrator) {
        self.in_hand.set(integrator.slots.in_use() as f64);
        self.waiting.set(integrator.slots.parked() as f64);
        self.in_flight.set(integrator.limiter().in_flight() as f64);
    }
}
