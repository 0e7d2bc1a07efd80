//! Turning a results-stream message into the outcome it carries, or into poison that says why not.

use chrono::Utc;
use sync_store::{Outcome, PoisonMessage};
use sync_topology::Names;

/// Where a message came from: enough to key its poison row and to find it in the stream again.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub stream: &'a str,
    pub stream_seq: u64,
    pub subject: &'a str,
}

/// Decodes by subject. Never fails: what cannot be decoded becomes [`Outcome::Poison`], so one bad
/// message is stored for inspection and acked instead of being redelivered forever.
pub fn decode(names: &Names, origin: Origin<'_>, body: &[u8]) -> Outcome {
    let subject = origin.subject;
    let decoded = if subject == names.synced_subject() {
        serde_json::from_slice(body)
            .map(Outcome::Synced)
            .map_err(|err| format!("body is not a SyncedOutcome: {err}"))
    } else if subject == names.rejected_subject() {
        serde_json::from_slice(body)
            .map(Outcome::Rejected)
            .map_err(|err| format!("body is not a RejectedRow: {err}"))
    } else if subject == names.dead_subject() {
        serde_json::from_slice(body)
            .map(Outcome::Dead)
            .map_err(|err| format!("body is not a DeadLetter: {err}"))
    } else {
        Err(format!("unknown outcome subject {subject:?}"))
    };
    decoded.unwrap_or_else(|reason| poison(origin, reason, body))
}

pub fn poison(origin: Origin<'_>, reason: String, body: &[u8]) -> Outcome {
    Outcome::Poison(PoisonMessage {
        stream: origin.stream.to_owned(),
        stream_seq: origin.stream_seq,
        subject: origin.subject.to_owned(),
        reason,
        body: body.to_vec(),
        received_at: Utc::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin<'a>(subject: &'a str) -> Origin<'a> {
        Origin {
            stream: "CUSTOMERS_RESULTS",
            stream_seq: 7,
            subject,
        }
    }

    #[test]
    fn a_body_that_does_not_parse_becomes_poison_with_the_reason() {
        let names = Names::default();
        let outcome = decode(&names, origin("customers.synced"), b"{not json");
        let Outcome::Poison(p) = outcome else {
            panic!("expected poison, got {outcome:?}");
        };
        assert_eq!(p.stream_seq, 7);
        assert!(
            p.reason.starts_with("body is not a SyncedOutcome"),
            "{}",
            p.reason
        );
        assert_eq!(p.body, b"{not json");
    }

    #[test]
    fn an_unknown_subject_becomes_poison() {
        let names = Names::default();
        let outcome = decode(&names, origin("customers.other"), b"{}");
        assert!(matches!(outcome, Outcome::Poison(p) if p.reason.contains("customers.other")));
    }

    #[test]
    fn a_rejected_row_decodes() {
        let names = Names::default();
        let body = br#"{"source_file":"a.csv","line":3,"kind":"empty_id","reason":"field `id` is empty","raw":",x","rejected_at":"2026-01-01T00:00:00Z"}"#;
        let outcome = decode(&names, origin("customers.rejected"), body);
        assert!(matches!(outcome, Outcome::Rejected(r) if r.line == 3));
    }
}
