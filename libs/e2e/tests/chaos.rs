//! End to end under faults: a 50,000-row file through crm-mock with 20% errors, 5% 429s and 2%
//! timeouts; three integrators, one killed with SIGKILL and restarted every few seconds; the NATS
//! server restarted once mid-run; PostgreSQL restarted once; the reader killed once and resumed.
//! At the end nothing is lost, nothing is pending, no customer reached the CRM twice, and the
//! reconciliation is exact.

use std::path::Path;
use std::time::Duration;

use e2e::expect::expected_from_csv;
use e2e::pipeline::{MockFaults, Pipeline, PipelineEnv, describe};
use e2e::{PrivateNats, PrivatePostgres, TestDatabase, stream_messages, wait_for};
use sync_topology::Names;

const ROWS: &str = "50000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_lost_nothing_twice_whatever_fails() -> anyhow::Result<()> {
    let mut nats = PrivateNats::start().await?;
    let pg = PrivatePostgres::start().await?;
    let db = TestDatabase::create_on(&pg.url()).await?;
    let env = PipelineEnv::new(&nats.url(), &db.url);
    let names = Names::new(&env.namespace)?;
    let ingest = names.ingest_stream();

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("chaos.csv");
    generate(&env, &file).await?;
    let expected = expected_from_csv(&file)?;

    let faults = MockFaults {
        failure_rate: 0.20,
        rate_limit_rate: 0.05,
        timeout_rate: 0.02,
        hang_ms: 1500,
        latency_ms: 1,
        extra: Vec::new(),
    };
    let mut pipeline =
        Pipeline::start(env.clone(), faults, 3, &["--request-timeout-ms", "500"]).await?;

    // The reader, killed once mid-file, then resumed.
    let file_arg = file.display().to_string();
    let mut reader = env.command("csv-reader")?.arg(&file_arg).spawn()?;
    let url = nats.url();
    wait_for(
        "the reader to publish 5,000 rows",
        Duration::from_secs(60),
        || {
            let (url, ingest) = (url.clone(), ingest.clone());
            async move { stream_messages(&url, &ingest).await.filter(|n| *n >= 5_000) }
        },
    )
    .await?;
    reader.start_kill()?;
    reader.wait().await?;
    let mut resumed = env
        .command("csv-reader")?
        .args([file_arg.as_str(), "--resume"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;

    // One integrator killed and restarted every few seconds, for as long as the run takes.
    let mut kills = tokio::time::interval(Duration::from_secs(3));
    kills.tick().await;
    let mut nats_restarted = false;
    let mut pg_restarted = false;
    let mut rounds = 0u32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(480);
    loop {
        kills.tick().await;
        rounds += 1;
        pipeline.integrators[0].kill().await?;
        pipeline.respawn_integrator(0).await?;
        if rounds == 2 && !nats_restarted {
            nats.restart().await?;
            nats_restarted = true;
        }
        if rounds == 4 && !pg_restarted {
            pg.stop().await?;
            pg.start_again().await?;
            pg_restarted = true;
        }
        let reader_done = resumed.try_wait()?.is_some();
        let synced = pipeline.crm_stats().await.ok();
        let crm_customers = synced
            .as_ref()
            .and_then(|s| s["customers"].as_u64())
            .unwrap_or(0);
        if reader_done && pg_restarted && crm_customers >= expected.last_hash.len() as u64 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "chaos run did not finish: {crm_customers} of {} customers in the CRM{}",
            expected.last_hash.len(),
            pipeline.logs()
        );
    }
    let reader_out = resumed.wait_with_output().await?;
    anyhow::ensure!(
        reader_out.status.success(),
        "resumed reader failed: {}",
        describe(&reader_out)
    );

    pipeline.wait_drained(Duration::from_secs(300)).await?;

    let stats = pipeline.crm_stats().await?;
    assert_eq!(
        stats["duplicate_effects"], 0,
        "no duplicate in the CRM: {stats:#}"
    );
    assert_eq!(
        stats["customers"].as_u64(),
        Some(expected.last_hash.len() as u64),
        "{stats:#}"
    );
    let client = db.client().await?;
    let rows = client
        .query("SELECT id, content_hash FROM customers", &[])
        .await?;
    assert_eq!(rows.len(), expected.last_hash.len());
    for row in rows {
        let id: String = row.get(0);
        let hash: String = row.get(1);
        assert_eq!(
            Some(hash.as_str()),
            expected.last_hash.get(&id).map(|h| h.as_str()),
            "customer {id} holds its last version"
        );
    }
    let rejected: i64 = client
        .query_one("SELECT count(*) FROM rejected_rows", &[])
        .await?
        .get(0);
    assert_eq!(rejected as usize, expected.rejected_lines.len());
    let status = env.status().await?;
    assert_eq!(status["reconciled"], true, "{status:#}");
    assert_eq!(status["difference"], 0, "{status:#}");
    pipeline.stop().await
}

async fn generate(env: &PipelineEnv, file: &Path) -> anyhow::Result<()> {
    let path = file.display().to_string();
    let out = env
        .run(
            "syncctl",
            &[
                "gen-csv",
                "--rows",
                ROWS,
                "--bad-rate",
                "0.01",
                "--dup-rate",
                "0.02",
                "--change-rate",
                "0.03",
                "--seed",
                "99",
                "--output",
                &path,
            ],
        )
        .await?;
    anyhow::ensure!(out.status.success(), "gen-csv: {}", describe(&out));
    Ok(())
}
