//! `syncctl dlq`: what the CRM refused for good (from the `dead_letters` table), and putting those
//! records back on the ingest path once the cause is fixed.
//!
//! A redriven record is republished onto the ingest subject as a copy of the version that died
//! (see `sync_topology::ingest`: same body, source and `Sync-Version`) with a fresh `Nats-Msg-Id`
//! `redrive:{version}:{nonce}` so the stream's dedup window does not drop it. It leaves the table
//! when the persister writes its synced outcome; a record that fails again is dead-lettered again.
//! A dead letter whose customer the ledger knows at a newer version is not redriven (it would only
//! be recorded as superseded) but named.

use std::fmt;

use chrono::{DateTime, Utc};
use customer_record::CustomerRecord;
use serde::Serialize;
use service_kit::NatsArgs;
use sync_topology::ids::{self, CopyKind};
use sync_topology::{IngestMessage, Version};

use crate::{CtlError, Pipeline, nats_error};

#[derive(Debug, Clone)]
pub struct ListConfig {
    pub database_url: String,
    pub limit: i64,
    /// How long to wait for a database that does not answer yet (`--startup-wait`).
    pub startup_wait: std::time::Duration,
}

/// One row of `dead_letters`, newest first in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterRow {
    pub customer_id: String,
    pub content_hash: String,
    pub ingest_seq: i64,
    pub reason: String,
    pub crm_status: Option<i32>,
    pub crm_body: Option<String>,
    pub attempts: i64,
    pub dead_at: DateTime<Utc>,
    /// Whether the record itself is stored, which redrive needs.
    pub redrivable: bool,
}

/// The newest `limit` dead letters.
pub async fn list(config: &ListConfig) -> Result<Vec<DeadLetterRow>, CtlError> {
    let client = crate::connect_database(&config.database_url, config.startup_wait).await?;
    crate::require_schema(&client, &config.database_url).await?;
    let rows = client
        .query(
            "SELECT customer_id, content_hash, ingest_seq, reason, crm_status, crm_body, attempts, \
                    dead_at, record IS NOT NULL \
             FROM dead_letters ORDER BY dead_at DESC, customer_id LIMIT $1",
            &[&config.limit.max(0)],
        )
        .await
        .map_err(sync_store::StoreError::query("listing dead letters"))?;
    Ok(rows
        .iter()
        .map(|row| DeadLetterRow {
            customer_id: row.get(0),
            content_hash: row.get(1),
            ingest_seq: row.get(2),
            reason: row.get(3),
            crm_status: row.get(4),
            crm_body: row.get(5),
            attempts: row.get(6),
            dead_at: row.get(7),
            redrivable: row.get(8),
        })
        .collect())
}

/// Renders a listing as an aligned table.
pub struct Listing<'a>(pub &'a [DeadLetterRow]);

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return writeln!(f, "no dead letters");
        }
        let rows = self
            .0
            .iter()
            .map(|row| {
                vec![
                    row.customer_id.clone(),
                    row.content_hash.clone(),
                    row.crm_status
                        .map_or_else(|| "-".to_owned(), |s| s.to_string()),
                    row.attempts.to_string(),
                    row.dead_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    row.reason.clone(),
                ]
            })
            .collect();
        writeln!(
            f,
            "{}",
            crate::table(
                &[
                    "CUSTOMER", "HASH", "STATUS", "ATTEMPTS", "DEAD AT", "REASON"
                ],
                &[2, 3],
                rows
            )
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveSelection {
    /// Every dead letter of this customer id.
    Customer(String),
    All,
}

#[derive(Debug, Clone)]
pub struct RedriveConfig {
    pub nats: NatsArgs,
    pub database_url: String,
    pub selection: RedriveSelection,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedriveOutcome {
    pub republished: u64,
    /// Dead letters without a stored record (the CRM refused something we could not keep): they
    /// stay in the table and are named here.
    pub without_record: Vec<String>,
    /// Customer ids left alone because the ledger holds a later, different version.
    pub superseded: Vec<String>,
}

/// Republishes the selected dead letters onto the ingest subject.
pub async fn redrive(config: &RedriveConfig) -> Result<RedriveOutcome, CtlError> {
    let client = crate::connect_database(&config.database_url, config.nats.startup_wait).await?;
    crate::require_schema(&client, &config.database_url).await?;
    let pipeline = Pipeline::connect(&config.nats).await?;
    // Fail with "run setup" before publishing into a subject nothing stores.
    pipeline.stream(&pipeline.names.ingest_stream()).await?;
    let ledger = crate::replay::open_ledger(&pipeline).await?;
    let query = "SELECT customer_id, content_hash, record, source_file, source_line, ingest_seq, \
                        version_stamp, version_load, version_line \
                 FROM dead_letters WHERE $1::text IS NULL OR customer_id = $1 \
                 ORDER BY version_stamp, version_load, version_line";
    let customer = match &config.selection {
        RedriveSelection::Customer(id) => Some(id.as_str()),
        RedriveSelection::All => None,
    };
    let rows = client
        .query(query, &[&customer])
        .await
        .map_err(sync_store::StoreError::query(
            "reading dead letters to redrive",
        ))?;
    if let (Some(id), true) = (customer, rows.is_empty()) {
        return Err(CtlError::Usage(format!(
            "no dead letter for customer id {id:?}"
        )));
    }

    let nonce = crate::nonce();
    let subject = pipeline.names.ingest_subject();
    let mut outcome = RedriveOutcome::default();
    for row in &rows {
        let customer_id: String = row.get(0);
        let stored_hash: String = row.get(1);
        let record: Option<serde_json::Value> = row.get(2);
        let source_file: Option<String> = row.get(3);
        let source_line: Option<i64> = row.get(4);
        let ingest_seq: i64 = row.get(5);
        let version = Version::from_i64s(row.get(6), row.get(7), row.get(8));
        let Some(record) = record else {
            outcome.without_record.push(customer_id);
            continue;
        };
        let record: CustomerRecord =
            serde_json::from_value(record).map_err(|source| CtlError::Json {
                what: format!("stored record of dead letter {customer_id}/{stored_hash}"),
                source,
            })?;
        let message = IngestMessage {
            record,
            version,
            source_file,
            source_line: source_line.and_then(|l| u64::try_from(l).ok()),
            copy_of: u64::try_from(ingest_seq).ok(),
            force_resend: false,
        };
        let action = || format!("redriving dead letter {customer_id}/{stored_hash}");
        let (headers, body) = message
            .encode(&ids::ingest_copy(CopyKind::Redrive, &version, &nonce))
            .map_err(|e| nats_error(action(), e))?;
        let decoded =
            IngestMessage::decode(Some(&headers), &body, 0).map_err(|e| nats_error(action(), e))?;
        if crate::replay::superseded(&ledger, &decoded).await? {
            outcome.superseded.push(customer_id);
            continue;
        }
        pipeline
            .js
            .publish_with_headers(subject.clone(), headers, body)
            .await
            .map_err(|e| nats_error(action(), e))?
            .await
            .map_err(|e| nats_error(action(), e))?;
        outcome.republished += 1;
    }
    Ok(outcome)
}
