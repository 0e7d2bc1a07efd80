//! syncctl's subcommands against the real nats-server and PostgreSQL, each test in a namespace (and
//! database) of its own. Outcome and checkpoint messages are published by hand, standing in for the
//! services, so each subcommand is checked against counts the test knows exactly.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use chrono::Utc;
use customer_record::CustomerRecord;
use e2e::TestDatabase;
use sync_topology::ledger::ledger_key;
use sync_topology::messages::Checkpoint;
use sync_topology::{
    Change, HEADER_CONTENT_HASH, HEADER_FORCE_RESEND, HEADER_SOURCE_LINE, HEADER_VERSION, Names,
    RETENTION_METADATA, TopologySettings, Version,
};
use syncctl::setup::SetupOutcome;
use syncctl::{CtlError, Pipeline};

mod common;
use common::{LOAD, customer, nats_args, prepared, publish_row, settle_ingest, setup_config};

async fn publish_outcome(pipeline: &Pipeline, subject: String, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        pipeline
            .js
            .publish(subject.clone(), format!("{{\"n\":{i}}}").into())
            .await?
            .await?;
    }
    Ok(())
}

async fn put_checkpoint(
    pipeline: &Pipeline,
    key: &str,
    checkpoint: &Checkpoint,
) -> anyhow::Result<()> {
    let store = pipeline
        .js
        .get_key_value(pipeline.names.checkpoints_bucket())
        .await?;
    store
        .put(key, serde_json::to_vec(checkpoint)?.into())
        .await?;
    Ok(())
}

fn checkpoint(rows_read: u64, published: u64, deduplicated: u64, rejected: u64) -> Checkpoint {
    Checkpoint {
        path: "customers.csv".to_owned(),
        size: 1234,
        head_hash: "00".repeat(16),
        modified_ns: None,
        load: LOAD,
        line: rows_read + 1,
        rows_read,
        published,
        deduplicated,
        rejected,
        complete: true,
        updated_at: Utc::now(),
    }
}

fn all_unchanged(outcome: &SetupOutcome) -> bool {
    outcome
        .topology
        .objects
        .iter()
        .all(|(_, change)| *change == Change::Unchanged)
}

#[tokio::test]
async fn setup_twice_in_a_row_changes_nothing() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let nats = nats_args()?;
    let config = setup_config(&nats, Some(&db));

    let first = syncctl::setup::run(&config).await?;
    assert!(first.changed());
    assert!(
        first
            .topology
            .objects
            .iter()
            .all(|(_, change)| *change == Change::Created),
        "{first}"
    );
    let pipeline = Pipeline::connect(&nats).await?;
    let names = pipeline.names.clone();
    let snapshot = || async {
        let mut configs = Vec::new();
        for name in [
            names.ingest_stream(),
            names.results_stream(),
            format!("KV_{}", names.ledger_bucket()),
            format!("KV_{}", names.checkpoints_bucket()),
            format!("KV_{}", names.control_bucket()),
        ] {
            let mut stream = pipeline.js.get_stream(&name).await?;
            configs.push(serde_json::to_value(&stream.info().await?.config)?);
        }
        for (stream, consumer) in [
            (names.ingest_stream(), names.integrators_consumer()),
            (names.results_stream(), names.persister_consumer()),
        ] {
            let info = pipeline.consumer_info(&stream, consumer).await?;
            configs.push(serde_json::to_value(&info.config)?);
        }
        anyhow::Ok(configs)
    };
    let before = snapshot().await?;

    let second = syncctl::setup::run(&config).await?;
    assert!(!second.changed(), "{second}");
    assert!(all_unchanged(&second), "{second}");
    let schema = second.schema.as_ref().context("schema report")?;
    assert!(schema.migration.applied.is_empty());
    assert_eq!(schema.migration.version, sync_store::SCHEMA_VERSION);
    assert_eq!(
        first.schema.as_ref().map(|s| s.migration.version),
        Some(schema.migration.version)
    );
    assert_eq!(
        before,
        snapshot().await?,
        "configs changed on the second run"
    );
    let text = second.to_string();
    assert!(text.contains("nothing changed"), "{text}");
    assert!(
        !text.contains("Created") && !text.contains("Updated"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn setup_migrates_an_older_layout() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let mut client = db.client().await?;
    sync_store::migrate(&mut client, Some(1)).await?;
    let nats = nats_args()?;
    let names = Names::new(&nats.namespace)?;
    let js = jetstream::new(async_nats::connect(&nats.nats_url).await?);
    js.create_stream(stream::Config {
        name: names.ingest_stream(),
        subjects: vec![names.ingest_subject()],
        duplicate_window: Duration::from_secs(60),
        ..Default::default()
    })
    .await?;
    // Earlier layouts capped deliveries on the server, which could drop a record that was only
    // waiting for an older version of its customer.
    js.create_consumer_on_stream(
        jetstream::consumer::pull::Config {
            durable_name: Some(names.integrators_consumer().to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_deliver: 50,
            ..Default::default()
        },
        names.ingest_stream(),
    )
    .await?;

    let outcome = syncctl::setup::run(&setup_config(&nats, Some(&db))).await?;
    let change_of = |object: &str| {
        outcome
            .topology
            .objects
            .iter()
            .find(|(name, _)| name == object)
            .map(|(_, change)| *change)
    };
    assert_eq!(
        change_of(&format!("stream {}", names.ingest_stream())),
        Some(Change::Updated),
        "{outcome}"
    );
    assert_eq!(
        change_of(&format!("stream {}", names.results_stream())),
        Some(Change::Created),
        "{outcome}"
    );
    let schema = outcome.schema.as_ref().context("schema report")?;
    assert_eq!(schema.version_before, 1);
    assert_eq!(schema.migration.version, sync_store::SCHEMA_VERSION);
    assert!(!schema.migration.applied.is_empty());

    let mut ingest = js.get_stream(names.ingest_stream()).await?;
    let config = &ingest.info().await?.config;
    assert_eq!(
        config.duplicate_window,
        TopologySettings::default().dedup_window
    );
    // No age limit any more (it would delete messages that never got their outcome); the
    // retention is what `syncctl prune` applies to settled messages.
    assert_eq!(config.max_age, Duration::ZERO);
    assert_eq!(
        config.metadata.get(RETENTION_METADATA),
        Some(&TopologySettings::default().retention.as_secs().to_string())
    );
    assert_eq!(
        change_of(&format!(
            "consumer {}/{}",
            names.ingest_stream(),
            names.integrators_consumer()
        )),
        Some(Change::Updated),
        "{outcome}"
    );
    let integrators = js
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            names.integrators_consumer(),
            names.ingest_stream(),
        )
        .await?;
    assert_eq!(integrators.cached_info().config.max_deliver, -1);
    assert!(all_unchanged(
        &syncctl::setup::run(&setup_config(&nats, Some(&db))).await?
    ));
    Ok(())
}

#[tokio::test]
async fn status_reconciles_and_names_a_missing_outcome() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let (nats, pipeline) = prepared(Some(&db)).await?;
    let names = pipeline.names.clone();
    // A file of 6 rows: 4 published (one a changed repeat), 1 exact duplicate, 1 rejected.
    for (i, email) in ["a@x.io", "b@x.io", "c@x.io", "a2@x.io"].iter().enumerate() {
        let id = if i == 3 { "c0" } else { ["c0", "c1", "c2"][i] };
        publish_row(&pipeline, &customer(id, email), i as u64 + 2).await?;
    }
    put_checkpoint(&pipeline, "file1", &checkpoint(6, 4, 1, 1)).await?;
    publish_outcome(&pipeline, names.synced_subject(), 3).await?;
    publish_outcome(&pipeline, names.dead_subject(), 1).await?;
    publish_outcome(&pipeline, names.rejected_subject(), 1).await?;
    settle_ingest(&pipeline, 4).await?;

    let config = syncctl::status::StatusConfig {
        nats: nats.clone(),
        database_url: Some(db.url.clone()),
    };
    let status = syncctl::status::collect(&config).await?;
    assert_eq!(status.difference, 0, "{status}");
    assert!(status.reconciled);
    assert_eq!(status.outcomes.synced, 3);
    assert_eq!(status.outcomes.dead, 1);
    assert_eq!(status.outcomes.rejected, 1);
    assert_eq!(status.checkpoints.rows_read, 6);
    assert_eq!(status.streams[0].messages, 4);
    // Nothing persisted them yet: the persister's consumer still holds all 5 outcomes.
    assert_eq!(status.consumers[1].num_pending, 5);
    let json = serde_json::to_value(&status)?;
    assert_eq!(json["difference"], 0);
    assert_eq!(json["reconciled"], true);

    // An ingest message settled without an outcome is a lost row.
    publish_row(&pipeline, &customer("c9", "z@x.io"), 9).await?;
    settle_ingest(&pipeline, 1).await?;
    let status = syncctl::status::collect(&config).await?;
    assert_eq!(status.difference, 1, "{status}");
    assert!(!status.reconciled);
    let ingest = status
        .equations
        .iter()
        .find(|e| e.name == "ingest")
        .context("ingest equation")?;
    assert_eq!(ingest.difference, 1);
    assert!(status.to_string().contains("NOT RECONCILED"));
    Ok(())
}

#[tokio::test]
async fn status_without_setup_says_to_run_setup() -> anyhow::Result<()> {
    let nats = nats_args()?;
    let err = syncctl::status::collect(&syncctl::status::StatusConfig {
        nats,
        database_url: None,
    })
    .await
    .expect_err("no layout yet");
    assert!(matches!(err, CtlError::StreamMissing { .. }), "{err}");
    assert!(err.to_string().contains("syncctl setup"), "{err}");
    Ok(())
}

#[tokio::test]
async fn status_and_dlq_on_an_unmigrated_database_say_to_run_setup() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let (nats, _pipeline) = prepared(None).await?;
    let err = syncctl::status::collect(&syncctl::status::StatusConfig {
        nats,
        database_url: Some(db.url.clone()),
    })
    .await
    .expect_err("no schema yet");
    assert!(matches!(err, CtlError::SchemaMissing { .. }), "{err}");
    let err = syncctl::dlq::list(&syncctl::dlq::ListConfig {
        database_url: db.url.clone(),
        limit: 5,
        startup_wait: std::time::Duration::ZERO,
    })
    .await
    .expect_err("no schema yet");
    assert!(err.to_string().contains("syncctl setup"), "{err}");
    Ok(())
}

#[tokio::test]
async fn wait_returns_when_drained_and_times_out_otherwise() -> anyhow::Result<()> {
    let (nats, pipeline) = prepared(None).await?;
    let config = |timeout| syncctl::wait::WaitConfig {
        poll_interval: Duration::from_millis(20),
        ..syncctl::wait::WaitConfig::new(nats.clone(), timeout)
    };
    syncctl::wait::run(&config(Duration::from_secs(10))).await?;

    publish_row(&pipeline, &customer("w1", "w@x.io"), 2).await?;
    let err = syncctl::wait::run(&config(Duration::from_millis(300)))
        .await
        .expect_err("an unconsumed message is pending");
    assert!(matches!(err, CtlError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("integrators: 1 pending"), "{err}");

    settle_ingest(&pipeline, 1).await?;
    syncctl::wait::run(&config(Duration::from_secs(10))).await?;
    Ok(())
}

async fn ingest_message(
    pipeline: &Pipeline,
    seq: u64,
) -> anyhow::Result<jetstream::message::StreamMessage> {
    let stream = pipeline
        .js
        .get_stream(pipeline.names.ingest_stream())
        .await?;
    Ok(stream.get_raw_message(seq).await?)
}

fn header(message: &jetstream::message::StreamMessage, name: &str) -> Option<String> {
    message.headers.get(name).map(|v| v.as_str().to_owned())
}

#[tokio::test]
async fn replay_by_sequence_republishes_exactly_the_range() -> anyhow::Result<()> {
    let (nats, pipeline) = prepared(None).await?;
    for i in 1..=5u64 {
        publish_row(&pipeline, &customer(&format!("r{i}"), "r@x.io"), i + 1).await?;
    }
    let selection = syncctl::replay::Selection::Sequences { from: 2, to: 4 };
    let outcome = syncctl::replay::run(&syncctl::replay::ReplayConfig::new(
        nats.clone(),
        selection,
        false,
    ))
    .await?;
    assert_eq!(outcome.republished, 3);
    assert_eq!((outcome.first_seq, outcome.last_seq), (Some(2), Some(4)));

    for (copy, original) in [(6, 2), (7, 3), (8, 4)] {
        let replayed = ingest_message(&pipeline, copy).await?;
        let source = ingest_message(&pipeline, original).await?;
        assert_eq!(replayed.payload, source.payload);
        // The copy keeps the original's version (line = original sequence + 1 here).
        let version = Version::row(LOAD, original + 1).to_string();
        let msg_id = header(&replayed, "Nats-Msg-Id").context("msg id")?;
        assert!(
            msg_id.starts_with(&format!("replay:{version}:")),
            "{msg_id}"
        );
        assert_eq!(header(&replayed, HEADER_VERSION), Some(version));
        assert_eq!(
            header(&replayed, HEADER_CONTENT_HASH),
            header(&source, HEADER_CONTENT_HASH)
        );
        assert_eq!(
            header(&replayed, sync_topology::HEADER_REPLAY_OF),
            Some(original.to_string())
        );
        assert_eq!(header(&replayed, HEADER_FORCE_RESEND), None);
    }
    let mut stream = pipeline
        .js
        .get_stream(pipeline.names.ingest_stream())
        .await?;
    assert_eq!(stream.info().await?.state.messages, 8);

    // --force marks every copy; a range past the end replays nothing.
    let forced = syncctl::replay::run(&syncctl::replay::ReplayConfig::new(
        nats.clone(),
        syncctl::replay::Selection::Sequences { from: 5, to: 100 },
        true,
    ))
    .await?;
    assert_eq!(forced.republished, 4, "5 and the three copies 6..=8");
    let copy = ingest_message(&pipeline, 9).await?;
    assert_eq!(header(&copy, HEADER_FORCE_RESEND).as_deref(), Some("true"));
    let beyond = syncctl::replay::run(&syncctl::replay::ReplayConfig::new(
        nats,
        syncctl::replay::Selection::Sequences { from: 500, to: 600 },
        false,
    ))
    .await?;
    assert_eq!(beyond.republished, 0);
    Ok(())
}

#[tokio::test]
async fn replay_by_time_republishes_exactly_the_window() -> anyhow::Result<()> {
    let (nats, pipeline) = prepared(None).await?;
    publish_row(&pipeline, &customer("t1", "t@x.io"), 2).await?;
    publish_row(&pipeline, &customer("t2", "t@x.io"), 3).await?;
    let since = Utc::now();
    publish_row(&pipeline, &customer("t3", "t@x.io"), 4).await?;
    publish_row(&pipeline, &customer("t4", "t@x.io"), 5).await?;
    let until = Utc::now();
    publish_row(&pipeline, &customer("t5", "t@x.io"), 6).await?;

    let outcome = syncctl::replay::run(&syncctl::replay::ReplayConfig::new(
        nats,
        syncctl::replay::Selection::Times { since, until },
        false,
    ))
    .await?;
    assert_eq!(outcome.republished, 2);
    assert_eq!((outcome.first_seq, outcome.last_seq), (Some(3), Some(4)));
    let replayed: Vec<CustomerRecord> = vec![
        serde_json::from_slice(&ingest_message(&pipeline, 6).await?.payload)?,
        serde_json::from_slice(&ingest_message(&pipeline, 7).await?.payload)?,
    ];
    assert_eq!(replayed[0].id, "t3");
    assert_eq!(replayed[1].id, "t4");
    Ok(())
}

async fn insert_dead_letter(
    client: &tokio_postgres::Client,
    record: Option<&CustomerRecord>,
    id: &str,
    minutes_ago: i64,
) -> anyhow::Result<String> {
    let hash = record.map_or_else(|| "ab".repeat(16), |r| r.content_hash().to_string());
    let record_json = record.map(serde_json::to_value).transpose()?;
    let dead_at = Utc::now() - chrono::Duration::minutes(minutes_ago);
    client
        .execute(
            "INSERT INTO dead_letters (customer_id, content_hash, version_stamp, version_load, \
             version_line, ingest_seq, reason, crm_status, crm_body, attempts, record, \
             source_file, source_line, dead_at) \
             VALUES ($1, $2, 1, 1, 12, 7, 'CRM refused: invalid phone', 422, \
             '{\"error\":\"phone\"}', 3, $3, 'customers.csv', 12, $4)",
            &[&id, &hash, &record_json, &dead_at],
        )
        .await?;
    Ok(hash)
}

#[tokio::test]
async fn dlq_lists_and_redrives_dead_letters() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let (nats, pipeline) = prepared(Some(&db)).await?;
    let client = db.client().await?;
    let refused = customer("d1", "d1@x.io");
    let hash = insert_dead_letter(&client, Some(&refused), "d1", 5).await?;
    insert_dead_letter(&client, None, "d2", 1).await?;

    let listed = syncctl::dlq::list(&syncctl::dlq::ListConfig {
        database_url: db.url.clone(),
        limit: 10,
        startup_wait: std::time::Duration::ZERO,
    })
    .await?;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].customer_id, "d2", "newest first");
    assert_eq!(listed[1].content_hash, hash);
    assert_eq!(listed[1].crm_status, Some(422));
    assert_eq!(listed[1].attempts, 3);
    assert!(listed[1].redrivable && !listed[0].redrivable);
    let table = syncctl::dlq::Listing(&listed).to_string();
    assert!(table.contains("invalid phone"), "{table}");

    let redrive = |selection| syncctl::dlq::RedriveConfig {
        nats: nats.clone(),
        database_url: db.url.clone(),
        selection,
    };
    let one = syncctl::dlq::redrive(&redrive(syncctl::dlq::RedriveSelection::Customer(
        "d1".to_owned(),
    )))
    .await?;
    assert_eq!(one.republished, 1);
    let message = ingest_message(&pipeline, 1).await?;
    let body: CustomerRecord = serde_json::from_slice(&message.payload)?;
    assert_eq!(body, refused);
    assert_eq!(header(&message, HEADER_CONTENT_HASH), Some(hash.clone()));
    assert_eq!(header(&message, HEADER_SOURCE_LINE).as_deref(), Some("12"));
    assert_eq!(header(&message, HEADER_VERSION).as_deref(), Some("1.1.12"));
    let msg_id = header(&message, "Nats-Msg-Id").context("msg id")?;
    assert!(msg_id.starts_with("redrive:1.1.12:"), "{msg_id}");

    // Again (say the first redrive failed too): a fresh message id, not dropped as a duplicate.
    let all = syncctl::dlq::redrive(&redrive(syncctl::dlq::RedriveSelection::All)).await?;
    assert_eq!(all.republished, 1);
    assert_eq!(all.without_record, vec!["d2".to_owned()]);
    let mut stream = pipeline
        .js
        .get_stream(pipeline.names.ingest_stream())
        .await?;
    assert_eq!(stream.info().await?.state.messages, 2);

    // Once the ledger holds a newer version of d1, redriving d1 would only be superseded.
    let ledger = pipeline
        .js
        .get_key_value(pipeline.names.ledger_bucket())
        .await?;
    let newer = serde_json::json!({
        "confirmed": {
            "hash": customer("d1", "fixed@x.io").content_hash(),
            "version": Version::row(2, 1),
        }
    });
    ledger
        .put(ledger_key(&refused.id)?, serde_json::to_vec(&newer)?.into())
        .await?;
    let held_back = syncctl::dlq::redrive(&redrive(syncctl::dlq::RedriveSelection::Customer(
        "d1".to_owned(),
    )))
    .await?;
    assert_eq!(held_back.republished, 0);
    assert_eq!(held_back.superseded, vec!["d1".to_owned()]);

    let unknown = syncctl::dlq::redrive(&redrive(syncctl::dlq::RedriveSelection::Customer(
        "nobody".to_owned(),
    )))
    .await
    .expect_err("no such dead letter");
    assert!(unknown.to_string().contains("nobody"), "{unknown}");
    Ok(())
}

#[tokio::test]
async fn replay_leaves_out_versions_the_ledger_has_superseded() -> anyhow::Result<()> {
    let (nats, pipeline) = prepared(None).await?;
    let old = customer("v1", "old@x.io");
    let unchanged = customer("v2", "same@x.io");
    publish_row(&pipeline, &old, 2).await?;
    publish_row(&pipeline, &unchanged, 3).await?;
    let ledger = pipeline
        .js
        .get_key_value(pipeline.names.ledger_bucket())
        .await?;
    let newer_hash = customer("v1", "new@x.io").content_hash();
    let entry = |hash: String, line: u64| {
        serde_json::json!({
            "confirmed": { "hash": hash, "version": Version::row(LOAD, line), "crm_id": "x" }
        })
    };
    // v1 has a newer version (line 40) confirmed: a copy of line 2 would only be superseded.
    ledger
        .put(
            ledger_key(&old.id)?,
            serde_json::to_vec(&entry(newer_hash.to_string(), 40))?.into(),
        )
        .await?;
    // v2 is confirmed at the very version replayed: resending it (forced) is what was asked.
    ledger
        .put(
            ledger_key(&unchanged.id)?,
            serde_json::to_vec(&entry(unchanged.content_hash().to_string(), 3))?.into(),
        )
        .await?;

    let outcome = syncctl::replay::run(&syncctl::replay::ReplayConfig::new(
        nats,
        syncctl::replay::Selection::Sequences { from: 1, to: 2 },
        true,
    ))
    .await?;
    assert_eq!(outcome.skipped_superseded, 1);
    assert_eq!(outcome.republished, 1);
    let copy: CustomerRecord =
        serde_json::from_slice(&ingest_message(&pipeline, 3).await?.payload)?;
    assert_eq!(copy, unchanged);
    Ok(())
}

/// The durable the integrators share is untouched by replay (it reads with its own consumer).
#[tokio::test]
async fn replay_leaves_the_integrators_consumer_alone() -> anyhow::Result<()> {
    let (nats, pipeline) = prepared(None).await?;
    publish_row(&pipeline, &customer("k1", "k@x.io"), 2).await?;
    syncctl::replay::run(&syncctl::replay::ReplayConfig::new(
        nats,
        syncctl::replay::Selection::Sequences { from: 1, to: 1 },
        false,
    ))
    .await?;
    let info = pipeline
        .consumer_info(
            &pipeline.names.ingest_stream(),
            pipeline.names.integrators_consumer(),
        )
        .await?;
    assert_eq!(
        info.num_pending, 2,
        "the original and its copy wait for the integrators"
    );
    Ok(())
}
