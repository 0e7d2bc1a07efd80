//! End to end, the newest version wins: a NATS server killed while the reader publishes (rows
//! stored out of file order), a value that changes and changes back inside and after the dedup
//! window, files read again in any order, a deliberate reload of an older file, and an ingest
//! stream deleted and recreated (sequences handed out again). Each run ends with `syncctl verify`
//! checking every customer's content in `customers`, the ledger and the CRM.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use customer_record::{ContentHash, CustomerRecord};
use e2e::pipeline::{MockFaults, Pipeline, PipelineEnv, describe};
use e2e::{PrivateNats, TestDatabase, nats_url, stream_messages, wait_for};
use sync_topology::Names;

/// Writes a CSV of `(id, first_name)` rows, one per line in order, e-mails derived from the id.
fn write_csv(dir: &Path, name: &str, rows: &[(String, String)]) -> anyhow::Result<PathBuf> {
    let mut text = String::from("id,first_name,last_name,email\n");
    for (id, first_name) in rows {
        writeln!(text, "{id},{first_name},Tester,{id}@example.com")?;
    }
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn record(id: &str, first_name: &str) -> CustomerRecord {
    CustomerRecord::normalised(
        id,
        first_name,
        "Tester",
        &format!("{id}@example.com"),
        None,
        Default::default(),
    )
}

async fn read(env: &PipelineEnv, file: &Path, extra: &[&str]) -> anyhow::Result<()> {
    let mut args = vec![file.to_str().unwrap_or_default()];
    args.extend(extra);
    let out = env.run("csv-reader", &args).await?;
    anyhow::ensure!(out.status.success(), "csv-reader: {}", describe(&out));
    Ok(())
}

/// The content hash `customers` holds per id.
async fn customers(db: &TestDatabase) -> anyhow::Result<HashMap<String, String>> {
    let client = db.client().await?;
    Ok(client
        .query("SELECT id, content_hash FROM customers", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Every listed customer holds `first_name`'s version in `customers` and in the CRM, and the whole
/// pipeline verifies.
async fn assert_everywhere(
    pipeline: &Pipeline,
    db: &TestDatabase,
    ids: &[String],
    first_name: &str,
) -> anyhow::Result<()> {
    let table = customers(db).await?;
    let http = reqwest::Client::new();
    for id in ids {
        let want = record(id, first_name);
        assert_eq!(
            table.get(id).map(String::as_str),
            Some(want.content_hash().as_str()),
            "customers row of {id} should be {first_name}"
        );
        let stored: serde_json::Value = http
            .get(format!("{}/customers/{id}", pipeline.crm_url))
            .bearer_auth(&pipeline.env.crm_token)
            .send()
            .await?
            .json()
            .await?;
        let held: CustomerRecord = serde_json::from_value(stored["customer"].clone())?;
        assert_eq!(held, want, "the CRM should hold {first_name} for {id}");
    }
    pipeline.verify().await?;
    let stats = pipeline.crm_stats().await?;
    assert_eq!(stats["duplicate_effects"], 0, "{stats:#}");
    Ok(())
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn rows(ids: &[String], first_name: &str) -> Vec<(String, String)> {
    ids.iter()
        .map(|id| (id.clone(), first_name.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_changed_back_and_files_read_in_any_order() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let mut env = PipelineEnv::new(&nats_url()?, &db.url);
    // A short dedup window, so the last steps happen after it.
    let window = Duration::from_secs(1);
    env.setup_args = vec!["--dedup-window".into(), "1s".into()];
    let pipeline = Pipeline::start(env.clone(), MockFaults::default(), 2, &[]).await?;
    let dir = tempfile::tempdir()?;
    let people = ids("aba-", 100);

    // A, B, A on adjacent lines of one file, inside the dedup window: the last A wins.
    let mut aba = Vec::new();
    for id in &people {
        for name in ["Alpha", "Bravo", "Alpha"] {
            aba.push((id.clone(), name.to_owned()));
        }
    }
    let started = Instant::now();
    read(&env, &write_csv(dir.path(), "aba.csv", &aba)?, &[]).await?;
    pipeline.wait_drained(Duration::from_secs(120)).await?;
    assert_everywhere(&pipeline, &db, &people, "Alpha").await?;

    // B in a later file, then A again in a third, after the dedup window: A wins again.
    let bravo = write_csv(dir.path(), "bravo.csv", &rows(&people, "Bravo"))?;
    read(&env, &bravo, &[]).await?;
    pipeline.wait_drained(Duration::from_secs(120)).await?;
    assert_everywhere(&pipeline, &db, &people, "Bravo").await?;
    anyhow::ensure!(
        started.elapsed() > window,
        "the next step must come after the dedup window"
    );
    let alpha = write_csv(dir.path(), "alpha.csv", &rows(&people, "Alpha"))?;
    read(&env, &alpha, &[]).await?;
    pipeline.wait_drained(Duration::from_secs(120)).await?;
    assert_everywhere(&pipeline, &db, &people, "Alpha").await?;

    // Reading the older file again does nothing: it was read completely, and its rows must not
    // come back as newer than the file read after it.
    read(&env, &bravo, &[]).await?;
    pipeline.wait_drained(Duration::from_secs(120)).await?;
    assert_everywhere(&pipeline, &db, &people, "Alpha").await?;

    // Loading it again on purpose makes it the newest data.
    read(&env, &bravo, &["--reload"]).await?;
    pipeline.wait_drained(Duration::from_secs(120)).await?;
    assert_everywhere(&pipeline, &db, &people, "Bravo").await?;
    pipeline.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_ingest_stream_does_not_freeze_customers() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats_url()?, &db.url);
    let mut pipeline = Pipeline::start(env.clone(), MockFaults::default(), 1, &[]).await?;
    let dir = tempfile::tempdir()?;
    // Padding first, so the customers under test get high sequences in the first stream.
    let padding = ids("pad-", 200);
    let people = ids("re-", 50);
    let mut first = rows(&padding, "Pad");
    first.extend(rows(&people, "Old"));
    read(&env, &write_csv(dir.path(), "first.csv", &first)?, &[]).await?;
    pipeline.wait_drained(Duration::from_secs(120)).await?;
    assert_everywhere(&pipeline, &db, &people, "Old").await?;

    // The ingest stream is lost and recreated: sequences start again at 1.
    pipeline.integrators[0]
        .stop(Duration::from_secs(30))
        .await?;
    let names = Names::new(&env.namespace)?;
    let js = jetstream::new(async_nats::connect(&env.nats_url).await?);
    js.delete_stream(names.ingest_stream()).await?;
    env.setup().await?;
    pipeline.respawn_integrator(0).await?;

    read(
        &env,
        &write_csv(dir.path(), "second.csv", &rows(&people, "New"))?,
        &[],
    )
    .await?;
    pipeline.wait_drained(Duration::from_secs(120)).await?;
    assert_everywhere(&pipeline, &db, &people, "New").await?;
    pipeline.stop().await
}

/// The later of two adjacent lines wins in the CRM, the ledger and `customers`, even when the NATS
/// server is killed (SIGKILL) and restarted while the reader publishes, which makes the reader's
/// retried publishes land out of file order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_while_the_reader_publishes_keeps_the_later_line() -> anyhow::Result<()> {
    let mut nats = PrivateNats::start().await?;
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats.url(), &db.url);
    env.setup().await?;
    let dir = tempfile::tempdir()?;
    let people = ids("k-", 10_000);
    let mut both = Vec::new();
    for id in &people {
        both.push((id.clone(), "Earlier".to_owned()));
        both.push((id.clone(), "Later".to_owned()));
    }
    let file = write_csv(dir.path(), "two-versions.csv", &both)?;
    let reader = env
        .command("csv-reader")?
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let ingest = Names::new(&env.namespace)?.ingest_stream();
    let url = nats.url();
    wait_for(
        "the reader to publish 4,000 rows",
        Duration::from_secs(60),
        || {
            let (url, ingest) = (url.clone(), ingest.clone());
            async move { stream_messages(&url, &ingest).await.filter(|n| *n >= 4_000) }
        },
    )
    .await?;
    nats.restart().await?;
    let out = reader.wait_with_output().await?;
    anyhow::ensure!(out.status.success(), "reader: {}", describe(&out));

    let pipeline = Pipeline::start(env.clone(), MockFaults::default(), 2, &[]).await?;
    pipeline.wait_drained(Duration::from_secs(300)).await?;
    let table = customers(&db).await?;
    let later: HashMap<&String, ContentHash> = people
        .iter()
        .map(|id| (id, record(id, "Later").content_hash()))
        .collect();
    let wrong: Vec<&String> = people
        .iter()
        .filter(|id| table.get(*id).map(String::as_str) != later.get(id).map(ContentHash::as_str))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} customer(s) do not hold their later line, e.g. {:?}",
        wrong.len(),
        wrong.iter().take(5).collect::<Vec<_>>()
    );
    let verified = pipeline.verify().await?;
    assert_eq!(verified["ok"], 10_000, "{verified:#}");
    pipeline.stop().await
}

/// With `--version-column updated_at`, the row with the later `updated_at` wins, even when it comes
/// earlier in the file, and a row whose `updated_at` is not a date is rejected, not guessed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_column_orders_rows_by_their_data() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats_url()?, &db.url);
    let pipeline = Pipeline::start(env.clone(), MockFaults::default(), 1, &[]).await?;
    let dir = tempfile::tempdir()?;
    let people = ids("vc-", 50);
    let mut text = String::from("id,first_name,last_name,email,updated_at\n");
    for id in &people {
        writeln!(
            text,
            "{id},New,Tester,{id}@example.com,2026-11-02T08:00:00Z"
        )?;
        writeln!(text, "{id},Old,Tester,{id}@example.com,2026-11-01 08:00:00")?;
    }
    writeln!(text, "vc-bad,Bad,Tester,bad@example.com,last tuesday")?;
    let file = dir.path().join("versioned.csv");
    std::fs::write(&file, text)?;
    read(&env, &file, &["--version-column", "updated_at"]).await?;
    pipeline.wait_drained(Duration::from_secs(120)).await?;
    let client = db.client().await?;
    let names: Vec<String> = client
        .query("SELECT DISTINCT first_name FROM customers", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["New"], "the later updated_at wins everywhere");
    let rejected: Vec<String> = client
        .query("SELECT kind FROM rejected_rows", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rejected, ["invalid_version"]);
    pipeline.verify().await?;
    pipeline.stop().await
}
