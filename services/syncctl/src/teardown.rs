//! `syncctl teardown`: deletes a namespace's streams and buckets with every message in them (a
//! benchmark's scratch namespace, or a pipeline being retired). The database is left alone: its
//! tables are the record of what the CRM confirmed.

use std::fmt;

use service_kit::NatsArgs;
use sync_topology::TeardownReport;

use crate::{CtlError, Pipeline};

pub async fn run(nats: &NatsArgs) -> Result<TeardownReport, CtlError> {
    let pipeline = Pipeline::connect(nats).await?;
    Ok(sync_topology::teardown(&pipeline.js, &pipeline.names).await?)
}

/// The report as the CLI prints it.
pub struct Printed<'a>(pub &'a TeardownReport);

impl fmt::Display for Printed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for stream in &self.0.deleted {
            writeln!(f, "deleted {stream}")?;
        }
        for stream in &self.0.absent {
            writeln!(f, "absent  {stream} (nothing to delete)")?;
        }
        Ok(())
    }
}
