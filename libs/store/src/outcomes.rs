//! Idempotent batch writes of pipeline outcomes: one transaction per batch, each table written by one
//! multi-row `INSERT … SELECT FROM unnest(…)` statement, so a batch costs a handful of round trips
//! whatever its size, and writing the same batch again changes nothing.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sync_topology::Version;
use sync_topology::messages::{DeadLetter, RejectedRow, SupersededOutcome, SyncedOutcome};

use crate::StoreError;

/// One message of the results stream, decoded, or kept verbatim when it cannot be stored as what it
/// claims to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Synced(SyncedOutcome),
    /// Counted, never stored: a superseded version never reached the CRM, and `customers` holds
    /// only what did.
    Superseded(SupersededOutcome),
    Rejected(RejectedRow),
    Dead(DeadLetter),
    Poison(PoisonMessage),
}

/// A results-stream message isolated as poison, stored in `poison_messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoisonMessage {
    pub stream: String,
    pub stream_seq: u64,
    pub subject: String,
    pub reason: String,
    pub body: Vec<u8>,
    pub received_at: DateTime<Utc>,
}

/// What one committed batch changed. Counts are rows the statements actually inserted, updated or
/// deleted, so a redelivered batch reports zeros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BatchReport {
    pub outcomes: u64,
    pub customers_written: u64,
    pub rejected_rows_written: u64,
    pub dead_letters_written: u64,
    /// Dead letters removed because a synced outcome of the same or a later version arrived.
    pub dead_letters_cleared: u64,
    pub poison_written: u64,
    /// Superseded outcomes seen (nothing is written for them).
    pub superseded: u64,
}

impl BatchReport {
    pub fn add(&mut self, other: &BatchReport) {
        self.outcomes += other.outcomes;
        self.customers_written += other.customers_written;
        self.rejected_rows_written += other.rejected_rows_written;
        self.dead_letters_written += other.dead_letters_written;
        self.dead_letters_cleared += other.dead_letters_cleared;
        self.poison_written += other.poison_written;
        self.superseded += other.superseded;
    }
}

/// How customer rows reach PostgreSQL; both give identical tables, they differ only in speed
/// (see the persister's benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteStrategy {
    /// One `INSERT … SELECT FROM unnest($1::text[], …) ON CONFLICT …` with array parameters.
    #[default]
    Unnest,
    /// Binary `COPY` into a session temporary table, then one `INSERT … SELECT … ON CONFLICT …`.
    CopyMerge,
}

/// Writes `outcomes` in one transaction and commits it, with the default strategy.
pub async fn write_batch(
    client: &mut tokio_postgres::Client,
    outcomes: &[Outcome],
) -> Result<BatchReport, StoreError> {
    write_batch_with(client, outcomes, WriteStrategy::default()).await
}

/// Writes `outcomes` in one transaction and commits it.
///
/// Order inside a batch does not matter, nor does the split of a stream into batches: of several
/// versions of a customer the newest [`Version`] wins; a dead letter is stored only while no synced
/// version at least as new exists, and removed once one arrives.
pub async fn write_batch_with(
    client: &mut tokio_postgres::Client,
    outcomes: &[Outcome],
    strategy: WriteStrategy,
) -> Result<BatchReport, StoreError> {
    let rows = BatchRows::collect(outcomes)?;
    let tx = client
        .transaction()
        .await
        .map_err(StoreError::query("starting the batch transaction"))?;
    let mut report = BatchReport {
        outcomes: outcomes.len() as u64,
        superseded: rows.superseded,
        ..BatchReport::default()
    };
    // Dead letters first: the synced outcomes of this same batch then clear the superseded ones.
    if !rows.dead.is_empty() {
        report.dead_letters_written = write_dead_letters(&tx, &rows.dead).await?;
    }
    if !rows.synced.is_empty() {
        report.customers_written = match strategy {
            WriteStrategy::Unnest => write_customers(&tx, &rows.synced).await?,
            WriteStrategy::CopyMerge => copy_merge_customers(&tx, &rows.synced).await?,
        };
        report.dead_letters_cleared = clear_dead_letters(&tx, &rows.synced).await?;
    }
    if !rows.rejected.is_empty() {
        report.rejected_rows_written = write_rejected(&tx, &rows.rejected).await?;
    }
    if !rows.poison.is_empty() {
        report.poison_written = write_poison(&tx, &rows.poison).await?;
    }
    tx.commit()
        .await
        .map_err(StoreError::query("committing the batch"))?;
    Ok(report)
}

/// An outcome with the values its row needs as PostgreSQL `bigint`s, range-checked once.
#[derive(Debug)]
struct Row<'a, T> {
    outcome: &'a T,
    version: [i64; 3],
    ingest_seq: i64,
}

// By hand: the derive would demand `T: Copy`, and only the reference is copied.
impl<T> Clone for Row<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Row<'_, T> {}

/// A batch regrouped by table, with the duplicates `ON CONFLICT DO UPDATE` cannot take collapsed,
/// and sorted by key so concurrent writers lock rows in one order.
#[derive(Debug, Default)]
struct BatchRows<'a> {
    synced: Vec<Row<'a, SyncedOutcome>>,
    dead: Vec<Row<'a, DeadLetter>>,
    rejected: Vec<&'a RejectedRow>,
    poison: Vec<&'a PoisonMessage>,
    superseded: u64,
}

fn version_columns(key: &str, version: Version) -> Result<[i64; 3], StoreError> {
    version.to_i64s().ok_or_else(|| StoreError::InvalidData {
        what: format!("version {version} of {key:?}: beyond PostgreSQL's bigint"),
    })
}

impl<'a> BatchRows<'a> {
    fn collect(outcomes: &'a [Outcome]) -> Result<Self, StoreError> {
        let mut synced: HashMap<&str, Row<'a, SyncedOutcome>> = HashMap::new();
        let mut dead: HashMap<(&str, &str), Row<'a, DeadLetter>> = HashMap::new();
        let mut rejected: HashMap<(&str, u64), &RejectedRow> = HashMap::new();
        let mut poison: HashMap<(&str, u64), &PoisonMessage> = HashMap::new();
        let mut superseded = 0;
        for outcome in outcomes {
            match outcome {
                Outcome::Synced(s) => {
                    let id = s.customer.id.as_str();
                    let row = Row {
                        outcome: s,
                        version: version_columns(id, s.version())?,
                        ingest_seq: to_i64("ingest_seq", id, s.ingest_seq)?,
                    };
                    checked_i64("source_line", id, s.source_line)?;
                    let slot = synced.entry(id).or_insert(row);
                    if row.version > slot.version {
                        *slot = row;
                    }
                }
                Outcome::Superseded(_) => superseded += 1,
                Outcome::Dead(d) => {
                    let id = d.customer_id.as_str();
                    let row = Row {
                        outcome: d,
                        version: version_columns(id, d.version())?,
                        ingest_seq: to_i64("ingest_seq", id, d.ingest_seq)?,
                    };
                    to_i64("attempts", id, d.attempts)?;
                    checked_i64("source_line", id, d.source_line)?;
                    let slot = dead.entry((id, d.content_hash.as_str())).or_insert(row);
                    if (row.version, d.attempts) > (slot.version, slot.outcome.attempts) {
                        *slot = row;
                    }
                }
                Outcome::Rejected(r) => {
                    to_i64("line", &r.source_file, r.line)?;
                    rejected
                        .entry((r.source_file.as_str(), r.line))
                        .or_insert(r);
                }
                Outcome::Poison(p) => {
                    to_i64("stream_seq", &p.stream, p.stream_seq)?;
                    poison.entry((p.stream.as_str(), p.stream_seq)).or_insert(p);
                }
            }
        }
        let mut rows = BatchRows {
            synced: synced.into_values().collect(),
            dead: dead.into_values().collect(),
            rejected: rejected.into_values().collect(),
            poison: poison.into_values().collect(),
            superseded,
        };
        rows.synced
            .sort_by(|a, b| a.outcome.customer.id.cmp(&b.outcome.customer.id));
        rows.dead.sort_by(|a, b| {
            (&a.outcome.customer_id, &a.outcome.content_hash)
                .cmp(&(&b.outcome.customer_id, &b.outcome.content_hash))
        });
        rows.rejected
            .sort_by(|a, b| (&a.source_file, a.line).cmp(&(&b.source_file, b.line)));
        rows.poison
            .sort_by(|a, b| (&a.stream, a.stream_seq).cmp(&(&b.stream, b.stream_seq)));
        Ok(rows)
    }
}

fn to_i64(field: &'static str, key: &str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::InvalidData {
        what: format!("{field} {value} of {key:?} is beyond PostgreSQL's bigint"),
    })
}

fn checked_i64(
    field: &'static str,
    key: &str,
    value: Option<u64>,
) -> Result<Option<i64>, StoreError> {
    value.map(|v| to_i64(field, key, v)).transpose()
}

// Values below were range-checked by `BatchRows::collect`, so these conversions cannot saturate.
fn bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn attributes_json(record: &customer_record::CustomerRecord) -> String {
    // A map of strings always serialises; the fallback only keeps the signature infallible.
    serde_json::to_string(&record.attributes).unwrap_or_else(|_| "{}".to_owned())
}

/// The customer columns of synced outcomes, column by column, for `unnest` or `COPY`.
struct CustomerColumns<'a> {
    ids: Vec<&'a str>,
    first_names: Vec<&'a str>,
    last_names: Vec<&'a str>,
    emails: Vec<&'a str>,
    phones: Vec<Option<&'a str>>,
    attributes: Vec<String>,
    hashes: Vec<&'a str>,
    stamps: Vec<i64>,
    loads: Vec<i64>,
    lines: Vec<i64>,
    seqs: Vec<i64>,
    crm_ids: Vec<Option<&'a str>>,
    synced_ats: Vec<DateTime<Utc>>,
    files: Vec<Option<&'a str>>,
    source_lines: Vec<Option<i64>>,
}

impl<'a> CustomerColumns<'a> {
    fn of(rows: &[Row<'a, SyncedOutcome>]) -> Self {
        let n = rows.len();
        let mut columns = CustomerColumns {
            ids: Vec::with_capacity(n),
            first_names: Vec::with_capacity(n),
            last_names: Vec::with_capacity(n),
            emails: Vec::with_capacity(n),
            phones: Vec::with_capacity(n),
            attributes: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            stamps: Vec::with_capacity(n),
            loads: Vec::with_capacity(n),
            lines: Vec::with_capacity(n),
            seqs: Vec::with_capacity(n),
            crm_ids: Vec::with_capacity(n),
            synced_ats: Vec::with_capacity(n),
            files: Vec::with_capacity(n),
            source_lines: Vec::with_capacity(n),
        };
        for row in rows {
            let s = row.outcome;
            let c = &s.customer;
            columns.ids.push(c.id.as_str());
            columns.first_names.push(c.first_name.as_str());
            columns.last_names.push(c.last_name.as_str());
            columns.emails.push(c.email.as_str());
            columns.phones.push(c.phone.as_deref());
            columns.attributes.push(attributes_json(c));
            columns.hashes.push(s.content_hash.as_str());
            let [stamp, load, line] = row.version;
            columns.stamps.push(stamp);
            columns.loads.push(load);
            columns.lines.push(line);
            columns.seqs.push(row.ingest_seq);
            columns.crm_ids.push(s.crm_id.as_deref());
            columns.synced_ats.push(s.synced_at);
            columns.files.push(s.source_file.as_deref());
            columns.source_lines.push(s.source_line.map(bigint));
        }
        columns
    }
}

/// The columns of `customers` every write strategy fills, in this order.
const CUSTOMER_COLUMNS: &str = "id, first_name, last_name, email, phone, attributes, content_hash, \
     version_stamp, version_load, version_line, ingest_seq, crm_id, synced_at, source_file, \
     source_line";

/// The same list as it is selected from the incoming rows (attributes arrive as text).
const CUSTOMER_SELECT: &str = "id, first_name, last_name, email, phone, attributes::jsonb, \
     content_hash, version_stamp, version_load, version_line, ingest_seq, crm_id, synced_at, \
     source_file, source_line";

async fn write_customers(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[Row<'_, SyncedOutcome>],
) -> Result<u64, StoreError> {
    let c = CustomerColumns::of(rows);
    tx.execute(
        &format!(
            "INSERT INTO customers ({CUSTOMER_COLUMNS}) \
             SELECT {CUSTOMER_SELECT} \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                         $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], \
                         $12::text[], $13::timestamptz[], $14::text[], $15::int8[]) \
                  AS t({CUSTOMER_COLUMNS}) \
             {CUSTOMER_UPSERT_TAIL}"
        ),
        &[
            &c.ids,
            &c.first_names,
            &c.last_names,
            &c.emails,
            &c.phones,
            &c.attributes,
            &c.hashes,
            &c.stamps,
            &c.loads,
            &c.lines,
            &c.seqs,
            &c.crm_ids,
            &c.synced_ats,
            &c.files,
            &c.source_lines,
        ],
    )
    .await
    .map_err(StoreError::query("upserting customers"))
}

/// Newer versions replace older ones; an older or equal one (a redelivery, a late copy) changes
/// nothing.
const CUSTOMER_UPSERT_TAIL: &str = "ON CONFLICT (id) DO UPDATE SET \
     first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name, \
     email = EXCLUDED.email, phone = EXCLUDED.phone, attributes = EXCLUDED.attributes, \
     content_hash = EXCLUDED.content_hash, version_stamp = EXCLUDED.version_stamp, \
     version_load = EXCLUDED.version_load, version_line = EXCLUDED.version_line, \
     ingest_seq = EXCLUDED.ingest_seq, crm_id = COALESCE(EXCLUDED.crm_id, customers.crm_id), \
     synced_at = EXCLUDED.synced_at, source_file = EXCLUDED.source_file, \
     source_line = EXCLUDED.source_line \
     WHERE (customers.version_stamp, customers.version_load, customers.version_line) \
         < (EXCLUDED.version_stamp, EXCLUDED.version_load, EXCLUDED.version_line)";

async fn copy_merge_customers(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[Row<'_, SyncedOutcome>],
) -> Result<u64, StoreError> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;

    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS customers_incoming ( \
             id text, first_name text, last_name text, email text, phone text, attributes text, \
             content_hash text, version_stamp int8, version_load int8, version_line int8, \
             ingest_seq int8, crm_id text, synced_at timestamptz, source_file text, \
             source_line int8) ON COMMIT DELETE ROWS",
    )
    .await
    .map_err(StoreError::query("creating the customers staging table"))?;
    let sink = tx
        .copy_in(&format!(
            "COPY customers_incoming ({CUSTOMER_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .map_err(StoreError::query("starting COPY of customers"))?;
    let types = [
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::INT8,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    tokio::pin!(writer);
    let c = CustomerColumns::of(rows);
    for i in 0..rows.len() {
        writer
            .as_mut()
            .write(&[
                &c.ids[i],
                &c.first_names[i],
                &c.last_names[i],
                &c.emails[i],
                &c.phones[i],
                &c.attributes[i],
                &c.hashes[i],
                &c.stamps[i],
                &c.loads[i],
                &c.lines[i],
                &c.seqs[i],
                &c.crm_ids[i],
                &c.synced_ats[i],
                &c.files[i],
                &c.source_lines[i],
            ])
            .await
            .map_err(StoreError::query("copying customers"))?;
    }
    writer
        .as_mut()
        .finish()
        .await
        .map_err(StoreError::query("finishing COPY of customers"))?;
    tx.execute(
        &format!(
            "INSERT INTO customers ({CUSTOMER_COLUMNS}) \
             SELECT {CUSTOMER_SELECT} FROM customers_incoming {CUSTOMER_UPSERT_TAIL}"
        ),
        &[],
    )
    .await
    .map_err(StoreError::query("merging copied customers"))
}

async fn clear_dead_letters(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[Row<'_, SyncedOutcome>],
) -> Result<u64, StoreError> {
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r.outcome.customer.id.as_str())
        .collect();
    let [stamps, loads, lines] = version_arrays(rows);
    tx.execute(
        "DELETE FROM dead_letters d \
         USING unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
               AS s(customer_id, version_stamp, version_load, version_line) \
         WHERE d.customer_id = s.customer_id \
           AND (d.version_stamp, d.version_load, d.version_line) \
               <= (s.version_stamp, s.version_load, s.version_line)",
        &[&ids, &stamps, &loads, &lines],
    )
    .await
    .map_err(StoreError::query(
        "clearing dead letters of synced customers",
    ))
}

fn version_arrays<T>(rows: &[Row<'_, T>]) -> [Vec<i64>; 3] {
    let mut columns = [
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
    ];
    for row in rows {
        for (column, value) in columns.iter_mut().zip(row.version) {
            column.push(value);
        }
    }
    columns
}

/// The columns of dead letters, column by column, for `unnest`.
struct DeadLetterColumns<'a> {
    ids: Vec<&'a str>,
    hashes: Vec<&'a str>,
    seqs: Vec<i64>,
    reasons: Vec<&'a str>,
    statuses: Vec<Option<i32>>,
    bodies: Vec<Option<&'a str>>,
    attempts: Vec<i64>,
    records: Vec<Option<String>>,
    files: Vec<Option<&'a str>>,
    lines: Vec<Option<i64>>,
    dead_ats: Vec<DateTime<Utc>>,
}

impl<'a> DeadLetterColumns<'a> {
    fn of(rows: &[Row<'a, DeadLetter>]) -> Self {
        let n = rows.len();
        let mut columns = DeadLetterColumns {
            ids: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            seqs: Vec::with_capacity(n),
            reasons: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            bodies: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            records: Vec::with_capacity(n),
            files: Vec::with_capacity(n),
            lines: Vec::with_capacity(n),
            dead_ats: Vec::with_capacity(n),
        };
        for row in rows {
            let d = row.outcome;
            columns.ids.push(d.customer_id.as_str());
            columns.hashes.push(d.content_hash.as_str());
            columns.seqs.push(row.ingest_seq);
            columns.reasons.push(d.reason.as_str());
            columns.statuses.push(d.crm_status.map(i32::from));
            columns.bodies.push(d.crm_body.as_deref());
            columns.attempts.push(bigint(d.attempts));
            columns.records.push(
                d.customer
                    .as_ref()
                    .and_then(|c| serde_json::to_string(c).ok()),
            );
            columns.files.push(d.source_file.as_deref());
            columns.lines.push(d.source_line.map(bigint));
            columns.dead_ats.push(d.dead_at);
        }
        columns
    }
}

/// A dead letter is stored only while `customers` holds no version at least as new, and replaces
/// a stored one of the same content only when it is newer or was attempted more often.
const DEAD_LETTER_UPSERT: &str = "INSERT INTO dead_letters (customer_id, content_hash, \
         version_stamp, version_load, version_line, ingest_seq, reason, crm_status, crm_body, \
         attempts, record, source_file, source_line, dead_at) \
     SELECT t.customer_id, t.content_hash, t.version_stamp, t.version_load, t.version_line, \
            t.ingest_seq, t.reason, t.crm_status, t.crm_body, t.attempts, t.record::jsonb, \
            t.source_file, t.source_line, t.dead_at \
     FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], \
                 $7::text[], $8::int4[], $9::text[], $10::int8[], $11::text[], $12::text[], \
                 $13::int8[], $14::timestamptz[]) \
          AS t(customer_id, content_hash, version_stamp, version_load, version_line, \
               ingest_seq, reason, crm_status, crm_body, attempts, record, source_file, \
               source_line, dead_at) \
     WHERE NOT EXISTS (SELECT 1 FROM customers c \
                       WHERE c.id = t.customer_id \
                         AND (c.version_stamp, c.version_load, c.version_line) \
                             >= (t.version_stamp, t.version_load, t.version_line)) \
     ON CONFLICT (customer_id, content_hash) DO UPDATE SET \
         version_stamp = EXCLUDED.version_stamp, version_load = EXCLUDED.version_load, \
         version_line = EXCLUDED.version_line, ingest_seq = EXCLUDED.ingest_seq, \
         reason = EXCLUDED.reason, crm_status = EXCLUDED.crm_status, \
         crm_body = EXCLUDED.crm_body, attempts = EXCLUDED.attempts, \
         record = EXCLUDED.record, source_file = EXCLUDED.source_file, \
         source_line = EXCLUDED.source_line, dead_at = EXCLUDED.dead_at \
     WHERE (dead_letters.version_stamp, dead_letters.version_load, \
            dead_letters.version_line, dead_letters.attempts) \
         < (EXCLUDED.version_stamp, EXCLUDED.version_load, EXCLUDED.version_line, \
            EXCLUDED.attempts)";

async fn write_dead_letters(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[Row<'_, DeadLetter>],
) -> Result<u64, StoreError> {
    let c = DeadLetterColumns::of(rows);
    let [stamps, loads, version_lines] = version_arrays(rows);
    tx.execute(
        DEAD_LETTER_UPSERT,
        &[
            &c.ids,
            &c.hashes,
            &stamps,
            &loads,
            &version_lines,
            &c.seqs,
            &c.reasons,
            &c.statuses,
            &c.bodies,
            &c.attempts,
            &c.records,
            &c.files,
            &c.lines,
            &c.dead_ats,
        ],
    )
    .await
    .map_err(StoreError::query("upserting dead letters"))
}

async fn write_rejected(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[&RejectedRow],
) -> Result<u64, StoreError> {
    let files: Vec<&str> = rows.iter().map(|r| r.source_file.as_str()).collect();
    let lines: Vec<i64> = rows.iter().map(|r| bigint(r.line)).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
    let reasons: Vec<&str> = rows.iter().map(|r| r.reason.as_str()).collect();
    let raws: Vec<&str> = rows.iter().map(|r| r.raw.as_str()).collect();
    let rejected_ats: Vec<DateTime<Utc>> = rows.iter().map(|r| r.rejected_at).collect();
    tx.execute(
        "INSERT INTO rejected_rows (source_file, line, kind, reason, raw, rejected_at) \
         SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], \
                              $6::timestamptz[]) \
         ON CONFLICT (source_file, line) DO NOTHING",
        &[&files, &lines, &kinds, &reasons, &raws, &rejected_ats],
    )
    .await
    .map_err(StoreError::query("inserting rejected rows"))
}

async fn write_poison(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[&PoisonMessage],
) -> Result<u64, StoreError> {
    let streams: Vec<&str> = rows.iter().map(|p| p.stream.as_str()).collect();
    let seqs: Vec<i64> = rows.iter().map(|p| bigint(p.stream_seq)).collect();
    let subjects: Vec<String> = rows.iter().map(|p| without_nul(&p.subject)).collect();
    let reasons: Vec<String> = rows.iter().map(|p| without_nul(&p.reason)).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|p| p.body.as_slice()).collect();
    let received_ats: Vec<DateTime<Utc>> = rows.iter().map(|p| p.received_at).collect();
    tx.execute(
        "INSERT INTO poison_messages (stream, stream_seq, subject, reason, body, received_at) \
         SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::bytea[], \
                              $6::timestamptz[]) \
         ON CONFLICT (stream, stream_seq) DO NOTHING",
        &[&streams, &seqs, &subjects, &reasons, &bodies, &received_ats],
    )
    .await
    .map_err(StoreError::query("inserting poison messages"))
}

/// PostgreSQL text cannot hold NUL, and the reason for poison often quotes the very bytes at fault.
fn without_nul(text: &str) -> String {
    text.replace('\0', "\\0")
}

/// Number of rows in `poison_messages`.
pub async fn poison_message_count(client: &tokio_postgres::Client) -> Result<i64, StoreError> {
    let row = client
        .query_one("SELECT count(*) FROM poison_messages", &[])
        .await
        .map_err(StoreError::query("counting poison messages"))?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use customer_record::CustomerRecord;
    use sync_topology::messages::SyncAction;

    /// Version `(load, line)`, stored at ingest sequence `seq`.
    fn synced(id: &str, load: u64, line: u64, seq: u64) -> Outcome {
        let customer = CustomerRecord::normalised(
            id,
            "Ada",
            &format!("v{load}.{line}"),
            "ada@example.com",
            None,
            Default::default(),
        );
        Outcome::Synced(SyncedOutcome {
            content_hash: customer.content_hash(),
            customer,
            version: Some(Version::row(load, line)),
            ingest_seq: seq,
            crm_id: None,
            action: SyncAction::Created,
            source_file: None,
            source_line: None,
            synced_at: Utc::now(),
        })
    }

    #[test]
    fn versions_of_one_customer_collapse_to_the_newest_whatever_the_stream_order() {
        let batch = [
            synced("a", 1, 5, 10),
            synced("b", 1, 1, 11),
            // Stored later in the stream (a NATS restart reordered the publishes), yet older.
            synced("a", 1, 3, 12),
            synced("a", 2, 1, 9),
        ];
        let rows = BatchRows::collect(&batch).expect("valid batch");
        let kept: Vec<(&str, [i64; 3])> = rows
            .synced
            .iter()
            .map(|r| (r.outcome.customer.id.as_str(), r.version))
            .collect();
        assert_eq!(kept, vec![("a", [2, 2, 1]), ("b", [1, 1, 1])]);
        assert_eq!(rows.synced[0].outcome.customer.last_name, "v2.1");
    }

    #[test]
    fn outcomes_without_a_version_order_by_their_ingest_sequence() {
        let mut old = synced("a", 0, 0, 7);
        if let Outcome::Synced(s) = &mut old {
            s.version = None;
        }
        let batch = [old, synced("a", 1, 1, 3)];
        let rows = BatchRows::collect(&batch).expect("valid batch");
        assert_eq!(rows.synced[0].version, [1, 1, 1], "any load beats legacy");
    }

    #[test]
    fn a_sequence_beyond_bigint_is_a_data_error() {
        let err = BatchRows::collect(&[synced("a", 1, 1, u64::MAX)]).expect_err("out of range");
        assert!(err.is_data_error(), "{err}");
        assert!(err.to_string().contains("\"a\""), "{err}");
    }

    #[test]
    fn nul_bytes_are_escaped_for_text_columns() {
        assert_eq!(without_nul("a\0b"), "a\\0b");
    }
}
