//! The real binary as a child process: SIGKILL mid-send loses nothing and sends nothing twice
//! (a surviving replica finishes the work, looking up what the dead one may have sent), and
//! SIGTERM drains in-flight work and exits 0.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Pipeline, customers, start_mock};
use crm_mock::CrmMockConfig;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

fn spawn_replica(pipeline: &Pipeline, crm_url: &str, extra: &[&str]) -> anyhow::Result<Child> {
    let child = Command::new(e2e::binary("crm-integrator")?)
        .env("NATS_URL", &pipeline.nats_url)
        .env("SYNC_NAMESPACE", pipeline.names.namespace())
        .env("CRM_URL", crm_url)
        .env("RUST_LOG", "warn")
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    Ok(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_send_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // Slow answers keep requests in flight when the kill comes; no idempotency, so only the
    // lookup before resending stands between a resend and a duplicate.
    let mock = start_mock(
        CrmMockConfig {
            latency_ms: 1_500,
            no_idempotency: true,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    let pipeline = Pipeline::new().await?;
    let records = customers("k", 40);
    pipeline.publish_all(&records).await?;

    let mut doomed = spawn_replica(
        &pipeline,
        &mock.url,
        &["--concurrency", "16", "--request-timeout", "4s"],
    )?;
    e2e::wait_for(
        "the child to have requests in flight",
        Duration::from_secs(30),
        || async { (mock.stats().concurrency_current >= 8).then_some(()) },
    )
    .await?;
    doomed.kill().await?;
    let in_flight_at_kill = mock.stats().concurrency_current;

    let mut config = pipeline.config(&mock.url)?;
    config.settings.request_timeout = Duration::from_secs(4);
    config.settings.concurrency = Some(16);
    let survivor = crm_integrator::start(config, shutdown.clone()).await?;
    let outcomes = pipeline
        .wait_for_outcomes(records.len(), Duration::from_secs(90))
        .await?;

    let stats = mock.stats();
    assert_eq!(stats.duplicate_effects, 0, "{stats:?}");
    assert_eq!(stats.customers, records.len() as u64, "{stats:?}");
    assert!(outcomes.dead.is_empty(), "{:?}", outcomes.dead);
    assert_eq!(outcomes.synced.len(), records.len());
    assert!(in_flight_at_kill > 0 || stats.created > 0);
    assert_eq!(pipeline.unacked().await?, 0);
    shutdown.cancel();
    survivor.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_exits_zero() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(
        CrmMockConfig {
            latency_ms: 300,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    let pipeline = Pipeline::new().await?;
    let records = customers("t", 200);
    pipeline.publish_all(&records).await?;
    let mut child = spawn_replica(&pipeline, &mock.url, &["--concurrency", "8"])?;
    e2e::wait_for("requests in flight", Duration::from_secs(30), || async {
        (mock.stats().concurrency_current > 0).then_some(())
    })
    .await?;
    e2e::terminate(&child)?;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
    assert!(status.success(), "exit status {status:?}");

    // Everything the CRM applied has its outcome: the drain finished what it had started.
    let outcomes = pipeline.outcomes().await?;
    let stats = mock.stats();
    assert!(stats.created > 0);
    assert_eq!(outcomes.synced.len() as u64, stats.created, "{stats:?}");
    assert_eq!(stats.concurrency_current, 0);
    Ok(())
}
