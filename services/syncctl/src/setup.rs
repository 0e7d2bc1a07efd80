//! `syncctl setup`: brings streams, consumers, buckets and the PostgreSQL schema to this build's
//! layout. Idempotent: a second run changes nothing and says so.

use std::fmt;

use service_kit::NatsArgs;
use sync_store::MigrationReport;
use sync_topology::{SetupReport, TopologySettings};

use crate::{CtlError, Pipeline};

#[derive(Debug, Clone)]
pub struct SetupConfig {
    pub nats: NatsArgs,
    /// `None` skips the database (`--skip-db`).
    pub database_url: Option<String>,
    pub settings: TopologySettings,
}

#[derive(Debug, Clone)]
pub struct SetupOutcome {
    pub topology: SetupReport,
    /// `None` when the database was skipped.
    pub schema: Option<SchemaOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaOutcome {
    pub version_before: i32,
    pub migration: MigrationReport,
}

impl SetupOutcome {
    /// True when anything was created, updated or migrated.
    pub fn changed(&self) -> bool {
        self.topology.changed()
            || self
                .schema
                .as_ref()
                .is_some_and(|s| !s.migration.applied.is_empty())
    }
}

impl fmt::Display for SetupOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.topology)?;
        match &self.schema {
            Some(schema) if schema.migration.applied.is_empty() => writeln!(
                f,
                "Unchanged: schema at version {}",
                schema.migration.version
            )?,
            Some(schema) => writeln!(
                f,
                "Updated: schema from version {} to {} (applied {})",
                schema.version_before,
                schema.migration.version,
                schema.migration.applied.join(", ")
            )?,
            None => writeln!(f, "Skipped: database (--skip-db)")?,
        }
        if self.changed() {
            writeln!(f, "setup done")
        } else {
            writeln!(
                f,
                "setup done: everything was already up to date, nothing changed"
            )
        }
    }
}

/// Creates or updates the namespace's JetStream layout, then migrates the schema.
pub async fn run(config: &SetupConfig) -> Result<SetupOutcome, CtlError> {
    let pipeline = Pipeline::connect(&config.nats).await?;
    let topology =
        sync_topology::ensure_topology(&pipeline.js, &pipeline.names, &config.settings).await?;
    let schema = match &config.database_url {
        Some(url) => {
            let mut client = crate::connect_database(url, config.nats.startup_wait).await?;
            let version_before = sync_store::schema_version(&client).await?;
            let migration = sync_store::migrate(&mut client, None).await?;
            Some(SchemaOutcome {
                version_before,
                migration,
            })
        }
        None => None,
    };
    Ok(SetupOutcome { topology, schema })
}
