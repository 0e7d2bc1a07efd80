//! End to end under faults: a 50,000-row file through crm-mock with 20% errors, 5% 429s and 2%
//! timeouts; three integrators, one killed with SIGKILL and restarted every few seconds; the NATS
//! server restarted once mid-run; PostgreSQL restarted once; the reader killed once and resumed.
//! At the end nothing is lost, nothing is pending, no customer reached the CRM twice, and the
//! reconciliation is exact.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use e2e::expect::expected_from_csv;
use e2e::pipeline::{MockFaults, Pipeline, PipelineEnv, Service, describe};
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
        // The mock's default `Retry-After: 1`: random 429s delay their own records, never the
        // fleet (crm-integrator's fault policy).
        extra: Vec::new(),
    };
    let mut pipeline =
        Pipeline::start(env.clone(), faults, 3, &["--request-timeout", "500ms"]).await?;

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
    // Its log goes beside the services', so a run that stalls shows what the reader was doing.
    let mut resumed = Service::spawn(
        &env,
        "csv-reader",
        &[file_arg.clone(), "--resume".to_owned()],
        pipeline.log_dir.path(),
        "csv-reader-resumed",
    )
    .await?;

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
        // Chaos lasts until the reader is done, both servers were restarted and most customers
        // went through; the tail (records in retry backoff) then drains without kills.
        let reader_done = resumed.child.try_wait()?.is_some();
        let crm_customers = pipeline
            .crm_stats()
            .await
            .ok()
            .and_then(|s| s["customers"].as_u64())
            .unwrap_or(0);
        if reader_done && pg_restarted && crm_customers * 10 >= expected.last_hash.len() as u64 * 9
        {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "chaos run made too little progress: {crm_customers} of {} customers in the CRM \
             (reader done: {reader_done}){}\n=== csv-reader (resumed) ===\n{}",
            expected.last_hash.len(),
            pipeline.logs(),
            resumed.log_tail()
        );
    }
    let status = resumed.child.wait().await?;
    anyhow::ensure!(
        status.success(),
        "resumed reader failed with {status}:\n{}",
        resumed.log_tail()
    );

    pipeline.wait_drained(Duration::from_secs(300)).await?;

    let stats = pipeline.crm_stats().await?;
    assert_eq!(
        stats["duplicate_effects"], 0,
        "no duplicate in the CRM: {stats:#}"
    );
    // Every valid id ends with its last version either confirmed (in `customers`) or, if the CRM
    // kept failing it past max-deliver, in `dead_letters`: never lost, never an older version.
    let client = db.client().await?;
    let synced: HashMap<String, String> = client
        .query("SELECT id, content_hash FROM customers", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let dead: HashSet<(String, String)> = client
        .query("SELECT customer_id, content_hash FROM dead_letters", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (id, hash) in &expected.last_hash {
        let confirmed = synced.get(id).is_some_and(|h| h == hash.as_str());
        let dead_lettered = dead.contains(&(id.clone(), hash.as_str().to_owned()));
        assert!(
            confirmed || dead_lettered,
            "customer {id}: last version {hash} neither synced ({:?}) nor dead-lettered",
            synced.get(id)
        );
    }
    assert!(
        synced.keys().all(|id| expected.last_hash.contains_key(id)),
        "no unexpected customer"
    );
    assert!(
        dead.len() * 100 <= expected.last_hash.len(),
        "dead letters stay rare with 10 deliveries per record: {}",
        dead.len()
    );
    let rejected: i64 = client
        .query_one("SELECT count(*) FROM rejected_rows", &[])
        .await?
        .get(0);
    assert_eq!(rejected as usize, expected.rejected_lines.len());
    let status = env.status().await?;
    assert_eq!(status["reconciled"], true, "{status:#}");
    assert_eq!(status["difference"], 0, "{status:#}");
    pipeline.verify().await?;
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
