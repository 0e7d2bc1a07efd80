//! `syncctl prune`: removes settled messages older than the retention from both streams (see
//! `sync_topology::prune_settled`). Streams never expire messages by age themselves, so this is
//! how space comes back; a message without its outcome is never removed, however old.

use std::fmt;
use std::time::Duration;

use service_kit::NatsArgs;
use sync_topology::PruneReport;

use crate::{CtlError, Pipeline, nats_error};

#[derive(Debug, Clone)]
pub struct PruneConfig {
    pub nats: NatsArgs,
    /// None: the retention `syncctl setup --retention` stored on each stream.
    pub older_than: Option<Duration>,
}

pub async fn run(config: &PruneConfig) -> Result<PruneReport, CtlError> {
    let pipeline = Pipeline::connect(&config.nats).await?;
    pipeline.stream(&pipeline.names.ingest_stream()).await?;
    pipeline.stream(&pipeline.names.results_stream()).await?;
    sync_topology::prune_settled(&pipeline.js, &pipeline.names, config.older_than)
        .await
        .map_err(|e| nats_error("pruning settled messages", e))
}

/// The report as the CLI prints it.
pub struct Printed<'a>(pub &'a PruneReport);

impl fmt::Display for Printed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.0.streams {
            writeln!(
                f,
                "{}: removed {} message(s) below sequence {} (settled up to {} by {}, retention {})",
                s.stream,
                s.purged,
                s.pruned_below,
                s.ack_floor,
                s.consumer,
                humantime::format_duration(Duration::from_secs(s.retention_secs))
            )?;
        }
        Ok(())
    }
}
