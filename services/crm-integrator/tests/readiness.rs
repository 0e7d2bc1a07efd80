//! `/readyz` means it: a replica whose CRM cannot be reached (its breaker open) is not ready, and
//! says so naming the CRM's address and the error, in its heartbeat too; once the CRM answers it
//! is ready again and every record goes through. A replica that stops cleanly removes its
//! heartbeat.

mod common;

use std::time::Duration;

use common::{Pipeline, customers};
use crm_mock::CrmMockConfig;
use sync_topology::messages::{ReplicaHeartbeat, replica_key};
use tokio_util::sync::CancellationToken;

/// `/readyz`'s status and body.
async fn readyz(http: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let response = http.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_crm_makes_a_replica_not_ready_until_it_answers() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::new().await?;
    let port = e2e::free_port()?;
    let mut config = pipeline.config(&format!("http://127.0.0.1:{port}"))?;
    config.settings.breaker.min_requests = 5;
    let records = customers("r", 20);
    pipeline.publish_all(&records).await?;

    let running = crm_integrator::start(config, shutdown.clone()).await?;
    let url = format!("http://{}/readyz", running.metrics_addr);
    let http = reqwest::Client::new();
    let (_, reason) = e2e::wait_for(
        "/readyz to say the CRM fails",
        Duration::from_secs(20),
        || async {
            let (status, body) = readyz(&http, &url).await?;
            (status == 503 && body.contains("CRM at")).then_some((status, body))
        },
    )
    .await?;
    assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
    assert!(
        reason.to_lowercase().contains("connection refused"),
        "{reason}"
    );
    assert!(reason.contains("circuit breaker open"), "{reason}");

    let control = pipeline.control().await?;
    let key = replica_key(running.integrator.replica());
    let beat = e2e::wait_for(
        "a heartbeat with the open breaker",
        Duration::from_secs(10),
        || async {
            let value = control.get(&key).await.ok()??;
            let beat: ReplicaHeartbeat = serde_json::from_slice(&value).ok()?;
            (beat.breaker != "closed" && beat.not_ready.is_some()).then_some(beat)
        },
    )
    .await?;
    assert!(
        beat.not_ready
            .as_deref()
            .is_some_and(|r| r.contains("CRM at")),
        "{beat:?}"
    );

    // The CRM comes up where the replica looks for it.
    let mock = crm_mock::start(
        CrmMockConfig {
            listen: format!("127.0.0.1:{port}").parse()?,
            ..CrmMockConfig::default()
        },
        shutdown.clone(),
    )
    .await?;
    e2e::wait_for("/readyz to say ready", Duration::from_secs(40), || async {
        let (status, body) = readyz(&http, &url).await?;
        (status == 200 && body.trim() == "ready").then_some(())
    })
    .await?;
    let outcomes = pipeline
        .wait_for_outcomes(records.len(), Duration::from_secs(60))
        .await?;
    assert_eq!(outcomes.synced.len(), records.len());
    assert_eq!(mock.stats().duplicate_effects, 0);

    shutdown.cancel();
    running.wait().await?;
    assert!(
        control.get(&key).await?.is_none(),
        "the replica left its heartbeat behind"
    );
    Ok(())
}
