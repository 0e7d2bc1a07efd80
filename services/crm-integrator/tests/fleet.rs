//! Several replicas on one consumer: they divide the work, keep a customer's versions in order,
//! and all obey a pause one of them was asked for.

mod common;

use std::time::Duration;

use common::{Pipeline, customer, customers, start_mock};
use crm_integrator::{PAUSE_KEY, PauseNotice, Settled};
use crm_mock::CrmMockConfig;
use sync_topology::messages::SyncAction;
use sync_topology::{IngestMessage, Version, ids};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_work() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(
        CrmMockConfig {
            latency_ms: 20,
            jitter_ms: 10,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    let pipeline = Pipeline::new().await?;
    let records = customers("s", 300);
    pipeline.publish_all(&records).await?;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mut config = pipeline.config(&mock.url)?;
        // Small fixed windows so no replica can take the whole stream in one pull.
        config.settings.concurrency = Some(4);
        config.settings.fetch_batch = 4;
        replicas.push(crm_integrator::start(config, shutdown.clone()).await?);
    }
    let outcomes = pipeline
        .wait_for_outcomes(records.len(), Duration::from_secs(60))
        .await?;

    let shares: Vec<u64> = replicas
        .iter()
        .map(|r| r.integrator.settled_messages())
        .collect();
    assert_eq!(
        shares.iter().sum::<u64>(),
        records.len() as u64,
        "{shares:?}"
    );
    assert!(
        shares.iter().all(|&n| n > 0),
        "every replica worked: {shares:?}"
    );
    let stats = mock.stats();
    assert_eq!(stats.customers, records.len() as u64);
    assert_eq!(stats.duplicate_effects, 0);
    assert_eq!(outcomes.synced.len(), records.len());
    shutdown.cancel();
    for replica in replicas {
        replica.wait().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_processed_out_of_order_leave_the_newest_in_the_crm() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let versions: Vec<_> = ["V1", "V2", "V3"]
        .iter()
        .map(|name| customer("o1", name))
        .collect();
    let seqs = pipeline.publish_all(&versions).await?;

    // Take the three deliveries by hand and settle them newest first, as racing replicas might.
    let integrator =
        crm_integrator::connect(&pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let mut messages = common::take(&pipeline, 3).await?;
    let newest = messages.pop().expect("three messages");
    assert_eq!(
        crm_integrator::process_message(&integrator, newest).await?,
        Settled::Synced(SyncAction::Created)
    );
    for older in messages {
        assert!(matches!(
            crm_integrator::process_message(&integrator, older).await?,
            Settled::Superseded { .. }
        ));
    }
    assert_eq!(
        common::crm_holds(&mock, "o1").await?,
        versions.last().cloned()
    );

    // And with replicas racing on many versions of a few customers, the newest still wins.
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mut config = pipeline.config(&mock.url)?;
        config.settings.concurrency = Some(8);
        replicas.push(crm_integrator::start(config, shutdown.clone()).await?);
    }
    let mut newest = Vec::new();
    for round in 0..8 {
        for (n, id) in ["r1", "r2", "r3"].into_iter().enumerate() {
            let version = customer(id, &format!("Round{round}"));
            // One row per line, as in a file: line numbers make the versions.
            pipeline
                .publish(&version, 10 + round * 3 + n as u64)
                .await?;
            if round == 7 {
                newest.push(version);
            }
        }
    }
    pipeline
        .wait_for_outcomes(seqs.len() + 24, Duration::from_secs(60))
        .await?;
    for version in newest {
        assert_eq!(
            common::crm_holds(&mock, &version.id).await?,
            Some(version.clone())
        );
    }
    assert_eq!(mock.stats().duplicate_effects, 0);
    shutdown.cancel();
    for replica in replicas {
        replica.wait().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_copy_of_an_old_version_never_passes_for_the_newest() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let old = customer("p1", "Old");
    let new = customer("p1", "New");
    let seqs = pipeline.publish_all(&[old.clone(), new.clone()]).await?;
    let replica = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;
    pipeline
        .wait_for_outcomes(2, Duration::from_secs(30))
        .await?;
    assert_eq!(common::crm_holds(&mock, "p1").await?, Some(new.clone()));

    // `syncctl replay` republishes the old version: a newer stream sequence, but it keeps the
    // version it copies (line 2 of the test's load).
    let copy = IngestMessage::from_row(old.clone(), Version::row(pipeline.load, 2), "test.csv", 2)
        .copy(Some(seqs[0]), false);
    let id = ids::ingest_copy(ids::CopyKind::Replay, &copy.version, "test");
    let copy_seq = pipeline.publish_message(&copy, &id).await?;
    let outcomes = pipeline
        .wait_for_outcomes(3, Duration::from_secs(30))
        .await?;
    assert!(
        outcomes.superseded.iter().any(|o| o.ingest_seq == copy_seq
            && o.version == copy.version
            && o.superseded_by == Version::row(pipeline.load, 3)),
        "the copy is recorded as superseded by the newer version: {outcomes:?}"
    );
    // The original line 2 may have been synced before line 3 was (both were in hand at once);
    // what matters is that the copy never is, and the CRM ends with line 3.
    assert!(
        outcomes.synced.iter().all(|o| o.ingest_seq != copy_seq),
        "the copy is never synced: {outcomes:?}"
    );
    assert_eq!(common::crm_holds(&mock, "p1").await?, Some(new));
    assert_eq!(mock.stats().duplicate_effects, 0);
    shutdown.cancel();
    replica.wait().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_asked_of_one_replica_holds_the_others() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // Replica A talks to a CRM that answers every request with 429 and Retry-After: 3: after the
    // refusals have lasted a second (the records' own retries), that is overload, not noise.
    let limiting = start_mock(
        CrmMockConfig {
            rate_limit_rate: 1.0,
            retry_after_secs: 3,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    // Replica B talks to a healthy one, so any request B makes shows up in its stats.
    let healthy = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let control = pipeline.control().await?;

    let a_stop = CancellationToken::new();
    let a = crm_integrator::start(pipeline.config(&limiting.url)?, a_stop.clone()).await?;
    let first = customers("first", 30);
    pipeline.publish_all(&first).await?;
    let notice: PauseNotice =
        e2e::wait_for("the pause notice", Duration::from_secs(20), || async {
            let entry = control.get(PAUSE_KEY).await.ok()??;
            serde_json::from_slice(&entry).ok()
        })
        .await?;
    assert_eq!(notice.set_by, a.integrator.replica());
    assert!(notice.reason.contains("were 429"), "{}", notice.reason);
    let length = notice.until_ms - notice.since_ms;
    assert!((3_000..=60_000).contains(&length), "{length} ms");
    a_stop.cancel();
    a.wait().await?;

    let b = crm_integrator::start(pipeline.config(&healthy.url)?, shutdown.clone()).await?;
    for i in 1..=5 {
        pipeline
            .publish(&customer(&format!("p{i}"), "Next"), i + 40)
            .await?;
    }
    let total = first.len() + 5;
    e2e::wait_for(
        "replica B to send after the pause",
        Duration::from_secs(30),
        || async { (healthy.stats().requests > 0).then_some(()) },
    )
    .await?;
    let first_request_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        first_request_ms >= notice.until_ms - 100,
        "B sent {} ms before the shared pause ended",
        notice.until_ms - first_request_ms
    );
    pipeline
        .wait_for_outcomes(total, Duration::from_secs(30))
        .await?;
    assert_eq!(healthy.stats().customers, total as u64);
    assert_eq!(b.integrator.settled_messages(), total as u64);
    shutdown.cancel();
    b.wait().await?;
    Ok(())
}
