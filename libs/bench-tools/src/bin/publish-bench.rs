//! `publish-bench raw`: the reference run of deploy/local/bench.d/csv-reader.sh. It measures the
//! plain JetStream publish rate for messages shaped like the reader's, so the reader's rate can be
//! set beside what the same server allows. (The script makes its CSV and its namespaces with
//! `syncctl gen-csv`, `setup` and `teardown`.)

use std::future::IntoFuture as _;
use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use clap::{Parser, Subcommand};
use csv_reader::message::{MessageContext, customer_message};
use customer_record::ColumnLayout;
use futures::{StreamExt, stream::FuturesOrdered};
use serde::Serialize;
use sync_topology::{Names, TopologySettings};

#[derive(Debug, Parser)]
#[command(name = "publish-bench")]
struct Cli {
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish `count` reader-shaped messages with distinct dedup ids to a fresh stream, pipelined
    /// `window` deep, and print the rate as JSON. The stream is deleted afterwards.
    Raw {
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        #[arg(long, default_value_t = csv_reader::DEFAULT_PUBLISH_WINDOW)]
        window: usize,
        #[arg(long)]
        namespace: String,
    },
}

#[derive(Debug, Serialize)]
struct RawResult {
    messages: u64,
    payload_bytes: usize,
    header_bytes: usize,
    window: usize,
    elapsed_secs: f64,
    messages_per_sec: f64,
}

// The same runtime as csv-reader, so the raw rate is measured under the same conditions.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Raw {
            count,
            window,
            namespace,
        } => {
            let result = raw(&cli.nats_url, count, window, &namespace).await?;
            println!("{}", serde_json::to_string(&result)?);
        }
    }
    Ok(())
}

/// Publishes real reader messages (built from generated rows by the reader's own code) but skips
/// the CSV parsing: the difference to the reader's rate is what reading and parsing cost.
async fn raw(
    nats_url: &str,
    count: u64,
    window: usize,
    namespace: &str,
) -> anyhow::Result<RawResult> {
    let names = Names::new(namespace)?;
    let client = sync_topology::connect(nats_url, None, "publish-bench").await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(window * 2)
        .build(client);
    let settings = TopologySettings::default();
    js.create_stream(stream::Config {
        name: names.ingest_stream(),
        subjects: vec![names.ingest_subject()],
        duplicate_window: settings.dedup_window,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("creating the benchmark stream")?;

    // A pool of reader-shaped messages; each publish gets a distinct dedup id.
    let mut sample = Vec::new();
    csv_gen::generate(
        &csv_gen::GenOptions {
            rows: 1000,
            ..Default::default()
        },
        &mut sample,
    )?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(sample.as_slice());
    let mut rows = reader.byte_records();
    let header = rows.next().context("sample has a header")??;
    let layout = ColumnLayout::from_header(header.iter())?;
    let context = MessageContext::new(&names, "/bench/customers.csv", "file-bench", 1, 1024 * 1024);
    let mut pool = Vec::new();
    for (index, row) in rows.enumerate() {
        let record = layout.parse_row(row?.iter())?;
        pool.push(customer_message(&context, &record, index as u64 + 2)?);
    }
    let payload_bytes = pool.iter().map(|m| m.payload.len()).sum::<usize>() / pool.len().max(1);
    let header_bytes = pool
        .iter()
        .map(|m| {
            m.headers
                .iter()
                .map(|(k, v)| {
                    AsRef::<str>::as_ref(k).len()
                        + v.iter().map(|x| x.as_str().len() + 4).sum::<usize>()
                })
                .sum::<usize>()
        })
        .sum::<usize>()
        / pool.len().max(1);

    let started = Instant::now();
    let mut in_flight = FuturesOrdered::new();
    for i in 0..count {
        let template = &pool[(i as usize) % pool.len()];
        let mut message = template.clone();
        message.headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("bench-{i}:{}", template.line).as_str(),
        );
        let ack = js
            .send_publish(message.subject.clone(), message.to_publish())
            .await
            .with_context(|| format!("publishing message {i}"))?;
        in_flight.push_back(ack.into_future());
        while in_flight.len() >= window {
            if let Some(ack) = in_flight.next().await {
                ack.context("awaiting an ack")?;
            }
        }
    }
    while let Some(ack) = in_flight.next().await {
        ack.context("awaiting an ack")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    js.delete_stream(names.ingest_stream()).await.ok();
    Ok(RawResult {
        messages: count,
        payload_bytes,
        header_bytes,
        window,
        elapsed_secs: elapsed,
        messages_per_sec: count as f64 / elapsed,
    })
}
