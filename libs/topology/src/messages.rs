//! Bodies of the outcome messages and KV entries that cross service boundaries, as JSON.
//!
//! Every ingest message gets exactly one outcome: `synced` (the CRM holds this version, or holds
//! its content), `superseded` (a newer version of the customer is known, so this one was never
//! sent) or `dead` (the CRM refused it for good, its sends kept failing, or the message is not a
//! customer at all). Outcomes written before versions existed carry none; [`SyncedOutcome::version`]
//! and [`DeadLetter::version`] then read as [`Version::legacy`] of their ingest sequence.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use customer_record::{ContentHash, CustomerRecord};
use serde::{Deserialize, Serialize};

use crate::Version;

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
    /// The ledger had already confirmed this content: nothing was sent.
    SkippedConfirmed,
    /// Written only by builds before the `superseded` outcome existed: a newer version was known
    /// and this one was not sent. Read as superseded, never stored as synced.
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

/// Published on `{ns}.synced`: the CRM holds this version of the customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncedOutcome {
    pub customer: CustomerRecord,
    pub content_hash: ContentHash,
    /// The version the CRM holds; `customers` keeps the newest one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// Sequence of the ingest message in the ingest stream (where to find it again).
    pub ingest_seq: u64,
    pub crm_id: Option<String>,
    pub action: SyncAction,
    pub source_file: Option<String>,
    pub source_line: Option<u64>,
    pub synced_at: DateTime<Utc>,
}

impl SyncedOutcome {
    pub fn version(&self) -> Version {
        self.version.unwrap_or(Version::legacy(self.ingest_seq))
    }
}

/// Published on `{ns}.superseded`: this version was not sent because a newer version of the same
/// customer is known (confirmed, being sent, or failing). It is never stored as synced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupersededOutcome {
    pub customer_id: String,
    pub content_hash: ContentHash,
    pub version: Version,
    /// The newer version that made this one obsolete.
    pub superseded_by: Version,
    pub ingest_seq: u64,
    pub source_file: Option<String>,
    pub source_line: Option<u64>,
    pub superseded_at: DateTime<Utc>,
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

/// Published on `{ns}.dead`: the CRM refused this record for good, its sends kept failing, or the
/// ingest message is not a customer at all (`malformed`: then `customer_id` is empty and the raw
/// body is kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub customer_id: String,
    pub content_hash: ContentHash,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    pub ingest_seq: u64,
    pub reason: String,
    pub crm_status: Option<u16>,
    pub crm_body: Option<String>,
    /// Failed sends of this version (0 for a record refused outright or malformed).
    pub attempts: u64,
    /// Kept so that `syncctl dlq redrive` can put the record back on the ingest path.
    pub customer: Option<CustomerRecord>,
    pub source_file: Option<String>,
    pub source_line: Option<u64>,
    pub dead_at: DateTime<Utc>,
    /// The ingest message's body, base64, when it could not be read as a customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed_body_base64: Option<String>,
}

impl DeadLetter {
    pub fn version(&self) -> Version {
        self.version.unwrap_or(Version::legacy(self.ingest_seq))
    }

    /// A dead letter for an ingest message that is not a customer: no id, no version, the body
    /// kept byte for byte.
    pub fn malformed(ingest_seq: u64, reason: String, body: &[u8]) -> Self {
        DeadLetter {
            customer_id: String::new(),
            content_hash: ContentHash::of_bytes(body),
            version: None,
            ingest_seq,
            reason,
            crm_status: None,
            crm_body: None,
            attempts: 0,
            customer: None,
            source_file: None,
            source_line: None,
            dead_at: Utc::now(),
            malformed_body_base64: Some(base64::engine::general_purpose::STANDARD.encode(body)),
        }
    }

    /// The raw body of a malformed ingest message (None for a customer's dead letter).
    pub fn malformed_body(&self) -> Option<Result<Vec<u8>, base64::DecodeError>> {
        self.malformed_body_base64
            .as_ref()
            .map(|text| base64::engine::general_purpose::STANDARD.decode(text))
    }
}

/// Key of the fleet-wide CRM pause in the control bucket.
pub const PAUSE_KEY: &str = "crm_pause";

/// The longest pause an integrator takes by default (its `--max-pause`), whatever a notice or a
/// `Retry-After` asks; `syncctl status` flags notices asking for more.
pub const DEFAULT_MAX_PAUSE_MS: u64 = 60_000;

/// Stored under [`PAUSE_KEY`] by an integrator whose CRM signals overload: every integrator holds
/// its requests until `until_ms`; `syncctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseNotice {
    /// Unix milliseconds until which no replica sends to the CRM.
    pub until_ms: i64,
    pub set_by: String,
    /// The cause, in words: which answers, how many, over how long.
    pub reason: String,
    /// Unix milliseconds when the pause was called (0 in notices from older replicas).
    #[serde(default)]
    pub since_ms: i64,
}

/// Key prefix of the integrator replicas' heartbeats in the control bucket: `replica.{name}`.
pub const REPLICA_KEY_PREFIX: &str = "replica.";

/// The control bucket key of a replica's heartbeat.
pub fn replica_key(replica: &str) -> String {
    format!("{REPLICA_KEY_PREFIX}{replica}")
}

/// What an integrator replica says about itself every few seconds (`replica.{name}` in the control
/// bucket), for `syncctl status`. Written with a plain put and deleted when the replica stops
/// cleanly; one that stops writing (killed) is shown as stale once `seen_at_ms` is three
/// `every_ms` old. Counts are since the replica started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaHeartbeat {
    pub replica: String,
    /// Unix milliseconds of this heartbeat.
    pub seen_at_ms: i64,
    pub started_at_ms: i64,
    /// How often the replica writes its heartbeat.
    pub every_ms: u64,
    /// `/readyz` in words: None when ready, otherwise why not.
    pub not_ready: Option<String>,
    /// `closed`, `open` or `half-open`.
    pub breaker: String,
    /// Unix milliseconds until which the replica holds its requests (a fleet pause), if it does.
    pub paused_until_ms: Option<i64>,
    pub concurrency_limit: u64,
    pub requests_in_flight: u64,
    pub messages_in_hand: u64,
    pub synced: u64,
    pub superseded: u64,
    pub dead: u64,
    /// Handed back to the server for later (a retry, a pause, a wait for an older version).
    pub handed_back: u64,
    pub retries: u64,
}

impl ReplicaHeartbeat {
    /// Messages settled with an outcome.
    pub fn settled(&self) -> u64 {
        self.synced + self.superseded + self.dead
    }

    /// No heartbeat for three intervals at `now_ms`: the replica stopped or cannot reach NATS.
    pub fn is_stale(&self, now_ms: i64) -> bool {
        now_ms - self.seen_at_ms > 3 * i64::try_from(self.every_ms).unwrap_or(i64::MAX / 4)
    }
}

/// Stored in the checkpoints bucket by the reader, keyed by the file's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub path: String,
    pub size: u64,
    /// BLAKE3 (hex) of the file's first bytes: a replaced file with the same path is detected.
    pub head_hash: String,
    /// The file's modification time (ns since the Unix epoch) when it was read: a file rewritten in
    /// place with the same size and first bytes is detected too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ns: Option<u64>,
    /// The load number this content of the file was given: the `load` of its rows' versions. Every
    /// run of the same content keeps it; 0 in checkpoints of builds before versions existed.
    #[serde(default)]
    pub load: u64,
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
