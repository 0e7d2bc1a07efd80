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

use customer_record::CustomerRecord;
use serde::Serialize;
use service_kit::NatsArgs;
use sync_store::dead_letters::StoredDeadLetter;
use sync_topology::IngestMessage;
use sync_topology::ids::{self, CopyKind};

use crate::{CtlError, Pipeline, nats_error};

#[derive(Debug, Clone)]
pub struct ListConfig {
    pub database_url: String,
    pub limit: i64,
    /// How long to wait for a database that does not answer yet (`--startup-wait`).
    pub startup_wait: std::time::Duration,
}

pub use sync_store::dead_letters::DeadLetterRow;

/// The newest `limit` dead letters.
pub async fn list(config: &ListConfig) -> Result<Vec<DeadLetterRow>, CtlError> {
    let client = crate::connect_database(&config.database_url, config.startup_wait).await?;
    crate::require_schema(&client, &config.database_url).await?;
    Ok(sync_store::dead_letters::list(&client, config.limit).await?)
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
    let customer = match &config.selection {
        RedriveSelection::Customer(id) => Some(id.as_str()),
        RedriveSelection::All => None,
    };
    let letters = sync_store::dead_letters::for_redrive(&client, customer).await?;
    if let (Some(id), true) = (customer, letters.is_empty()) {
        return Err(CtlError::Usage(format!(
            "no dead letter for customer id {id:?}"
        )));
    }

    let nonce = crate::nonce();
    let mut outcome = RedriveOutcome::default();
    for letter in letters {
        let Some(record) = letter.record()? else {
            outcome.without_record.push(letter.customer_id);
            continue;
        };
        if republish(&pipeline, &ledger, &letter, record, &nonce).await? {
            outcome.republished += 1;
        } else {
            outcome.superseded.push(letter.customer_id);
        }
    }
    Ok(outcome)
}

/// Publishes `record` of `letter` as a copy of the version that died; false, publishing nothing,
/// when the ledger knows the customer at a newer version.
async fn republish(
    pipeline: &Pipeline,
    ledger: &async_nats::jetstream::kv::Store,
    letter: &StoredDeadLetter,
    record: CustomerRecord,
    nonce: &str,
) -> Result<bool, CtlError> {
    let message = IngestMessage {
        record,
        version: letter.version,
        source_file: letter.source_file.clone(),
        source_line: letter.source_line.and_then(|l| u64::try_from(l).ok()),
        copy_of: u64::try_from(letter.ingest_seq).ok(),
        force_resend: false,
    };
    let action = || {
        format!(
            "redriving dead letter {}/{}",
            letter.customer_id, letter.content_hash
        )
    };
    let (headers, body) = message
        .encode(&ids::ingest_copy(CopyKind::Redrive, &letter.version, nonce))
        .map_err(|e| nats_error(action(), e))?;
    let decoded =
        IngestMessage::decode(Some(&headers), &body, 0).map_err(|e| nats_error(action(), e))?;
    if crate::replay::superseded(ledger, &decoded).await? {
        return Ok(false);
    }
    pipeline
        .js
        .publish_with_headers(pipeline.names.ingest_subject(), headers, body)
        .await
        .map_err(|e| nats_error(action(), e))?
        .await
        .map_err(|e| nats_error(action(), e))?;
    Ok(true)
}
