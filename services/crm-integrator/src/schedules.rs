//! Every retry this crate makes, named by purpose: how long a record waits before its next CRM
//! request, how long a version waits for an older one's claim, how often a ledger write may race,
//! how soon a message is handed back after a race or a NATS failure, and how soon a broken pull
//! or watch starts again. A change to one of these policies is made here and nowhere else.

use std::time::Duration;

use backon::{BackoffBuilder as _, ConstantBuilder, ExponentialBuilder};
use crm_client::Transient;

/// Failed CRM requests of one delivery retried in-process before the message is handed back.
pub const INLINE_ATTEMPTS: u32 = 4;

/// Compare-and-set conflicts tolerated on one ledger key (each answered by reading it again, at
/// once) before this delivery gives up.
pub const LEDGER_CONFLICTS: u32 = 16;

/// A message handed back because the ledger raced us (the key keeps changing, or our claim was
/// taken over) comes again this soon.
pub const LEDGER_RACE: Duration = Duration::from_millis(200);

/// A message handed back after NATS failed us mid-way comes again this soon, not after the whole
/// ack wait.
pub const AFTER_NATS_FAILURE: Duration = Duration::from_secs(1);

/// A message held back because the CRM refused our credentials waits at least this long (and at
/// least one request deadline).
pub const CREDENTIALS_REFUSED: Duration = Duration::from_secs(5);

/// Pulling starts again this long after the consumer could not be read.
pub const PULL_RESTART: Duration = Duration::from_secs(1);

/// Pulling goes on this long after a pull failed mid-stream.
pub const PULL_RETRY: Duration = Duration::from_millis(500);

/// The ceiling of a record's wait before its next CRM request: 50 ms for the first failure,
/// doubling with each failure (this delivery's and the earlier deliveries'), at most 30 s.
pub fn crm_call() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_factor(2.0)
        .with_max_delay(CRM_CALL_LONGEST)
        .without_max_times()
}

const CRM_CALL_LONGEST: Duration = Duration::from_secs(30);

/// When a record whose request failed with `failure` tries again: full jitter under
/// [`crm_call`]'s ceiling for its `attempt` of delivery `delivered`, never shorter than the CRM's
/// `Retry-After` for it, never longer than `max`.
pub fn crm_retry_delay(
    failure: &Transient,
    delivered: u64,
    attempt: u32,
    max: Duration,
) -> Duration {
    let step = (delivered.saturating_sub(1) as usize).saturating_add(attempt as usize);
    let ceiling = crm_call()
        .build()
        .nth(step.saturating_sub(1))
        .unwrap_or(CRM_CALL_LONGEST);
    let jittered = Duration::from_millis(rand::random_range(0..=ceiling.as_millis() as u64));
    let delay = match failure.retry_after {
        // A little spread so the records refused together do not return in lockstep.
        Some(after) => after + Duration::from_millis(rand::random_range(0..=100)),
        None => jittered,
    };
    delay.min(max)
}

/// A newer version waiting for the claim of an older one: 100 ms at its first delivery, doubling
/// with each delivery so a long wait stays cheap, at most 5 s.
pub fn claim_wait() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_factor(2.0)
        .with_max_delay(CLAIM_WAIT_LONGEST)
        .without_max_times()
}

const CLAIM_WAIT_LONGEST: Duration = Duration::from_secs(5);

/// How long delivery `delivered` of a version waits for a claim that has `remaining_ms` of its
/// lease left: [`claim_wait`]'s step, or less when the lease runs out sooner (at least 100 ms).
pub fn claim_wait_delay(delivered: u64, remaining_ms: i64) -> Duration {
    let step = delivered.saturating_sub(1) as usize;
    let backoff = claim_wait().build().nth(step).unwrap_or(CLAIM_WAIT_LONGEST);
    // backon doubles in f32 (200 ms comes out as 200.000003 ms): whole milliseconds, as meant.
    let backoff = Duration::from_millis((backoff.as_secs_f64() * 1_000.0).round() as u64);
    Duration::from_millis(remaining_ms.max(100) as u64).min(backoff)
}

/// Watching the fleet's pause key again after the watch could not start: every second, for as
/// long as it takes.
pub fn pause_watch() -> ConstantBuilder {
    ConstantBuilder::default()
        .with_delay(Duration::from_secs(1))
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(retry_after: Option<Duration>) -> Transient {
        Transient {
            status: Some(503),
            retry_after,
            maybe_applied: false,
            congestion: false,
            unreachable: false,
            detail: String::new(),
        }
    }

    #[test]
    fn backoff_grows_with_attempts_honours_retry_after_and_is_capped() {
        let max = Duration::from_secs(60);
        for _ in 0..100 {
            assert!(crm_retry_delay(&failure(None), 1, 1, max) <= Duration::from_millis(50));
            assert!(crm_retry_delay(&failure(None), 3, 2, max) <= Duration::from_millis(400));
            assert!(crm_retry_delay(&failure(None), 40, 9, max) <= Duration::from_secs(30));
            assert!(
                crm_retry_delay(&failure(Some(Duration::from_secs(2))), 1, 1, max)
                    >= Duration::from_secs(2)
            );
            assert_eq!(
                crm_retry_delay(&failure(Some(Duration::from_secs(3600))), 1, 1, max),
                max
            );
        }
    }

    #[test]
    fn a_claim_wait_doubles_per_delivery_up_to_five_seconds_or_the_lease() {
        // What the integrator waited before the schedule had a name: 100 ms << (delivery - 1),
        // at most six doublings and 5 s, never past the lease (at least 100 ms).
        for delivered in 1..=12u64 {
            for remaining_ms in [-5, 0, 50, 150, 1_000, 4_000, 60_000] {
                let before = (remaining_ms.max(100) as u64)
                    .min(100u64 << delivered.saturating_sub(1).min(6))
                    .min(5_000);
                assert_eq!(
                    claim_wait_delay(delivered, remaining_ms),
                    Duration::from_millis(before),
                    "delivery {delivered}, {remaining_ms} ms left"
                );
            }
        }
    }
}
