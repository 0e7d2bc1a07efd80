//! The persister against the real nats-server and PostgreSQL: each test has its own namespace and
//! database, and the PostgreSQL-outage test its own PostgreSQL cluster that it stops and starts.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::PullConsumer};
use chrono::Utc;
use customer_record::CustomerRecord;
use e2e::{PrivatePostgres, TestDatabase, wait_for};
use persister::{PersisterConfig, RunReport};
use service_kit::NatsArgs;
use sync_store::Outcome;
use sync_topology::messages::{DeadLetter, RejectedRow, SyncAction, SyncedOutcome};
use sync_topology::{IngestMessage, Names, Version, ids};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(60);

struct Pipeline {
    names: Names,
    nats_url: String,
    js: jetstream::Context,
}

impl Pipeline {
    async fn new() -> anyhow::Result<Self> {
        let nats_url = e2e::nats_url()?;
        let names = Names::new(&e2e::unique_namespace())?;
        let client = async_nats::connect(&nats_url)
            .await
            .with_context(|| format!("connecting to {nats_url}"))?;
        let js = jetstream::new(client);
        sync_topology::ensure_topology(&js, &names, &Default::default()).await?;
        Ok(Pipeline {
            names,
            nats_url,
            js,
        })
    }

    fn config(&self, database_url: &str) -> PersisterConfig {
        let mut config = PersisterConfig::new(
            NatsArgs::new(&self.nats_url, self.names.namespace()),
            database_url,
        );
        config.settings.writer.batch_size = 100;
        config.settings.writer.batch_linger = Duration::from_millis(20);
        config
    }

    /// Publishes each body and waits for every publish ack; returns the last stream sequence.
    async fn publish(&self, messages: Vec<(String, Vec<u8>)>) -> anyhow::Result<u64> {
        let mut acks = Vec::with_capacity(messages.len());
        for (subject, body) in messages {
            acks.push(self.js.publish(subject, body.into()).await?);
        }
        let mut last = 0;
        for ack in acks {
            last = ack.await.context("publish ack")?.sequence;
        }
        Ok(last)
    }

    fn synced(&self, outcome: &SyncedOutcome) -> (String, Vec<u8>) {
        (self.names.synced_subject(), json(outcome))
    }

    /// A dead letter as an integrator makes one: of an ingest message that carries its customer,
    /// version and content (the persister stores no other), published first.
    async fn dead(&self, mut letter: DeadLetter) -> anyhow::Result<(String, Vec<u8>)> {
        let record = letter
            .customer
            .clone()
            .context("a dead letter with its record")?;
        letter.ingest_seq = self.ingest(record, letter.version()).await?;
        Ok((self.names.dead_subject(), json(&letter)))
    }

    /// Publishes `record` as the ingest message of `version`; returns its stream sequence.
    async fn ingest(&self, record: CustomerRecord, version: Version) -> anyhow::Result<u64> {
        let message = IngestMessage::from_row(record, version, "customers.csv", version.line);
        let (headers, body) = message.encode(&ids::ingest_row(&version))?;
        Ok(self
            .js
            .publish_with_headers(self.names.ingest_subject(), headers, body)
            .await?
            .await
            .context("ingest publish ack")?
            .sequence)
    }

    fn rejected(&self, row: &RejectedRow) -> (String, Vec<u8>) {
        (self.names.rejected_subject(), json(row))
    }

    async fn consumer(&self) -> anyhow::Result<PullConsumer> {
        Ok(self
            .js
            .get_consumer_from_stream(self.names.persister_consumer(), self.names.results_stream())
            .await?)
    }

    /// Waits until the persister consumer has acked everything up to `last_seq`.
    async fn wait_acked(&self, last_seq: u64) -> anyhow::Result<()> {
        let consumer = self.consumer().await?;
        wait_for(
            &format!("persister to ack through stream sequence {last_seq}"),
            PATIENCE,
            || {
                let consumer = consumer.clone();
                async move {
                    let info = consumer.get_info().await.ok()?;
                    (info.ack_floor.stream_sequence >= last_seq
                        && info.num_ack_pending == 0
                        && info.num_pending == 0)
                        .then_some(())
                }
            },
        )
        .await
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("outcomes serialise")
}

/// The outcome of version `(1, seq)`, stored at ingest sequence `seq`.
fn synced(id: &str, seq: u64, first_name: &str) -> SyncedOutcome {
    let mut attributes = BTreeMap::new();
    attributes.insert("tier".to_owned(), "gold".to_owned());
    let customer = CustomerRecord::normalised(
        id,
        first_name,
        "Lovelace",
        &format!("{id}@example.com"),
        Some("+44 1"),
        attributes,
    );
    SyncedOutcome {
        content_hash: customer.content_hash(),
        customer,
        version: Some(Version::row(1, seq)),
        ingest_seq: seq,
        crm_id: Some(format!("crm-{id}")),
        action: SyncAction::Created,
        source_file: Some("customers.csv".to_owned()),
        source_line: Some(seq + 1),
        synced_at: Utc::now(),
    }
}

fn dead(id: &str, seq: u64) -> DeadLetter {
    let customer =
        CustomerRecord::normalised(id, "Bad", "Data", "bad@example.com", None, BTreeMap::new());
    DeadLetter {
        customer_id: id.to_owned(),
        content_hash: customer.content_hash(),
        version: Some(Version::row(1, seq)),
        ingest_seq: seq,
        reason: "CRM refused: 422".to_owned(),
        crm_status: Some(422),
        crm_body: Some("{\"error\":\"invalid\"}".to_owned()),
        attempts: 1,
        customer: Some(customer),
        source_file: Some("customers.csv".to_owned()),
        source_line: Some(seq + 1),
        dead_at: Utc::now(),
        malformed_body_base64: None,
    }
}

fn rejected(line: u64) -> RejectedRow {
    RejectedRow {
        source_file: "customers.csv".to_owned(),
        line,
        kind: "empty_id".to_owned(),
        reason: "field `id` is empty".to_owned(),
        raw: ",Ada,Lovelace,ada@example.com".to_owned(),
        rejected_at: Utc::now(),
    }
}

fn start(config: PersisterConfig) -> (CancellationToken, JoinHandle<anyhow::Result<RunReport>>) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(persister::run(config, shutdown.clone()));
    (shutdown, task)
}

async fn stop(
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<RunReport>>,
) -> anyhow::Result<RunReport> {
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .context("persister did not stop after shutdown")?
        .context("persister task panicked")?
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client
        .query_one(sql, &[])
        .await
        .with_context(|| sql.to_owned())?
        .get(0))
}

/// Every column of every customer, in id order: compares whole tables.
async fn customers_snapshot(client: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT row_to_json(c)::text FROM customers c ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn hash_of(client: &tokio_postgres::Client, id: &str) -> anyhow::Result<(String, i64)> {
    let row = client
        .query_one(
            "SELECT content_hash, ingest_seq FROM customers WHERE id = $1",
            &[&id],
        )
        .await
        .with_context(|| format!("customer {id}"))?;
    Ok((row.get(0), row.get(1)))
}

#[tokio::test]
async fn batches_commit_and_every_message_is_acked() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let db = TestDatabase::create().await?;
    let mut messages: Vec<_> = (1..=450)
        .map(|i| pipeline.synced(&synced(&format!("c{i}"), i, "Ada")))
        .collect();
    messages.extend((1..=3).map(|line| pipeline.rejected(&rejected(line))));
    messages.push(pipeline.dead(dead("d1", 1000)).await?);
    let last = pipeline.publish(messages).await?;

    let (shutdown, task) = start(pipeline.config(&db.url));
    pipeline.wait_acked(last).await?;
    let report = stop(shutdown, task).await?;

    let client = db.client().await?;
    assert_eq!(count(&client, "SELECT count(*) FROM customers").await?, 450);
    assert_eq!(
        count(&client, "SELECT count(*) FROM rejected_rows").await?,
        3
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM dead_letters").await?,
        1
    );
    assert_eq!(report.messages_acked, 454);
    assert!(
        report.batches >= 5,
        "batch size 100 needs >= 5 batches: {report:?}"
    );
    let attributes: serde_json::Value = client
        .query_one("SELECT attributes FROM customers WHERE id = 'c7'", &[])
        .await?
        .get(0);
    assert_eq!(attributes, serde_json::json!({"tier": "gold"}));
    Ok(())
}

#[tokio::test]
async fn a_redelivered_batch_changes_nothing() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let db = TestDatabase::create().await?;
    let outcomes: Vec<SyncedOutcome> = (1..=120)
        .map(|i| synced(&format!("c{i}"), i, "Ada"))
        .collect();
    let mut messages: Vec<_> = outcomes.iter().map(|o| pipeline.synced(o)).collect();
    messages.push(pipeline.dead(dead("d1", 500)).await?);
    messages.push(pipeline.rejected(&rejected(9)));
    let first = pipeline.publish(messages.clone()).await?;

    let mut config = pipeline.config(&db.url);
    config.settings.writer.stop_when_drained = true;
    let first_run = persister::run(config.clone(), CancellationToken::new()).await?;
    assert_eq!(first_run.written.customers_written, 120);
    let client = db.client().await?;
    let before = customers_snapshot(&client).await?;

    // The same outcomes again, as new messages (as after a results replay or a publisher retry).
    let second = pipeline.publish(messages).await?;
    assert!(second > first);
    let second_run = persister::run(config, CancellationToken::new()).await?;
    assert_eq!(second_run.messages_acked, 122);
    assert_eq!(second_run.written.customers_written, 0, "{second_run:?}");
    assert_eq!(second_run.written.dead_letters_written, 0, "{second_run:?}");
    assert_eq!(
        second_run.written.rejected_rows_written, 0,
        "{second_run:?}"
    );
    assert_eq!(customers_snapshot(&client).await?, before);
    pipeline.wait_acked(second).await?;

    // And the per-batch function itself, called twice with one batch.
    let mut direct = db.client().await?;
    let batch: Vec<Outcome> = (1..=5)
        .map(|i| Outcome::Synced(synced(&format!("x{i}"), 1000 + i, "Bo")))
        .collect();
    let once = sync_store::write_batch(&mut direct, &batch).await?;
    let twice = sync_store::write_batch(&mut direct, &batch).await?;
    assert_eq!(once.customers_written, 5);
    assert_eq!(twice.customers_written, 0);
    Ok(())
}

#[tokio::test]
async fn an_older_version_never_overwrites_a_newer_one() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let db = TestDatabase::create().await?;
    let newer = synced("c1", 20, "Newer");
    let older = synced("c1", 10, "Older");
    // Newer first, then older, each alone in its batch: linger is short and they are published
    // one after the other only once the first has been acked.
    let (shutdown, task) = start(pipeline.config(&db.url));
    let seq = pipeline.publish(vec![pipeline.synced(&newer)]).await?;
    pipeline.wait_acked(seq).await?;
    let seq = pipeline.publish(vec![pipeline.synced(&older)]).await?;
    pipeline.wait_acked(seq).await?;
    // Both orders inside one batch, for another customer.
    let batch = vec![
        pipeline.synced(&synced("c2", 31, "Newer")),
        pipeline.synced(&synced("c2", 30, "Older")),
        pipeline.synced(&synced("c3", 40, "Older")),
        pipeline.synced(&synced("c3", 41, "Newer")),
    ];
    let seq = pipeline.publish(batch).await?;
    pipeline.wait_acked(seq).await?;
    stop(shutdown, task).await?;

    let client = db.client().await?;
    assert_eq!(
        hash_of(&client, "c1").await?,
        (newer.content_hash.to_string(), 20)
    );
    assert_eq!(
        hash_of(&client, "c2").await?,
        (synced("c2", 31, "Newer").content_hash.to_string(), 31)
    );
    assert_eq!(
        hash_of(&client, "c3").await?,
        (synced("c3", 41, "Newer").content_hash.to_string(), 41)
    );
    assert_eq!(count(&client, "SELECT count(*) FROM customers").await?, 3);
    Ok(())
}

#[tokio::test]
async fn postgres_stopped_mid_run_loses_nothing() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let postgres = PrivatePostgres::start().await?;
    let db = TestDatabase::create_on(&postgres.url()).await?;
    let (shutdown, task) = start(pipeline.config(&db.url));

    let first: Vec<_> = (1..=100)
        .map(|i| pipeline.synced(&synced(&format!("c{i}"), i, "Ada")))
        .collect();
    let seq = pipeline.publish(first).await?;
    pipeline.wait_acked(seq).await?;

    postgres.stop().await?;
    let second: Vec<_> = (101..=300)
        .map(|i| pipeline.synced(&synced(&format!("c{i}"), i, "Ada")))
        .collect();
    let last = pipeline.publish(second).await?;
    // The persister has taken them and holds them unacked while PostgreSQL is away.
    let consumer = pipeline.consumer().await?;
    wait_for("persister to hold the new outcomes", PATIENCE, || {
        let consumer = consumer.clone();
        async move {
            let info = consumer.get_info().await.ok()?;
            (info.num_pending == 0
                && info.num_ack_pending > 0
                && info.ack_floor.stream_sequence < last)
                .then_some(())
        }
    })
    .await?;
    let info = consumer.get_info().await?;
    assert!(
        info.ack_floor.stream_sequence <= 100,
        "nothing acked while PostgreSQL is down"
    );

    postgres.start_again().await?;
    pipeline.wait_acked(last).await?;
    let report = stop(shutdown, task).await?;

    let client = db.client().await?;
    assert_eq!(count(&client, "SELECT count(*) FROM customers").await?, 300);
    assert!(
        report.retries > 0,
        "the outage shows as retries: {report:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_poisonous_message_is_isolated_while_the_rest_of_its_batch_commits() -> anyhow::Result<()>
{
    let pipeline = Pipeline::new().await?;
    let db = TestDatabase::create().await?;
    let mut messages: Vec<_> = (1..=10)
        .map(|i| pipeline.synced(&synced(&format!("c{i}"), i, "Ada")))
        .collect();
    // A body that does not parse, and one that parses but holds a NUL byte PostgreSQL refuses.
    messages.push((
        pipeline.names.synced_subject(),
        b"{\"customer\": tru".to_vec(),
    ));
    messages.push(pipeline.synced(&synced("nul", 11, "Ada\0Lovelace")));
    messages.extend((12..=20).map(|i| pipeline.synced(&synced(&format!("c{i}"), i, "Ada"))));
    let last = pipeline.publish(messages).await?;

    let mut config = pipeline.config(&db.url);
    config.settings.writer.stop_when_drained = true;
    let report = persister::run(config, CancellationToken::new()).await?;
    pipeline.wait_acked(last).await?;

    let client = db.client().await?;
    assert_eq!(count(&client, "SELECT count(*) FROM customers").await?, 19);
    let poison = client
        .query(
            "SELECT subject, reason FROM poison_messages ORDER BY stream_seq",
            &[],
        )
        .await?;
    assert_eq!(poison.len(), 2, "{report:?}");
    let unparsable: String = poison[0].get(1);
    assert!(unparsable.contains("not a SyncedOutcome"), "{unparsable}");
    let refused: String = poison[1].get(1);
    assert!(refused.contains("PostgreSQL refused"), "{refused}");
    assert!(
        refused.contains("SQLSTATE 22"),
        "the server's reason is kept: {refused}"
    );
    assert_eq!(report.messages_acked, 21);
    assert_eq!(report.written.poison_written, 2);
    Ok(())
}

#[tokio::test]
async fn migrations_are_applied_at_start_and_idempotent() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let db = TestDatabase::create().await?;
    // An older layout with data in it, as a database of a previous release.
    let mut client = db.client().await?;
    let older = sync_store::migrate(&mut client, Some(1)).await?;
    assert_eq!(older.version, 1);
    client
        .batch_execute(
            "INSERT INTO customers (id, first_name, last_name, email, content_hash, ingest_seq, \
             synced_at) VALUES ('old', 'A', 'B', 'a@b.example', 'h', 1, now())",
        )
        .await?;

    let mut config = pipeline.config(&db.url);
    config.settings.writer.stop_when_drained = true;
    persister::run(config.clone(), CancellationToken::new()).await?;
    assert_eq!(
        sync_store::schema_version(&client).await?,
        sync_store::SCHEMA_VERSION
    );
    assert_eq!(count(&client, "SELECT count(*) FROM customers").await?, 1);

    // A second start, and a direct call, find nothing to do.
    persister::run(config, CancellationToken::new()).await?;
    let again = sync_store::migrate(&mut client, None).await?;
    assert!(again.applied.is_empty(), "{again:?}");
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_leaves_when_a_later_version_of_its_customer_syncs() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let db = TestDatabase::create().await?;
    let (shutdown, task) = start(pipeline.config(&db.url));

    let seq = pipeline
        .publish(vec![
            pipeline.dead(dead("c1", 5)).await?,
            pipeline.dead(dead("c2", 6)).await?,
        ])
        .await?;
    pipeline.wait_acked(seq).await?;
    let client = db.client().await?;
    assert_eq!(
        count(&client, "SELECT count(*) FROM dead_letters").await?,
        2
    );

    // c1 is redriven and succeeds under a later ingest sequence.
    let seq = pipeline
        .publish(vec![pipeline.synced(&synced("c1", 9, "Fixed"))])
        .await?;
    pipeline.wait_acked(seq).await?;
    stop(shutdown, task).await?;

    let left: Vec<String> = client
        .query("SELECT customer_id FROM dead_letters", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["c2".to_owned()]);

    // A dead letter of an older version arriving after the newer one synced is moot.
    let mut direct = db.client().await?;
    let late = sync_store::write_batch(&mut direct, &[Outcome::Dead(dead("c1", 7))]).await?;
    assert_eq!(late.dead_letters_written, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM dead_letters").await?,
        1
    );
    Ok(())
}

#[tokio::test]
async fn both_write_strategies_build_the_same_tables() -> anyhow::Result<()> {
    let batches: Vec<Vec<Outcome>> = vec![
        (1..=50)
            .map(|i| Outcome::Synced(synced(&format!("c{i}"), 100 + i, "First")))
            .chain([Outcome::Dead(dead("c1", 50)), Outcome::Dead(dead("z", 10))])
            .collect(),
        // Newer versions of some, older of others, and a repeat of the first batch's outcomes.
        (1..=50)
            .map(|i| {
                let seq = if i % 2 == 0 { 200 + i } else { i };
                Outcome::Synced(synced(&format!("c{i}"), seq, "Second"))
            })
            .chain([
                Outcome::Rejected(rejected(4)),
                Outcome::Rejected(rejected(4)),
            ])
            .collect(),
    ];
    let mut snapshots = Vec::new();
    for strategy in [
        sync_store::WriteStrategy::Unnest,
        sync_store::WriteStrategy::CopyMerge,
    ] {
        let db = TestDatabase::create().await?;
        let mut client = db.client().await?;
        sync_store::migrate(&mut client, None).await?;
        for batch in batches.iter().chain(batches.iter()) {
            sync_store::write_batch_with(&mut client, batch, strategy).await?;
        }
        let dead: Vec<String> = client
            .query("SELECT customer_id FROM dead_letters ORDER BY 1", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(dead, vec!["z".to_owned()], "{strategy:?}");
        snapshots.push(customers_snapshot(&client).await?);
    }
    assert_eq!(snapshots[0].len(), 50);
    assert_eq!(snapshots[0], snapshots[1]);
    Ok(())
}

/// Outcomes that no integrator can have made (the results subjects are where a forger who got past
/// NATS's permissions would write) are kept as poison, with the reason, and pin no customer: a load
/// from the future, a stamp from the data that its ingest message does not carry, a dead letter
/// whose record is not its ingest message's (`dlq redrive` would send it to the CRM) or that names
/// no ingest message at all.
#[tokio::test]
async fn outcomes_no_integrator_made_are_kept_as_poison_and_pin_nothing() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let db = TestDatabase::create().await?;
    let now = u64::try_from(Utc::now().timestamp_millis())?;

    let real = synced("c1", 2, "Real");
    let mut from_the_future = synced("c1", 3, "Forged");
    from_the_future.version = Some(Version::row(now + 3_600_000, 3));

    // A data-stamped version (csv-reader --version-column) vouched for by its ingest message, and
    // a forged one naming the same ingest message with a stamp that outranks everything.
    let stamped = Version {
        stamp: 5_000,
        load: 1,
        line: 4,
    };
    let mut vouched = synced("c2", 0, "Stamped");
    vouched.version = Some(stamped);
    vouched.ingest_seq = pipeline.ingest(vouched.customer.clone(), stamped).await?;
    let mut outranking = synced("c2", 0, "Forged");
    outranking.version = Some(Version {
        stamp: u64::MAX / 4,
        ..stamped
    });
    outranking.ingest_seq = vouched.ingest_seq;

    // Dead letters: one whose record is not its ingest message's, one naming nothing.
    let (_, honest) = pipeline.dead(dead("c3", 6)).await?;
    let honest: DeadLetter = serde_json::from_slice(&honest)?;
    let mut swapped = honest.clone();
    let forged_record = synced("c3", 6, "Forged").customer;
    swapped.content_hash = forged_record.content_hash();
    swapped.customer = Some(forged_record);
    let mut nowhere = dead("c4", 7);
    nowhere.ingest_seq = 1_000_000;

    let last = pipeline
        .publish(vec![
            pipeline.synced(&real),
            pipeline.synced(&from_the_future),
            pipeline.synced(&vouched),
            pipeline.synced(&outranking),
            (pipeline.names.dead_subject(), json(&swapped)),
            (pipeline.names.dead_subject(), json(&nowhere)),
            (pipeline.names.dead_subject(), json(&honest)),
        ])
        .await?;
    let (shutdown, task) = start(pipeline.config(&db.url));
    pipeline.wait_acked(last).await?;
    stop(shutdown, task).await?;

    let client = db.client().await?;
    assert_eq!(
        hash_of(&client, "c1").await?,
        (real.content_hash.to_string(), 2),
        "the load from the future pins nothing"
    );
    assert_eq!(
        hash_of(&client, "c2").await?.0,
        vouched.content_hash.to_string(),
        "the vouched stamp is stored, the outranking one is not"
    );
    let dead_hashes: Vec<String> = client
        .query("SELECT content_hash FROM dead_letters ORDER BY 1", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(dead_hashes, vec![honest.content_hash.to_string()]);
    let reasons: Vec<String> = client
        .query(
            "SELECT reason FROM poison_messages ORDER BY stream_seq",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:#?}");
    assert!(
        reasons.iter().all(|r| r.contains("no integrator made it")),
        "{reasons:#?}"
    );
    assert!(
        reasons[0].contains("past this host's clock"),
        "{reasons:#?}"
    );
    assert!(reasons[1].contains("carries"), "{reasons:#?}");
    assert!(reasons[2].contains("carries"), "{reasons:#?}");
    assert!(reasons[3].contains("does not hold"), "{reasons:#?}");
    Ok(())
}
