//! Ending one ingest message: publishing its one outcome (synced, superseded or dead) with a dedup
//! id naming the message, then acknowledging it; or handing it back with a delayed NAK.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use serde::Serialize;
use sync_topology::Version;
use sync_topology::ids;
use sync_topology::messages::{DeadLetter, SupersededOutcome, SyncAction, SyncedOutcome};

use super::{ProcessError, Settled, Task};
use crate::integrator::Integrator;
use crate::telemetry::{self, time_phase};

fn encode(value: &impl Serialize, what: &'static str) -> Result<Bytes, ProcessError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|source| ProcessError::Encode { what, source })
}

/// Publishes on `subject` and waits for the stream's acknowledgement.
async fn publish(
    integrator: &Integrator,
    seq: u64,
    subject: String,
    msg_id: String,
    body: Bytes,
) -> Result<(), ProcessError> {
    let failed = |err: &dyn std::fmt::Display| ProcessError::Publish {
        seq,
        subject: subject.clone(),
        message: err.to_string(),
    };
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
    integrator
        .js
        .publish_with_headers(subject.clone(), headers, body)
        .await
        .map_err(|e| failed(&e))?
        .await
        .map_err(|e| failed(&e))?;
    Ok(())
}

/// Acknowledges once the outcome is stored. A plain ack, not a double ack: should it be lost, the
/// redelivered message finds its version confirmed in the ledger (or superseded) and its outcome's
/// dedup id makes the results stream drop the second copy, so nothing is done twice.
async fn ack(message: &jetstream::Message, seq: u64) -> Result<(), ProcessError> {
    message.ack().await.map_err(|err| ProcessError::Ack {
        seq,
        kind: "ack",
        message: err.to_string(),
    })
}

fn count(integrator: &Integrator, outcome: &'static str, action: &'static str) {
    integrator.settled.fetch_add(1, Ordering::Relaxed);
    telemetry::records(outcome, action).increment(1);
}

/// What the CRM said when it refused a record, for its dead letter.
#[derive(Debug, Default)]
pub(super) struct CrmAnswer {
    pub status: Option<u16>,
    pub body: Option<String>,
}

/// An ingest message that is not a customer version: dead-lettered with its raw body, never
/// retried (its bytes cannot change).
pub(super) async fn malformed(
    integrator: &Integrator,
    message: &jetstream::Message,
    stream_seq: u64,
    reason: String,
) -> Result<Settled, ProcessError> {
    tracing::warn!(seq = stream_seq, %reason, "ingest message is not a customer: dead-lettering it with its body");
    let letter = DeadLetter::malformed(stream_seq, reason, &message.payload);
    publish_dead(integrator, message, stream_seq, &letter).await
}

async fn publish_dead(
    integrator: &Integrator,
    message: &jetstream::Message,
    stream_seq: u64,
    letter: &DeadLetter,
) -> Result<Settled, ProcessError> {
    publish(
        integrator,
        stream_seq,
        integrator.names.dead_subject(),
        ids::outcome(stream_seq, &letter.version()),
        encode(letter, "dead letter")?,
    )
    .await?;
    ack(message, stream_seq).await?;
    count(integrator, "dead", "dead_lettered");
    Ok(Settled::DeadLettered)
}

impl Task<'_> {
    /// Publishes the synced outcome, not yet acknowledging the message: a sent record's ledger
    /// confirmation goes out alongside.
    pub(super) async fn publish_synced(
        &self,
        action: SyncAction,
        crm_id: Option<String>,
    ) -> Result<(), ProcessError> {
        let outcome = SyncedOutcome {
            customer: self.record.clone(),
            content_hash: self.hash.clone(),
            version: Some(self.version),
            ingest_seq: self.stream_seq,
            crm_id,
            action,
            source_file: self.source_file.clone(),
            source_line: self.source_line,
            synced_at: chrono::Utc::now(),
        };
        let started = Instant::now();
        publish(
            self.integrator,
            self.stream_seq,
            self.integrator.names.synced_subject(),
            ids::outcome(self.stream_seq, &self.version),
            encode(&outcome, "synced outcome")?,
        )
        .await?;
        time_phase("publish_outcome", started);
        Ok(())
    }

    /// Acknowledges a message whose synced outcome is published.
    pub(super) async fn ack_synced(&self, action: SyncAction) -> Result<Settled, ProcessError> {
        let started = Instant::now();
        ack(&self.message, self.stream_seq).await?;
        time_phase("ack", started);
        count(self.integrator, "synced", action.as_str());
        Ok(Settled::Synced(action))
    }

    /// The CRM holds this version and the ledger says so already: outcome, then ack.
    pub(super) async fn synced(
        &self,
        action: SyncAction,
        crm_id: Option<String>,
    ) -> Result<Settled, ProcessError> {
        self.publish_synced(action, crm_id).await?;
        self.ack_synced(action).await
    }

    /// A newer version is known: this one is recorded as superseded, never sent.
    pub(super) async fn superseded(&self, by: Version) -> Result<Settled, ProcessError> {
        let outcome = SupersededOutcome {
            customer_id: self.record.id.clone(),
            content_hash: self.hash.clone(),
            version: self.version,
            superseded_by: by,
            ingest_seq: self.stream_seq,
            source_file: self.source_file.clone(),
            source_line: self.source_line,
            superseded_at: chrono::Utc::now(),
        };
        publish(
            self.integrator,
            self.stream_seq,
            self.integrator.names.superseded_subject(),
            ids::outcome(self.stream_seq, &self.version),
            encode(&outcome, "superseded outcome")?,
        )
        .await?;
        ack(&self.message, self.stream_seq).await?;
        count(self.integrator, "superseded", "not_sent");
        Ok(Settled::Superseded { by })
    }

    /// The CRM refused this version for good, or its sends kept failing.
    pub(super) async fn dead_letter(
        &self,
        reason: String,
        answer: CrmAnswer,
        attempts: u64,
    ) -> Result<Settled, ProcessError> {
        tracing::warn!(seq = self.stream_seq, id = %self.record.id, version = %self.version, status = ?answer.status, %reason, "dead-lettering the record");
        let letter = DeadLetter {
            customer_id: self.record.id.clone(),
            content_hash: self.hash.clone(),
            version: Some(self.version),
            ingest_seq: self.stream_seq,
            reason,
            crm_status: answer.status,
            crm_body: answer.body,
            attempts,
            customer: Some(self.record.clone()),
            source_file: self.source_file.clone(),
            source_line: self.source_line,
            dead_at: chrono::Utc::now(),
            malformed_body_base64: None,
        };
        publish_dead(self.integrator, &self.message, self.stream_seq, &letter).await
    }

    /// Hands the message back to the server, to come again after `delay`.
    pub(super) async fn defer(
        &self,
        delay: Duration,
        reason: String,
    ) -> Result<Settled, ProcessError> {
        tracing::debug!(seq = self.stream_seq, id = %self.record.id, ?delay, %reason, "handing the message back");
        self.message
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|err| ProcessError::Ack {
                seq: self.stream_seq,
                kind: "nak",
                message: err.to_string(),
            })?;
        telemetry::plain("crm_integrator_deferred_total").increment(1);
        Ok(Settled::Deferred { delay, reason })
    }
}
