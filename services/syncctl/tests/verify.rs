//! `syncctl verify` and `syncctl prune` against the real nats-server and PostgreSQL, with the
//! pipeline's state written by hand so each check meets exactly the case it must catch.

mod common;

use chrono::Utc;
use common::{LOAD, customer, prepared, publish_row, settle_ingest};
use e2e::TestDatabase;
use sync_store::Outcome;
use sync_topology::Version;
use sync_topology::ledger::{Confirmed, LedgerEntry, ledger_key};
use sync_topology::messages::{SyncAction, SyncedOutcome};
use syncctl::Pipeline;
use syncctl::verify::{VerifyConfig, VerifyReport};

/// What the services would leave after syncing `record` at `line`: its ledger entry and row.
async fn synced(
    pipeline: &Pipeline,
    db: &TestDatabase,
    record: &customer_record::CustomerRecord,
    line: u64,
) -> anyhow::Result<()> {
    let version = Version::row(LOAD, line);
    let entry = LedgerEntry {
        confirmed: Some(Confirmed {
            hash: record.content_hash(),
            version,
            crm_id: Some(format!("crm-{}", record.id)),
        }),
        ..LedgerEntry::default()
    };
    pipeline
        .js
        .get_key_value(pipeline.names.ledger_bucket())
        .await?
        .put(ledger_key(&record.id)?, serde_json::to_vec(&entry)?.into())
        .await?;
    let mut client = db.client().await?;
    sync_store::write_batch(
        &mut client,
        &[Outcome::Synced(SyncedOutcome {
            customer: record.clone(),
            content_hash: record.content_hash(),
            version: Some(version),
            ingest_seq: line,
            crm_id: Some(format!("crm-{}", record.id)),
            action: SyncAction::Created,
            source_file: None,
            source_line: Some(line),
            synced_at: Utc::now(),
        })],
    )
    .await?;
    Ok(())
}

async fn verify(nats: &service_kit::NatsArgs, db: &TestDatabase) -> anyhow::Result<VerifyReport> {
    Ok(syncctl::verify::run(&VerifyConfig {
        nats: nats.clone(),
        database_url: db.url.clone(),
        crm: None,
    })
    .await?)
}

fn differing(report: &VerifyReport) -> Vec<&str> {
    report
        .differences
        .iter()
        .map(|d| d.customer_id.as_str())
        .collect()
}

#[tokio::test]
async fn verify_checks_content_and_names_each_customer_that_differs() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let (nats, pipeline) = prepared(Some(&db)).await?;
    let (ann, bob) = (customer("c1", "ann@x.io"), customer("c2", "bob@x.io"));
    publish_row(&pipeline, &ann, 2).await?;
    publish_row(&pipeline, &bob, 3).await?;
    settle_ingest(&pipeline, 2).await?;
    synced(&pipeline, &db, &ann, 2).await?;
    synced(&pipeline, &db, &bob, 3).await?;

    let report = verify(&nats, &db).await?;
    assert!(report.clean(), "{report}");
    assert_eq!((report.customers, report.ok), (2, 2));

    // A row changed behind the pipeline's back: counts still add up, content does not.
    let client = db.client().await?;
    client
        .execute(
            "UPDATE customers SET first_name = 'Mallory' WHERE id = 'c1'",
            &[],
        )
        .await?;
    let report = verify(&nats, &db).await?;
    assert_eq!(differing(&report), ["c1"], "{report}");
    assert!(report.differences[0].problem.contains("hash"), "{report}");
    assert!(report.to_string().contains("NOT VERIFIED"));
    synced(&pipeline, &db, &ann, 2).await?;
    client
        .execute(
            "UPDATE customers SET first_name = 'Ada' WHERE id = 'c1'",
            &[],
        )
        .await?;
    assert!(verify(&nats, &db).await?.clean());

    // A newer version settled without reaching customers: named, with what each place holds.
    let newer = customer("c2", "bob@new.io");
    publish_row(&pipeline, &newer, 4).await?;
    settle_ingest(&pipeline, 1).await?;
    let report = verify(&nats, &db).await?;
    assert_eq!(differing(&report), ["c2"], "{report}");
    let difference = &report.differences[0];
    assert!(difference.problem.contains("older version"), "{report}");
    assert_eq!(
        difference.newest.as_ref().map(|h| h.version),
        Some(Version::row(LOAD, 4))
    );
    assert_eq!(
        difference.customers_row.as_ref().map(|h| h.version),
        Some(Version::row(LOAD, 3))
    );

    // Once that version is dead-lettered, c2 is reported as such, not as differing.
    client
        .execute(
            "INSERT INTO dead_letters (customer_id, content_hash, version_stamp, version_load, \
             version_line, ingest_seq, reason, attempts, dead_at) \
             VALUES ('c2', $1, $2, $2, 4, 3, 'refused', 1, now())",
            &[&newer.content_hash().as_str(), &(LOAD as i64)],
        )
        .await?;
    let report = verify(&nats, &db).await?;
    assert!(report.clean(), "{report}");
    assert_eq!(report.dead_lettered, 1);

    // While work is pending, an unsettled customer is pending, and verify is not clean.
    publish_row(&pipeline, &customer("c3", "cy@x.io"), 5).await?;
    let report = verify(&nats, &db).await?;
    assert_eq!((report.pending, report.drained), (1, false), "{report}");
    assert!(!report.clean());
    Ok(())
}

#[tokio::test]
async fn prune_removes_only_settled_messages() -> anyhow::Result<()> {
    let (nats, pipeline) = prepared(None).await?;
    for line in 2..=4 {
        publish_row(&pipeline, &customer(&format!("p{line}"), "p@x.io"), line).await?;
    }
    // Two of three ingest messages got their outcome; the third never did.
    settle_ingest(&pipeline, 2).await?;
    let report = syncctl::prune::run(&syncctl::prune::PruneConfig {
        nats,
        older_than: Some(std::time::Duration::ZERO),
    })
    .await?;
    let ingest = &report.streams[0];
    assert_eq!((ingest.purged, ingest.pruned_below), (2, 3), "{report:?}");
    let mut stream = pipeline
        .js
        .get_stream(pipeline.names.ingest_stream())
        .await?;
    let state = stream.info().await?.state.clone();
    assert_eq!(
        (state.messages, state.first_sequence),
        (1, 3),
        "the unsettled message stays, however old"
    );
    Ok(())
}

#[tokio::test]
async fn show_tells_one_customers_story() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let (nats, pipeline) = prepared(Some(&db)).await?;
    let (old, new) = (customer("s1", "old@x.io"), customer("s1", "new@x.io"));
    let old_seq = publish_row(&pipeline, &old, 2).await?;
    publish_row(&pipeline, &customer("other", "o@x.io"), 3).await?;
    let new_seq = publish_row(&pipeline, &new, 4).await?;
    synced(&pipeline, &db, &new, 4).await?;
    let superseded = sync_topology::messages::SupersededOutcome {
        customer_id: "s1".to_owned(),
        content_hash: old.content_hash(),
        version: Version::row(LOAD, 2),
        superseded_by: Version::row(LOAD, 4),
        ingest_seq: old_seq,
        source_file: None,
        source_line: Some(2),
        superseded_at: Utc::now(),
    };
    pipeline
        .js
        .publish(
            pipeline.names.superseded_subject(),
            serde_json::to_vec(&superseded)?.into(),
        )
        .await?
        .await?;

    let story = syncctl::show::run(&syncctl::show::ShowConfig {
        nats,
        database_url: db.url.clone(),
        customer_id: "s1".to_owned(),
        crm: None,
    })
    .await?;
    let seqs: Vec<u64> = story.versions.iter().map(|v| v.ingest_seq).collect();
    assert_eq!(seqs, [old_seq, new_seq], "{story}");
    assert_eq!(
        story.versions[0].outcome.as_deref(),
        Some(format!("superseded by {}", Version::row(LOAD, 4)).as_str())
    );
    assert_eq!(story.versions[1].outcome, None, "no outcome published yet");
    let confirmed = story.ledger.as_ref().and_then(|l| l.confirmed.as_ref());
    assert_eq!(confirmed.map(|c| c.version), Some(Version::row(LOAD, 4)));
    assert_eq!(
        story
            .customers_row
            .as_ref()
            .map(|r| r.record.email.as_str()),
        Some("new@x.io")
    );
    let text = story.to_string();
    assert!(text.contains("customers.csv:4"), "{text}");
    Ok(())
}
