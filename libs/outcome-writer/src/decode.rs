//! Turning a results-stream message into the outcome it carries, or into poison that says why not.

use async_nats::jetstream::message::StreamMessage;
use chrono::Utc;
use customer_record::ContentHash;
use sync_store::{Outcome, PoisonMessage};
use sync_topology::messages::{DeadLetter, SupersededOutcome, SyncAction, SyncedOutcome};
use sync_topology::{IngestMessage, Names, Version};

/// Where a message came from: enough to key its poison row and to find it in the stream again.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub stream: &'a str,
    pub stream_seq: u64,
    pub subject: &'a str,
}

/// Decodes by subject. Never fails: what cannot be decoded becomes [`Outcome::Poison`], so one bad
/// message is stored for inspection and acked instead of being redelivered forever. A dead letter
/// of an ingest message that was not a customer becomes poison too, keyed by its place in the
/// ingest stream and keeping its raw body.
pub fn decode(names: &Names, origin: Origin<'_>, body: &[u8]) -> Outcome {
    let subject = origin.subject;
    let decoded = if subject == names.synced_subject() {
        serde_json::from_slice(body)
            .map(synced_or_old_superseded)
            .map_err(|err| format!("body is not a SyncedOutcome: {err}"))
    } else if subject == names.superseded_subject() {
        serde_json::from_slice(body)
            .map(Outcome::Superseded)
            .map_err(|err| format!("body is not a SupersededOutcome: {err}"))
    } else if subject == names.dead_subject() {
        serde_json::from_slice::<DeadLetter>(body)
            .map_err(|err| format!("body is not a DeadLetter: {err}"))
            .and_then(|letter| dead_or_malformed(names, letter))
    } else if subject == names.rejected_subject() {
        serde_json::from_slice(body)
            .map(Outcome::Rejected)
            .map_err(|err| format!("body is not a RejectedRow: {err}"))
    } else {
        Err(format!("unknown outcome subject {subject:?}"))
    };
    decoded.unwrap_or_else(|reason| poison(origin, reason, body))
}

/// Builds before the `superseded` subject sent skipped older versions as synced; they never
/// reached the CRM, so they must not reach `customers` either.
fn synced_or_old_superseded(outcome: SyncedOutcome) -> Outcome {
    if outcome.action != SyncAction::SkippedSuperseded {
        return Outcome::Synced(outcome);
    }
    Outcome::Superseded(SupersededOutcome {
        customer_id: outcome.customer.id.clone(),
        content_hash: outcome.content_hash.clone(),
        version: outcome.version(),
        superseded_by: outcome.version(),
        ingest_seq: outcome.ingest_seq,
        source_file: outcome.source_file,
        source_line: outcome.source_line,
        superseded_at: outcome.synced_at,
    })
}

fn dead_or_malformed(names: &Names, letter: DeadLetter) -> Result<Outcome, String> {
    let Some(body) = letter.malformed_body() else {
        return Ok(Outcome::Dead(letter));
    };
    let body = body.map_err(|err| format!("malformed_body_base64 is not base64: {err}"))?;
    Ok(Outcome::Poison(PoisonMessage {
        stream: names.ingest_stream(),
        stream_seq: letter.ingest_seq,
        subject: names.ingest_subject(),
        reason: letter.reason,
        body,
        received_at: letter.dead_at,
    }))
}

/// Whether an outcome's version and record can be taken at their word. Only an integrator should
/// publish outcomes, but the results subjects are where a forger who got past NATS's permissions
/// (or a server without them) would write, and a stored version outranks every older one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Nothing to check, or nothing that could pin a customer: stored as it is.
    Plausible,
    /// No integrator can have made it (a load from the future, a record that is not the content
    /// it names): kept in `poison_messages` with the reason.
    Refused(String),
    /// Stored only if the ingest message it names carries this customer, version and content:
    /// a stamp from the data (any value is possible), or a dead letter (whose record `syncctl dlq
    /// redrive` would send to the CRM).
    MustMatchIngest {
        ingest_seq: u64,
        customer_id: String,
        version: Version,
        hash: ContentHash,
    },
}

/// What [`Provenance`] an outcome needs, judged against this host's clock `now_ms`.
pub fn provenance(outcome: &Outcome, now_ms: i64) -> Provenance {
    let (customer_id, version, hash, record, ingest_seq, always_check) = match outcome {
        Outcome::Synced(s) => (
            &s.customer.id,
            s.version(),
            &s.content_hash,
            Some(&s.customer),
            s.ingest_seq,
            false,
        ),
        Outcome::Dead(d) => (
            &d.customer_id,
            d.version(),
            &d.content_hash,
            d.customer.as_ref(),
            d.ingest_seq,
            true,
        ),
        Outcome::Superseded(_) | Outcome::Rejected(_) | Outcome::Poison(_) => {
            return Provenance::Plausible;
        }
    };
    if let Some(reason) = version.implausible(now_ms) {
        return Provenance::Refused(reason);
    }
    if !always_check && !version.stamped_by_data() {
        // A plain load at most MAX_CLOCK_SKEW_MS ahead: any load read later outranks it.
        return Provenance::Plausible;
    }
    if let Some(record) = record
        && record.content_hash() != *hash
    {
        return Provenance::Refused(format!(
            "the record of {customer_id:?} does not hash to the content hash {hash} it claims"
        ));
    }
    Provenance::MustMatchIngest {
        ingest_seq,
        customer_id: customer_id.clone(),
        version,
        hash: hash.clone(),
    }
}

/// Why the ingest message `found` does not vouch for `expected` ([`Provenance::MustMatchIngest`]),
/// or None when it does.
pub fn ingest_mismatch(expected: &Provenance, found: &StreamMessage) -> Option<String> {
    let Provenance::MustMatchIngest {
        ingest_seq,
        customer_id,
        version,
        hash,
    } = expected
    else {
        return None;
    };
    let decoded = match IngestMessage::decode(Some(&found.headers), &found.payload, *ingest_seq) {
        Ok(decoded) => decoded,
        Err(malformed) => {
            return Some(format!(
                "it names ingest message {ingest_seq}, which is not a customer: {malformed}"
            ));
        }
    };
    let carried = &decoded.message;
    (carried.record.id != *customer_id || carried.version != *version || decoded.hash != *hash)
        .then(|| {
            format!(
                "it claims {customer_id:?} version {version} with content {hash}, but ingest \
                 message {ingest_seq} carries {:?} version {} with content {}",
                carried.record.id, carried.version, decoded.hash
            )
        })
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
    fn a_malformed_ingest_message_is_kept_as_poison_of_the_ingest_stream() {
        let names = Names::default();
        let letter = DeadLetter::malformed(41, "body is not a customer".to_owned(), b"\xff{x");
        let body = serde_json::to_vec(&letter).expect("json");
        let outcome = decode(&names, origin("customers.dead"), &body);
        let Outcome::Poison(p) = outcome else {
            panic!("expected poison, got {outcome:?}");
        };
        assert_eq!((p.stream.as_str(), p.stream_seq), ("CUSTOMERS", 41));
        assert_eq!(p.subject, "customers.ingest");
        assert_eq!(p.body, b"\xff{x");
    }

    #[test]
    fn a_skipped_older_version_of_an_old_build_is_superseded_not_synced() {
        let names = Names::default();
        let body = br#"{"customer":{"id":"1","first_name":"A","last_name":"B","email":"a@b.io"},"content_hash":"00000000000000000000000000000001","ingest_seq":3,"crm_id":null,"action":"skipped_superseded","source_file":null,"source_line":null,"synced_at":"2026-01-01T00:00:00Z"}"#;
        assert!(matches!(
            decode(&names, origin("customers.synced"), body),
            Outcome::Superseded(_)
        ));
    }

    fn synced_at(version: Version) -> Outcome {
        let customer = customer_record::CustomerRecord::normalised(
            "c1",
            "Ada",
            "Lovelace",
            "ada@example.com",
            None,
            Default::default(),
        );
        Outcome::Synced(SyncedOutcome {
            content_hash: customer.content_hash(),
            customer,
            version: Some(version),
            ingest_seq: 9,
            crm_id: None,
            action: SyncAction::Created,
            source_file: None,
            source_line: None,
            synced_at: Utc::now(),
        })
    }

    #[test]
    fn only_what_could_pin_a_customer_is_checked() {
        let now: i64 = 1_800_000_000_000;
        let load = now as u64 - 1_000;
        assert_eq!(
            provenance(&synced_at(Version::row(load, 2)), now),
            Provenance::Plausible,
            "a plain load is outranked by any later one: nothing to ask"
        );
        assert!(matches!(
            provenance(&synced_at(Version::row(load + 86_400_000, 2)), now),
            Provenance::Refused(reason) if reason.contains("past this host's clock")
        ));
        let stamped = Version {
            stamp: 42,
            load,
            line: 2,
        };
        assert!(matches!(
            provenance(&synced_at(stamped), now),
            Provenance::MustMatchIngest { ingest_seq: 9, version, .. } if version == stamped
        ));
        let Outcome::Synced(mut tampered) = synced_at(stamped) else {
            unreachable!("synced_at makes a synced outcome");
        };
        tampered.customer.first_name = "Eve".to_owned();
        assert!(matches!(
            provenance(&Outcome::Synced(tampered), now),
            Provenance::Refused(reason) if reason.contains("does not hash")
        ));
        let rejected = decode(
            &Names::default(),
            origin("customers.rejected"),
            br#"{"source_file":"a.csv","line":3,"kind":"empty_id","reason":"r","raw":"","rejected_at":"2026-01-01T00:00:00Z"}"#,
        );
        assert_eq!(provenance(&rejected, now), Provenance::Plausible);
    }

    #[test]
    fn a_rejected_row_decodes() {
        let names = Names::default();
        let body = br#"{"source_file":"a.csv","line":3,"kind":"empty_id","reason":"field `id` is empty","raw":",x","rejected_at":"2026-01-01T00:00:00Z"}"#;
        let outcome = decode(&names, origin("customers.rejected"), body);
        assert!(matches!(outcome, Outcome::Rejected(r) if r.line == 3));
    }
}
