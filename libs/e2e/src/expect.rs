//! What a pipeline run over a CSV file must produce, computed independently of the services by
//! parsing the file with the shared record rules.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context as _;
use customer_record::{ColumnLayout, ContentHash};

/// The final state a file must leave: the last version of every valid id, and the bad lines.
#[derive(Debug, Default)]
pub struct Expected {
    /// Customer id → content hash of its last version in the file.
    pub last_hash: HashMap<String, ContentHash>,
    /// Lines (1-based, where the row starts) of the rows that must be rejected.
    pub rejected_lines: Vec<u64>,
    /// Data rows in the file.
    pub rows: u64,
}

pub fn expected_from_csv(path: &Path) -> anyhow::Result<Expected> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut records = reader.byte_records();
    let header = records
        .next()
        .context("file has no header")?
        .context("reading the header")?;
    let layout = ColumnLayout::from_header(header.iter())?;
    let mut expected = Expected::default();
    for record in records {
        let record = record.context("reading a row")?;
        expected.rows += 1;
        let line = record.position().map(|p| p.line()).unwrap_or_default();
        match layout.parse_row(record.iter()) {
            Ok(customer) => {
                let hash = customer.content_hash();
                expected.last_hash.insert(customer.id, hash);
            }
            Err(_) => expected.rejected_lines.push(line),
        }
    }
    Ok(expected)
}
