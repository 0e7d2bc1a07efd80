//! Against an unreliable CRM: every customer arrives, none twice, each ingest message gets exactly
//! one outcome, and refusals land in the dead subject with the CRM's answer.

mod common;

use std::time::Duration;

use common::{Pipeline, customer, customers, start_mock};
use crm_mock::CrmMockConfig;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_customer_reaches_a_faulty_crm_exactly_once() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(
        CrmMockConfig {
            failure_rate: 0.20,
            rate_limit_rate: 0.05,
            retry_after_secs: 1,
            timeout_rate: 0.02,
            hang_ms: 1_000,
            seed: 7,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    let pipeline = Pipeline::new().await?;
    let records = customers("f", 150);
    pipeline.publish_all(&records).await?;

    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let outcomes = pipeline
        .wait_for_outcomes(records.len(), Duration::from_secs(120))
        .await?;

    let stats = mock.stats();
    assert_eq!(stats.duplicate_effects, 0, "{stats:?}");
    assert!(
        outcomes.dead.is_empty(),
        "dead letters: {:?}",
        outcomes.dead
    );
    assert_eq!(stats.customers, records.len() as u64, "{stats:?}");
    assert_eq!(outcomes.synced.len(), records.len());
    assert!(
        stats.injected.error > 0 && stats.injected.rate_limited > 0,
        "the faults were exercised: {stats:?}"
    );
    shutdown.cancel();
    running.wait().await?;
    Ok(())
}

/// The fault mix at the mock's defaults (`Retry-After: 1`, 30-s hangs) on a
/// MOCK_DATA-sized input: random faults cost each record its own retry and never stop the fleet,
/// so it drains in seconds (the figure is in BENCHMARKS.md; the deadline here only bounds the wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_records_drain_through_random_5xx_429s_and_hangs() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(
        CrmMockConfig {
            failure_rate: 0.20,
            rate_limit_rate: 0.05,
            timeout_rate: 0.02,
            seed: 12,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    assert_eq!(
        (mock.config().retry_after_secs, mock.config().hang_ms),
        (1, 30_000)
    );
    let pipeline = Pipeline::new().await?;
    let records = customers("m", 1_000);
    pipeline.publish_all(&records).await?;

    let mut config = pipeline.config(&mock.url)?;
    // The production deadlines: a hang is cut by what the CRM's answer times teach, not by a
    // short test setting.
    config.settings.request_timeout = Duration::from_secs(10);
    config.settings.min_request_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let running = crm_integrator::start(config, shutdown.clone()).await?;
    let outcomes = pipeline
        .wait_for_outcomes(records.len(), Duration::from_secs(120))
        .await?;
    eprintln!(
        "1,000 records drained in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let stats = mock.stats();
    assert_eq!(stats.duplicate_effects, 0, "{stats:?}");
    assert_eq!(stats.customers, records.len() as u64, "{stats:?}");
    assert!(
        outcomes.dead.is_empty(),
        "dead letters: {:?}",
        outcomes.dead
    );
    assert_eq!(outcomes.synced.len(), records.len());
    assert!(
        stats.injected.error > 100
            && stats.injected.rate_limited > 20
            && stats.injected.timeout > 5,
        "the faults were exercised: {stats:?}"
    );
    let pause = pipeline
        .control()
        .await?
        .get(crm_integrator::PAUSE_KEY)
        .await?;
    assert!(pause.is_none(), "random 429s paused the fleet: {pause:?}");
    assert!(!running.integrator.gate().breaker_open());
    shutdown.cancel();
    running.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_customer_becomes_one_update() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;

    let first = customer("c1", "Ada");
    pipeline.publish(&first, 2).await?;
    pipeline
        .wait_for_outcomes(1, Duration::from_secs(20))
        .await?;
    let changed = customer("c1", "Adelaide");
    pipeline.publish(&changed, 3).await?;
    // The same row read again: the stream drops it by its dedup id, so still two messages.
    pipeline.publish(&changed, 3).await?;
    let outcomes = pipeline
        .wait_for_outcomes(2, Duration::from_secs(20))
        .await?;

    let stats = mock.stats();
    assert_eq!((stats.created, stats.updated), (1, 1), "{stats:?}");
    assert_eq!(stats.duplicate_effects, 0);
    assert_eq!(common::crm_holds(&mock, "c1").await?, Some(changed));
    let actions: Vec<_> = outcomes.synced.iter().map(|o| o.action).collect();
    use sync_topology::messages::SyncAction;
    assert_eq!(actions, vec![SyncAction::Created, SyncAction::Updated]);
    shutdown.cancel();
    running.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_is_dead_lettered_with_the_crm_answer() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;

    // The reader would reject this row; the CRM is the last line and answers 422.
    let mut refused = customer("bad1", "Bob");
    refused.email = "not-an-address".to_owned();
    pipeline.publish(&refused, 2).await?;
    pipeline.publish(&customer("good1", "Gina"), 3).await?;
    let outcomes = pipeline
        .wait_for_outcomes(2, Duration::from_secs(20))
        .await?;

    assert_eq!(outcomes.dead.len(), 1, "{outcomes:?}");
    let dead = &outcomes.dead[0];
    assert_eq!(dead.customer_id, "bad1");
    assert_eq!(dead.crm_status, Some(422));
    let body = dead.crm_body.as_deref().unwrap_or_default();
    assert!(body.contains("email"), "the CRM's body is kept: {body}");
    assert_eq!(dead.customer.as_ref(), Some(&refused));
    assert_eq!(dead.attempts, 1);
    assert_eq!(outcomes.synced.len(), 1);
    assert_eq!(pipeline.unacked().await?, 0, "both messages acknowledged");
    shutdown.cancel();
    running.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_before_resending_keep_a_crm_without_idempotency_duplicate_free()
-> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // Half of the timeouts apply the change before hanging; a blind resend would apply it twice.
    let mock = start_mock(
        CrmMockConfig {
            timeout_rate: 0.3,
            hang_ms: 1_000,
            no_idempotency: true,
            seed: 11,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    let pipeline = Pipeline::new().await?;
    let records = customers("n", 80);
    pipeline.publish_all(&records).await?;
    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let outcomes = pipeline
        .wait_for_outcomes(records.len(), Duration::from_secs(90))
        .await?;

    let stats = mock.stats();
    assert!(stats.injected.timeout > 0, "{stats:?}");
    assert_eq!(stats.duplicate_effects, 0, "{stats:?}");
    assert_eq!(stats.customers, records.len() as u64);
    assert!(outcomes.dead.is_empty(), "{:?}", outcomes.dead);
    let found_present = outcomes
        .synced
        .iter()
        .filter(|o| o.action == sync_topology::messages::SyncAction::AlreadyPresent)
        .count();
    assert!(
        found_present > 0,
        "some applied-then-timed-out sends were found by lookup"
    );
    shutdown.cancel();
    running.wait().await?;
    Ok(())
}
