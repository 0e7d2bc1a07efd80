//! Every backoff schedule the services use, by name, in one place: how long each kind of retry
//! waits, and why, is read here rather than in the code that retries. All are `backon` builders
//! (see the README's "Retries: why backon"); each caller adds only what is its own (`when`,
//! `notify`, a deadline).

use std::time::Duration;

use backon::ExponentialBuilder;

/// Waiting for NATS or PostgreSQL at start-up: 0.5 s doubling to 5 s, without jitter so the
/// logged "retrying in 2s" is what happens; the deadline (`--startup-wait`) is the caller's.
pub fn server_startup() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
}

/// A batch write PostgreSQL failed for a reason other than its data (connection lost, server
/// restarting): retried for as long as it takes, because nothing is acknowledged meanwhile.
/// Jittered so the writers do not retry in step.
pub fn database_write() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// A publish JetStream did not acknowledge (server restarting, leader moving): `attempts` tries in
/// all with the same message id, so the stream's dedup window makes a retry harmless.
pub fn publish_ack(
    min_delay: Duration,
    max_delay: Duration,
    attempts: usize,
) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min_delay)
        .with_max_delay(max_delay)
        .with_max_times(attempts.saturating_sub(1))
        .with_jitter()
}

/// How many more times `syncctl verify --crm` asks the CRM for a customer after a transient
/// failure: with a quarter of the answers failing, 8 still left one customer in 50,000
/// unanswered in about a third of the runs; 20 leave one in 10^11.
pub const CRM_LOOKUP_RETRIES: usize = 20;

/// A read the operator is waiting for (`syncctl verify --crm` asking the CRM for a customer) that
/// met a transient failure: `retries` more tries, quickly at first, so a flaky CRM leaves no
/// customer unverified; the caller waits at least the CRM's own `Retry-After` when it sends one.
pub fn crm_lookup(retries: usize) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(retries)
        .with_jitter()
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder as _;

    use super::*;

    #[test]
    fn server_startup_doubles_from_half_a_second_to_five() {
        let delays: Vec<Duration> = server_startup().build().take(6).collect();
        let millis: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [500, 1000, 2000, 4000, 5000, 5000]);
    }

    #[test]
    fn database_writes_never_give_up_and_stay_under_the_ceiling() {
        let delays: Vec<Duration> = database_write().build().take(1000).collect();
        assert_eq!(delays.len(), 1000);
        // Jitter adds up to one more delay on top of the ceiling.
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
    }

    #[test]
    fn publish_ack_counts_the_first_try_among_its_attempts() {
        let ms = Duration::from_millis;
        assert_eq!(publish_ack(ms(10), ms(100), 4).build().count(), 3);
        assert_eq!(publish_ack(ms(10), ms(100), 0).build().count(), 0);
    }
}
