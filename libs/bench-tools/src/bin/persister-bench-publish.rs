//! Benchmark helper for `deploy/local/bench.d/persister.sh`: fills a namespace's results stream with
//! a backlog of synced outcomes (and writes the same rows as a CSV for a plain `COPY` beside it),
//! creates extra durable consumers so several persister runs can each drain the whole backlog, and
//! deletes the namespace's layout afterwards. It also gives the script the library's schema for a
//! database (`--migrate`) and the database's share of the persister's work (`--store-direct`: the
//! same outcomes through the store's own batch write, with no NATS), so no SQL is retyped there.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use clap::Parser;
use customer_record::CustomerRecord;
use service_kit::NatsArgs;
use sync_topology::messages::{SyncAction, SyncedOutcome};
use sync_topology::{Names, Version};

#[derive(Debug, Parser)]
#[command(about = "Publishes a backlog of synced outcomes for the persister benchmark")]
struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    /// Outcomes to publish (one customer each).
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Also write the same rows, in `customers` column order, as CSV for `COPY`.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Extra durable consumers to create on the results stream, configured like `persister`.
    #[arg(long, value_delimiter = ',')]
    consumers: Vec<String>,
    /// Publish acks awaited at most this far behind. Stay under async-nats's default cap of 5,000
    /// acks in flight per context, beyond which `publish` itself waits and the window deadlocks.
    #[arg(long, default_value_t = 4_000)]
    window: usize,
    /// Delete the namespace's streams and buckets instead of publishing.
    #[arg(long)]
    delete: bool,
    /// Apply the store's migrations to this database instead of publishing.
    #[arg(long, value_name = "DATABASE_URL")]
    migrate: Option<String>,
    /// Instead of publishing, write the same `--count` outcomes into this database through the
    /// store's batch write (`--batch-size` per transaction, one connection), and print the seconds
    /// it took.
    #[arg(long, value_name = "DATABASE_URL")]
    store_direct: Option<String>,
    /// Outcomes per transaction for `--store-direct`.
    #[arg(long, default_value_t = 4_000)]
    batch_size: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.migrate {
        drop(migrated_client(url).await?);
        return Ok(());
    }
    if let Some(url) = &args.store_direct {
        return store_direct(url, args.count, args.batch_size).await;
    }
    let names = Names::new(&args.nats.namespace)?;
    let client = sync_topology::connect(&args.nats.nats_url, None, "persister-bench").await?;
    let js = jetstream::new(client);
    if args.delete {
        sync_topology::teardown(&js, &names).await?;
        return Ok(());
    }
    let settings = sync_topology::TopologySettings::default();
    sync_topology::ensure_topology(&js, &names, &settings).await?;
    for name in &args.consumers {
        js.create_consumer_on_stream(
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: settings.persister_ack_wait,
                max_deliver: -1,
                max_ack_pending: settings.persister_max_ack_pending,
                ..Default::default()
            },
            names.results_stream(),
        )
        .await
        .with_context(|| format!("creating consumer {name}"))?;
    }

    let mut csv = match &args.csv {
        Some(path) => Some(
            csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => None,
    };
    let synced_at: DateTime<Utc> = Utc::now();
    let subject = names.synced_subject();
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(args.window);
    for seq in 1..=args.count {
        let outcome = outcome(seq, synced_at);
        if let Some(writer) = csv.as_mut() {
            writer
                .write_record(csv_row(&outcome)?)
                .context("writing the CSV")?;
        }
        let body = serde_json::to_vec(&outcome)?;
        let ack = js
            .publish(subject.clone(), body.into())
            .await
            .with_context(|| format!("publishing outcome {seq}"))?;
        in_flight.push_back(ack);
        if in_flight.len() >= args.window
            && let Some(ack) = in_flight.pop_front()
        {
            ack.await.context("publish ack")?;
        }
        if seq % 100_000 == 0 {
            eprintln!("published {seq} in {:.1?}", started.elapsed());
        }
    }
    for ack in in_flight {
        ack.await.context("publish ack")?;
    }
    if let Some(mut writer) = csv {
        writer.flush().context("flushing the CSV")?;
    }
    let took = started.elapsed();
    eprintln!(
        "published {} outcomes in {took:.1?} ({:.0}/s)",
        args.count,
        args.count as f64 / took.as_secs_f64().max(f64::EPSILON)
    );
    Ok(())
}

/// A connection to `url` with the store's schema applied (a connection of its own, not a pool).
async fn migrated_client(url: &str) -> anyhow::Result<deadpool_postgres::Object> {
    let pool = sync_store::connect_pool(url, 1)?;
    let mut client = sync_store::connection(&pool, url).await?;
    sync_store::migrate(&mut client, None).await?;
    Ok(client)
}

/// The database's share: every outcome through the store's own statements, no NATS, no decoding.
async fn store_direct(url: &str, count: u64, batch_size: usize) -> anyhow::Result<()> {
    let mut client = migrated_client(url).await?;
    let synced_at = Utc::now();
    let batch_size = batch_size.max(1);
    let mut batch = Vec::with_capacity(batch_size);
    let mut writing = std::time::Duration::ZERO;
    for seq in 1..=count {
        batch.push(sync_store::Outcome::Synced(outcome(seq, synced_at)));
        if batch.len() == batch_size || seq == count {
            let started = Instant::now();
            sync_store::write_batch(&mut client, &batch).await?;
            writing += started.elapsed();
            batch.clear();
        }
    }
    println!("{:.3}", writing.as_secs_f64());
    Ok(())
}

fn outcome(seq: u64, synced_at: DateTime<Utc>) -> SyncedOutcome {
    let mut attributes = BTreeMap::new();
    attributes.insert("segment".to_owned(), format!("s{}", seq % 17));
    attributes.insert("country".to_owned(), "DE".to_owned());
    let id = format!("cust-{seq:08}");
    let customer = CustomerRecord::normalised(
        &id,
        "Grace",
        &format!("Hopper{}", seq % 1000),
        &format!("grace.{seq}@example.com"),
        Some("+49 30 1234567"),
        attributes,
    );
    SyncedOutcome {
        content_hash: customer.content_hash(),
        crm_id: Some(format!("crm-{seq}")),
        customer,
        version: Some(Version::row(1, seq + 1)),
        ingest_seq: seq,
        action: SyncAction::Created,
        source_file: Some("bench.csv".to_owned()),
        source_line: Some(seq + 1),
        synced_at,
    }
}

/// The `customers` columns in table order (the version columns came last, with schema version 4),
/// as the persister would store them.
fn csv_row(o: &SyncedOutcome) -> anyhow::Result<Vec<String>> {
    let c = &o.customer;
    Ok(vec![
        c.id.clone(),
        c.first_name.clone(),
        c.last_name.clone(),
        c.email.clone(),
        c.phone.clone().unwrap_or_default(),
        serde_json::to_string(&c.attributes)?,
        o.content_hash.to_string(),
        o.ingest_seq.to_string(),
        o.crm_id.clone().unwrap_or_default(),
        o.synced_at.to_rfc3339(),
        o.source_file.clone().unwrap_or_default(),
        o.source_line.map(|l| l.to_string()).unwrap_or_default(),
        o.version().stamp.to_string(),
        o.version().load.to_string(),
        o.version().line.to_string(),
    ])
}
