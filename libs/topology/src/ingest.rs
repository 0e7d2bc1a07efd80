//! The ingest message: one version of one customer on `{ns}.ingest`. Every producer (csv-reader,
//! `syncctl replay` and `dlq redrive`, the benchmark tools, tests) encodes with
//! [`IngestMessage::encode`] and the integrator decodes with [`IngestMessage::decode`], so the
//! wire form is written once.
//!
//! Body: the customer as JSON. Headers: `Nats-Msg-Id` (see [`crate::ids`]), `Sync-Version`,
//! `Sync-Content-Hash`, `Sync-Source-File`/`Sync-Source-Line` when the record comes from a file,
//! `Sync-Replay-Of` on a copy, `Sync-Force-Resend: true` on a forced copy.

use async_nats::HeaderMap;
use async_nats::header::{HeaderValue, NATS_MESSAGE_ID};
use bytes::Bytes;
use customer_record::{ContentHash, CustomerRecord};

use crate::ledger::{UnkeyableId, ledger_key};
use crate::{
    HEADER_CONTENT_HASH, HEADER_FORCE_RESEND, HEADER_REPLAY_OF, HEADER_SOURCE_FILE,
    HEADER_SOURCE_LINE, HEADER_VERSION, Version,
};

/// One version of one customer, as it travels to the integrators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestMessage {
    pub record: CustomerRecord,
    pub version: Version,
    pub source_file: Option<String>,
    pub source_line: Option<u64>,
    /// On a copy made by replay or redrive: the ingest sequence of the message it copies. Only for
    /// tracing: the version, not this, orders the copy.
    pub copy_of: Option<u64>,
    /// Send even when the ledger says the CRM holds this content (a CRM that lost data).
    pub force_resend: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("header {header} cannot carry {value:?} (line breaks are not allowed in headers)")]
    Header { header: &'static str, value: String },
    #[error("customer {id:?} cannot be encoded as JSON: {source}")]
    Json {
        id: String,
        source: serde_json::Error,
    },
}

/// Why an ingest message is not a customer version the integrator can work on. It is
/// dead-lettered with its raw body, never retried: retrying cannot change its bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("body is not a customer record: {0}")]
    Body(String),
    #[error(transparent)]
    Id(#[from] UnkeyableId),
    #[error("header {HEADER_VERSION}: {0}")]
    Version(String),
}

/// An ingest message read back, with what the integrator derives from it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub message: IngestMessage,
    pub hash: ContentHash,
    /// The customer's key in the ledger bucket.
    pub ledger_key: String,
    /// The `Sync-Content-Hash` header disagreed with the body (the body wins); for a warning.
    pub hash_header_mismatch: bool,
}

fn value(header: &'static str, text: &str) -> Result<HeaderValue, EncodeError> {
    text.parse().map_err(|_| EncodeError::Header {
        header,
        value: text.chars().take(200).collect(),
    })
}

impl IngestMessage {
    /// A row of a file.
    pub fn from_row(record: CustomerRecord, version: Version, file: &str, line: u64) -> Self {
        IngestMessage {
            record,
            version,
            source_file: Some(file.to_owned()),
            source_line: Some(line),
            copy_of: None,
            force_resend: false,
        }
    }

    /// Headers and body to publish under `message_id` (one of [`crate::ids`]'s formats).
    pub fn encode(&self, message_id: &str) -> Result<(HeaderMap, Bytes), EncodeError> {
        let hash = self.record.content_hash();
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, value("Nats-Msg-Id", message_id)?);
        headers.insert(
            HEADER_VERSION,
            value(HEADER_VERSION, &self.version.to_string())?,
        );
        headers.insert(
            HEADER_CONTENT_HASH,
            value(HEADER_CONTENT_HASH, hash.as_str())?,
        );
        if let Some(file) = &self.source_file {
            headers.insert(HEADER_SOURCE_FILE, value(HEADER_SOURCE_FILE, file)?);
        }
        if let Some(line) = self.source_line {
            headers.insert(
                HEADER_SOURCE_LINE,
                value(HEADER_SOURCE_LINE, &line.to_string())?,
            );
        }
        if let Some(seq) = self.copy_of {
            headers.insert(HEADER_REPLAY_OF, value(HEADER_REPLAY_OF, &seq.to_string())?);
        }
        if self.force_resend {
            headers.insert(HEADER_FORCE_RESEND, value(HEADER_FORCE_RESEND, "true")?);
        }
        let body = serde_json::to_vec(&self.record).map_err(|source| EncodeError::Json {
            id: self.record.id.clone(),
            source,
        })?;
        Ok((headers, Bytes::from(body)))
    }

    /// Reads a message of the ingest stream stored at `stream_seq`. A message without a
    /// `Sync-Version` (published before versions existed) is [`Version::legacy`].
    pub fn decode(
        headers: Option<&HeaderMap>,
        payload: &[u8],
        stream_seq: u64,
    ) -> Result<Decoded, Malformed> {
        let header = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let record: CustomerRecord =
            serde_json::from_slice(payload).map_err(|err| Malformed::Body(err.to_string()))?;
        let ledger_key = ledger_key(&record.id)?;
        let version = match header(HEADER_VERSION) {
            Some(text) => {
                Version::parse(&text).map_err(|err| Malformed::Version(err.to_string()))?
            }
            None => Version::legacy(stream_seq),
        };
        let hash = record.content_hash();
        let hash_header_mismatch = header(HEADER_CONTENT_HASH)
            .and_then(|h| ContentHash::from_hex(&h))
            .is_some_and(|h| h != hash);
        let message = IngestMessage {
            record,
            version,
            source_file: header(HEADER_SOURCE_FILE),
            source_line: header(HEADER_SOURCE_LINE).and_then(|l| l.parse().ok()),
            copy_of: header(HEADER_REPLAY_OF).and_then(|s| s.parse().ok()),
            force_resend: header(HEADER_FORCE_RESEND)
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
        };
        Ok(Decoded {
            message,
            hash,
            ledger_key,
            hash_header_mismatch,
        })
    }

    /// A copy of this version for replay or redrive: same version and source, marked as a copy.
    pub fn copy(&self, copy_of: Option<u64>, force_resend: bool) -> Self {
        IngestMessage {
            copy_of,
            force_resend,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ids;

    fn record(id: &str) -> CustomerRecord {
        CustomerRecord::normalised(
            id,
            "Zoë",
            "O'Neil",
            "z@x.org",
            Some("+1 555"),
            BTreeMap::from([("tier".to_owned(), "gold".to_owned())]),
        )
    }

    #[test]
    fn a_message_round_trips_through_its_wire_form() {
        let message = IngestMessage::from_row(record("c-1"), Version::row(5, 9), "/data/a.csv", 9);
        let (headers, body) = message
            .encode(&ids::ingest_row(&message.version))
            .expect("encode");
        let decoded = IngestMessage::decode(Some(&headers), &body, 77).expect("decode");
        assert_eq!(decoded.message, message);
        assert_eq!(decoded.hash, message.record.content_hash());
        assert_eq!(decoded.ledger_key, "c-1");
        assert!(!decoded.hash_header_mismatch);
        assert_eq!(
            headers.get(NATS_MESSAGE_ID).map(HeaderValue::as_str),
            Some("row:5:9")
        );

        let copy = message.copy(Some(3), true);
        let (headers, body) = copy
            .encode(&ids::ingest_copy(ids::CopyKind::Replay, &copy.version, "n"))
            .expect("encode");
        let decoded = IngestMessage::decode(Some(&headers), &body, 78).expect("decode");
        assert_eq!(decoded.message, copy);
        assert_eq!(
            decoded.message.version,
            Version::row(5, 9),
            "a copy keeps its version"
        );
    }

    /// The wire form other tools and older builds rely on.
    #[test]
    fn the_wire_form_is_pinned() {
        let message = IngestMessage::from_row(record("c-1"), Version::row(5, 9), "a.csv", 9);
        let (headers, body) = message.encode("row:5:9").expect("encode");
        let text = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(text("Sync-Version").as_deref(), Some("5.5.9"));
        assert_eq!(text("Sync-Source-File").as_deref(), Some("a.csv"));
        assert_eq!(text("Sync-Source-Line").as_deref(), Some("9"));
        assert_eq!(
            text("Sync-Content-Hash"),
            Some(message.record.content_hash().to_string())
        );
        assert_eq!(
            std::str::from_utf8(&body).expect("utf-8"),
            r#"{"id":"c-1","first_name":"Zoë","last_name":"O'Neil","email":"z@x.org","phone":"+1 555","attributes":{"tier":"gold"}}"#
        );
    }

    #[test]
    fn a_message_without_a_version_is_legacy_and_older_than_any_load() {
        let body = serde_json::to_vec(&record("c-2")).expect("json");
        let decoded = IngestMessage::decode(None, &body, 12).expect("decode");
        assert_eq!(decoded.message.version, Version::legacy(12));
        assert!(decoded.message.version < Version::row(1, 1));
    }

    #[test]
    fn malformed_messages_say_why() {
        assert!(matches!(
            IngestMessage::decode(None, b"not json", 1),
            Err(Malformed::Body(_))
        ));
        assert!(matches!(
            IngestMessage::decode(None, br#"{"first_name":"x"}"#, 1),
            Err(Malformed::Body(_))
        ));
        let empty_id = serde_json::to_vec(&record("")).expect("json");
        assert!(matches!(
            IngestMessage::decode(None, &empty_id, 1),
            Err(Malformed::Id(_))
        ));
        let long_id = serde_json::to_vec(&record(&"x".repeat(5000))).expect("json");
        assert!(matches!(
            IngestMessage::decode(None, &long_id, 1),
            Err(Malformed::Id(_))
        ));
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_VERSION, "1.2");
        let body = serde_json::to_vec(&record("c-3")).expect("json");
        assert!(matches!(
            IngestMessage::decode(Some(&headers), &body, 1),
            Err(Malformed::Version(_))
        ));
    }

    #[test]
    fn a_header_that_would_break_the_block_is_an_error_not_a_panic() {
        let message = IngestMessage::from_row(record("c-1"), Version::row(1, 2), "a\nb.csv", 2);
        assert!(matches!(
            message.encode("row:1:2"),
            Err(EncodeError::Header { .. })
        ));
    }
}
