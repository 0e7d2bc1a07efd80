//! Bodies of the messages and KV entries that cross service boundaries, as JSON.

use chrono::{DateTime, Utc};
use customer_record::{ContentHash, CustomerRecord};
use serde::{Deserialize, Serialize};

/// How the integrator settled one ingest message when the CRM holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncAction {
    /// `POST /customers` created the customer.
    Created,
    /// `PUT /customers/{id}` applied a changed version.
    Updated,
    /// The CRM already held exactly this content (found by lookup after a crash or a lost answer).
    AlreadyPresent,
    /// The ledger had already confirmed this hash: nothing was sent.
    SkippedConfirmed,
    /// A newer version of this customer was already confirmed: this older one was not sent.
    SkippedSuperseded,
}

impl SyncAction {
    /// The same name as the JSON form, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncAction::Created => "created",
            SyncAction::Updated => "updated",
            SyncAction::AlreadyPresent => "already_present",
            SyncAction::SkippedConfirmed => "skipped_confirmed",
            SyncAction::SkippedSuperseded => "skipped_superseded",
        }
    }
}

/// Published on `{ns}.synced`: the CRM holds this version of the customer (or a newer one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncedOutcome {
    pub customer: CustomerRecord,
    pub content_hash: ContentHash,
    /// Sequence of the ingest message in the ingest stream: the version order of a customer.
    pub ingest_seq: u64,
    pub crm_id: Option<String>,
    pub action: SyncAction,
    pub source_file: Option<String>,
    pub source_line: Option<u64>,
    pub synced_at: DateTime<Utc>,
}

/// Published on `{ns}.rejected` by the reader: a CSV row that is not a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedRow {
    pub source_file: String,
    pub line: u64,
    /// Short machine-readable kind, e.g. `invalid_email`.
    pub kind: String,
    /// Human-readable reason naming the field.
    pub reason: String,
    /// The row as read, re-encoded as CSV.
    pub raw: String,
    pub rejected_at: DateTime<Utc>,
}

/// Published on `{ns}.dead`: the CRM refused this record for good, or retries were spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub customer_id: String,
    pub content_hash: ContentHash,
    pub ingest_seq: u64,
    pub reason: String,
    pub crm_status: Option<u16>,
    pub crm_body: Option<String>,
    pub attempts: u64,
    /// Kept so that `syncctl dlq redrive` can put the record back on the ingest path.
    pub customer: Option<CustomerRecord>,
    pub source_file: Option<String>,
    pub source_line: Option<u64>,
    pub dead_at: DateTime<Utc>,
}

/// Stored in the checkpoints bucket by the reader, keyed by the file's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub path: String,
    pub size: u64,
    /// BLAKE3 (hex) of the file's first bytes: a replaced file with the same path is detected.
    pub head_hash: String,
    /// Every data row that starts at or before this line is acknowledged by the stream.
    pub line: u64,
    /// Data rows read, published (acked), deduplicated by the stream and rejected, up to `line`.
    pub rows_read: u64,
    pub published: u64,
    pub deduplicated: u64,
    pub rejected: u64,
    /// True once the whole file was read and acknowledged.
    pub complete: bool,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_are_snake_case() {
        let json = serde_json::to_string(&SyncAction::SkippedConfirmed).expect("serialise");
        assert_eq!(json, "\"skipped_confirmed\"");
        for action in [
            SyncAction::Created,
            SyncAction::Updated,
            SyncAction::AlreadyPresent,
            SyncAction::SkippedConfirmed,
            SyncAction::SkippedSuperseded,
        ] {
            let json = serde_json::to_string(&action).expect("serialise");
            assert_eq!(json, format!("\"{}\"", action.as_str()));
        }
    }
}
