//! Judging a task against the ledger: the rules of [`sync_topology::ledger::decide`] applied to
//! its customer's entry, and the claim that makes the customer ours to send. Every verdict but a
//! claim ends the message here.

use std::time::Instant;

use sync_topology::ledger::{Decision, decide};
use sync_topology::messages::SyncAction;

use super::outcome::CrmAnswer;
use super::send::Sending;
use super::{ProcessError, Settled, Task};
use crate::ledger::Held;
use crate::now_ms;
use crate::schedules::{self, LEDGER_CONFLICTS};
use crate::telemetry::time_phase;

/// What the ledger says about a task.
pub(super) enum Verdict<'t> {
    Settled(Settled),
    /// The customer is claimed: ours to send.
    Send(Box<Sending<'t>>),
}

/// Reads the ledger, decides, and claims the customer with compare-and-set (deciding again after
/// a conflict).
pub(super) async fn judge<'t>(task: &'t Task<'t>) -> Result<Verdict<'t>, ProcessError> {
    let started = Instant::now();
    // Most first deliveries are new customers: try the claim as a create straight away, which
    // saves the read; the create fails harmlessly when the customer is known.
    let mut optimistic = task.delivered == 1;
    for _ in 0..=LEDGER_CONFLICTS {
        let current = if std::mem::take(&mut optimistic) {
            None
        } else {
            task.integrator.ledger.read(&task.key).await?
        };
        if let Some(verdict) = decide_on(task, current).await? {
            if matches!(verdict, Verdict::Send(_)) {
                time_phase("claim", started);
            }
            return Ok(verdict);
        }
    }
    let reason = "ledger key keeps changing under us".to_owned();
    let settled = task.defer(schedules::LEDGER_RACE, reason).await?;
    Ok(Verdict::Settled(settled))
}

/// Acts on what `decide` says of the entry `current`. `None`: the entry changed meanwhile, so
/// decide again.
async fn decide_on<'t>(
    task: &'t Task<'t>,
    current: Option<Held>,
) -> Result<Option<Verdict<'t>>, ProcessError> {
    let entry = current.as_ref().map(|h| &h.entry);
    if task.delivered > 1 && entry.is_some_and(|e| e.dead_lettered(task.version, task.stream_seq)) {
        // Its ack was lost after the dead letter: the same outcome again (the results stream
        // drops it as a duplicate), never a send that would give it a second one.
        let reason = "dead-lettered before; its acknowledgement was lost".to_owned();
        let settled = task.dead_letter(reason, CrmAnswer::default(), 0).await?;
        return Ok(Some(Verdict::Settled(settled)));
    }
    let ledger = &task.integrator.ledger;
    let settled = match decide(entry, task.version, &task.hash, task.force_resend, now_ms()) {
        Decision::AlreadyConfirmed { crm_id } => {
            task.synced(SyncAction::SkippedConfirmed, crm_id).await?
        }
        Decision::SameContent { crm_id } => {
            let Some(held) = current.as_ref() else {
                return Ok(None);
            };
            if !ledger.advance(task.subject(), held).await? {
                return Ok(None);
            }
            task.synced(SyncAction::SkippedConfirmed, crm_id).await?
        }
        Decision::Superseded { by } => task.superseded(by).await?,
        Decision::Conflict { confirmed_hash } => {
            let reason = format!(
                "the ledger confirmed version {} with content {confirmed_hash}, this message \
                 carries the same version with content {}: two records claim one version",
                task.version, task.hash
            );
            task.dead_letter(reason, CrmAnswer::default(), 0).await?
        }
        Decision::Wait {
            claim_version,
            remaining_ms,
        } => {
            // Waiting is not failing: nothing is counted, and the wait grows with each delivery
            // so a long one stays cheap.
            let delay = schedules::claim_wait_delay(task.delivered, remaining_ms);
            let reason = format!("waiting for the claim of version {claim_version}");
            task.defer(delay, reason).await?
        }
        Decision::Send {
            look_up_first,
            create,
        } => {
            let claim = ledger
                .claim(task.subject(), current.as_ref(), look_up_first)
                .await?;
            return Ok(
                claim.map(|claim| Verdict::Send(Box::new(Sending::new(task, claim, create))))
            );
        }
    };
    Ok(Some(Verdict::Settled(settled)))
}
