//! The work for one ingest message, as a few short steps over one [`Task`]: read it (a message
//! that is not a customer is dead-lettered with its body), [`judge`] it against the ledger
//! (already confirmed, superseded by a newer version, wait for an older one, or claim the
//! customer), [`send`] it to the CRM (looking it up first when an earlier send may have landed
//! unseen; retrying in-process or handing it back), confirm it in the ledger, publish exactly one
//! [`outcome`], and acknowledge.

mod judge;
mod outcome;
mod send;

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use customer_record::{ContentHash, CustomerRecord};
use sync_topology::messages::SyncAction;
use sync_topology::{Decoded, IngestMessage, Version};

use crate::integrator::Integrator;
use crate::ledger::Subject;
use crate::{now_ms, schedules};

/// How a message was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Published on the synced subject and acked.
    Synced(SyncAction),
    /// A newer version was known: published on the superseded subject and acked, never sent.
    Superseded { by: Version },
    /// Published on the dead subject and acked.
    DeadLettered,
    /// Handed back with a delayed NAK: a transient failure, a pause, or an older version of the
    /// same customer still in flight.
    Deferred { delay: Duration, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("message has no JetStream metadata (not from a consumer?): {0}")]
    Metadata(String),
    #[error("ledger {action} of key {key} failed: {message}")]
    Ledger {
        action: &'static str,
        key: String,
        message: String,
    },
    #[error("ledger entry of key {key} is not readable JSON: {source}")]
    LedgerEntry {
        key: String,
        source: serde_json::Error,
    },
    #[error("publishing the outcome of ingest message {seq} to {subject} failed: {message}")]
    Publish {
        seq: u64,
        subject: String,
        message: String,
    },
    #[error("acknowledging ingest message {seq} ({kind}) failed: {message}")]
    Ack {
        seq: u64,
        kind: &'static str,
        message: String,
    },
    #[error("encoding {what} failed: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
}

impl ProcessError {
    pub(crate) fn ledger(action: &'static str, key: &str, err: impl std::fmt::Display) -> Self {
        ProcessError::Ledger {
            action,
            key: key.to_owned(),
            message: err.to_string(),
        }
    }
}

/// One ingest message being worked on: the customer version it carries, where it came from, and
/// the replica working on it.
pub(crate) struct Task<'a> {
    pub integrator: &'a Integrator,
    pub message: jetstream::Message,
    pub record: CustomerRecord,
    pub hash: ContentHash,
    pub version: Version,
    pub key: String,
    /// The message's own place in the ingest stream: names its one outcome.
    pub stream_seq: u64,
    pub delivered: u64,
    pub source_file: Option<String>,
    pub source_line: Option<u64>,
    pub force_resend: bool,
}

impl<'a> Task<'a> {
    fn new(
        integrator: &'a Integrator,
        message: jetstream::Message,
        decoded: Decoded,
        stream_seq: u64,
        delivered: u64,
    ) -> Self {
        let fields = decoded.message;
        Task {
            integrator,
            message,
            record: fields.record,
            hash: decoded.hash,
            version: fields.version,
            key: decoded.ledger_key,
            stream_seq,
            delivered,
            source_file: fields.source_file,
            source_line: fields.source_line,
            force_resend: fields.force_resend,
        }
    }

    /// The key of every ledger change this task makes.
    fn subject(&self) -> Subject<'_> {
        Subject {
            key: &self.key,
            version: self.version,
            hash: &self.hash,
        }
    }
}

/// Handles one ingest message from start to settlement. Returns how it was settled; an error
/// means NATS failed us mid-way and the message will come back (nothing was acknowledged).
pub async fn process_message(
    integrator: &Integrator,
    message: jetstream::Message,
) -> Result<Settled, ProcessError> {
    let info = message
        .info()
        .map_err(|err| ProcessError::Metadata(err.to_string()))?;
    let stream_seq = info.stream_sequence;
    let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
    let decoded =
        match IngestMessage::decode(message.headers.as_ref(), &message.payload, stream_seq) {
            Ok(decoded) => decoded,
            Err(malformed) => {
                let reason = malformed.to_string();
                return not_a_customer(integrator, &message, stream_seq, reason).await;
            }
        };
    if let Some(reason) = decoded.message.version.implausible(now_ms()) {
        // A version no reader made would outrank every real one in the ledger and the CRM until
        // its time comes: dead-lettered with its body, never sent.
        return not_a_customer(integrator, &message, stream_seq, reason).await;
    }
    if decoded.hash_header_mismatch {
        tracing::warn!(seq = stream_seq, id = %decoded.message.record.id, "content hash header differs from the body's; using the body's");
    }
    let task = Task::new(integrator, message, decoded, stream_seq, delivered);
    let result = settle(&task).await;
    nak_on_error(&task.message, stream_seq, result).await
}

/// Dead-letters a message that carries no customer version we may send, with its body.
async fn not_a_customer(
    integrator: &Integrator,
    message: &jetstream::Message,
    stream_seq: u64,
    reason: String,
) -> Result<Settled, ProcessError> {
    let result = outcome::malformed(integrator, message, stream_seq, reason).await;
    nak_on_error(message, stream_seq, result).await
}

/// After a NATS failure mid-way, hands the message back soon rather than after the whole ack
/// wait; if even that fails, the ack wait brings it back.
async fn nak_on_error(
    message: &jetstream::Message,
    seq: u64,
    result: Result<Settled, ProcessError>,
) -> Result<Settled, ProcessError> {
    if let Err(err) = &result {
        tracing::warn!(seq, %err, "processing failed; handing the message back");
        if let Err(nak) = message
            .ack_with(AckKind::Nak(Some(schedules::AFTER_NATS_FAILURE)))
            .await
        {
            tracing::debug!(seq, %nak, "nak after failure failed too");
        }
    }
    result
}

async fn settle(task: &Task<'_>) -> Result<Settled, ProcessError> {
    if task.force_resend {
        tracing::warn!(seq = task.stream_seq, id = %task.record.id, version = %task.version, "FORCED RESEND: looking the customer up, and writing if the CRM's copy differs from this version, even if the ledger has it confirmed");
    }
    match judge::judge(task).await? {
        judge::Verdict::Settled(settled) => Ok(settled),
        judge::Verdict::Send(sending) => sending.run().await,
    }
}
