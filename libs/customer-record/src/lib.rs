//! The customer record: how a CSV row becomes one, the rules that reject a row, the normalised
//! form, its content hash and its JSON shape. Every service agrees on a customer through this crate.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Columns every input file must have (matched case-insensitively, trimmed).
pub const REQUIRED_COLUMNS: [&str; 4] = ["id", "first_name", "last_name", "email"];
/// Optional well-known column; every other column goes into `attributes`.
pub const PHONE_COLUMN: &str = "phone";
/// A field longer than this is a bad row, not a customer.
pub const MAX_FIELD_BYTES: usize = 1024;
/// A customer id longer than this is a bad row. Ledger keys (hex-escaped, so up to twice as long)
/// and message headers and ids are derived from the id, and the NATS server limits how long those
/// may be: an over-long id must be refused at the source, not discovered by the integrator.
pub const MAX_ID_BYTES: usize = 256;

/// One customer, normalised: fields trimmed, e-mail lower-cased, empty phone absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerRecord {
    pub id: String,
    pub first_name: String,
    pub last_name: String,
    pub email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// Hex of the first 16 bytes of a BLAKE3 digest of the normalised record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ContentHash(String);

impl ContentHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The same kind of digest over arbitrary bytes, for a message that is not a customer (it
    /// still needs a stable name).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self::from_digest(&blake3::hash(bytes))
    }

    fn from_digest(digest: &blake3::Hash) -> Self {
        let mut hex = String::with_capacity(32);
        for byte in &digest.as_bytes()[..16] {
            hex.push_str(&format!("{byte:02x}"));
        }
        ContentHash(hex)
    }

    /// Accepts a hash read back from a header, a ledger entry or a table.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let valid = hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then(|| ContentHash(hex.to_ascii_lowercase()))
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl CustomerRecord {
    /// Builds a record from already-extracted field values, normalising them.
    pub fn normalised(
        id: &str,
        first_name: &str,
        last_name: &str,
        email: &str,
        phone: Option<&str>,
        attributes: BTreeMap<String, String>,
    ) -> Self {
        CustomerRecord {
            id: id.trim().to_owned(),
            first_name: first_name.trim().to_owned(),
            last_name: last_name.trim().to_owned(),
            email: email.trim().to_lowercase(),
            phone: phone
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
                .collect(),
        }
    }

    /// Stable across processes, platforms and versions of this crate: every field is fed in a fixed
    /// order, length-prefixed, so no two different records can share an encoding.
    pub fn content_hash(&self) -> ContentHash {
        let mut hasher = blake3::Hasher::new();
        let mut feed = |tag: u8, value: &str| {
            hasher.update(&[tag]);
            hasher.update(&(value.len() as u64).to_le_bytes());
            hasher.update(value.as_bytes());
        };
        feed(1, &self.id);
        feed(2, &self.first_name);
        feed(3, &self.last_name);
        feed(4, &self.email);
        match &self.phone {
            Some(phone) => feed(5, phone),
            None => feed(6, ""),
        }
        for (key, value) in &self.attributes {
            feed(7, key);
            feed(8, value);
        }
        ContentHash::from_digest(&hasher.finalize())
    }
}

/// Why a row is not a customer. Each names the field or the count so an operator can fix the row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowRejection {
    #[error("row has {found} fields but the header has {expected}")]
    FieldCount { expected: usize, found: usize },
    #[error("field `id` is empty")]
    EmptyId,
    #[error(
        "field `id` is {len} bytes, over the {MAX_ID_BYTES}-byte limit for customer ids (ledger keys \
         and message headers are derived from the id)"
    )]
    IdTooLong { len: usize },
    #[error("field `email` is not a plausible address: {value:?}")]
    InvalidEmail { value: String },
    #[error("field `{field}` is not valid UTF-8")]
    InvalidUtf8 { field: String },
    #[error("field `{field}` is {len} bytes, over the {MAX_FIELD_BYTES}-byte limit")]
    FieldTooLong { field: String, len: usize },
    #[error("field `{field}` contains a control character (NUL or similar)")]
    ControlCharacter { field: String },
    #[error(
        "the row makes a {bytes}-byte message, over the {limit}-byte limit of the NATS server \
         (max_payload): trim its fields or drop columns"
    )]
    RecordTooLarge { bytes: usize, limit: usize },
    /// The parser read lines `opened` to `ended` as one row that is not a valid row: the hallmark
    /// of a quote that was never closed (or closed by another stray quote), which would otherwise
    /// swallow every row in between. Only line `opened` is rejected; the reader reads the lines
    /// after it as rows of their own.
    #[error("{}", unterminated_quote_reason(*opened, *ended))]
    UnterminatedQuote { opened: u64, ended: u64 },
    /// A line longer than the reader's row limit with no line break in it: not a customer row.
    #[error(
        "the line runs on for {bytes} bytes without a line break, over the {limit}-byte row limit \
         (csv-reader --max-row-bytes): it is not a customer row (fields are at most \
         {MAX_FIELD_BYTES} bytes); reading went on at the next line"
    )]
    RowTooLong { bytes: u64, limit: u64 },
    /// The column named by `csv-reader --version-column` does not hold a version.
    #[error(
        "field `{column}` (the version column) is {value:?}: not a whole number or a date-time \
         (RFC 3339, `YYYY-MM-DD HH:MM:SS` in UTC, or `YYYY-MM-DD`)"
    )]
    InvalidVersion { column: String, value: String },
}

impl RowRejection {
    /// A short machine-readable kind, used in metrics and summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            RowRejection::FieldCount { .. } => "field_count",
            RowRejection::EmptyId => "empty_id",
            RowRejection::IdTooLong { .. } => "id_too_long",
            RowRejection::InvalidEmail { .. } => "invalid_email",
            RowRejection::InvalidUtf8 { .. } => "invalid_utf8",
            RowRejection::FieldTooLong { .. } => "field_too_long",
            RowRejection::ControlCharacter { .. } => "control_character",
            RowRejection::RecordTooLarge { .. } => "record_too_large",
            RowRejection::UnterminatedQuote { .. } => "unterminated_quote",
            RowRejection::RowTooLong { .. } => "row_too_long",
            RowRejection::InvalidVersion { .. } => "invalid_version",
        }
    }
}

fn unterminated_quote_reason(opened: u64, ended: u64) -> String {
    let fix = format!(
        "fix line {opened} by closing the quote, or by doubling a quote that is part of the text (\"\")"
    );
    if ended > opened {
        format!(
            "a quote opened on line {opened} is not closed where its row should end: it runs on to \
             line {ended}, making one invalid row of the lines between. Line {opened} is rejected \
             on its own and the lines after it are read as rows of their own; {fix}"
        )
    } else {
        format!(
            "a quote opened on line {opened} is never closed: it runs to the end of the file; {fix}"
        )
    }
}

/// Problems with the header row: the whole file is refused before anything is published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("required column(s) missing from the header: {missing}; found columns: {found}")]
    MissingColumns { missing: String, found: String },
    #[error("column `{0}` appears twice in the header")]
    DuplicateColumn(String),
    #[error("the header is not valid UTF-8 (is this a CSV file?)")]
    NotUtf8,
}

/// Where each known column sits in a row, learned once from the header.
#[derive(Debug, Clone)]
pub struct ColumnLayout {
    width: usize,
    id: usize,
    first_name: usize,
    last_name: usize,
    email: usize,
    phone: Option<usize>,
    attributes: Vec<(usize, String)>,
    names: Vec<String>,
}

impl ColumnLayout {
    /// Reads the header row. Names are trimmed and matched case-insensitively; a UTF-8 BOM on the
    /// first name is ignored.
    pub fn from_header<'a>(
        fields: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, HeaderError> {
        let mut names = Vec::new();
        for raw in fields {
            let text = std::str::from_utf8(raw).map_err(|_| HeaderError::NotUtf8)?;
            let name = text.trim_start_matches('\u{feff}').trim().to_lowercase();
            if !name.is_empty() && names.contains(&name) {
                return Err(HeaderError::DuplicateColumn(name));
            }
            names.push(name);
        }
        let position = |wanted: &str| names.iter().position(|n| n == wanted);
        let missing: Vec<&str> = REQUIRED_COLUMNS
            .iter()
            .copied()
            .filter(|c| position(c).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(HeaderError::MissingColumns {
                missing: missing.join(", "),
                found: names.join(", "),
            });
        }
        let known = |n: &str| REQUIRED_COLUMNS.contains(&n) || n == PHONE_COLUMN;
        let attributes = names
            .iter()
            .enumerate()
            .filter(|(_, n)| !known(n) && !n.is_empty())
            .map(|(i, n)| (i, n.clone()))
            .collect();
        let found = |c: &str| {
            position(c).ok_or_else(|| HeaderError::MissingColumns {
                missing: c.to_owned(),
                found: names.join(", "),
            })
        };
        Ok(ColumnLayout {
            width: names.len(),
            id: found("id")?,
            first_name: found("first_name")?,
            last_name: found("last_name")?,
            email: found("email")?,
            phone: position(PHONE_COLUMN),
            attributes,
            names,
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn column_names(&self) -> &[String] {
        &self.names
    }

    /// Where the column of this name (matched like the header: trimmed, case-insensitive) sits.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        let wanted = name.trim().to_lowercase();
        self.names.iter().position(|n| *n == wanted)
    }

    /// Turns one data row into a customer, or says why it is not one.
    pub fn parse_row<'a>(
        &self,
        fields: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> Result<CustomerRecord, RowRejection> {
        if fields.len() != self.width {
            return Err(RowRejection::FieldCount {
                expected: self.width,
                found: fields.len(),
            });
        }
        let mut texts: Vec<&str> = Vec::with_capacity(self.width);
        for (index, raw) in fields.enumerate() {
            let field = || self.names[index].clone();
            if raw.len() > MAX_FIELD_BYTES {
                return Err(RowRejection::FieldTooLong {
                    field: field(),
                    len: raw.len(),
                });
            }
            let text = std::str::from_utf8(raw)
                .map_err(|_| RowRejection::InvalidUtf8 { field: field() })?;
            // Newlines and tabs are legitimate inside quoted fields; NUL and the like are not data.
            if text
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
            {
                return Err(RowRejection::ControlCharacter { field: field() });
            }
            texts.push(text);
        }
        let attributes = self
            .attributes
            .iter()
            .map(|(i, name)| (name.clone(), texts[*i].to_owned()))
            .collect();
        let record = CustomerRecord::normalised(
            texts[self.id],
            texts[self.first_name],
            texts[self.last_name],
            texts[self.email],
            self.phone.map(|i| texts[i]),
            attributes,
        );
        if record.id.is_empty() {
            return Err(RowRejection::EmptyId);
        }
        if record.id.len() > MAX_ID_BYTES {
            return Err(RowRejection::IdTooLong {
                len: record.id.len(),
            });
        }
        if !is_plausible_email(&record.email) {
            return Err(RowRejection::InvalidEmail {
                value: record.email,
            });
        }
        Ok(record)
    }
}

/// One `@`, a non-empty local part, a dot inside the domain, no whitespace.
pub fn is_plausible_email(email: &str) -> bool {
    if email.chars().any(char::is_whitespace) {
        return false;
    }
    let mut parts = email.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let dot_inside = domain
        .find('.')
        .is_some_and(|i| i > 0 && i + 1 < domain.len())
        && !domain.ends_with('.');
    !local.is_empty() && dot_inside
}

/// Re-encodes a row as CSV text so a rejected row can be shown (and fixed) as it was read.
pub fn raw_row_text<'a>(fields: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let fields: Vec<&[u8]> = fields.into_iter().collect();
    let encoded = writer
        .write_record(&fields)
        .ok()
        .and_then(|()| writer.into_inner().ok());
    let bytes = encoded.unwrap_or_else(|| fields.join(&b","[..]));
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if text.ends_with('\n') {
        text.pop();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(header: &[&str]) -> ColumnLayout {
        ColumnLayout::from_header(header.iter().map(|s| s.as_bytes())).expect("valid header")
    }

    fn row<'a>(fields: &'a [&'a str]) -> impl ExactSizeIterator<Item = &'a [u8]> {
        fields.iter().map(|s| s.as_bytes())
    }

    #[test]
    fn header_is_matched_by_name_case_insensitively_with_bom_and_spaces() {
        let l = layout(&["\u{feff}ID", " Email ", "first_name", "LAST_NAME", "tier"]);
        let rec = l
            .parse_row(row(&["7", "A@B.io", "Ann", "Lee", "gold"]))
            .expect("valid row");
        assert_eq!(rec.id, "7");
        assert_eq!(rec.email, "a@b.io");
        assert_eq!(rec.attributes.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(rec.phone, None);
    }

    #[test]
    fn missing_required_column_is_named() {
        let err = ColumnLayout::from_header(["id", "first_name", "phone"].map(str::as_bytes))
            .expect_err("missing columns");
        let text = err.to_string();
        assert!(text.contains("last_name, email"), "{text}");
    }

    #[test]
    fn every_rejection_kind() {
        let l = layout(&["id", "first_name", "last_name", "email", "phone"]);
        let cases: Vec<(Vec<&[u8]>, &str)> = vec![
            (vec![b"1", b"a", b"b"], "field_count"),
            (vec![b" ", b"a", b"b", b"a@b.c", b""], "empty_id"),
            (vec![b"1", b"a", b"b", b"nope", b""], "invalid_email"),
            (vec![b"1", b"a", b"b", b"a@@b.c", b""], "invalid_email"),
            (vec![b"1", b"a", b"b", b"a b@c.d", b""], "invalid_email"),
            (vec![b"1", b"a", b"b", b"a@bc", b""], "invalid_email"),
            (vec![b"1", b"\xff", b"b", b"a@b.c", b""], "invalid_utf8"),
            (vec![b"1", b"a\0", b"b", b"a@b.c", b""], "control_character"),
        ];
        for (fields, kind) in cases {
            let err = l
                .parse_row(fields.clone().into_iter())
                .expect_err("should be rejected");
            assert_eq!(err.kind(), kind, "{fields:?}");
        }
        let long = vec![b'x'; MAX_FIELD_BYTES + 1];
        let err = l
            .parse_row(vec![&b"1"[..], &long, b"b", b"a@b.c", b""].into_iter())
            .expect_err("too long");
        assert_eq!(err.kind(), "field_too_long");
        let long_id = "7".repeat(MAX_ID_BYTES + 1);
        let err = l
            .parse_row(row(&[&long_id, "a", "b", "a@b.c", ""]))
            .expect_err("id too long");
        assert_eq!(err.kind(), "id_too_long");
        assert!(err.to_string().contains("257 bytes"), "{err}");
        let longest_id = "7".repeat(MAX_ID_BYTES);
        let padded = format!("  {longest_id}  ");
        assert!(
            l.parse_row(row(&[&padded, "a", "b", "a@b.c", ""])).is_ok(),
            "the limit applies to the trimmed id"
        );
    }

    #[test]
    fn hash_ignores_whitespace_and_email_case_but_not_content() {
        let l = layout(&["id", "first_name", "last_name", "email"]);
        let a = l
            .parse_row(row(&["1", "Ann", "Lee", "A@b.io"]))
            .expect("row");
        let b = l
            .parse_row(row(&["1 ", " Ann", "Lee", "a@B.io "]))
            .expect("row");
        let c = l
            .parse_row(row(&["1", "Anne", "Lee", "a@b.io"]))
            .expect("row");
        assert_eq!(a.content_hash(), b.content_hash());
        assert_ne!(a.content_hash(), c.content_hash());
        assert_eq!(a.content_hash().as_str().len(), 32);
    }

    #[test]
    fn hash_is_pinned_so_a_release_cannot_silently_change_it() {
        let rec = CustomerRecord::normalised("1", "Ann", "Lee", "a@b.io", None, BTreeMap::new());
        assert_eq!(
            rec.content_hash().as_str(),
            "8563861360243bd3a3ed5014c60af708",
            "changing the hash re-sends every customer: do it only with a migration plan"
        );
    }

    #[test]
    fn raw_text_requotes_fields() {
        assert_eq!(
            raw_row_text([&b"1"[..], b"a,b", b"say \"hi\""]),
            "1,\"a,b\",\"say \"\"hi\"\"\""
        );
    }

    #[test]
    fn json_round_trip() {
        let mut attrs = BTreeMap::new();
        attrs.insert("tier".into(), "gold".into());
        let rec = CustomerRecord::normalised("9", "Zoë", "O'Neil", "z@x.org", Some("1"), attrs);
        let json = serde_json::to_string(&rec).expect("serialise");
        let back: CustomerRecord = serde_json::from_str(&json).expect("parse");
        assert_eq!(rec, back);
    }
}
