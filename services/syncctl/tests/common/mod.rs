//! Shared by syncctl's integration tests: a namespace (and database) of the test's own with the full
//! layout, and ingest messages published and settled by hand, standing in for the services.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use customer_record::CustomerRecord;
use e2e::TestDatabase;
use futures::StreamExt as _;
use service_kit::NatsArgs;
use sync_topology::{IngestMessage, TopologySettings, Version, ids};
use syncctl::Pipeline;
use syncctl::setup::SetupConfig;

pub fn nats_args() -> anyhow::Result<NatsArgs> {
    Ok(NatsArgs::new(e2e::nats_url()?, e2e::unique_namespace()))
}

pub fn setup_config(nats: &NatsArgs, db: Option<&TestDatabase>) -> SetupConfig {
    SetupConfig {
        nats: nats.clone(),
        database_url: db.map(|db| db.url.clone()),
        settings: TopologySettings::default(),
    }
}

/// A fresh namespace with the full layout.
pub async fn prepared(db: Option<&TestDatabase>) -> anyhow::Result<(NatsArgs, Pipeline)> {
    let nats = nats_args()?;
    syncctl::setup::run(&setup_config(&nats, db))
        .await
        .context("syncctl setup")?;
    let pipeline = Pipeline::connect(&nats).await?;
    Ok((nats, pipeline))
}

pub fn customer(id: &str, email: &str) -> CustomerRecord {
    CustomerRecord::normalised(id, "Ada", "Lovelace", email, None, Default::default())
}

/// The load number of the rows these tests publish.
pub const LOAD: u64 = 7;

/// Publishes a row the way csv-reader does (line `line` of load [`LOAD`]); returns its stream
/// sequence.
pub async fn publish_row(
    pipeline: &Pipeline,
    record: &CustomerRecord,
    line: u64,
) -> anyhow::Result<u64> {
    let version = Version::row(LOAD, line);
    let message = IngestMessage::from_row(record.clone(), version, "customers.csv", line);
    let (headers, body) = message.encode(&ids::ingest_row(&version))?;
    let ack = pipeline
        .js
        .publish_with_headers(pipeline.names.ingest_subject(), headers, body)
        .await?
        .await?;
    Ok(ack.sequence)
}

/// Takes `n` messages off the integrators' consumer and acks them, as integrators would.
pub async fn settle_ingest(pipeline: &Pipeline, n: usize) -> anyhow::Result<()> {
    let consumer: jetstream::consumer::PullConsumer = pipeline
        .js
        .get_consumer_from_stream(
            pipeline.names.integrators_consumer(),
            pipeline.names.ingest_stream(),
        )
        .await?;
    let mut messages = consumer
        .fetch()
        .max_messages(n)
        .expires(Duration::from_secs(5))
        .messages()
        .await?;
    let mut settled = 0;
    while let Some(message) = messages.next().await {
        message
            .map_err(|e| anyhow::anyhow!("fetching: {e}"))?
            .double_ack()
            .await
            .map_err(|e| anyhow::anyhow!("acking: {e}"))?;
        settled += 1;
    }
    anyhow::ensure!(settled == n, "settled {settled} of {n} ingest messages");
    Ok(())
}
