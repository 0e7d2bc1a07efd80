//! Property: any customer record written as a CSV row survives the reader's parsing and message
//! encoding unchanged, and its content hash (the dedup id) is the same on both sides.

use std::collections::BTreeMap;

use csv_async::ByteRecord;
use csv_reader::message::{MessageContext, MessageKind, row_message};
use csv_reader::{Row, RowReader};
use customer_record::{ColumnLayout, CustomerRecord};
use proptest::prelude::*;
use sync_topology::{HEADER_CONTENT_HASH, Names};

/// Text as people type it: any printable characters (commas, quotes, unicode), plus line breaks
/// and tabs, which are legal inside quoted fields. A CRLF inside a field is read as LF (the reader
/// normalises line endings), so it is left out of the texts that must survive unchanged.
fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            8 => any::<char>().prop_filter("printable", |c| !c.is_control()),
            1 => prop::sample::select(vec![',', '"', '\n', '\r', '\t', ' ']),
        ],
        0..max,
    )
    .prop_map(|chars| chars.into_iter().collect::<String>())
    .prop_filter("no CRLF", |s| !s.contains("\r\n"))
}

fn record() -> impl Strategy<Value = CustomerRecord> {
    let id = text(20).prop_filter("id present, no line break", |s| {
        !s.trim().is_empty() && !s.contains(['\r', '\n'])
    });
    let email = "[a-zA-Z0-9._%+-]{1,12}@[a-z0-9-]{1,10}\\.[a-z]{2,6}";
    let attributes = proptest::collection::btree_map("[a-z][a-z0-9_]{0,8}x", text(30), 0..4);
    (
        id,
        text(30),
        text(30),
        email,
        proptest::option::of(text(15)),
        attributes,
    )
        .prop_map(|(id, first, last, email, phone, attributes)| {
            CustomerRecord::normalised(&id, &first, &last, &email, phone.as_deref(), attributes)
        })
}

/// Writes `record` as a file of a header and one row, the way an export would.
fn as_csv(record: &CustomerRecord) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["id", "first_name", "last_name", "email", "phone"];
    header.extend(record.attributes.keys().map(String::as_str));
    let mut row = vec![
        record.id.as_str(),
        &record.first_name,
        &record.last_name,
        &record.email,
        record.phone.as_deref().unwrap_or(""),
    ];
    row.extend(record.attributes.values().map(String::as_str));
    writer.write_record(&header).expect("header");
    writer.write_record(&row).expect("row");
    writer.into_inner().expect("flushed")
}

async fn read_back(csv_bytes: Vec<u8>) -> (CustomerRecord, String) {
    let mut rows = RowReader::new(csv_bytes.as_slice(), u64::MAX);
    let mut record = ByteRecord::new();
    assert!(rows.read_header(&mut record).await.expect("header read"));
    let layout = ColumnLayout::from_header(record.iter()).expect("header parsed");
    rows.expect_width(layout.width()).expect("width");
    // A field with line breaks is a valid row over several lines: never taken for a stray quote.
    let row = rows.next(&mut record).await.expect("row read");
    let Some(Row::Fields { line }) = row else {
        panic!("not read as one row: {row:?}");
    };
    assert_eq!(line, 2);
    let context = MessageContext::new(&Names::default(), "/in.csv", "file-x", 1, 1024 * 1024);
    let message = row_message(&context, &layout, record.iter(), line).expect("message");
    assert_eq!(rows.next(&mut record).await.expect("end"), None);
    assert_eq!(message.kind, MessageKind::Customer);
    let hash = message
        .headers
        .get(HEADER_CONTENT_HASH)
        .map(|v| v.as_str().to_owned())
        .expect("hash header");
    (
        serde_json::from_slice(&message.payload).expect("JSON body"),
        hash,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_record_survives_csv_then_message_then_record(record in record()) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let (back, hash_header) = runtime.block_on(read_back(as_csv(&record)));
        prop_assert_eq!(&back, &record);
        let hash = record.content_hash();
        prop_assert_eq!(back.content_hash(), hash.clone());
        prop_assert_eq!(hash_header.as_str(), hash.as_str());
    }
}

#[test]
fn normalising_twice_changes_nothing() {
    let once =
        CustomerRecord::normalised(" 1 ", " Ann", "Lee ", " A@B.io", Some(" "), BTreeMap::new());
    let twice = CustomerRecord::normalised(
        &once.id,
        &once.first_name,
        &once.last_name,
        &once.email,
        once.phone.as_deref(),
        once.attributes.clone(),
    );
    assert_eq!(once, twice);
}
