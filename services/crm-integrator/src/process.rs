//! The work for one ingest message, as a few steps over one [`Task`]: read it (a message that is
//! not a customer is dead-lettered with its body), judge it against the ledger (already
//! confirmed, superseded by a newer version, wait for an older one, or claim the customer), send
//! it to the CRM (looking it up first when an earlier send may have landed unseen), retry or hand
//! it back, confirm in the ledger, publish exactly one outcome, acknowledge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use customer_record::{ContentHash, CustomerRecord};
use governor::DefaultDirectRateLimiter;
use sync_topology::ledger::{Decision, decide};
use sync_topology::messages::SyncAction;
use sync_topology::{IngestMessage, Names, Version, ids};
use tokio_util::sync::CancellationToken;

use crate::fleet::FleetPause;
use crate::flow::{Admission, Gate, Limiter, Parked, Slots};
use crate::ledger::{Held, Ledger, Subject};
use crate::now_ms;
use crate::outcome::{self, CrmAnswer};
use crate::schedules::{self, INLINE_ATTEMPTS, LEDGER_CONFLICTS};
use crate::{policy, telemetry};
use crm_client::{CrmClient, CrmReply, Transient, Write};

/// Everything `process_message` needs, shared by every message task of a replica.
pub struct Integrator {
    pub(crate) names: Names,
    pub(crate) js: jetstream::Context,
    pub(crate) ledger: Ledger,
    pub(crate) crm: CrmClient,
    pub(crate) gate: Arc<Gate>,
    pub(crate) fleet: FleetPause,
    pub(crate) limiter: Arc<Limiter>,
    /// Messages in hand; a record waiting for its retry lets another in meanwhile.
    pub(crate) slots: Arc<Slots>,
    pub(crate) rate: Option<DefaultDirectRateLimiter>,
    /// Failed deliveries of a version after which it is dead-lettered.
    pub(crate) max_deliver: u64,
    pub(crate) request_timeout: Duration,
    pub(crate) max_inline_wait: Duration,
    pub(crate) shutdown: CancellationToken,
    /// Messages this replica settled with an outcome (synced, superseded or dead).
    pub(crate) settled: AtomicU64,
    /// By outcome, hand-backs and retries: for the heartbeat and the log line at stop.
    pub(crate) totals: telemetry::Totals,
}

impl std::fmt::Debug for Integrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Integrator")
            .field("namespace", &self.names.namespace())
            .field("replica", &self.ledger.replica)
            .field("crm", &self.crm)
            .finish_non_exhaustive()
    }
}

impl Integrator {
    pub fn replica(&self) -> &str {
        &self.ledger.replica
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// How many messages this replica settled with an outcome.
    pub fn settled_messages(&self) -> u64 {
        self.settled.load(Ordering::Relaxed)
    }
}

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

/// One ingest message being worked on: the customer version it carries and where it came from.
pub(crate) struct Task {
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

impl Task {
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
                let result =
                    outcome::malformed(integrator, &message, stream_seq, malformed.to_string())
                        .await;
                return nak_on_error(&message, stream_seq, result).await;
            }
        };
    if let Some(reason) = decoded.message.version.implausible(now_ms()) {
        // A version no reader made would outrank every real one in the ledger and the CRM until
        // its time comes: dead-lettered with its body, never sent.
        let result = outcome::malformed(integrator, &message, stream_seq, reason).await;
        return nak_on_error(&message, stream_seq, result).await;
    }
    if decoded.hash_header_mismatch {
        tracing::warn!(seq = stream_seq, id = %decoded.message.record.id, "content hash header differs from the body's; using the body's");
    }
    let message_fields = decoded.message;
    let task = Task {
        message,
        record: message_fields.record,
        hash: decoded.hash,
        version: message_fields.version,
        key: decoded.ledger_key,
        stream_seq,
        delivered,
        source_file: message_fields.source_file,
        source_line: message_fields.source_line,
        force_resend: message_fields.force_resend,
    };
    let result = settle(integrator, &task).await;
    nak_on_error(&task.message, stream_seq, result).await
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

async fn settle(integrator: &Integrator, task: &Task) -> Result<Settled, ProcessError> {
    if task.force_resend {
        tracing::warn!(seq = task.stream_seq, id = %task.record.id, version = %task.version, "FORCED RESEND: looking the customer up, and writing if the CRM's copy differs from this version, even if the ledger has it confirmed");
    }
    match judge(integrator, task).await? {
        Judged::Settled(settled) => Ok(settled),
        Judged::Claimed(claimed) => send(integrator, task, claimed).await,
    }
}

/// What the ledger said about a message.
enum Judged {
    Settled(Settled),
    Claimed(Claimed),
}

/// The customer is ours to send.
struct Claimed {
    held: Held,
    /// An earlier send may have landed unseen: look the customer up before writing.
    in_doubt: bool,
    /// No version is confirmed: the CRM is believed not to know the customer.
    create: bool,
}

/// Reads the ledger, decides, and claims the customer with compare-and-set (deciding again after
/// a conflict). Everything but a claim ends the message here.
async fn judge(integrator: &Integrator, task: &Task) -> Result<Judged, ProcessError> {
    let started = Instant::now();
    // Most first deliveries are new customers: try the claim as a create straight away, which
    // saves the read; the create fails harmlessly when the customer is known.
    let mut optimistic = task.delivered == 1;
    for _ in 0..=LEDGER_CONFLICTS {
        let current = if std::mem::take(&mut optimistic) {
            None
        } else {
            integrator.ledger.read(&task.key).await?
        };
        let entry = current.as_ref().map(|h| &h.entry);
        if task.delivered > 1
            && entry.is_some_and(|e| e.dead_lettered(task.version, task.stream_seq))
        {
            // Its ack was lost after the dead letter: the same outcome again (the results stream
            // drops it as a duplicate), never a send that would give it a second one.
            let reason = "dead-lettered before; its acknowledgement was lost".to_owned();
            let attempts = 0;
            return Ok(Judged::Settled(
                outcome::dead_letter(integrator, task, reason, CrmAnswer::default(), attempts)
                    .await?,
            ));
        }
        let decision = decide(entry, task.version, &task.hash, task.force_resend, now_ms());
        let settled = match decision {
            Decision::AlreadyConfirmed { crm_id } => {
                outcome::synced(integrator, task, SyncAction::SkippedConfirmed, crm_id).await?
            }
            Decision::SameContent { crm_id } => {
                let Some(held) = current.as_ref() else {
                    continue;
                };
                if !integrator.ledger.advance(task.subject(), held).await? {
                    continue;
                }
                outcome::synced(integrator, task, SyncAction::SkippedConfirmed, crm_id).await?
            }
            Decision::Superseded { by } => outcome::superseded(integrator, task, by).await?,
            Decision::Conflict { confirmed_hash } => {
                let reason = format!(
                    "the ledger confirmed version {} with content {confirmed_hash}, this message \
                     carries the same version with content {}: two records claim one version",
                    task.version, task.hash
                );
                outcome::dead_letter(integrator, task, reason, CrmAnswer::default(), 0).await?
            }
            Decision::Wait {
                claim_version,
                remaining_ms,
            } => {
                // Waiting is not failing: nothing is counted, and the wait grows with each
                // delivery so a long one stays cheap.
                let delay = schedules::claim_wait_delay(task.delivered, remaining_ms);
                let reason = format!("waiting for the claim of version {claim_version}");
                outcome::defer(task, delay, reason).await?
            }
            Decision::Send {
                look_up_first,
                create,
            } => {
                let Some(held) = integrator
                    .ledger
                    .claim(task.subject(), current.as_ref(), look_up_first)
                    .await?
                else {
                    continue;
                };
                time_phase("claim", started);
                return Ok(Judged::Claimed(Claimed {
                    held,
                    in_doubt: look_up_first,
                    create,
                }));
            }
        };
        return Ok(Judged::Settled(settled));
    }
    let reason = "ledger key keeps changing under us".to_owned();
    Ok(Judged::Settled(
        outcome::defer(task, schedules::LEDGER_RACE, reason).await?,
    ))
}

/// What to do after one CRM answer.
enum Next<'a> {
    Done(Settled),
    /// Send again at once (the lookup told us what to write).
    Again,
    /// Wait this long in-process, then send again; meanwhile another message has our place.
    RetryAfter(Duration, Parked<'a>),
}

/// Sends the claimed version until the CRM holds it, refuses it, or the message is handed back.
async fn send(
    integrator: &Integrator,
    task: &Task,
    mut claimed: Claimed,
) -> Result<Settled, ProcessError> {
    let mut attempt: u32 = 0;
    let mut fell_back_to_create = false;
    loop {
        let probe = match admit(integrator, task, &mut claimed).await? {
            Ok(probe) => probe,
            Err(settled) => return Ok(settled),
        };
        if let Some(rate) = &integrator.rate {
            rate.until_ready().await;
        }
        let permit_started = Instant::now();
        let permit = integrator.limiter.acquire().await;
        time_phase("request_slot", permit_started);
        // The lease must outlive the request, or another replica could take over mid-send.
        let renewed = integrator
            .ledger
            .renew(
                task.subject(),
                &mut claimed.held,
                claimed.in_doubt,
                integrator.request_timeout,
            )
            .await?;
        if !renewed {
            drop(permit);
            let reason = "our claim was taken over".to_owned();
            return outcome::defer(task, schedules::LEDGER_RACE, reason).await;
        }
        let looking_up = claimed.in_doubt;
        let request_started = Instant::now();
        // A hung request holds its slot no longer than the deadline the limiter learned (longer
        // for a record handed back before).
        let earlier = task.delivered - 1;
        let deadline = permit.deadline(earlier);
        let reply = permit
            .bounded(
                earlier,
                !looking_up,
                request(integrator, task, &claimed, deadline),
            )
            .await;
        // The fault policy: this answer feeds the limiter, the breaker and the overload rule.
        let pause = policy::answered(permit, &integrator.gate, &reply, probe);
        time_phase("crm_request", request_started);
        count_reply(&reply, looking_up);
        if let Some(pause) = pause {
            integrator.fleet.announce(pause).await;
        }
        let next = match reply {
            CrmReply::Stored(stored) if looking_up => {
                if stored.customer == task.record {
                    tracing::info!(seq = task.stream_seq, id = %task.record.id, "CRM already holds this content: not resending");
                    let crm_id = Some(stored.crm_id);
                    Next::Done(
                        confirm(
                            integrator,
                            task,
                            &mut claimed,
                            SyncAction::AlreadyPresent,
                            crm_id,
                        )
                        .await?,
                    )
                } else {
                    claimed.in_doubt = false;
                    claimed.create = false;
                    Next::Again
                }
            }
            CrmReply::NotFound => {
                claimed.in_doubt = false;
                claimed.create = true;
                Next::Again
            }
            CrmReply::Stored(stored) => {
                let action = if claimed.create {
                    SyncAction::Created
                } else {
                    SyncAction::Updated
                };
                let crm_id = Some(stored.crm_id);
                Next::Done(confirm(integrator, task, &mut claimed, action, crm_id).await?)
            }
            CrmReply::Refused { status: 404, .. } if !claimed.create && !fell_back_to_create => {
                // The ledger believed the CRM knows this customer; the CRM says it does not.
                tracing::warn!(seq = task.stream_seq, id = %task.record.id, "update answered 404: creating instead");
                fell_back_to_create = true;
                claimed.create = true;
                Next::Again
            }
            CrmReply::Refused { status, body } => {
                let reason = format!("CRM refused the record with HTTP {status}");
                let answer = CrmAnswer {
                    status: Some(status),
                    body: Some(body),
                };
                Next::Done(
                    dead_letter_claimed(integrator, task, &mut claimed, reason, answer).await?,
                )
            }
            CrmReply::Unauthorized { status, body } => {
                // Our credentials, not this record: held back without counting a failure, so a
                // wrong token empties nothing into the dead letters.
                let reason = format!(
                    "the CRM refused our credentials (HTTP {status}; check CRM_API_TOKEN): {body}"
                );
                let delay = integrator
                    .request_timeout
                    .max(schedules::CREDENTIALS_REFUSED);
                Next::Done(hand_back(integrator, task, &mut claimed, delay, reason, false).await?)
            }
            CrmReply::Transient(failure) => {
                attempt += 1;
                on_failure(integrator, task, &mut claimed, failure, attempt).await?
            }
        };
        match next {
            Next::Done(settled) => return Ok(settled),
            Next::Again => {}
            Next::RetryAfter(delay, parked) => {
                let waited = wait_inline(integrator, task, &mut claimed, delay).await?;
                parked.resume().await;
                if !waited {
                    let reason = "shutting down".to_owned();
                    return hand_back(integrator, task, &mut claimed, delay, reason, false).await;
                }
            }
        }
    }
}

/// Holds the request while the fleet is paused or the breaker is open: in-process for short
/// holds, by handing the message back for long ones. `Ok(probe)` when the request may go.
async fn admit(
    integrator: &Integrator,
    task: &Task,
    claimed: &mut Claimed,
) -> Result<Result<bool, Settled>, ProcessError> {
    loop {
        match integrator.gate.admit() {
            Admission::Go { probe } => return Ok(Ok(probe)),
            Admission::Wait(wait) if wait <= integrator.max_inline_wait => {
                // Waiting out a short hold lets another message in meanwhile (bounded).
                let Some(parked) = integrator.slots.park() else {
                    let reason = "holding, and as many records already wait".to_owned();
                    let settled = hand_back(integrator, task, claimed, wait, reason, false).await?;
                    return Ok(Err(settled));
                };
                let waited = wait_inline(integrator, task, claimed, wait).await?;
                parked.resume().await;
                if !waited {
                    let reason = "shutting down".to_owned();
                    let settled = hand_back(integrator, task, claimed, wait, reason, false).await?;
                    return Ok(Err(settled));
                }
            }
            Admission::Wait(wait) => {
                let reason = if integrator.gate.paused_for().is_some() {
                    "CRM asked the fleet to pause"
                } else {
                    "circuit breaker open"
                };
                let settled =
                    hand_back(integrator, task, claimed, wait, reason.to_owned(), false).await?;
                return Ok(Err(settled));
            }
        }
    }
}

/// One request: a lookup when in doubt, otherwise the write with the version's idempotency key.
async fn request(
    integrator: &Integrator,
    task: &Task,
    claimed: &Claimed,
    deadline: Duration,
) -> CrmReply {
    if claimed.in_doubt {
        return integrator.crm.look_up(&task.record.id, deadline).await;
    }
    let write = if claimed.create {
        Write::Create
    } else {
        Write::Update
    };
    let key = if task.force_resend {
        ids::forced_idempotency_key(&task.version, &task.hash, task.stream_seq)
    } else {
        ids::idempotency_key(&task.version, &task.hash)
    };
    integrator
        .crm
        .write(write, &task.record, &key, deadline)
        .await
}

/// A transient failure: retry in-process while the wait is short, otherwise hand the message
/// back, counting the failed delivery; dead-letter once `--max-deliver` deliveries failed.
async fn on_failure<'a>(
    integrator: &'a Integrator,
    task: &Task,
    claimed: &mut Claimed,
    failure: Transient,
    attempt: u32,
) -> Result<Next<'a>, ProcessError> {
    claimed.in_doubt |= failure.maybe_applied;
    telemetry::plain("crm_integrator_retries_total").increment(1);
    integrator.totals.retries.fetch_add(1, Ordering::Relaxed);
    // This record's own wait (its Retry-After, or backoff): the fleet goes on.
    let failures_before = claimed.held.entry.failures_of(task.version);
    let delay = integrator
        .gate
        .retry_delay(&failure, failures_before + 1, attempt);
    tracing::debug!(seq = task.stream_seq, id = %task.record.id, attempt, ?delay, %failure, "CRM request failed");
    // Waiting lets another message in meanwhile; when too many wait already, the server keeps
    // the record for its delay instead.
    if delay <= integrator.max_inline_wait
        && attempt < INLINE_ATTEMPTS
        && let Some(parked) = integrator.slots.park()
    {
        return Ok(Next::RetryAfter(delay, parked));
    }
    // A CRM we cannot reach is the breaker's business, not this record's.
    let counts = !failure.unreachable;
    if counts && failures_before + 1 >= integrator.max_deliver {
        let reason = format!(
            "CRM still failing after {} failed deliveries: {failure}",
            failures_before + 1
        );
        let answer = CrmAnswer {
            status: failure.status,
            body: Some(failure.detail),
        };
        return Ok(Next::Done(
            dead_letter_claimed(integrator, task, claimed, reason, answer).await?,
        ));
    }
    let reason = failure.to_string();
    Ok(Next::Done(
        hand_back(integrator, task, claimed, delay, reason, counts).await?,
    ))
}

/// The CRM holds the version: confirm it in the ledger and publish the outcome together (one round
/// trip of latency instead of two; safe in either order of failure: an outcome without its
/// confirmation leaves our claim, which the redelivery resolves by lookup under the same outcome
/// dedup id), then acknowledge.
async fn confirm(
    integrator: &Integrator,
    task: &Task,
    claimed: &mut Claimed,
    action: SyncAction,
    crm_id: Option<String>,
) -> Result<Settled, ProcessError> {
    let ledger_crm_id = crm_id.clone();
    let confirm = async {
        let started = Instant::now();
        integrator
            .ledger
            .confirm(task.subject(), &mut claimed.held, ledger_crm_id)
            .await?;
        time_phase("confirm", started);
        Ok(())
    };
    tokio::try_join!(
        confirm,
        outcome::publish_synced(integrator, task, action, crm_id)
    )?;
    outcome::ack_synced(integrator, task, action).await
}

async fn dead_letter_claimed(
    integrator: &Integrator,
    task: &Task,
    claimed: &mut Claimed,
    reason: String,
    answer: CrmAnswer,
) -> Result<Settled, ProcessError> {
    let attempts = claimed.held.entry.failures_of(task.version) + 1;
    integrator
        .ledger
        .mark_dead(
            task.subject(),
            &mut claimed.held,
            claimed.in_doubt,
            task.stream_seq,
        )
        .await?;
    outcome::dead_letter(integrator, task, reason, answer, attempts).await
}

/// Releases the claim (keeping any doubt; `failed` counts this delivery toward `--max-deliver`)
/// and hands the message back.
async fn hand_back(
    integrator: &Integrator,
    task: &Task,
    claimed: &mut Claimed,
    delay: Duration,
    reason: String,
    failed: bool,
) -> Result<Settled, ProcessError> {
    let released = integrator
        .ledger
        .release(task.subject(), &mut claimed.held, claimed.in_doubt, failed)
        .await;
    if let Err(err) = released {
        // The lease runs out by itself; until then a newer version of the customer waits.
        tracing::warn!(seq = task.stream_seq, %err, "cannot release the ledger claim");
    }
    outcome::defer(task, delay, reason).await
}

/// Waits `wait` with the message kept alive (ack progress, claim lease). False on shutdown.
async fn wait_inline(
    integrator: &Integrator,
    task: &Task,
    claimed: &mut Claimed,
    wait: Duration,
) -> Result<bool, ProcessError> {
    if let Err(err) = task.message.ack_with(AckKind::Progress).await {
        tracing::debug!(seq = task.stream_seq, %err, "ack progress failed");
    }
    let needed = wait + integrator.request_timeout;
    let renewed = integrator
        .ledger
        .renew(task.subject(), &mut claimed.held, claimed.in_doubt, needed)
        .await?;
    if !renewed {
        return Ok(false);
    }
    tokio::select! {
        () = integrator.shutdown.cancelled() => Ok(false),
        () = tokio::time::sleep(wait) => Ok(true),
    }
}

/// Where a record's time goes, for profiling: `crm_integrator_phase_seconds{phase}`.
pub(crate) fn time_phase(phase: &'static str, started: Instant) {
    telemetry::phase(phase).record(started.elapsed().as_secs_f64());
}

fn count_reply(reply: &CrmReply, looking_up: bool) {
    let status = match reply {
        CrmReply::Stored(_) => "2xx",
        CrmReply::NotFound => "404",
        CrmReply::Refused { status, .. } | CrmReply::Unauthorized { status, .. } => {
            telemetry::status_label(*status)
        }
        CrmReply::Transient(t) => t.status.map_or("no_answer", telemetry::status_label),
    };
    let kind = if looking_up { "lookup" } else { "write" };
    telemetry::crm_response(status, kind).increment(1);
}
