//! Sending a claimed version to the CRM: one request at a time, each admitted by the gate, the
//! rate budget and a limiter slot, under a claim lease that outlives it; then what its answer
//! means for this record (confirm, look up, create instead, dead-letter, retry in-process, or hand
//! the message back).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use sync_topology::ids;
use sync_topology::messages::SyncAction;

use super::outcome::CrmAnswer;
use super::{ProcessError, Settled, Task};
use crate::flow::{Admission, Parked};
use crate::ledger::OurClaim;
use crate::policy;
use crate::schedules::{self, INLINE_ATTEMPTS};
use crate::telemetry::{self, time_phase};
use crm_client::{CrmCustomer, CrmReply, Transient, Write};

/// A task whose customer this replica has claimed, and where its sending stands.
pub(super) struct Sending<'t> {
    task: &'t Task<'t>,
    claim: OurClaim<'t>,
    /// No version is confirmed: the CRM is believed not to know the customer.
    create: bool,
    /// Failed requests of this delivery so far.
    attempt: u32,
    /// An update drew a 404 and this delivery writes a create instead (once).
    fell_back_to_create: bool,
}

/// What to do after one CRM answer.
enum Next<'a> {
    Done(Settled),
    /// Send again at once (the lookup told us what to write).
    Again,
    /// Wait this long in-process, then send again; meanwhile another message has our place.
    RetryAfter(Duration, Parked<'a>),
}

impl<'t> Sending<'t> {
    pub(super) fn new(task: &'t Task<'t>, claim: OurClaim<'t>, create: bool) -> Self {
        Sending {
            task,
            claim,
            create,
            attempt: 0,
            fell_back_to_create: false,
        }
    }

    /// Sends the claimed version until the CRM holds it, refuses it, or the message is handed
    /// back.
    pub(super) async fn run(mut self) -> Result<Settled, ProcessError> {
        loop {
            match self.send_once().await? {
                Next::Done(settled) => return Ok(settled),
                Next::Again => {}
                Next::RetryAfter(delay, parked) => {
                    let waited = self.wait_inline(delay).await?;
                    parked.resume().await;
                    if !waited {
                        let reason = "shutting down".to_owned();
                        return self.hand_back(delay, reason, false).await;
                    }
                }
            }
        }
    }

    /// One request, once the gate, the rate budget and the limiter let it go, and what its
    /// answer means.
    async fn send_once(&mut self) -> Result<Next<'t>, ProcessError> {
        let integrator = self.task.integrator;
        let probe = match self.admit().await? {
            Ok(probe) => probe,
            Err(settled) => return Ok(Next::Done(settled)),
        };
        if let Some(rate) = &integrator.rate {
            rate.until_ready().await;
        }
        let permit_started = Instant::now();
        let permit = integrator.limiter.acquire().await;
        time_phase("request_slot", permit_started);
        // The lease must outlive the request, or another replica could take over mid-send.
        if !self.claim.renew(integrator.request_timeout).await? {
            drop(permit);
            let reason = "our claim was taken over".to_owned();
            return Ok(Next::Done(
                self.task.defer(schedules::LEDGER_RACE, reason).await?,
            ));
        }
        let looking_up = self.claim.in_doubt;
        let request_started = Instant::now();
        // A hung request holds its slot no longer than the deadline the limiter learned (longer
        // for a record handed back before).
        let earlier = self.task.delivered - 1;
        let deadline = permit.deadline(earlier);
        let reply = permit
            .bounded(earlier, !looking_up, self.request(deadline))
            .await;
        // The fault policy: this answer feeds the limiter, the breaker and the overload rule.
        let pause = policy::answered(permit, &integrator.gate, &reply, probe);
        time_phase("crm_request", request_started);
        count_reply(&reply, looking_up);
        if let Some(pause) = pause {
            integrator.fleet.announce(pause).await;
        }
        self.on_reply(reply, looking_up).await
    }

    /// Holds the request while the fleet is paused or the breaker is open: in-process for short
    /// holds, by handing the message back for long ones. `Ok(probe)` when the request may go.
    async fn admit(&mut self) -> Result<Result<bool, Settled>, ProcessError> {
        let integrator = self.task.integrator;
        loop {
            let wait = match integrator.gate.admit() {
                Admission::Go { probe } => return Ok(Ok(probe)),
                Admission::Wait(wait) => wait,
            };
            if wait > integrator.max_inline_wait {
                let reason = if integrator.gate.paused_for().is_some() {
                    "CRM asked the fleet to pause"
                } else {
                    "circuit breaker open"
                };
                return Ok(Err(self.hand_back(wait, reason.to_owned(), false).await?));
            }
            // Waiting out a short hold lets another message in meanwhile (bounded).
            let Some(parked) = integrator.slots.park() else {
                let reason = "holding, and as many records already wait".to_owned();
                return Ok(Err(self.hand_back(wait, reason, false).await?));
            };
            let waited = self.wait_inline(wait).await?;
            parked.resume().await;
            if !waited {
                let reason = "shutting down".to_owned();
                return Ok(Err(self.hand_back(wait, reason, false).await?));
            }
        }
    }

    /// One request: a lookup when in doubt, otherwise the write with the version's idempotency
    /// key.
    async fn request(&self, deadline: Duration) -> CrmReply {
        let (task, crm) = (self.task, &self.task.integrator.crm);
        if self.claim.in_doubt {
            return crm.look_up(&task.record.id, deadline).await;
        }
        let write = if self.create {
            Write::Create
        } else {
            Write::Update
        };
        let key = if task.force_resend {
            ids::forced_idempotency_key(&task.version, &task.hash, task.stream_seq)
        } else {
            ids::idempotency_key(&task.version, &task.hash)
        };
        crm.write(write, &task.record, &key, deadline).await
    }

    /// What one answer means for this record.
    async fn on_reply(
        &mut self,
        reply: CrmReply,
        looking_up: bool,
    ) -> Result<Next<'t>, ProcessError> {
        let task = self.task;
        let settled = match reply {
            CrmReply::Stored(stored) if looking_up => return self.on_found(stored).await,
            CrmReply::NotFound => {
                self.claim.in_doubt = false;
                self.create = true;
                return Ok(Next::Again);
            }
            CrmReply::Stored(stored) => {
                let action = if self.create {
                    SyncAction::Created
                } else {
                    SyncAction::Updated
                };
                self.confirm(action, Some(stored.crm_id)).await?
            }
            CrmReply::Refused { status: 404, .. } if !self.create && !self.fell_back_to_create => {
                // The ledger believed the CRM knows this customer; the CRM says it does not.
                tracing::warn!(seq = task.stream_seq, id = %task.record.id, "update answered 404: creating instead");
                self.fell_back_to_create = true;
                self.create = true;
                return Ok(Next::Again);
            }
            CrmReply::Refused { status, body } => {
                let reason = format!("CRM refused the record with HTTP {status}");
                let answer = CrmAnswer {
                    status: Some(status),
                    body: Some(body),
                };
                self.dead_letter(reason, answer).await?
            }
            CrmReply::Unauthorized { status, body } => {
                // Our credentials, not this record: held back without counting a failure, so a
                // wrong token empties nothing into the dead letters.
                let reason = format!(
                    "the CRM refused our credentials (HTTP {status}; check CRM_API_TOKEN): {body}"
                );
                let delay = task
                    .integrator
                    .request_timeout
                    .max(schedules::CREDENTIALS_REFUSED);
                self.hand_back(delay, reason, false).await?
            }
            CrmReply::Transient(failure) => {
                self.attempt += 1;
                return self.on_failure(failure).await;
            }
        };
        Ok(Next::Done(settled))
    }

    /// A lookup found the customer: done when the CRM already holds this content, otherwise
    /// the write goes now (as an update).
    async fn on_found(&mut self, stored: CrmCustomer) -> Result<Next<'t>, ProcessError> {
        let task = self.task;
        if stored.customer == task.record {
            tracing::info!(seq = task.stream_seq, id = %task.record.id, "CRM already holds this content: not resending");
            let settled = self
                .confirm(SyncAction::AlreadyPresent, Some(stored.crm_id))
                .await?;
            return Ok(Next::Done(settled));
        }
        self.claim.in_doubt = false;
        self.create = false;
        Ok(Next::Again)
    }

    /// A transient failure: retry in-process while the wait is short, otherwise hand the message
    /// back, counting the failed delivery; dead-letter once `--max-deliver` deliveries failed.
    async fn on_failure(&mut self, failure: Transient) -> Result<Next<'t>, ProcessError> {
        let (task, integrator) = (self.task, self.task.integrator);
        if failure.maybe_applied {
            self.claim.suspect();
        }
        telemetry::plain("crm_integrator_retries_total").increment(1);
        integrator.totals.retries.fetch_add(1, Ordering::Relaxed);
        // This record's own wait (its Retry-After, or backoff): the fleet goes on.
        let failures_before = self.claim.failures();
        let delay = integrator
            .gate
            .retry_delay(&failure, failures_before + 1, self.attempt);
        tracing::debug!(seq = task.stream_seq, id = %task.record.id, attempt = self.attempt, ?delay, %failure, "CRM request failed");
        // Waiting lets another message in meanwhile; when too many wait already, the server keeps
        // the record for its delay instead.
        if delay <= integrator.max_inline_wait
            && self.attempt < INLINE_ATTEMPTS
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
            return Ok(Next::Done(self.dead_letter(reason, answer).await?));
        }
        let reason = failure.to_string();
        Ok(Next::Done(self.hand_back(delay, reason, counts).await?))
    }

    /// The CRM holds the version: confirm it in the ledger and publish the outcome together (one
    /// round trip of latency instead of two; safe in either order of failure: an outcome without
    /// its confirmation leaves our claim, which the redelivery resolves by lookup under the same
    /// outcome dedup id), then acknowledge.
    async fn confirm(
        &mut self,
        action: SyncAction,
        crm_id: Option<String>,
    ) -> Result<Settled, ProcessError> {
        let task = self.task;
        let ledger_crm_id = crm_id.clone();
        let claim = &mut self.claim;
        let confirm = async {
            let started = Instant::now();
            claim.confirm(ledger_crm_id).await?;
            time_phase("confirm", started);
            Ok(())
        };
        tokio::try_join!(confirm, task.publish_synced(action, crm_id))?;
        task.ack_synced(action).await
    }

    async fn dead_letter(
        &mut self,
        reason: String,
        answer: CrmAnswer,
    ) -> Result<Settled, ProcessError> {
        let attempts = self.claim.failures() + 1;
        self.claim.mark_dead(self.task.stream_seq).await?;
        self.task.dead_letter(reason, answer, attempts).await
    }

    /// Releases the claim (keeping any doubt; `failed` counts this delivery toward
    /// `--max-deliver`) and hands the message back.
    async fn hand_back(
        &mut self,
        delay: Duration,
        reason: String,
        failed: bool,
    ) -> Result<Settled, ProcessError> {
        if let Err(err) = self.claim.release(failed).await {
            // The lease runs out by itself; until then a newer version of the customer waits.
            tracing::warn!(seq = self.task.stream_seq, %err, "cannot release the ledger claim");
        }
        self.task.defer(delay, reason).await
    }

    /// Waits `wait` with the message kept alive (ack progress, claim lease). False on shutdown.
    async fn wait_inline(&mut self, wait: Duration) -> Result<bool, ProcessError> {
        let (task, integrator) = (self.task, self.task.integrator);
        if let Err(err) = task.message.ack_with(AckKind::Progress).await {
            tracing::debug!(seq = task.stream_seq, %err, "ack progress failed");
        }
        if !self.claim.renew(wait + integrator.request_timeout).await? {
            return Ok(false);
        }
        tokio::select! {
            () = integrator.shutdown.cancelled() => Ok(false),
            () = tokio::time::sleep(wait) => Ok(true),
        }
    }
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
