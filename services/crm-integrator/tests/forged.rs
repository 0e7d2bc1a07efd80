//! Integrity where NATS permissions cannot help (a forger who got past them, or a server without
//! them): a forged `Sync-Force-Resend` applies nothing twice, an ingest version no reader made is
//! never sent, and a pause notice of any length holds the fleet no longer than `--max-pause`.

mod common;

use std::time::Duration;

use common::{Pipeline, customer, start_mock};
use crm_mock::CrmMockConfig;
use sync_topology::messages::{PAUSE_KEY, PauseNotice, SyncAction};
use sync_topology::{IngestMessage, Version, ids};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `Sync-Force-Resend` is what `syncctl replay --force` sets for a CRM that lost data. Anyone who
/// can publish on the ingest subject can set it too; a forced copy therefore looks the customer up
/// first and writes only when the CRM's copy differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_resend_writes_only_what_the_crm_lost() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let record = customer("forced", "Ada");
    pipeline.publish(&record, 2).await?;
    pipeline.wait_for_outcomes(1, PATIENCE).await?;

    // Forged (or mistaken) forced copies of a version the CRM holds: looked up, never written.
    for n in 0..3 {
        pipeline.publish_forced(&record, 2).await?;
        let outcomes = pipeline.wait_for_outcomes(2 + n, PATIENCE).await?;
        let last = outcomes.synced.last().map(|o| o.action);
        assert_eq!(last, Some(SyncAction::AlreadyPresent), "{outcomes:?}");
    }
    let stats = mock.stats();
    assert_eq!((stats.created, stats.updated), (1, 0), "{stats:?}");
    assert_eq!(stats.duplicate_effects, 0, "{stats:?}");

    // The case --force exists for: the CRM lost the customer, and the forced copy restores it.
    let reset = reqwest::Client::new()
        .post(format!("{}/reset", mock.url))
        .send()
        .await?;
    assert!(reset.status().is_success());
    assert_eq!(common::crm_holds(&mock, "forced").await?, None);
    pipeline.publish_forced(&record, 2).await?;
    let outcomes = pipeline.wait_for_outcomes(5, PATIENCE).await?;
    assert_eq!(
        outcomes.synced.last().map(|o| o.action),
        Some(SyncAction::Created)
    );
    assert_eq!(common::crm_holds(&mock, "forced").await?, Some(record));
    assert_eq!(mock.stats().duplicate_effects, 0);
    shutdown.cancel();
    running.wait().await
}

/// A load is the reader's clock reading: a version an hour ahead was made by no reader, and would
/// outrank every real version of the customer until then. It is dead-lettered, never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_version_from_the_future_is_never_sent() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let hour_ahead = u64::try_from(now_ms())? + 3_600_000;
    let forged = IngestMessage::from_row(
        customer("pinned", "Forged"),
        Version::row(hour_ahead, 2),
        "forged.csv",
        2,
    );
    pipeline
        .publish_message(&forged, &ids::ingest_row(&forged.version))
        .await?;
    let real = customer("pinned", "Real");
    pipeline.publish(&real, 2).await?;
    let outcomes = pipeline.wait_for_outcomes(2, PATIENCE).await?;
    assert_eq!(outcomes.dead.len(), 1, "{outcomes:?}");
    assert!(
        outcomes.dead[0].reason.contains("past this host's clock"),
        "{}",
        outcomes.dead[0].reason
    );
    assert_eq!(common::crm_holds(&mock, "pinned").await?, Some(real));
    shutdown.cancel();
    running.wait().await
}

/// Anyone who can write the control bucket can ask the fleet to pause for a year; every integrator
/// holds at most `--max-pause`, from when it read the notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_notice_of_any_length_holds_no_longer_than_the_cap() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let notice = PauseNotice {
        until_ms: now_ms() + 365 * 24 * 3_600_000,
        set_by: "forger".to_owned(),
        reason: "forged".to_owned(),
        since_ms: now_ms(),
    };
    pipeline
        .control()
        .await?
        .put(PAUSE_KEY, serde_json::to_vec(&notice)?.into())
        .await?;
    let mut config = pipeline.config(&mock.url)?;
    config.settings.max_pause = Duration::from_millis(1_500);
    let running = crm_integrator::start(config, shutdown.clone()).await?;
    let held = running.integrator.gate().paused_for();
    assert!(
        held.is_some_and(|h| h <= Duration::from_millis(1_500)),
        "{held:?}"
    );
    pipeline.publish(&customer("p1", "Ada"), 2).await?;
    let outcomes = pipeline.wait_for_outcomes(1, PATIENCE).await?;
    assert_eq!(outcomes.synced.len(), 1, "{outcomes:?}");
    assert_eq!(mock.stats().created, 1);
    shutdown.cancel();
    running.wait().await
}
