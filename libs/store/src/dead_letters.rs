//! Reading the `dead_letters` table (what the CRM refused for good), for the operator's tools. The
//! persister writes it (see [`crate::write_batch`]); these queries only read it.

use chrono::{DateTime, Utc};
use customer_record::CustomerRecord;
use serde::Serialize;
use sync_topology::Version;

use crate::StoreError;

/// One dead letter as listed (newest first): everything but the stored record itself.
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

/// The newest `limit` dead letters (a negative limit lists none).
pub async fn list(
    client: &tokio_postgres::Client,
    limit: i64,
) -> Result<Vec<DeadLetterRow>, StoreError> {
    let rows = client
        .query(
            "SELECT customer_id, content_hash, ingest_seq, reason, crm_status, crm_body, attempts, \
                    dead_at, record IS NOT NULL \
             FROM dead_letters ORDER BY dead_at DESC, customer_id LIMIT $1",
            &[&limit.max(0)],
        )
        .await
        .map_err(StoreError::query("listing dead letters"))?;
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

/// One dead letter of a customer, as `syncctl show` tells its story.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomerDeadLetter {
    pub version: Version,
    pub content_hash: String,
    pub reason: String,
    pub crm_status: Option<i32>,
    pub attempts: i64,
    pub dead_at: DateTime<Utc>,
}

/// Every dead letter of customer `id`, oldest version first.
pub async fn of_customer(
    client: &tokio_postgres::Client,
    id: &str,
) -> Result<Vec<CustomerDeadLetter>, StoreError> {
    let rows = client
        .query(
            "SELECT version_stamp, version_load, version_line, content_hash, reason, crm_status, \
                    attempts, dead_at \
             FROM dead_letters WHERE customer_id = $1 \
             ORDER BY version_stamp, version_load, version_line",
            &[&id],
        )
        .await
        .map_err(StoreError::query("reading dead letters"))?;
    Ok(rows
        .iter()
        .map(|row| CustomerDeadLetter {
            version: Version::from_i64s(row.get(0), row.get(1), row.get(2)),
            content_hash: row.get(3),
            reason: row.get(4),
            crm_status: row.get(5),
            attempts: row.get(6),
            dead_at: row.get(7),
        })
        .collect())
}

/// A dead letter with what putting it back on the ingest path needs.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    pub customer_id: String,
    pub content_hash: String,
    pub version: Version,
    pub ingest_seq: i64,
    pub source_file: Option<String>,
    pub source_line: Option<i64>,
    /// The refused record as stored (JSON); None when the CRM refused something that could not be
    /// kept. Read it with [`StoredDeadLetter::record`].
    pub record_json: Option<serde_json::Value>,
}

impl StoredDeadLetter {
    /// The stored record, None when there is none. Decoded one letter at a time, so a caller
    /// working through a list meets a damaged record only when it reaches it.
    pub fn record(&self) -> Result<Option<CustomerRecord>, StoreError> {
        let Some(json) = &self.record_json else {
            return Ok(None);
        };
        serde_json::from_value(json.clone())
            .map(Some)
            .map_err(|source| StoreError::Json {
                what: format!(
                    "stored record of dead letter {}/{}",
                    self.customer_id, self.content_hash
                ),
                source,
            })
    }
}

/// The dead letters of `customer` (None: all of them), oldest version first.
pub async fn for_redrive(
    client: &tokio_postgres::Client,
    customer: Option<&str>,
) -> Result<Vec<StoredDeadLetter>, StoreError> {
    let rows = client
        .query(
            "SELECT customer_id, content_hash, record, source_file, source_line, ingest_seq, \
                    version_stamp, version_load, version_line \
             FROM dead_letters WHERE $1::text IS NULL OR customer_id = $1 \
             ORDER BY version_stamp, version_load, version_line",
            &[&customer],
        )
        .await
        .map_err(StoreError::query("reading dead letters to redrive"))?;
    Ok(rows
        .iter()
        .map(|row| StoredDeadLetter {
            customer_id: row.get(0),
            content_hash: row.get(1),
            record_json: row.get(2),
            source_file: row.get(3),
            source_line: row.get(4),
            ingest_seq: row.get(5),
            version: Version::from_i64s(row.get(6), row.get(7), row.get(8)),
        })
        .collect())
}
