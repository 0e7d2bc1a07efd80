//! `syncctl replay --results`: rebuilds the PostgreSQL tables from the results stream into an empty
//! database, with the persister's own writer ([`outcome_writer`]), so the rebuilt tables are exactly
//! what the persister would have written.
//!
//! A fresh durable consumer (`rebuild_{nonce}`, DeliverAll, explicit ack) reads every outcome the
//! stream still holds; the writer writes them in batches and stops once that consumer is drained;
//! the consumer is then deleted. The service's own `persister` consumer is not touched.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use serde::Serialize;
use service_kit::NatsArgs;
use sync_store::TableCounts;
use tokio_util::sync::CancellationToken;

use crate::{CtlError, Pipeline, nats_error};

#[derive(Debug, Clone)]
pub struct RebuildConfig {
    pub nats: NatsArgs,
    pub database_url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RebuildOutcome {
    pub consumer: String,
    pub schema_version: i32,
    pub report: outcome_writer::RunReport,
    pub tables: TableCounts,
}

/// Migrates the (empty) database, then writes every outcome of the results stream into it.
pub async fn run(
    config: &RebuildConfig,
    shutdown: CancellationToken,
) -> Result<RebuildOutcome, CtlError> {
    let pipeline = Pipeline::connect(&config.nats).await?;
    let stream_name = pipeline.names.results_stream();
    let stream = pipeline.stream(&stream_name).await?;

    let mut client =
        crate::connect_database(&config.database_url, config.nats.startup_wait).await?;
    let migration = sync_store::migrate(&mut client, None).await?;
    let before = sync_store::table_counts(&client).await?;
    if before != TableCounts::default() {
        return Err(CtlError::Usage(format!(
            "database {} is not empty (customers {}, rejected_rows {}, dead_letters {}): \
             rebuild into an empty database",
            sync_store::redact(&config.database_url),
            before.customers,
            before.rejected_rows,
            before.dead_letters
        )));
    }

    let name = format!("rebuild_{}", crate::nonce());
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            description: Some("syncctl replay --results: rebuilds the tables once".to_owned()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 50_000,
            // Left behind by a crashed rebuild, it removes itself.
            inactive_threshold: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .map_err(|e| nats_error(format!("creating consumer {stream_name}/{name}"), e))?;

    let written = write_outcomes(config, &pipeline, &name, shutdown).await;
    if let Err(err) = stream.delete_consumer(&name).await {
        tracing::warn!(%err, consumer = %name, "could not delete the rebuild consumer; it expires in an hour");
    }
    let report = written?;
    let tables = sync_store::table_counts(&client).await?;
    Ok(RebuildOutcome {
        consumer: name,
        schema_version: migration.version,
        report,
        tables,
    })
}

/// Writes every outcome of consumer `name` into the database, as the persister would, until the
/// consumer is drained.
async fn write_outcomes(
    config: &RebuildConfig,
    pipeline: &Pipeline,
    name: &str,
    shutdown: CancellationToken,
) -> Result<outcome_writer::RunReport, CtlError> {
    let failed = |err: &(dyn std::error::Error + 'static)| CtlError::Rebuild {
        message: service_kit::one_line(err),
    };
    let settings = outcome_writer::Settings {
        consumer: name.to_owned(),
        stop_when_drained: true,
        ..outcome_writer::Settings::default()
    };
    let pool = sync_store::connect_pool(&config.database_url, settings.writers.max(1))
        .map_err(|err| failed(&err))?;
    let endpoints = outcome_writer::Endpoints {
        client: pipeline.client.clone(),
        names: pipeline.names.clone(),
        nats_shown: config.nats.redacted_url(),
        pool,
        database_url: config.database_url.clone(),
    };
    let writer = outcome_writer::OutcomeWriter::bind(endpoints, settings)
        .await
        .map_err(|err| failed(&err))?;
    // Nobody asks this run whether it is ready.
    writer
        .run(&service_kit::Health::default(), shutdown)
        .await
        .map_err(|err| failed(&err))
}
