//! The messages a CSV row becomes: a customer on the ingest subject, or a rejection on the rejected
//! subject, each with the `Nats-Msg-Id` that makes a re-sent row a duplicate the stream drops.

use async_nats::Subject;
use async_nats::header::{HeaderMap, HeaderValue, NATS_MESSAGE_ID};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use customer_record::{ColumnLayout, CustomerRecord, RowRejection, raw_row_text};
use sync_topology::messages::RejectedRow;
use sync_topology::{
    HEADER_SOURCE_FILE, HEADER_SOURCE_LINE, IngestMessage, Names, Version, ids, stamp_from_text,
};

use crate::ReaderError;

/// A rejected row keeps this much of its raw text: enough to find and fix it, and small enough that
/// a row with a 10 MB field still fits in a NATS message.
pub const MAX_RAW_BYTES: usize = 4096;

/// Where the messages of one input file go and what they say about their source.
#[derive(Debug, Clone)]
pub struct MessageContext {
    pub ingest_subject: Subject,
    pub rejected_subject: Subject,
    /// Shown in the source-file header and in rejections.
    pub source_file: String,
    /// The file's identity key: part of a rejection's dedup id, so a re-run does not repeat it.
    pub file_key: String,
    /// The load number of this run: with the line, the version of each row.
    pub load: u64,
    /// `--version-column`: where the column sits whose value orders a customer's rows before the
    /// load and line do.
    pub version_column: Option<usize>,
    /// The server's largest message (its `max_payload`): a bigger row is rejected, not published.
    pub max_message_bytes: usize,
}

impl MessageContext {
    pub fn new(
        names: &Names,
        source_file: &str,
        file_key: &str,
        load: u64,
        max_message_bytes: usize,
    ) -> Self {
        MessageContext {
            ingest_subject: Subject::from(names.ingest_subject()),
            rejected_subject: Subject::from(names.rejected_subject()),
            source_file: source_file.to_owned(),
            file_key: file_key.to_owned(),
            load,
            version_column: None,
            max_message_bytes,
        }
    }
}

/// What a message is, for counting once the stream acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Customer,
    Rejected(&'static str),
}

/// One message ready to publish (and to publish again, unchanged, if the first attempt fails).
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub subject: Subject,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// The line the row starts on (1-based; the header is line 1).
    pub line: u64,
    pub kind: MessageKind,
}

impl OutgoingMessage {
    pub fn to_publish(&self) -> PublishMessage {
        PublishMessage::build()
            .payload(self.payload.clone())
            .headers(self.headers.clone())
    }

    /// Bytes the header block takes on the wire (`NATS/1.0`, `name: value` lines, blank line),
    /// which count toward the server's `max_payload`.
    pub fn headers_len(&self) -> usize {
        let lines: usize = self
            .headers
            .iter()
            .map(|(name, values)| {
                values
                    .iter()
                    .map(|value| AsRef::<[u8]>::as_ref(name).len() + 2 + value.as_str().len() + 2)
                    .sum::<usize>()
            })
            .sum();
        "NATS/1.0\r\n".len() + lines + 2
    }

    pub fn message_id(&self) -> Option<&str> {
        self.headers.get(NATS_MESSAGE_ID).map(HeaderValue::as_str)
    }
}

/// Turns one data row into its message: the customer, or why it is not one.
pub fn row_message<'a>(
    context: &MessageContext,
    layout: &ColumnLayout,
    fields: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    line: u64,
) -> Result<OutgoingMessage, ReaderError> {
    let parsed = layout.parse_row(fields.clone()).and_then(|record| {
        // The id travels in a header, where a line break would end the header block.
        if record.id.contains(['\r', '\n']) {
            Err(RowRejection::ControlCharacter {
                field: "id".to_owned(),
            })
        } else {
            Ok(record)
        }
    });
    let versioned = parsed.and_then(|record| {
        let version = version_of(context, layout, fields.clone(), line)?;
        Ok((record, version))
    });
    let rejection = match versioned {
        Ok((record, version)) => {
            let message = customer_message_at(context, &record, version, line)?;
            // The server would refuse it and the whole run would stop on one row.
            let bytes = message.payload.len() + message.headers_len();
            if bytes <= context.max_message_bytes {
                return Ok(message);
            }
            RowRejection::RecordTooLarge {
                bytes,
                limit: context.max_message_bytes,
            }
        }
        Err(rejection) => rejection,
    };
    rejected_message(context, &rejection, raw_row_text(fields), line)
}

/// The row's version: `(load, load, line)`, or with a version column `(its value, load, line)`.
fn version_of<'a>(
    context: &MessageContext,
    layout: &ColumnLayout,
    mut fields: impl Iterator<Item = &'a [u8]>,
    line: u64,
) -> Result<Version, RowRejection> {
    let Some(column) = context.version_column else {
        return Ok(Version::row(context.load, line));
    };
    let raw = fields.nth(column).unwrap_or_default();
    let text = String::from_utf8_lossy(raw);
    let stamp = stamp_from_text(&text).ok_or_else(|| RowRejection::InvalidVersion {
        column: layout
            .column_names()
            .get(column)
            .cloned()
            .unwrap_or_default(),
        value: text.chars().take(64).collect(),
    })?;
    Ok(Version {
        stamp,
        load: context.load,
        line,
    })
}

/// The ingest message of a valid row: version `(load, line)`, in the contract's wire form.
pub fn customer_message(
    context: &MessageContext,
    record: &CustomerRecord,
    line: u64,
) -> Result<OutgoingMessage, ReaderError> {
    customer_message_at(context, record, Version::row(context.load, line), line)
}

fn customer_message_at(
    context: &MessageContext,
    record: &CustomerRecord,
    version: Version,
    line: u64,
) -> Result<OutgoingMessage, ReaderError> {
    let message = IngestMessage::from_row(record.clone(), version, &context.source_file, line);
    let (headers, payload) = message
        .encode(&ids::ingest_row(&version))
        .map_err(|source| ReaderError::Ingest { line, source })?;
    Ok(OutgoingMessage {
        subject: context.ingest_subject.clone(),
        headers,
        payload,
        line,
        kind: MessageKind::Customer,
    })
}

/// The rejected-subject message of a bad row. Its dedup id is the file and line, so re-running or
/// resuming the file does not report the row twice.
pub fn rejected_message(
    context: &MessageContext,
    rejection: &RowRejection,
    mut raw: String,
    line: u64,
) -> Result<OutgoingMessage, ReaderError> {
    truncate_raw(&mut raw);
    let body = RejectedRow {
        source_file: context.source_file.clone(),
        line,
        kind: rejection.kind().to_owned(),
        reason: rejection.to_string(),
        raw,
        rejected_at: chrono::Utc::now(),
    };
    let mut headers = HeaderMap::new();
    let id = ids::rejected_row(&context.file_key, line);
    headers.insert(NATS_MESSAGE_ID, header_value(&id, line)?);
    headers.insert(
        HEADER_SOURCE_FILE,
        header_value(&context.source_file, line)?,
    );
    headers.insert(HEADER_SOURCE_LINE, header_value(&line.to_string(), line)?);
    let payload =
        serde_json::to_vec(&body).map_err(|source| ReaderError::Encode { line, source })?;
    Ok(OutgoingMessage {
        subject: context.rejected_subject.clone(),
        headers,
        payload: Bytes::from(payload),
        line,
        kind: MessageKind::Rejected(rejection.kind()),
    })
}

fn header_value(text: &str, line: u64) -> Result<HeaderValue, ReaderError> {
    text.parse().map_err(|_| ReaderError::Header {
        line,
        value: text.to_owned(),
    })
}

fn truncate_raw(raw: &mut String) {
    if raw.len() <= MAX_RAW_BYTES {
        return;
    }
    let total = raw.len() as u64;
    cut_with_note(raw, MAX_RAW_BYTES, total);
}

/// The raw text of a rejected line `total` bytes long of which the reader kept only `head`, the
/// start (it does not hold a line over the row limit in memory).
pub fn raw_line_excerpt(head: &[u8], total: u64) -> String {
    let mut raw = String::from_utf8_lossy(head).into_owned();
    if total > head.len() as u64 {
        // Room for the note, so that `rejected_message` leaves the text as it is.
        cut_with_note(&mut raw, MAX_RAW_BYTES - 64, total);
    }
    raw
}

fn cut_with_note(raw: &mut String, max: usize, total: u64) {
    let mut cut = max.min(raw.len());
    while !raw.is_char_boundary(cut) {
        cut -= 1;
    }
    raw.truncate(cut);
    raw.push_str(&format!("… [{cut} of {total} bytes shown]"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> MessageContext {
        MessageContext::new(
            &Names::default(),
            "/data/in.csv",
            "file-abc",
            7,
            1024 * 1024,
        )
    }

    fn layout() -> ColumnLayout {
        ColumnLayout::from_header(
            ["id", "first_name", "last_name", "email", "tier"].map(str::as_bytes),
        )
        .expect("valid header")
    }

    #[test]
    fn valid_row_carries_dedup_id_source_and_hash() {
        let fields = ["7", "Zoë", "O'Neil", "Z@x.org", "gold"].map(str::as_bytes);
        let message =
            row_message(&context(), &layout(), fields.iter().copied(), 12).expect("message");
        assert_eq!(message.subject.as_str(), "customers.ingest");
        assert_eq!(message.kind, MessageKind::Customer);
        let decoded =
            IngestMessage::decode(Some(&message.headers), &message.payload, 1).expect("decodes");
        let record = decoded.message.record;
        assert_eq!(message.message_id(), Some("row:7:12"));
        assert_eq!(decoded.message.version, Version::row(7, 12));
        assert_eq!(decoded.message.source_line, Some(12));
        assert_eq!(decoded.message.source_file.as_deref(), Some("/data/in.csv"));
        assert_eq!(
            record.attributes.get("tier").map(String::as_str),
            Some("gold")
        );
    }

    #[test]
    fn bad_row_becomes_a_rejection_with_a_per_line_id() {
        let fields = ["7", "Ann", "Lee", "nope", "gold"].map(str::as_bytes);
        let message =
            row_message(&context(), &layout(), fields.iter().copied(), 3).expect("message");
        assert_eq!(message.subject.as_str(), "customers.rejected");
        assert_eq!(message.kind, MessageKind::Rejected("invalid_email"));
        assert_eq!(message.message_id(), Some("rejected:file-abc:3"));
        let body: RejectedRow = serde_json::from_slice(&message.payload).expect("json body");
        assert_eq!(body.line, 3);
        assert_eq!(body.raw, "7,Ann,Lee,nope,gold");
        assert!(body.reason.contains("email"), "{}", body.reason);
    }

    #[test]
    fn an_id_with_a_line_break_is_rejected_not_a_broken_header() {
        let fields = ["a\nb", "Ann", "Lee", "a@b.io", ""].map(str::as_bytes);
        let message =
            row_message(&context(), &layout(), fields.iter().copied(), 5).expect("message");
        assert_eq!(message.kind, MessageKind::Rejected("control_character"));
    }

    #[test]
    fn a_row_over_the_servers_message_limit_is_rejected_with_both_sizes() {
        let mut small = context();
        small.max_message_bytes = 300;
        let tier = "g".repeat(200);
        let fields = ["7", "Ann", "Lee", "a@b.io", tier.as_str()].map(str::as_bytes);
        let message = row_message(&small, &layout(), fields.iter().copied(), 4).expect("message");
        assert_eq!(message.kind, MessageKind::Rejected("record_too_large"));
        let body: RejectedRow = serde_json::from_slice(&message.payload).expect("json body");
        assert!(body.reason.contains("300-byte limit"), "{}", body.reason);
        // The same row fits the default 1 MiB.
        let fits = row_message(&context(), &layout(), fields.iter().copied(), 4).expect("message");
        assert_eq!(fits.kind, MessageKind::Customer);
        assert!(fits.payload.len() + fits.headers_len() > 300);
    }

    #[test]
    fn huge_raw_text_is_truncated_on_a_char_boundary() {
        let huge = "é".repeat(10_000);
        let fields = ["1", huge.as_str(), "Lee", "a@b.io", ""].map(str::as_bytes);
        let message =
            row_message(&context(), &layout(), fields.iter().copied(), 9).expect("message");
        let body: RejectedRow = serde_json::from_slice(&message.payload).expect("json body");
        assert_eq!(body.kind, "field_too_long");
        assert!(body.raw.len() < MAX_RAW_BYTES + 100);
        assert!(body.raw.starts_with("1,é"));
        assert!(body.raw.ends_with(" of 20014 bytes shown]"), "{}", body.raw);
    }

    #[test]
    fn an_excerpt_of_a_long_line_says_how_long_it_was_and_is_not_cut_again() {
        let head = "ü".repeat(MAX_RAW_BYTES / 2);
        let raw = raw_line_excerpt(head.as_bytes(), 20_000_000);
        assert!(raw.ends_with("of 20000000 bytes shown]"), "{raw}");
        assert!(raw.len() <= MAX_RAW_BYTES);
        let rejection = RowRejection::RowTooLong {
            bytes: 20_000_000,
            limit: 16 * 1024 * 1024,
        };
        let message = rejected_message(&context(), &rejection, raw.clone(), 7).expect("message");
        let body: RejectedRow = serde_json::from_slice(&message.payload).expect("json body");
        assert_eq!(body.raw, raw);
        assert_eq!(body.kind, "row_too_long");
        assert_eq!(raw_line_excerpt(b"7,\"Ann", 6), "7,\"Ann");
    }
}
