//! Shared by the integration tests: a namespace with its topology on the real NATS server, an
//! in-process crm-mock, publishing ingest messages in the fixed format, and reading outcomes.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, kv};
use crm_integrator::IntegratorConfig;
use crm_mock::{CrmMockConfig, RunningMock};
use customer_record::CustomerRecord;
use futures::StreamExt as _;
use service_kit::NatsArgs;
use sync_topology::messages::{DeadLetter, SupersededOutcome, SyncedOutcome};
use sync_topology::{IngestMessage, Names, TopologySettings, Version, ids};
use tokio_util::sync::CancellationToken;

/// Short so a message held by a killed replica comes back within a test's patience.
pub const TEST_ACK_WAIT: Duration = Duration::from_secs(3);

pub struct Pipeline {
    pub names: Names,
    pub js: jetstream::Context,
    pub nats_url: String,
    /// The load number of the records this test publishes: their versions are `(load, line)`.
    pub load: u64,
}

impl Pipeline {
    pub async fn new() -> anyhow::Result<Self> {
        let nats_url = e2e::nats_url()?;
        let names = Names::new(&e2e::unique_namespace())?;
        let client = sync_topology::connect(&nats_url, None, "crm-integrator-test").await?;
        let js = jetstream::new(client);
        let settings = TopologySettings {
            integrator_ack_wait: TEST_ACK_WAIT,
            ..TopologySettings::default()
        };
        sync_topology::ensure_topology(&js, &names, &settings)
            .await
            .context("creating the test namespace's topology")?;
        Ok(Pipeline {
            names,
            js,
            nats_url,
            load: 1_000,
        })
    }

    /// An integrator config for this namespace and mock, with test-sized timeouts.
    pub fn config(&self, crm_url: &str) -> anyhow::Result<IntegratorConfig> {
        let nats = NatsArgs::new(&self.nats_url, self.names.namespace());
        let mut config = IntegratorConfig::new(nats, crm_url.parse().context("mock URL")?);
        config.settings.request_timeout = Duration::from_millis(300);
        config.settings.breaker.cooldown = Duration::from_millis(200);
        Ok(config)
    }

    /// Publishes one ingest message as csv-reader does, as line `line` of this test's load;
    /// returns its stream sequence.
    pub async fn publish(&self, record: &CustomerRecord, line: u64) -> anyhow::Result<u64> {
        let message = IngestMessage::from_row(
            record.clone(),
            Version::row(self.load, line),
            "test.csv",
            line,
        );
        self.publish_message(&message, &ids::ingest_row(&message.version))
            .await
    }

    /// Publishes a forced copy of line `line` (what `syncctl replay --force` makes).
    pub async fn publish_forced(&self, record: &CustomerRecord, line: u64) -> anyhow::Result<u64> {
        let message = IngestMessage::from_row(
            record.clone(),
            Version::row(self.load, line),
            "test.csv",
            line,
        )
        .copy(None, true);
        let id = ids::ingest_copy(
            ids::CopyKind::Replay,
            &message.version,
            &e2e::unique_namespace(),
        );
        self.publish_message(&message, &id).await
    }

    pub async fn publish_message(
        &self,
        message: &IngestMessage,
        message_id: &str,
    ) -> anyhow::Result<u64> {
        let (headers, body) = message.encode(message_id)?;
        let ack = self
            .js
            .publish_with_headers(self.names.ingest_subject(), headers, body)
            .await
            .context("publishing an ingest message")?
            .await
            .context("awaiting the ingest publish ack")?;
        Ok(ack.sequence)
    }

    pub async fn publish_all(&self, records: &[CustomerRecord]) -> anyhow::Result<Vec<u64>> {
        let mut seqs = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            seqs.push(self.publish(record, i as u64 + 2).await?);
        }
        Ok(seqs)
    }

    /// Every outcome published so far, in stream order.
    pub async fn outcomes(&self) -> anyhow::Result<Outcomes> {
        let mut stream = self.js.get_stream(self.names.results_stream()).await?;
        let state = stream.info().await?.state.clone();
        let mut outcomes = Outcomes::default();
        if state.messages == 0 {
            return Ok(outcomes);
        }
        for seq in state.first_sequence..=state.last_sequence {
            let message = stream
                .get_raw_message(seq)
                .await
                .with_context(|| format!("reading result {seq}"))?;
            if message.subject.as_str() == self.names.synced_subject() {
                outcomes
                    .synced
                    .push(serde_json::from_slice(&message.payload)?);
            } else if message.subject.as_str() == self.names.dead_subject() {
                outcomes
                    .dead
                    .push(serde_json::from_slice(&message.payload)?);
            } else if message.subject.as_str() == self.names.superseded_subject() {
                outcomes
                    .superseded
                    .push(serde_json::from_slice(&message.payload)?);
            }
        }
        Ok(outcomes)
    }

    /// Waits until `count` ingest messages have an outcome each.
    pub async fn wait_for_outcomes(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Outcomes> {
        e2e::wait_for(&format!("{count} outcomes"), timeout, || async {
            let outcomes = self.outcomes().await.ok()?;
            (outcomes.settled_seqs().len() >= count).then_some(outcomes)
        })
        .await
    }

    pub async fn ledger(&self) -> anyhow::Result<kv::Store> {
        Ok(self.js.get_key_value(self.names.ledger_bucket()).await?)
    }

    pub async fn control(&self) -> anyhow::Result<kv::Store> {
        Ok(self.js.get_key_value(self.names.control_bucket()).await?)
    }

    /// Ingest messages not yet acknowledged by the integrators' consumer.
    pub async fn unacked(&self) -> anyhow::Result<u64> {
        let mut consumer: jetstream::consumer::PullConsumer = self
            .js
            .get_consumer_from_stream("integrators", self.names.ingest_stream())
            .await?;
        let info = consumer.info().await?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }
}

#[derive(Debug, Default)]
pub struct Outcomes {
    pub synced: Vec<SyncedOutcome>,
    pub superseded: Vec<SupersededOutcome>,
    pub dead: Vec<DeadLetter>,
}

impl Outcomes {
    /// Ingest sequences with an outcome; panics (test failure) if one has two.
    pub fn settled_seqs(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self
            .synced
            .iter()
            .map(|o| o.ingest_seq)
            .chain(self.superseded.iter().map(|s| s.ingest_seq))
            .chain(self.dead.iter().map(|d| d.ingest_seq))
            .collect();
        seqs.sort_unstable();
        let before = seqs.len();
        seqs.dedup();
        assert_eq!(before, seqs.len(), "an ingest message has two outcomes");
        seqs
    }
}

pub fn customer(id: &str, first_name: &str) -> CustomerRecord {
    CustomerRecord::normalised(
        id,
        first_name,
        "Tester",
        &format!("{id}@example.com"),
        None,
        BTreeMap::from([("tier".to_owned(), "gold".to_owned())]),
    )
}

pub fn customers(prefix: &str, count: usize) -> Vec<CustomerRecord> {
    (0..count)
        .map(|i| customer(&format!("{prefix}{i}"), &format!("Name{i}")))
        .collect()
}

pub async fn start_mock(
    config: CrmMockConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<RunningMock> {
    crm_mock::start(
        CrmMockConfig {
            listen: "127.0.0.1:0".parse()?,
            ..config
        },
        shutdown.clone(),
    )
    .await
}

/// Fetches what the CRM holds for `id`.
pub async fn crm_holds(mock: &RunningMock, id: &str) -> anyhow::Result<Option<CustomerRecord>> {
    let response = reqwest::get(format!("{}/customers/{id}", mock.url)).await?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let stored: crm_integrator::CrmCustomer = response.error_for_status()?.json().await?;
    Ok(Some(stored.customer))
}

/// Takes the next `n` deliveries off the integrators' consumer, to settle by hand in any order.
pub async fn take(pipeline: &Pipeline, n: usize) -> anyhow::Result<Vec<jetstream::Message>> {
    let consumer: PullConsumer = pipeline
        .js
        .get_consumer_from_stream("integrators", pipeline.names.ingest_stream())
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(n)
        .expires(Duration::from_secs(5))
        .messages()
        .await?;
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        messages.push(message.map_err(|e| anyhow::anyhow!("fetch failed: {e}"))?);
    }
    anyhow::ensure!(messages.len() == n, "took {} of {n}", messages.len());
    Ok(messages)
}
