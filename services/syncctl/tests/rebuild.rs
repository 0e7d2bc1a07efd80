//! `syncctl replay --results`: the tables rebuilt from the results stream into an empty database
//! equal the ones the persister wrote while the pipeline ran.

use anyhow::Context as _;
use chrono::Utc;
use customer_record::CustomerRecord;
use e2e::TestDatabase;
use service_kit::NatsArgs;
use sync_topology::messages::{DeadLetter, RejectedRow, SyncAction, SyncedOutcome};
use sync_topology::{IngestMessage, TopologySettings, Version, ids};
use syncctl::Pipeline;

fn customer(id: &str, email: &str) -> CustomerRecord {
    CustomerRecord::normalised(id, "Grace", "Hopper", email, None, Default::default())
}

/// The outcome of line `line` of load 1 (stored at an arbitrary ingest sequence).
fn synced(record: CustomerRecord, line: u64) -> SyncedOutcome {
    let ingest_seq = 100 - line;
    SyncedOutcome {
        content_hash: record.content_hash(),
        customer: record,
        version: Some(Version::row(1, line)),
        ingest_seq,
        crm_id: Some(format!("crm-{ingest_seq}")),
        action: SyncAction::Created,
        source_file: Some("customers.csv".to_owned()),
        source_line: Some(line),
        synced_at: Utc::now(),
    }
}

async fn publish(
    pipeline: &Pipeline,
    subject: String,
    body: &impl serde::Serialize,
) -> anyhow::Result<()> {
    pipeline
        .js
        .publish(subject, serde_json::to_vec(body)?.into())
        .await?
        .await?;
    Ok(())
}

/// Every table's rows, in a fixed order, as text.
async fn dump(db: &TestDatabase) -> anyhow::Result<Vec<String>> {
    let client = db.client().await?;
    let mut rows = Vec::new();
    for query in [
        "SELECT id || ' ' || content_hash || ' ' || version_load || '.' || version_line || ' ' || email FROM customers ORDER BY id",
        "SELECT source_file || ':' || line || ' ' || kind || ' ' || reason FROM rejected_rows ORDER BY line",
        "SELECT customer_id || ' ' || content_hash || ' ' || reason FROM dead_letters ORDER BY customer_id",
    ] {
        for row in client.query(query, &[]).await.context(query)? {
            rows.push(row.get::<_, String>(0));
        }
    }
    Ok(rows)
}

/// What the persister does with the outcomes published so far: its writer, on its consumer, until
/// that consumer is drained.
async fn persist(pipeline: &Pipeline, nats: &NatsArgs, database_url: &str) -> anyhow::Result<()> {
    let settings = outcome_writer::Settings {
        stop_when_drained: true,
        ..outcome_writer::Settings::default()
    };
    let endpoints = outcome_writer::Endpoints {
        client: pipeline.client.clone(),
        names: pipeline.names.clone(),
        nats_shown: nats.redacted_url(),
        pool: sync_store::connect_pool(database_url, settings.writers)?,
        database_url: database_url.to_owned(),
    };
    outcome_writer::OutcomeWriter::bind(endpoints, settings)
        .await?
        .run(
            &service_kit::Health::default(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn results_replay_into_an_empty_database_reproduces_the_tables() -> anyhow::Result<()> {
    let live = TestDatabase::create().await?;
    let nats = NatsArgs::new(e2e::nats_url()?, e2e::unique_namespace());
    syncctl::setup::run(&syncctl::setup::SetupConfig {
        nats: nats.clone(),
        database_url: Some(live.url.clone()),
        settings: TopologySettings::default(),
    })
    .await?;
    let pipeline = Pipeline::connect(&nats).await?;
    let names = pipeline.names.clone();

    publish(
        &pipeline,
        names.synced_subject(),
        &synced(customer("c2", "new@x.io"), 5),
    )
    .await?;
    // An older version (an earlier line) arriving later must not win, in the rebuild as in the
    // live run.
    publish(
        &pipeline,
        names.synced_subject(),
        &synced(customer("c2", "old@x.io"), 2),
    )
    .await?;
    publish(
        &pipeline,
        names.synced_subject(),
        &synced(customer("c1", "one@x.io"), 1),
    )
    .await?;
    let refused = customer("c3", "three@x.io");
    // The persister stores a dead letter only when its ingest message carries it.
    let (headers, body) =
        IngestMessage::from_row(refused.clone(), Version::row(1, 4), "customers.csv", 4)
            .encode(&ids::ingest_row(&Version::row(1, 4)))?;
    let ingest_seq = pipeline
        .js
        .publish_with_headers(names.ingest_subject(), headers, body)
        .await?
        .await?
        .sequence;
    publish(
        &pipeline,
        names.dead_subject(),
        &DeadLetter {
            customer_id: refused.id.clone(),
            content_hash: refused.content_hash(),
            version: Some(Version::row(1, 4)),
            ingest_seq,
            reason: "CRM refused: 422".to_owned(),
            crm_status: Some(422),
            crm_body: Some("{}".to_owned()),
            attempts: 1,
            customer: Some(refused),
            source_file: Some("customers.csv".to_owned()),
            source_line: Some(4),
            dead_at: Utc::now(),
            malformed_body_base64: None,
        },
    )
    .await?;
    publish(
        &pipeline,
        names.rejected_subject(),
        &RejectedRow {
            source_file: "customers.csv".to_owned(),
            line: 7,
            kind: "invalid_email".to_owned(),
            reason: "email \"x\" is not an address".to_owned(),
            raw: "9,a,b,x".to_owned(),
            rejected_at: Utc::now(),
        },
    )
    .await?;

    persist(&pipeline, &nats, &live.url).await?;
    let expected = dump(&live).await?;
    assert_eq!(expected.len(), 4, "{expected:#?}");
    assert!(expected[1].contains("new@x.io"), "{expected:#?}");

    let empty = TestDatabase::create().await?;
    let config = syncctl::rebuild::RebuildConfig {
        nats: nats.clone(),
        database_url: empty.url.clone(),
    };
    let outcome =
        syncctl::rebuild::run(&config, tokio_util::sync::CancellationToken::new()).await?;
    assert_eq!(outcome.report.messages_acked, 5);
    assert_eq!(outcome.tables.customers, 2);
    assert_eq!(dump(&empty).await?, expected);

    // The rebuild's consumer is gone; the service's consumer was not touched.
    let stream = pipeline.js.get_stream(names.results_stream()).await?;
    assert!(stream.consumer_info(&outcome.consumer).await.is_err());
    let persister = pipeline
        .consumer_info(&names.results_stream(), names.persister_consumer())
        .await?;
    assert_eq!(persister.num_pending, 0);

    let again = syncctl::rebuild::run(&config, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("the database is no longer empty");
    assert!(again.to_string().contains("not empty"), "{again}");
    Ok(())
}
