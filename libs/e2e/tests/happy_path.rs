//! End to end, happy path: the real binaries as processes against the shared NATS and a database of
//! the test's own. Every valid id lands exactly once with its last version, bad rows are rejected
//! with line and reason, the CRM never sees a duplicate, and the reconciliation is exact.

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::expect::{Expected, expected_from_csv};
use e2e::pipeline::{MockFaults, Pipeline, PipelineEnv, describe};
use e2e::{TestDatabase, nats_url, workspace_root};

async fn sync_file(pipeline: &Pipeline, file: &Path) -> anyhow::Result<()> {
    let path = file.display().to_string();
    let out = pipeline.env.run("csv-reader", &[&path]).await?;
    anyhow::ensure!(
        out.status.success(),
        "csv-reader failed: {}",
        describe(&out)
    );
    pipeline.wait_drained(Duration::from_secs(300)).await
}

async fn assert_database_matches(db: &TestDatabase, expected: &Expected) -> anyhow::Result<()> {
    let client = db.client().await?;
    let rows = client
        .query("SELECT id, content_hash FROM customers", &[])
        .await?;
    assert_eq!(
        rows.len(),
        expected.last_hash.len(),
        "one row per distinct valid id"
    );
    for row in rows {
        let id: String = row.get(0);
        let hash: String = row.get(1);
        let want = expected
            .last_hash
            .get(&id)
            .unwrap_or_else(|| panic!("unexpected customer {id} in the table"));
        assert_eq!(hash, want.as_str(), "customer {id} holds its last version");
    }
    let rejected: Vec<i64> = client
        .query("SELECT line FROM rejected_rows ORDER BY line", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<i64> = expected.rejected_lines.iter().map(|l| *l as i64).collect();
    assert_eq!(rejected, want, "every bad row rejected with its line");
    Ok(())
}

async fn assert_reconciled(pipeline: &Pipeline) -> anyhow::Result<()> {
    let status = pipeline.env.status().await?;
    assert_eq!(
        status["reconciled"],
        serde_json::Value::Bool(true),
        "status must reconcile: {status:#}"
    );
    assert_eq!(status["difference"], serde_json::json!(0), "{status:#}");
    let stats = pipeline.crm_stats().await?;
    assert_eq!(
        stats["duplicate_effects"], 0,
        "no customer applied twice: {stats:#}"
    );
    // Content, not counts: every customer's newest version in customers, the ledger and the CRM.
    let verified = pipeline.verify().await?;
    assert_eq!(
        verified["crm"]["checked"], verified["customers"],
        "{verified:#}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_file_syncs_as_it_is() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats_url()?, &db.url);
    let pipeline = Pipeline::start(env, MockFaults::default(), 2, &[]).await?;
    let sample = workspace_root().join("libs/e2e/testdata/MOCK_DATA.csv");
    let expected = expected_from_csv(&sample)?;
    assert_eq!(expected.last_hash.len(), 1000);

    sync_file(&pipeline, &sample).await?;

    assert_database_matches(&db, &expected).await?;
    assert_reconciled(&pipeline).await?;
    let stats = pipeline.crm_stats().await?;
    assert_eq!(stats["customers"], 1000, "{stats:#}");
    pipeline.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_file_with_bad_rows_repeats_and_changes_syncs_exactly() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats_url()?, &db.url);
    let dir = tempfile::tempdir()?;
    let file: PathBuf = dir.path().join("generated.csv");
    let file_arg = file.display().to_string();
    let out = env
        .run(
            "syncctl",
            &[
                "gen-csv",
                "--rows",
                "5000",
                "--bad-rate",
                "0.03",
                "--dup-rate",
                "0.05",
                "--change-rate",
                "0.05",
                "--seed",
                "3",
                "--output",
                &file_arg,
            ],
        )
        .await?;
    anyhow::ensure!(out.status.success(), "gen-csv failed: {}", describe(&out));
    let expected = expected_from_csv(&file)?;
    assert!(!expected.rejected_lines.is_empty(), "the file has bad rows");

    let pipeline = Pipeline::start(env, MockFaults::default(), 2, &[]).await?;
    sync_file(&pipeline, &file).await?;
    assert_database_matches(&db, &expected).await?;
    assert_reconciled(&pipeline).await?;

    // Reading the same file again (it was read completely) publishes nothing and changes nothing.
    sync_file(&pipeline, &file).await?;
    assert_database_matches(&db, &expected).await?;
    assert_reconciled(&pipeline).await?;
    pipeline.stop().await
}
