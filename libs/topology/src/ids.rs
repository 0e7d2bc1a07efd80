//! Every message id (`Nats-Msg-Id`) and idempotency key the pipeline mints, in one place: a stream
//! drops a message whose id it has seen inside its dedup window, and the CRM answers a request whose
//! `Idempotency-Key` it has seen from memory, so these formats decide what counts as "the same".
//!
//! Ids name a record's version, never its content alone: a value that changes and changes back
//! (A, then B, then A) is three versions, and the last one must reach the CRM.

use customer_record::ContentHash;

use crate::Version;

/// The ingest message of the CSV row a version names. The same row read again (same load, same
/// line) is the same message; another load of the file is another.
pub fn ingest_row(version: &Version) -> String {
    format!("row:{}:{}", version.load, version.line)
}

/// Why a copy of an ingest message was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// `syncctl replay`.
    Replay,
    /// `syncctl dlq redrive`.
    Redrive,
}

impl CopyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::Replay => "replay",
            CopyKind::Redrive => "redrive",
        }
    }
}

/// A copy of a version, republished on purpose: the nonce keeps the stream's dedup window from
/// dropping it as the original, while the version it carries stays the original's.
pub fn ingest_copy(kind: CopyKind, version: &Version, nonce: &str) -> String {
    format!("{}:{version}:{nonce}", kind.as_str())
}

/// A rejected CSV row: the same line of the same file is reported once, however often it is read.
pub fn rejected_row(file_key: &str, line: u64) -> String {
    format!("rejected:{file_key}:{line}")
}

/// The one outcome of one ingest message, whichever it is. Its stream sequence tells copies of a
/// version apart (each copy needs its own outcome for the reconciliation), and the version beside
/// it keeps a reused sequence (a stream that lost its tail or was recreated) from matching another
/// record's outcome. The kind is not part of it: a message redelivered after its ack was lost
/// (a NATS node killed, a leader change) may be judged again differently (synced the first time,
/// superseded the second when a newer version was confirmed meanwhile), and that second outcome
/// must be dropped by the results stream as the duplicate it is.
pub fn outcome(ingest_seq: u64, version: &Version) -> String {
    format!("outcome:{ingest_seq}:{version}")
}

/// The CRM's `Idempotency-Key` for sending a version: a retry of the same version is a replay the
/// CRM answers from memory; every other version, even with content seen before, is a new request.
pub fn idempotency_key(version: &Version, hash: &ContentHash) -> String {
    format!("cs1:{version}:{hash}")
}

/// The key of a forced resend (`syncctl replay --force`): the plain key would be answered from the
/// CRM's memory, defeating the resend; the copy's own ingest sequence keeps a redelivery of the
/// same forced copy a replay.
pub fn forced_idempotency_key(version: &Version, hash: &ContentHash, copy_seq: u64) -> String {
    format!("cs1:{version}:{hash}:resend-{copy_seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changing any of these re-sends or drops messages across an upgrade: do it only with a plan.
    #[test]
    fn formats_are_pinned() {
        let v = Version::row(1_700_000_000_000, 12);
        let hash = ContentHash::from_hex(&"ab".repeat(16)).expect("hex");
        assert_eq!(ingest_row(&v), "row:1700000000000:12");
        assert_eq!(
            ingest_copy(CopyKind::Replay, &v, "n1"),
            "replay:1700000000000.1700000000000.12:n1"
        );
        assert_eq!(rejected_row("file-x", 7), "rejected:file-x:7");
        assert_eq!(outcome(5, &v), "outcome:5:1700000000000.1700000000000.12");
        assert_eq!(
            idempotency_key(&v, &hash),
            format!("cs1:1700000000000.1700000000000.12:{}", "ab".repeat(16))
        );
        assert!(forced_idempotency_key(&v, &hash, 99).ends_with(":resend-99"));
    }

    #[test]
    fn a_value_changed_back_is_a_new_key() {
        let hash = ContentHash::from_hex(&"cd".repeat(16)).expect("hex");
        let first = idempotency_key(&Version::row(1, 2), &hash);
        let again = idempotency_key(&Version::row(1, 4), &hash);
        assert_ne!(first, again);
        assert_ne!(
            ingest_row(&Version::row(1, 2)),
            ingest_row(&Version::row(1, 4))
        );
    }
}
