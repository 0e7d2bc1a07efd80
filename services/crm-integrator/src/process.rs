//! The work for one ingest message: read the ledger, claim the customer with compare-and-set,
//! send it to the CRM (looking it up first when an earlier send may have landed unseen), retry or
//! hand it back, confirm in the ledger, publish exactly one outcome, then acknowledge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, kv};
use bytes::Bytes;
use customer_record::{ContentHash, CustomerRecord, ledger_key};
use governor::DefaultDirectRateLimiter;
use serde::Serialize;
use sync_topology::messages::{DeadLetter, SyncAction, SyncedOutcome};
use sync_topology::{
    HEADER_CONTENT_HASH, HEADER_FORCE_RESEND, HEADER_REPLAY_OF, HEADER_SOURCE_FILE,
    HEADER_SOURCE_LINE, Names,
};
use tokio_util::sync::CancellationToken;

use crate::crm::{CrmClient, CrmReply, Write};
use crate::fleet::FleetPause;
use crate::flow::{Admission, Gate, Limiter, Slots, now_ms};
use crate::ledger::{Claim, Confirmed, Decision, LedgerEntry, decide};
use crate::policy;
use crate::telemetry;

/// Retries of one delivery done in-process before the message is handed back with a NAK.
const MAX_INLINE_ATTEMPTS: u32 = 4;
/// Compare-and-set conflicts tolerated on one key before the message is handed back.
const MAX_CAS_CONFLICTS: u32 = 16;

/// Everything `process_message` needs, shared by every message task of a replica.
pub struct Integrator {
    pub(crate) names: Names,
    pub(crate) js: jetstream::Context,
    pub(crate) ledger: kv::Store,
    pub(crate) crm: CrmClient,
    pub(crate) gate: Arc<Gate>,
    pub(crate) fleet: FleetPause,
    pub(crate) limiter: Arc<Limiter>,
    /// Messages in hand; a record waiting for its retry lets another in meanwhile.
    pub(crate) slots: Arc<Slots>,
    pub(crate) rate: Option<DefaultDirectRateLimiter>,
    /// This process's name in ledger claims and pause notices.
    pub(crate) replica: String,
    pub(crate) max_deliver: u64,
    pub(crate) claim_lease: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_inline_wait: Duration,
    pub(crate) shutdown: CancellationToken,
    /// Messages this replica settled with an outcome (synced or dead), for tests and logs.
    pub(crate) settled: AtomicU64,
}

impl std::fmt::Debug for Integrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Integrator")
            .field("namespace", &self.names.namespace())
            .field("replica", &self.replica)
            .field("crm", &self.crm)
            .finish_non_exhaustive()
    }
}

impl Integrator {
    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// How many messages this replica settled with an outcome (synced or dead-lettered).
    pub fn settled_messages(&self) -> u64 {
        self.settled.load(Ordering::Relaxed)
    }
}

/// How a message was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// An outcome was published on the synced subject and the message acked.
    Synced(SyncAction),
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

/// One ingest message, read.
struct Inbound {
    message: jetstream::Message,
    record: Option<CustomerRecord>,
    customer_id: String,
    hash: ContentHash,
    /// The version of the customer this message carries: its ingest sequence, or for a copy made
    /// by `syncctl replay`/`dlq redrive`, the sequence of the message it copies.
    seq: u64,
    /// The message's own place in the ingest stream: names its one outcome.
    stream_seq: u64,
    delivered: u64,
    source_file: Option<String>,
    source_line: Option<u64>,
    force_resend: bool,
    key: String,
}

impl Inbound {
    fn read(message: jetstream::Message) -> Result<(Self, Option<String>), ProcessError> {
        let info = message
            .info()
            .map_err(|err| ProcessError::Metadata(err.to_string()))?;
        let stream_seq = info.stream_sequence;
        let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let seq = header(HEADER_REPLAY_OF)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|copied| *copied > 0 && *copied < stream_seq)
            .unwrap_or(stream_seq);
        let source_file = header(HEADER_SOURCE_FILE);
        let source_line = header(HEADER_SOURCE_LINE).and_then(|l| l.parse().ok());
        let header_hash = header(HEADER_CONTENT_HASH).and_then(|h| ContentHash::from_hex(&h));
        let force_resend =
            header(HEADER_FORCE_RESEND).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let (record, unreadable) = match serde_json::from_slice::<CustomerRecord>(&message.payload)
        {
            Ok(record) => (Some(record), None),
            Err(err) => (None, Some(format!("body is not a customer record: {err}"))),
        };
        let hash = match (&record, header_hash) {
            (Some(record), header_hash) => {
                let hash = record.content_hash();
                if header_hash.as_ref().is_some_and(|h| *h != hash) {
                    tracing::warn!(seq, id = %record.id, "content hash header differs from the body's; using the body's");
                }
                hash
            }
            (None, Some(header_hash)) => header_hash,
            (None, None) => ContentHash::from_hex(&"0".repeat(32)).unwrap_or_else(|| {
                CustomerRecord::normalised("", "", "", "", None, Default::default()).content_hash()
            }),
        };
        let customer_id = record.as_ref().map(|r| r.id.clone()).unwrap_or_default();
        let key = ledger_key(&customer_id);
        Ok((
            Inbound {
                message,
                record,
                customer_id,
                hash,
                seq,
                stream_seq,
                delivered,
                source_file,
                source_line,
                force_resend,
                key,
            },
            unreadable,
        ))
    }
}

/// The ledger entry as last read or written by this task.
struct Held {
    entry: LedgerEntry,
    revision: u64,
}

/// Handles one ingest message from start to settlement. Returns how it was settled; an error
/// means NATS failed us mid-way and the message will come back (nothing was acknowledged).
pub async fn process_message(
    integrator: &Integrator,
    message: jetstream::Message,
) -> Result<Settled, ProcessError> {
    let (inbound, unreadable) = Inbound::read(message)?;
    let result = settle(integrator, &inbound, unreadable).await;
    if let Ok(Settled::Synced(_) | Settled::DeadLettered) = &result {
        integrator.settled.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(err) = &result {
        // Hand it back soon rather than after the whole ack wait; if even that fails, the ack
        // wait brings it back.
        tracing::warn!(seq = inbound.seq, id = %inbound.customer_id, %err, "processing failed; handing the message back");
        if let Err(nak) = inbound
            .message
            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
            .await
        {
            tracing::debug!(seq = inbound.seq, %nak, "nak after failure failed too");
        }
    }
    result
}

async fn settle(
    integrator: &Integrator,
    inbound: &Inbound,
    unreadable: Option<String>,
) -> Result<Settled, ProcessError> {
    let Some(record) = inbound.record.clone() else {
        let reason = unreadable.unwrap_or_else(|| "unreadable body".to_owned());
        return dead_letter(integrator, inbound, reason, None, None).await;
    };
    if inbound.force_resend {
        tracing::warn!(
            seq = inbound.seq,
            id = %record.id,
            hash = %inbound.hash,
            "FORCED RESEND: sending even if the ledger has this content confirmed"
        );
    }
    let mut conflicts = 0;
    // Most first deliveries are new customers: try the claim as a create straight away, which
    // saves the read; the create fails harmlessly when the customer is known.
    let mut optimistic = inbound.delivered == 1;
    let claim_started = Instant::now();
    let (mut held, mut in_doubt, mut create) = loop {
        let current = if optimistic {
            optimistic = false;
            None
        } else {
            read_entry(integrator, &inbound.key).await?
        };
        let decision = decide(
            current.as_ref().map(|h| &h.entry),
            inbound.seq,
            &inbound.hash,
            inbound.force_resend,
            now_ms(),
        );
        let (look_up_first, create) = match decision {
            Decision::SkipConfirmed { crm_id } => {
                return synced(
                    integrator,
                    inbound,
                    &record,
                    SyncAction::SkippedConfirmed,
                    crm_id,
                )
                .await;
            }
            Decision::SkipSuperseded { crm_id } => {
                return synced(
                    integrator,
                    inbound,
                    &record,
                    SyncAction::SkippedSuperseded,
                    crm_id,
                )
                .await;
            }
            Decision::Wait {
                claim_seq,
                remaining_ms,
            } => {
                // Growing with each delivery: every NAK is a redelivery the server makes and
                // raises the delivery count `--max-deliver` reads, so a long wait stays cheap.
                let backoff_ms = 100u64 << inbound.delivered.saturating_sub(1).min(6);
                let delay = Duration::from_millis(
                    (remaining_ms.max(100) as u64).min(backoff_ms).min(5_000),
                );
                let reason = format!("waiting for the claim of ingest message {claim_seq}");
                return defer(inbound, delay, reason).await;
            }
            Decision::Send {
                look_up_first,
                create,
            } => (look_up_first, create),
        };
        // No dead letter for a high delivery count here: deliveries spent waiting for an older
        // version are not failures. `--max-deliver` is applied when a send fails.
        let mut wanted = current
            .as_ref()
            .map(|h| h.entry.clone())
            .unwrap_or_default();
        wanted.claim = Some(Claim {
            hash: inbound.hash.clone(),
            seq: inbound.seq,
            owner: integrator.replica.clone(),
            lease_until_ms: now_ms() + integrator.claim_lease.as_millis() as i64,
            in_doubt: look_up_first,
        });
        let revision = current.as_ref().map_or(0, |h| h.revision);
        match write_entry(integrator, &inbound.key, &wanted, revision).await? {
            Some(revision) => {
                break (
                    Held {
                        entry: wanted,
                        revision,
                    },
                    look_up_first,
                    create,
                );
            }
            None => {
                conflicts += 1;
                if conflicts > MAX_CAS_CONFLICTS {
                    let reason = "ledger key keeps changing under us".to_owned();
                    return defer(inbound, Duration::from_millis(200), reason).await;
                }
            }
        }
    };

    time_phase("claim", claim_started);
    let mut attempt: u32 = 0;
    let mut fell_back_to_create = false;
    loop {
        // Hold the request while the fleet is paused or the breaker is open.
        let probe = loop {
            match integrator.gate.admit() {
                Admission::Go { probe } => break probe,
                Admission::Wait(wait) if wait <= integrator.max_inline_wait => {
                    // Waiting out a short hold lets another message in meanwhile (bounded).
                    let Some(parked) = integrator.slots.park() else {
                        let reason = "holding, and as many records already wait";
                        return hand_back(integrator, inbound, &mut held, in_doubt, wait, reason)
                            .await;
                    };
                    let waited =
                        wait_inline(integrator, inbound, &mut held, in_doubt, wait).await?;
                    parked.resume().await;
                    if !waited {
                        return hand_back(
                            integrator,
                            inbound,
                            &mut held,
                            in_doubt,
                            wait,
                            "shutting down",
                        )
                        .await;
                    }
                }
                Admission::Wait(wait) => {
                    let reason = if integrator.gate.paused_for().is_some() {
                        "CRM asked the fleet to pause"
                    } else {
                        "circuit breaker open"
                    };
                    return hand_back(integrator, inbound, &mut held, in_doubt, wait, reason).await;
                }
            }
        };
        if let Some(rate) = &integrator.rate {
            rate.until_ready().await;
        }
        let permit_started = Instant::now();
        let permit = integrator.limiter.acquire().await;
        time_phase("request_slot", permit_started);
        // The lease must outlive the request, or another replica could take over mid-send.
        if !ensure_lease(
            integrator,
            inbound,
            &mut held,
            in_doubt,
            integrator.request_timeout,
        )
        .await?
        {
            drop(permit);
            let reason = "our claim was taken over".to_owned();
            return defer(inbound, Duration::from_millis(200), reason).await;
        }
        let looking_up = in_doubt;
        let request_started = Instant::now();
        // A hung request holds its slot no longer than the deadline the limiter learned
        // (longer for a record handed back before).
        let earlier = inbound.delivered - 1;
        let deadline = permit.deadline(earlier);
        let reply = if looking_up {
            let request = integrator.crm.look_up(&record.id, deadline);
            permit.bounded(earlier, false, request).await
        } else {
            let write = if create { Write::Create } else { Write::Update };
            let key = idempotency_key(inbound);
            let request = integrator.crm.write(write, &record, &key, deadline);
            permit.bounded(earlier, true, request).await
        };
        // The fault policy: this answer feeds the limiter, the breaker and the overload rule.
        let pause = policy::answered(permit, &integrator.gate, &reply, probe);
        time_phase("crm_request", request_started);
        count_reply(&reply, looking_up);
        if let Some(pause) = pause {
            integrator.fleet.announce(pause).await;
        }
        if probe {
            tracing::info!(seq = inbound.seq, "circuit breaker probe answered");
        }
        match reply {
            CrmReply::Stored(stored) if looking_up => {
                if stored.customer == record {
                    tracing::info!(seq = inbound.seq, id = %record.id, "CRM already holds this content: not resending");
                    return confirm(
                        integrator,
                        inbound,
                        &record,
                        &mut held,
                        SyncAction::AlreadyPresent,
                        Some(stored.crm_id),
                    )
                    .await;
                }
                in_doubt = false;
                create = false;
            }
            CrmReply::NotFound => {
                in_doubt = false;
                create = true;
            }
            CrmReply::Stored(stored) => {
                let action = if create {
                    SyncAction::Created
                } else {
                    SyncAction::Updated
                };
                return confirm(
                    integrator,
                    inbound,
                    &record,
                    &mut held,
                    action,
                    Some(stored.crm_id),
                )
                .await;
            }
            CrmReply::Refused { status: 404, .. } if !create && !fell_back_to_create => {
                // The ledger believed the CRM knows this customer; the CRM says it does not.
                tracing::warn!(seq = inbound.seq, id = %record.id, "update answered 404: creating instead");
                fell_back_to_create = true;
                create = true;
            }
            CrmReply::Refused { status, body } => {
                let reason = format!("CRM refused the record with HTTP {status}");
                return dead_letter_held(
                    integrator,
                    inbound,
                    &mut held,
                    in_doubt,
                    reason,
                    Some(status),
                    Some(body),
                )
                .await;
            }
            CrmReply::Transient(failure) => {
                in_doubt |= failure.maybe_applied;
                attempt += 1;
                telemetry::plain("crm_integrator_retries_total").increment(1);
                // This record's own wait (its Retry-After, or backoff): the fleet goes on.
                let delay = integrator
                    .gate
                    .retry_delay(&failure, inbound.delivered, attempt);
                tracing::debug!(seq = inbound.seq, id = %record.id, attempt, ?delay, %failure, "CRM request failed");
                // Waiting lets another message in meanwhile; when too many wait already, the
                // server keeps the record for its delay instead.
                let parked = (delay <= integrator.max_inline_wait && attempt < MAX_INLINE_ATTEMPTS)
                    .then(|| integrator.slots.park())
                    .flatten();
                if let Some(parked) = parked {
                    let waited =
                        wait_inline(integrator, inbound, &mut held, in_doubt, delay).await?;
                    parked.resume().await;
                    if !waited {
                        return hand_back(
                            integrator,
                            inbound,
                            &mut held,
                            in_doubt,
                            delay,
                            "shutting down",
                        )
                        .await;
                    }
                    continue;
                }
                if inbound.delivered >= integrator.max_deliver {
                    let reason = format!(
                        "CRM still failing after {} deliveries: {failure}",
                        inbound.delivered
                    );
                    return dead_letter_held(
                        integrator,
                        inbound,
                        &mut held,
                        in_doubt,
                        reason,
                        failure.status,
                        Some(failure.detail),
                    )
                    .await;
                }
                return hand_back(
                    integrator,
                    inbound,
                    &mut held,
                    in_doubt,
                    delay,
                    &failure.to_string(),
                )
                .await;
            }
        }
    }
}

/// Where a record's time goes, for profiling: `crm_integrator_phase_seconds{phase}`.
fn time_phase(phase: &'static str, started: Instant) {
    telemetry::phase(phase).record(started.elapsed().as_secs_f64());
}

fn idempotency_key(inbound: &Inbound) -> String {
    if inbound.force_resend {
        // The plain key would be answered from the CRM's memory, defeating the forced resend.
        format!(
            "{}:{}:resend-{}",
            inbound.customer_id, inbound.hash, inbound.stream_seq
        )
    } else {
        format!("{}:{}", inbound.customer_id, inbound.hash)
    }
}

fn count_reply(reply: &CrmReply, looking_up: bool) {
    let status = match reply {
        CrmReply::Stored(_) => "2xx",
        CrmReply::NotFound => "404",
        CrmReply::Refused { status, .. } => telemetry::status_label(*status),
        CrmReply::Transient(t) => t.status.map_or("no_answer", telemetry::status_label),
    };
    let kind = if looking_up { "lookup" } else { "write" };
    telemetry::crm_response(status, kind).increment(1);
}

async fn read_entry(integrator: &Integrator, key: &str) -> Result<Option<Held>, ProcessError> {
    let entry = integrator
        .ledger
        .entry(key)
        .await
        .map_err(|err| ProcessError::Ledger {
            action: "read",
            key: key.to_owned(),
            message: err.to_string(),
        })?;
    let Some(entry) = entry else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        // Deleted by an operator: a fresh start, written over the tombstone's revision.
        return Ok(Some(Held {
            entry: LedgerEntry::default(),
            revision: entry.revision,
        }));
    }
    let parsed =
        serde_json::from_slice(&entry.value).map_err(|source| ProcessError::LedgerEntry {
            key: key.to_owned(),
            source,
        })?;
    Ok(Some(Held {
        entry: parsed,
        revision: entry.revision,
    }))
}

/// Compare-and-set: `Some(new revision)`, or `None` when someone else wrote first.
async fn write_entry(
    integrator: &Integrator,
    key: &str,
    entry: &LedgerEntry,
    revision: u64,
) -> Result<Option<u64>, ProcessError> {
    let body = encode(entry, "ledger entry")?;
    // Revision 0 expects no entry at all: the create of a new customer.
    match integrator.ledger.update(key, body, revision).await {
        Ok(revision) => Ok(Some(revision)),
        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
        Err(err) => Err(ProcessError::Ledger {
            action: "compare-and-set",
            key: key.to_owned(),
            message: err.to_string(),
        }),
    }
}

fn encode(value: &impl Serialize, what: &'static str) -> Result<Bytes, ProcessError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|source| ProcessError::Encode { what, source })
}

fn is_our_claim(claim: Option<&Claim>, inbound: &Inbound, replica: &str) -> bool {
    claim.is_some_and(|c| c.seq == inbound.seq && c.owner == replica)
}

/// Applies `change` to the entry with compare-and-set, re-reading after conflicts. `change`
/// returns false when there is nothing (left) to write.
async fn update_held(
    integrator: &Integrator,
    inbound: &Inbound,
    held: &mut Held,
    mut change: impl FnMut(&mut LedgerEntry) -> bool,
) -> Result<bool, ProcessError> {
    for _ in 0..MAX_CAS_CONFLICTS {
        let mut wanted = held.entry.clone();
        if !change(&mut wanted) {
            return Ok(false);
        }
        if let Some(revision) =
            write_entry(integrator, &inbound.key, &wanted, held.revision).await?
        {
            held.entry = wanted;
            held.revision = revision;
            return Ok(true);
        }
        match read_entry(integrator, &inbound.key).await? {
            Some(current) => *held = current,
            None => {
                held.entry = LedgerEntry::default();
                held.revision = 0;
            }
        }
    }
    Err(ProcessError::Ledger {
        action: "compare-and-set",
        key: inbound.key.clone(),
        message: format!("{MAX_CAS_CONFLICTS} conflicts in a row"),
    })
}

/// Renews our claim so it stays live for at least `needed`. False when the claim is no longer ours.
async fn ensure_lease(
    integrator: &Integrator,
    inbound: &Inbound,
    held: &mut Held,
    in_doubt: bool,
    needed: Duration,
) -> Result<bool, ProcessError> {
    let Some(claim) = held.entry.claim.as_ref() else {
        return Ok(false);
    };
    let now = now_ms();
    let margin = needed.as_millis() as i64 + 1_000;
    if claim.lease_until_ms - now > margin && claim.in_doubt == in_doubt {
        return Ok(true);
    }
    let lease = integrator.claim_lease.max(needed + Duration::from_secs(1));
    let replica = integrator.replica.clone();
    let mut still_ours = true;
    let written = update_held(integrator, inbound, held, |entry| {
        match entry.claim.as_mut() {
            Some(claim) if claim.seq == inbound.seq && claim.owner == replica => {
                claim.lease_until_ms = now_ms() + lease.as_millis() as i64;
                claim.in_doubt = in_doubt;
                true
            }
            _ => {
                still_ours = false;
                false
            }
        }
    })
    .await?;
    Ok(written && still_ours)
}

/// Waits `wait` with the message kept alive (ack progress, claim lease). False on shutdown.
async fn wait_inline(
    integrator: &Integrator,
    inbound: &Inbound,
    held: &mut Held,
    in_doubt: bool,
    wait: Duration,
) -> Result<bool, ProcessError> {
    if let Err(err) = inbound.message.ack_with(AckKind::Progress).await {
        tracing::debug!(seq = inbound.seq, %err, "ack progress failed");
    }
    if !ensure_lease(
        integrator,
        inbound,
        held,
        in_doubt,
        wait + integrator.request_timeout,
    )
    .await?
    {
        return Ok(false);
    }
    tokio::select! {
        () = integrator.shutdown.cancelled() => Ok(false),
        () = tokio::time::sleep(wait) => Ok(true),
    }
}

/// Gives the claim up, keeping the doubt for whoever sends next.
async fn release_claim(
    integrator: &Integrator,
    inbound: &Inbound,
    held: &mut Held,
    in_doubt: bool,
) {
    let replica = integrator.replica.clone();
    let released = update_held(integrator, inbound, held, |entry| {
        if !is_our_claim(entry.claim.as_ref(), inbound, &replica) {
            return false;
        }
        if in_doubt {
            if let Some(claim) = entry.claim.as_mut() {
                claim.lease_until_ms = 0;
                claim.in_doubt = true;
            }
        } else {
            entry.claim = None;
        }
        true
    })
    .await;
    if let Err(err) = released {
        // The lease runs out by itself; until then a newer version of the customer waits.
        tracing::warn!(seq = inbound.seq, %err, "cannot release the ledger claim");
    }
}

async fn hand_back(
    integrator: &Integrator,
    inbound: &Inbound,
    held: &mut Held,
    in_doubt: bool,
    delay: Duration,
    reason: &str,
) -> Result<Settled, ProcessError> {
    release_claim(integrator, inbound, held, in_doubt).await;
    defer(inbound, delay, reason.to_owned()).await
}

async fn defer(
    inbound: &Inbound,
    delay: Duration,
    reason: String,
) -> Result<Settled, ProcessError> {
    tracing::debug!(seq = inbound.seq, id = %inbound.customer_id, ?delay, %reason, "handing the message back");
    inbound
        .message
        .ack_with(AckKind::Nak(Some(delay)))
        .await
        .map_err(|err| ProcessError::Ack {
            seq: inbound.seq,
            kind: "nak",
            message: err.to_string(),
        })?;
    telemetry::plain("crm_integrator_deferred_total").increment(1);
    Ok(Settled::Deferred { delay, reason })
}

async fn confirm(
    integrator: &Integrator,
    inbound: &Inbound,
    record: &CustomerRecord,
    held: &mut Held,
    action: SyncAction,
    crm_id: Option<String>,
) -> Result<Settled, ProcessError> {
    let replica = integrator.replica.clone();
    let ledger_crm_id = crm_id.clone();
    let confirm = async {
        let started = Instant::now();
        update_held(integrator, inbound, held, |entry| {
            let newer_known = entry
                .confirmed
                .as_ref()
                .is_some_and(|c| c.seq > inbound.seq);
            if !newer_known {
                entry.confirmed = Some(Confirmed {
                    hash: inbound.hash.clone(),
                    seq: inbound.seq,
                    crm_id: ledger_crm_id.clone(),
                });
            }
            if is_our_claim(entry.claim.as_ref(), inbound, &replica) {
                entry.claim = None;
            }
            true
        })
        .await?;
        time_phase("confirm", started);
        Ok(())
    };
    // The ledger write and the outcome go out together: one round trip of latency instead of
    // two. Safe in either order of failure: an outcome without its confirmation leaves our claim,
    // which the redelivery resolves by lookup (AlreadyPresent) under the same outcome dedup id.
    tokio::try_join!(
        confirm,
        publish_synced(integrator, inbound, record, action, crm_id)
    )?;
    ack_synced(inbound, action).await
}

/// The dedup id of a message's one outcome. The stream sequence alone would do while sequences are
/// never reused; the record's own dedup id beside it keeps an outcome from being dropped as a
/// duplicate of another record's even if they ever are (a stream that lost its tail to a crash
/// hands the same sequences out again).
fn outcome_id(kind: &str, inbound: &Inbound) -> String {
    format!(
        "{kind}:{}:{}:{}",
        inbound.stream_seq, inbound.customer_id, inbound.hash
    )
}

fn outcome_headers(id: String) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    headers
}

async fn publish(
    integrator: &Integrator,
    inbound: &Inbound,
    subject: String,
    msg_id: String,
    body: Bytes,
) -> Result<(), ProcessError> {
    let failed = |err: &dyn std::fmt::Display| ProcessError::Publish {
        seq: inbound.seq,
        subject: subject.clone(),
        message: err.to_string(),
    };
    let ack = integrator
        .js
        .publish_with_headers(subject.clone(), outcome_headers(msg_id), body)
        .await
        .map_err(|e| failed(&e))?;
    ack.await.map_err(|e| failed(&e))?;
    Ok(())
}

/// A plain ack, not a double ack: async-nats 0.51 creates and drops a subscription for every
/// double ack, a cost per record, and learning that the ack landed changes nothing we do. An ack
/// that is lost (rare: the outcome's PubAck came back a moment before) is the case a failed
/// double ack always was: the message comes back after the ack wait, the ledger skips the hash it
/// holds confirmed, and the outcome's `Nats-Msg-Id` makes the results stream drop a repeated
/// outcome inside its dedup window.
async fn ack(inbound: &Inbound) -> Result<(), ProcessError> {
    inbound
        .message
        .ack()
        .await
        .map_err(|err| ProcessError::Ack {
            seq: inbound.seq,
            kind: "ack",
            message: err.to_string(),
        })
}

/// Publishes the synced outcome (awaiting the stream's ack), then acknowledges the message.
async fn synced(
    integrator: &Integrator,
    inbound: &Inbound,
    record: &CustomerRecord,
    action: SyncAction,
    crm_id: Option<String>,
) -> Result<Settled, ProcessError> {
    publish_synced(integrator, inbound, record, action, crm_id).await?;
    ack_synced(inbound, action).await
}

async fn publish_synced(
    integrator: &Integrator,
    inbound: &Inbound,
    record: &CustomerRecord,
    action: SyncAction,
    crm_id: Option<String>,
) -> Result<(), ProcessError> {
    let outcome = SyncedOutcome {
        customer: record.clone(),
        content_hash: inbound.hash.clone(),
        ingest_seq: inbound.seq,
        crm_id,
        action,
        source_file: inbound.source_file.clone(),
        source_line: inbound.source_line,
        synced_at: chrono::Utc::now(),
    };
    let body = encode(&outcome, "synced outcome")?;
    let started = Instant::now();
    publish(
        integrator,
        inbound,
        integrator.names.synced_subject(),
        outcome_id("synced", inbound),
        body,
    )
    .await?;
    time_phase("publish_outcome", started);
    Ok(())
}

async fn ack_synced(inbound: &Inbound, action: SyncAction) -> Result<Settled, ProcessError> {
    let started = Instant::now();
    ack(inbound).await?;
    time_phase("ack", started);
    telemetry::records("synced", action.as_str()).increment(1);
    Ok(Settled::Synced(action))
}

async fn dead_letter_held(
    integrator: &Integrator,
    inbound: &Inbound,
    held: &mut Held,
    in_doubt: bool,
    reason: String,
    crm_status: Option<u16>,
    crm_body: Option<String>,
) -> Result<Settled, ProcessError> {
    release_claim(integrator, inbound, held, in_doubt).await;
    dead_letter(integrator, inbound, reason, crm_status, crm_body).await
}

async fn dead_letter(
    integrator: &Integrator,
    inbound: &Inbound,
    reason: String,
    crm_status: Option<u16>,
    crm_body: Option<String>,
) -> Result<Settled, ProcessError> {
    tracing::warn!(seq = inbound.seq, id = %inbound.customer_id, status = ?crm_status, %reason, "dead-lettering the record");
    let letter = DeadLetter {
        customer_id: inbound.customer_id.clone(),
        content_hash: inbound.hash.clone(),
        ingest_seq: inbound.seq,
        reason,
        crm_status,
        crm_body,
        attempts: inbound.delivered,
        customer: inbound.record.clone(),
        source_file: inbound.source_file.clone(),
        source_line: inbound.source_line,
        dead_at: chrono::Utc::now(),
    };
    let body = encode(&letter, "dead letter")?;
    publish(
        integrator,
        inbound,
        integrator.names.dead_subject(),
        outcome_id("dead", inbound),
        body,
    )
    .await?;
    ack(inbound).await?;
    telemetry::records("dead", "dead_lettered").increment(1);
    Ok(Settled::DeadLettered)
}
