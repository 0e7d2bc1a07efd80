//! Benchmark helper: creates a namespace's topology and fills its ingest stream with synthetic
//! customers in the fixed ingest format, or deletes the namespace afterwards. Also waits until
//! the integrators' consumer has drained, printing the seconds it took.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::PullConsumer};
use clap::Parser as _;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use sync_topology::{IngestMessage, Names, TopologySettings, Version, ids};

#[derive(Debug, clap::Parser)]
#[command(about = "Fill, drain-wait or delete a benchmark namespace of crm-integrator")]
struct Args {
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[arg(long)]
    namespace: String,
    /// Customers to publish (ids `{prefix}{n}`).
    #[arg(long, default_value_t = 0)]
    count: u64,
    #[arg(long, default_value = "bench-")]
    prefix: String,
    /// Publish acks awaited at once.
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Instead of filling: wait until the integrators' consumer has nothing pending or unacked.
    #[arg(long)]
    wait_drained: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Instead of filling: delete the namespace's streams and buckets.
    #[arg(long)]
    delete: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let names = Names::new(&args.namespace)?;
    let client = sync_topology::connect(&args.nats_url, None, "integrator-bench-fill").await?;
    let js = jetstream::new(client);
    if args.delete {
        let report = sync_topology::teardown(&js, &names).await?;
        eprintln!(
            "deleted {:?}; already absent {:?}",
            report.deleted, report.absent
        );
        return Ok(());
    }
    if args.wait_drained {
        return wait_drained(&js, &names, Duration::from_secs(args.timeout_secs)).await;
    }
    sync_topology::ensure_topology(&js, &names, &TopologySettings::default()).await?;
    let started = Instant::now();
    let subject = names.ingest_subject();
    let mut acks = FuturesUnordered::new();
    // One load per fill: a fill of another namespace, or another run, never collides.
    let load = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(1);
    for n in 0..args.count {
        let record = bench_tools::bench_customer(&args.prefix, n);
        let message =
            IngestMessage::from_row(record, Version::row(load, n + 2), "bench.csv", n + 2);
        let (headers, body) = message.encode(&ids::ingest_row(&message.version))?;
        let ack = js
            .publish_with_headers(subject.clone(), headers, body)
            .await
            .with_context(|| format!("publishing record {n}"))?;
        acks.push(ack.into_future());
        if acks.len() >= args.window
            && let Some(ack) = acks.next().await
        {
            ack.context("publish ack")?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack.context("publish ack")?;
    }
    eprintln!(
        "published {} records to {subject} in {:.2}s",
        args.count,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn wait_drained(
    js: &jetstream::Context,
    names: &Names,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut consumer: PullConsumer = js
        .get_consumer_from_stream(names.integrators_consumer(), names.ingest_stream())
        .await?;
    let started = Instant::now();
    loop {
        let info = consumer.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            println!("{:.3}", started.elapsed().as_secs_f64());
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < timeout, "not drained after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
