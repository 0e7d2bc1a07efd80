//! Reference (2): drains `--count` messages from a pre-filled ingest stream (the namespace's
//! `integrators` consumer) doing only the per-record JetStream work no design can avoid: pull,
//! publish an outcome with a dedup id and await its PubAck, ack. Up to `--in-flight` records at
//! once, like the integrator's messages in hand. Prints one JSON line with the seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::PullConsumer};
use clap::Parser as _;
use futures::StreamExt as _;
use sync_topology::Names;
use tokio::sync::Semaphore;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, clap::Parser)]
#[command(about = "The per-record JetStream work alone: pull, publish an outcome, ack")]
struct Args {
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[arg(long, env = "SYNC_NAMESPACE")]
    namespace: String,
    #[arg(long)]
    count: u64,
    #[arg(long, default_value_t = 128)]
    fetch_batch: usize,
    #[arg(long, default_value_t = 512)]
    in_flight: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let names = Names::new(&args.namespace)?;
    let client = sync_topology::connect(&args.nats_url, None, "jetstream-reference").await?;
    let js = jetstream::new(client);
    let consumer: PullConsumer = js
        .get_consumer_from_stream(names.integrators_consumer(), names.ingest_stream())
        .await
        .context("the namespace's integrators consumer (fill it with integrator-bench-fill)")?;
    let subject = names.synced_subject();
    let permits = Arc::new(Semaphore::new(args.in_flight.max(1)));
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(args.fetch_batch)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .context("starting the pull")?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut pulled = 0u64;
    while pulled < args.count {
        let permit = permits.clone().acquire_owned().await?;
        let Some(message) = messages.next().await else {
            anyhow::bail!("the pull ended after {pulled} messages");
        };
        let message = message.map_err(|e| anyhow::anyhow!("pulling: {e}"))?;
        pulled += 1;
        let (js, subject) = (js.clone(), subject.clone());
        tasks.spawn(async move {
            let seq = message
                .info()
                .map(|i| i.stream_sequence)
                .unwrap_or_default();
            // The integrator's outcome id, so the server's dedup does the same work.
            let id = sync_topology::ids::outcome(seq, &sync_topology::Version::legacy(seq));
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            let ack = js
                .publish_with_headers(subject, headers, message.payload.clone())
                .await
                .map_err(|e| anyhow::anyhow!("publishing outcome {seq}: {e}"))?;
            ack.await
                .map_err(|e| anyhow::anyhow!("outcome {seq} PubAck: {e}"))?;
            message
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("acking {seq}: {e}"))?;
            drop(permit);
            anyhow::Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds,
            "records": args.count,
            "records_per_second": args.count as f64 / seconds,
        })
    );
    Ok(())
}
