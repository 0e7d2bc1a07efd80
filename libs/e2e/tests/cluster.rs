//! The pipeline on a 3-node JetStream cluster (the compose cluster's node configurations, on
//! loopback ports): `syncctl setup --replicas 3`, crm-mock with faults and its default
//! `Retry-After`, the persister, two integrators and the reader on a generated file with exact and
//! changed repeats. One run SIGKILLs the node leading the ingest stream mid-run and restarts it; the
//! other makes the leaders of the ingest, results and ledger streams step down mid-run. Either way
//! nothing is lost, no customer reaches the CRM twice, every customer's last version is in
//! `customers`, and the status reconciles exactly.
//!
//! A failure shows what is needed to tell why: the customer's versions in the ingest stream, its
//! ledger entry and the CRM's copy, or the ingest messages that got more than one outcome.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use e2e::cluster::PrivateNatsCluster;
use e2e::expect::{Expected, expected_from_csv};
use e2e::pipeline::{MockFaults, Pipeline, PipelineEnv, describe};
use e2e::{TestDatabase, ingest_history, repeated_outcomes, wait_for};
use sync_topology::Names;

const ROWS: u64 = 3000;

#[derive(Debug, Clone, Copy)]
enum Disruption {
    /// SIGKILL the node that leads the ingest stream, let the pipeline run on two nodes, restart it.
    KillIngestLeader,
    /// Ask the leaders of the ingest, results and ledger streams to step down, one after another.
    StepDownLeaders,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_killed_and_restarted_mid_run_loses_nothing() -> anyhow::Result<()> {
    run(Disruption::KillIngestLeader).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_stream_leaders_stepping_down_mid_run_lose_nothing() -> anyhow::Result<()> {
    run(Disruption::StepDownLeaders).await
}

async fn run(disruption: Disruption) -> anyhow::Result<()> {
    let mut cluster = PrivateNatsCluster::start().await?;
    eprintln!("cluster stores and logs: {}", cluster.store_dir().display());
    let db = TestDatabase::create().await?;
    let mut env = PipelineEnv::new(&cluster.url(), &db.url);
    env.setup_args = vec!["--replicas".into(), "3".into()];
    let names = Names::new(&env.namespace)?;

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("cluster.csv");
    generate(&file)?;
    let expected = expected_from_csv(&file)?;

    // Realistic faults at the CRM; crm-mock's default Retry-After (1 s) on its 429s, which pauses
    // the whole fleet each time, so they are rarer than the other faults.
    let faults = MockFaults {
        failure_rate: 0.05,
        rate_limit_rate: 0.002,
        timeout_rate: 0.01,
        hang_ms: 1000,
        latency_ms: 2,
        extra: Vec::new(),
    };
    let pipeline = Pipeline::start(env.clone(), faults, 2, &["--request-timeout", "500ms"]).await?;
    let reader = env
        .command("csv-reader")?
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let reader = tokio::spawn(reader.wait_with_output());

    let customers = expected.last_hash.len() as u64;
    wait_for_crm(&pipeline, customers / 5).await?;
    match disruption {
        Disruption::KillIngestLeader => {
            let ingest = names.ingest_stream();
            let leader = wait_for(
                "the ingest stream to have a leader",
                Duration::from_secs(30),
                || cluster.stream_leader(&ingest),
            )
            .await?;
            let index = cluster.index_of(&leader)?;
            eprintln!("killing {leader}, the ingest stream's leader");
            cluster.kill(index).await?;
            // The pipeline must keep going on the two nodes left, not only after the restart.
            wait_for_crm(&pipeline, customers / 2).await?;
            cluster.restart(index).await?;
            eprintln!("{leader} restarted and healthy");
        }
        Disruption::StepDownLeaders => {
            let streams = [
                names.ingest_stream(),
                names.results_stream(),
                format!("KV_{}", names.ledger_bucket()),
            ];
            for (i, stream) in streams.iter().enumerate() {
                let (old, new) = cluster.step_down(stream).await?;
                eprintln!("{stream}: leader {old} stepped down, {new} leads");
                let progress = customers * (i as u64 + 2) / (streams.len() as u64 + 2);
                wait_for_crm(&pipeline, progress).await?;
            }
        }
    }

    let reader_out = reader.await??;
    anyhow::ensure!(
        reader_out.status.success(),
        "csv-reader failed: {}",
        describe(&reader_out)
    );
    pipeline.wait_drained(Duration::from_secs(90)).await?;

    let stats = pipeline.crm_stats().await?;
    assert_eq!(
        stats["duplicate_effects"], 0,
        "no duplicate in the CRM: {stats:#}"
    );
    assert_last_versions(&pipeline, &db, &expected, &names).await?;
    let status = env.status().await?;
    if status["reconciled"] != true || status["difference"] != 0 {
        let repeated = repeated_outcomes(&env.nats_url, &names.results_stream())
            .await
            .unwrap_or_else(|err| format!("(cannot read the results: {err:#})"));
        anyhow::bail!(
            "the status does not reconcile: {status:#}\ningest messages with more than one outcome:\n{repeated}"
        );
    }
    pipeline.verify().await?;
    pipeline.stop().await
}

/// Waits until the CRM holds at least `customers` customers, with the services' logs on timeout.
async fn wait_for_crm(pipeline: &Pipeline, customers: u64) -> anyhow::Result<()> {
    let reached = wait_for(
        &format!("the CRM to hold {customers} customers"),
        Duration::from_secs(60),
        || async {
            let held = pipeline.crm_stats().await.ok()?["customers"].as_u64()?;
            (held >= customers).then_some(())
        },
    )
    .await;
    reached.map_err(|err| anyhow::anyhow!("{err:#}\n{}", pipeline.logs()))
}

/// Every valid id's last version is confirmed in `customers` (5% errors with 10 deliveries each
/// leave no room for a dead letter), nothing else is there, and every bad row is rejected. A
/// customer that misses its last version is shown with its messages in the ingest stream, its
/// ledger entry and what the CRM holds.
async fn assert_last_versions(
    pipeline: &Pipeline,
    db: &TestDatabase,
    expected: &Expected,
    names: &Names,
) -> anyhow::Result<()> {
    let client = db.client().await?;
    let synced: HashMap<String, String> = client
        .query("SELECT id, content_hash FROM customers", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut wrong: Vec<String> = Vec::new();
    for (id, hash) in &expected.last_hash {
        if synced.get(id).map(String::as_str) != Some(hash.as_str()) {
            wrong.push(format!(
                "customer {id}: last version {hash}, customers holds {:?}",
                synced.get(id)
            ));
        }
    }
    if !wrong.is_empty() {
        let ids: Vec<&str> = wrong
            .iter()
            .filter_map(|w| w.strip_prefix("customer ")?.split(':').next())
            .collect();
        let history = ingest_history(
            &pipeline.env.nats_url,
            &names.ingest_stream(),
            &names.ledger_bucket(),
            &ids,
        )
        .await
        .unwrap_or_else(|err| format!("(no history: {err:#})"));
        let mut crm = String::new();
        for id in &ids {
            let held = reqwest::Client::new()
                .get(format!("{}/customers/{id}", pipeline.crm_url))
                .bearer_auth(&pipeline.env.crm_token)
                .send()
                .await
                .map_err(anyhow::Error::from);
            let held = match held {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(err) => format!("{err:#}"),
            };
            crm.push_str(&format!("{id} in the CRM: {held}\n"));
        }
        let dead: Vec<String> = client
            .query(
                "SELECT customer_id, content_hash, reason FROM dead_letters WHERE customer_id = ANY($1)",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| format!("{} {}: {}", r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
            .collect();
        let status = pipeline.env.status().await.unwrap_or_default();
        anyhow::bail!(
            "{} of {} customers miss their last version:\n{}\n{history}{crm}dead letters: {dead:?}\nstatus: {status:#}",
            wrong.len(),
            expected.last_hash.len(),
            wrong.join("\n")
        );
    }
    assert_eq!(
        synced.len(),
        expected.last_hash.len(),
        "no unexpected customer"
    );
    let rejected: i64 = client
        .query_one("SELECT count(*) FROM rejected_rows", &[])
        .await?
        .get(0);
    assert_eq!(rejected as usize, expected.rejected_lines.len());
    Ok(())
}

fn generate(file: &Path) -> anyhow::Result<()> {
    let options = csv_gen::GenOptions {
        rows: ROWS,
        bad_rate: 0.01,
        dup_rate: 0.02,
        change_rate: 0.05,
        seed: 1414,
        extra_columns: true,
    };
    let out = std::fs::File::create(file)?;
    csv_gen::generate(&options, out)?;
    Ok(())
}
