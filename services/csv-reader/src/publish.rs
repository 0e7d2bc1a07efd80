//! Publishing one message and awaiting the stream's acknowledgement, retrying with the same dedup
//! id when it fails or times out, so a retry can never make a second copy.

use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::{self, publish::PublishAck};
use backon::{ExponentialBuilder, Retryable};

use crate::ReaderError;
use crate::message::{MessageKind, OutgoingMessage};

/// A message the stream has acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledged {
    pub line: u64,
    pub kind: MessageKind,
    /// The stream had already stored a message with this dedup id.
    pub duplicate: bool,
}

/// How hard to try before the run fails: the default rides out a NATS restart of about a minute.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 20,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Sends the message without waiting for its acknowledgement (the caller pipelines those).
pub async fn send(
    js: &jetstream::Context,
    message: &OutgoingMessage,
) -> Result<PublishAckFuture, PublishError> {
    js.send_publish(message.subject.clone(), message.to_publish())
        .await
}

/// Awaits the acknowledgement of a message already sent with [`send`]; on a transient failure
/// publishes it again (same dedup id) with backoff until `policy` is spent.
pub async fn acknowledged(
    js: &jetstream::Context,
    sent: Result<PublishAckFuture, PublishError>,
    message: OutgoingMessage,
    policy: RetryPolicy,
) -> Result<Acknowledged, ReaderError> {
    let first = match sent {
        Ok(ack) => ack.await,
        Err(err) => Err(err),
    };
    let ack = match first {
        Ok(ack) => ack,
        Err(err) if is_transient(&err) && policy.attempts > 1 => {
            tracing::warn!(line = message.line, %err, "publish not acknowledged; retrying with the same message id");
            let backoff = ExponentialBuilder::default()
                .with_min_delay(policy.min_delay)
                .with_max_delay(policy.max_delay)
                .with_max_times(policy.attempts - 1)
                .with_jitter();
            (|| publish_and_wait(js, &message))
                .retry(backoff)
                .when(is_transient)
                .notify(|err, delay| {
                    tracing::warn!(line = message.line, %err, ?delay, "publish retry failed");
                })
                .await
                .map_err(|source| failed(&message, source))?
        }
        Err(err) => return Err(failed(&message, err)),
    };
    Ok(Acknowledged {
        line: message.line,
        kind: message.kind,
        duplicate: ack.duplicate,
    })
}

async fn publish_and_wait(
    js: &jetstream::Context,
    message: &OutgoingMessage,
) -> Result<PublishAck, PublishError> {
    send(js, message).await?.await
}

fn failed(message: &OutgoingMessage, source: PublishError) -> ReaderError {
    ReaderError::Publish {
        line: message.line,
        subject: message.subject.to_string(),
        message_id: message.message_id().unwrap_or_default().to_owned(),
        source,
    }
}

/// Timeouts and connection trouble pass; a message the server refuses as such does not.
/// "No stream" is transient too: during a server restart JetStream answers no-responders.
fn is_transient(err: &PublishError) -> bool {
    matches!(
        err.kind(),
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::MaxAckPending
            | PublishErrorKind::Other
    )
}
