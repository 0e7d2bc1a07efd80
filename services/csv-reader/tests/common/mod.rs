//! Shared by the integration tests: a namespace of the test's own on the real NATS, and reading
//! back what the reader published.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, message::StreamMessage};
use csv_reader::ReaderConfig;
use futures::StreamExt;
use service_kit::NatsArgs;
use sync_topology::messages::Checkpoint;
use sync_topology::{Names, TopologySettings, ensure_topology};
use tokio::process::Command;

pub struct Pipeline {
    pub names: Names,
    pub nats_url: String,
    pub js: jetstream::Context,
}

impl Pipeline {
    /// A fresh namespace with its streams and buckets, as `syncctl setup` makes them.
    pub async fn new() -> anyhow::Result<Self> {
        let pipeline = Self::without_topology().await?;
        ensure_topology(&pipeline.js, &pipeline.names, &TopologySettings::default())
            .await
            .context("creating the topology")?;
        Ok(pipeline)
    }

    /// A fresh namespace with nothing in it.
    pub async fn without_topology() -> anyhow::Result<Self> {
        let nats_url = e2e::nats_url()?;
        let names = Names::new(&e2e::unique_namespace())?;
        let client = async_nats::connect(&nats_url)
            .await
            .with_context(|| format!("connecting to {nats_url}"))?;
        Ok(Pipeline {
            names,
            nats_url,
            js: jetstream::new(client),
        })
    }

    pub fn config(&self, input: &Path) -> ReaderConfig {
        let mut config = ReaderConfig::new(
            input,
            NatsArgs::new(self.nats_url.clone(), self.names.namespace()),
        );
        // Tests look at summaries, not at progress lines.
        config.settings.progress = csv_reader::progress::ProgressMode::Off;
        config
    }

    /// The csv-reader binary on `input`, pointed at this namespace.
    pub fn reader_command(&self, input: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut command = Command::new(e2e::binary("csv-reader")?);
        command.arg(input).args([
            "--namespace",
            self.names.namespace(),
            "--nats-url",
            &self.nats_url,
        ]);
        Ok(command)
    }

    pub async fn message_count(&self, stream: &str) -> anyhow::Result<u64> {
        let mut stream = self.js.get_stream(stream).await?;
        Ok(stream.info().await?.state.messages)
    }

    /// Every message of `stream`, in stream order.
    pub async fn messages(&self, stream: &str) -> anyhow::Result<Vec<StreamMessage>> {
        let mut handle = self.js.get_stream(stream).await?;
        let last = handle.info().await?.state.last_sequence;
        let mut messages = Vec::new();
        for sequence in 1..=last {
            messages.push(
                handle
                    .get_raw_message(sequence)
                    .await
                    .with_context(|| format!("reading {stream} #{sequence}"))?,
            );
        }
        Ok(messages)
    }

    /// Header `name` of every message of `stream`, in stream order ("" where it is missing). One
    /// ordered consumer instead of a request per message: quick for thousands of messages.
    pub async fn header_values(&self, stream: &str, name: &str) -> anyhow::Result<Vec<String>> {
        let count = self.message_count(stream).await?;
        let consumer = self
            .js
            .get_stream(stream)
            .await?
            .create_consumer(pull::OrderedConfig {
                headers_only: true,
                ..Default::default()
            })
            .await
            .with_context(|| format!("reading {stream}"))?;
        let mut messages = consumer.messages().await?;
        let mut values = Vec::new();
        while (values.len() as u64) < count {
            let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .with_context(|| format!("{stream}: message {} did not come", values.len() + 1))?
                .with_context(|| format!("{stream}: the consumer ended"))??;
            let value = message.headers.as_ref().and_then(|h| h.get(name));
            values.push(value.map(|v| v.as_str().to_owned()).unwrap_or_default());
        }
        Ok(values)
    }

    pub async fn checkpoint(&self, key: &str) -> anyhow::Result<Option<Checkpoint>> {
        let kv = self
            .js
            .get_key_value(self.names.checkpoints_bucket())
            .await?;
        let Some(value) = kv.get(key).await? else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(&value)?))
    }

    pub async fn delete_streams(&self) -> anyhow::Result<()> {
        sync_topology::teardown(&self.js, &self.names).await?;
        Ok(())
    }
}

pub fn header<'a>(message: &'a StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

/// The checkpoint key of a file, as the reader computes it.
pub fn checkpoint_key(path: &Path) -> anyhow::Result<String> {
    let canonical = std::fs::canonicalize(path)?;
    Ok(csv_reader::input::file_key(
        &canonical.display().to_string(),
    ))
}
