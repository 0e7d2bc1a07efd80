//! `syncctl show <customer-id>`: one customer's story in one place. Every version the ingest
//! stream holds (where it came from, its version and content hash) with the outcome each got, the
//! ledger entry, the `customers` row, its dead letters and rejected rows that name it, and with
//! `--crm` what the CRM holds.
//!
//! The streams have no per-customer index, so both are read once from start to end: seconds for
//! a million messages.

use std::fmt;

use async_nats::jetstream::consumer::DeliverPolicy;
use chrono::{DateTime, Utc};
use crm_client::CrmReply;
use customer_record::CustomerRecord;
use futures::StreamExt as _;
use serde::Serialize;
use service_kit::NatsArgs;
use sync_topology::Version;
use sync_topology::ledger::{LedgerEntry, ledger_key};
use sync_topology::messages::{DeadLetter, SupersededOutcome, SyncedOutcome};

use crate::verify::CrmCheck;
use crate::{CtlError, Pipeline, nats_error};

#[derive(Debug, Clone)]
pub struct ShowConfig {
    pub nats: NatsArgs,
    pub database_url: String,
    pub customer_id: String,
    /// Ask the CRM too (its sample size is ignored).
    pub crm: Option<CrmCheck>,
}

/// One ingest message of the customer, and the outcome it got (if any yet).
#[derive(Debug, Clone, Serialize)]
pub struct SeenVersion {
    pub ingest_seq: u64,
    pub stored_at: Option<String>,
    pub version: Version,
    pub content_hash: String,
    pub source_file: Option<String>,
    pub source_line: Option<u64>,
    /// The ingest sequence of the message this one copies (replay, redrive).
    pub copy_of: Option<u64>,
    pub forced: bool,
    /// `synced (created)`, `superseded by …`, `dead: …`, or None while pending.
    pub outcome: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CustomerRow {
    pub record: CustomerRecord,
    pub version: Version,
    pub content_hash: String,
    pub crm_id: Option<String>,
    pub synced_at: DateTime<Utc>,
    pub source_file: Option<String>,
    pub source_line: Option<i64>,
}

/// A dead letter of this customer, as `dead_letters` holds it.
pub use sync_store::dead_letters::CustomerDeadLetter as DeadLetterRow;

#[derive(Debug, Clone, Serialize)]
pub struct RejectedRowRef {
    pub source_file: String,
    pub line: i64,
    pub kind: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Story {
    pub customer_id: String,
    pub ledger_key: String,
    pub versions: Vec<SeenVersion>,
    pub ledger: Option<LedgerEntry>,
    pub customers_row: Option<CustomerRow>,
    pub dead_letters: Vec<DeadLetterRow>,
    pub rejected_rows: Vec<RejectedRowRef>,
    /// With `--crm`: what the CRM holds (None: nothing, 404).
    pub crm: Option<Option<CustomerRecord>>,
}

pub async fn run(config: &ShowConfig) -> Result<Story, CtlError> {
    let key = ledger_key(&config.customer_id).map_err(|e| CtlError::Usage(e.to_string()))?;
    let pipeline = Pipeline::connect(&config.nats).await?;
    let client = crate::connect_database(&config.database_url, config.nats.startup_wait).await?;
    crate::require_schema(&client, &config.database_url).await?;
    let mut versions = ingest_versions(&pipeline, &config.customer_id).await?;
    attach_outcomes(&pipeline, &config.customer_id, &mut versions).await?;
    let ledger = ledger_entry(&pipeline, &key).await?;
    let crm = match &config.crm {
        Some(check) => Some(crm_copy(check, &config.customer_id).await?),
        None => None,
    };
    Ok(Story {
        customer_id: config.customer_id.clone(),
        ledger_key: key,
        versions,
        ledger,
        customers_row: customers_row(&client, &config.customer_id).await?,
        dead_letters: sync_store::dead_letters::of_customer(&client, &config.customer_id).await?,
        rejected_rows: rejected_rows(&client, &config.customer_id).await?,
        crm,
    })
}

async fn ingest_versions(pipeline: &Pipeline, id: &str) -> Result<Vec<SeenVersion>, CtlError> {
    let messages = crate::ingest_messages(pipeline, "show").await?;
    futures::pin_mut!(messages);
    let mut versions = Vec::new();
    while let Some(stored) = messages.next().await {
        let stored = stored?;
        let Ok(decoded) = stored.decoded else {
            continue;
        };
        if decoded.message.record.id != id {
            continue;
        }
        versions.push(SeenVersion {
            ingest_seq: stored.seq,
            stored_at: stored.stored_at.map(crate::rfc3339),
            version: decoded.message.version,
            content_hash: decoded.hash.to_string(),
            source_file: decoded.message.source_file,
            source_line: decoded.message.source_line,
            copy_of: decoded.message.copy_of,
            forced: decoded.message.force_resend,
            outcome: None,
        });
    }
    Ok(versions)
}

/// Finds the outcome of each of the customer's ingest messages in the results stream.
async fn attach_outcomes(
    pipeline: &Pipeline,
    id: &str,
    versions: &mut [SeenVersion],
) -> Result<(), CtlError> {
    let names = &pipeline.names;
    let stream_name = names.results_stream();
    let read = crate::read_stream(
        pipeline,
        &stream_name,
        format!("{}.>", names.namespace()),
        DeliverPolicy::All,
        "show",
    )
    .await?;
    let mut messages = read.messages.take(read.pending_at_start as usize);
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| nats_error(format!("reading {stream_name}"), e))?;
        let subject = message.subject.as_str();
        let found = if subject == names.synced_subject() {
            serde_json::from_slice::<SyncedOutcome>(&message.payload)
                .ok()
                .filter(|o| o.customer.id == id)
                .map(|o| (o.ingest_seq, format!("synced ({})", o.action.as_str())))
        } else if subject == names.superseded_subject() {
            serde_json::from_slice::<SupersededOutcome>(&message.payload)
                .ok()
                .filter(|o| o.customer_id == id)
                .map(|o| (o.ingest_seq, format!("superseded by {}", o.superseded_by)))
        } else if subject == names.dead_subject() {
            serde_json::from_slice::<DeadLetter>(&message.payload)
                .ok()
                .filter(|o| o.customer_id == id)
                .map(|o| (o.ingest_seq, format!("dead: {}", o.reason)))
        } else {
            None
        };
        if let Some((seq, outcome)) = found
            && let Some(seen) = versions.iter_mut().find(|v| v.ingest_seq == seq)
        {
            seen.outcome = Some(outcome);
        }
    }
    Ok(())
}

async fn ledger_entry(pipeline: &Pipeline, key: &str) -> Result<Option<LedgerEntry>, CtlError> {
    let ledger = crate::replay::open_ledger(pipeline).await?;
    let Some(value) = ledger
        .get(key)
        .await
        .map_err(|e| nats_error(format!("reading ledger entry {key}"), e))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&value)
        .map(Some)
        .map_err(|source| CtlError::Json {
            what: format!("ledger entry {key}"),
            source,
        })
}

async fn customers_row(
    client: &tokio_postgres::Client,
    id: &str,
) -> Result<Option<CustomerRow>, CtlError> {
    let row = client
        .query_opt(
            "SELECT first_name, last_name, email, phone, attributes::text, version_stamp, \
                    version_load, version_line, content_hash, crm_id, synced_at, source_file, \
                    source_line \
             FROM customers WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(sync_store::StoreError::query("reading the customers row"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let attributes: String = row.get(4);
    Ok(Some(CustomerRow {
        record: CustomerRecord {
            id: id.to_owned(),
            first_name: row.get(0),
            last_name: row.get(1),
            email: row.get(2),
            phone: row.get(3),
            attributes: serde_json::from_str(&attributes).unwrap_or_default(),
        },
        version: Version::from_i64s(row.get(5), row.get(6), row.get(7)),
        content_hash: row.get(8),
        crm_id: row.get(9),
        synced_at: row.get(10),
        source_file: row.get(11),
        source_line: row.get(12),
    }))
}

/// Rejected rows with a field equal to the id (a bad row has no trustworthy id column, so any
/// field that matches counts).
async fn rejected_rows(
    client: &tokio_postgres::Client,
    id: &str,
) -> Result<Vec<RejectedRowRef>, CtlError> {
    let rows = client
        .query(
            "SELECT source_file, line, kind, reason, raw FROM rejected_rows \
             WHERE strpos(raw, $1) > 0 ORDER BY source_file, line LIMIT 1000",
            &[&id],
        )
        .await
        .map_err(sync_store::StoreError::query("reading rejected rows"))?;
    Ok(rows
        .iter()
        .filter(|row| {
            let raw: String = row.get(4);
            csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(raw.as_bytes())
                .records()
                .flatten()
                .any(|fields| fields.iter().any(|f| f.trim() == id))
        })
        .map(|row| RejectedRowRef {
            source_file: row.get(0),
            line: row.get(1),
            kind: row.get(2),
            reason: row.get(3),
        })
        .collect())
}

async fn crm_copy(check: &CrmCheck, id: &str) -> Result<Option<CustomerRecord>, CtlError> {
    let client = check.client(1)?;
    match client.look_up(id, std::time::Duration::from_secs(10)).await {
        CrmReply::Stored(stored) => Ok(Some(stored.customer)),
        CrmReply::NotFound => Ok(None),
        CrmReply::Unauthorized { status, .. } => Err(CtlError::Usage(format!(
            "the CRM refused our credentials (HTTP {status}): set --crm-token / CRM_API_TOKEN"
        ))),
        CrmReply::Refused { status, body } => Err(nats_error(
            format!("asking the CRM for {id}"),
            format!("HTTP {status}: {body}"),
        )),
        CrmReply::Transient(t) => Err(nats_error(format!("asking the CRM for {id}"), t)),
    }
}

impl fmt::Display for Story {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "customer {} (ledger key {})",
            self.customer_id, self.ledger_key
        )?;
        self.write_versions(f)?;
        self.write_ledger(f)?;
        self.write_tables_and_crm(f)
    }
}

impl Story {
    fn write_versions(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\ningest stream: {} version(s)", self.versions.len())?;
        if !self.versions.is_empty() {
            let rows = self
                .versions
                .iter()
                .map(|v| {
                    let from = match (&v.source_file, v.source_line) {
                        (Some(file), Some(line)) => format!("{file}:{line}"),
                        _ => "-".to_owned(),
                    };
                    let copy = v.copy_of.map_or_else(
                        || "-".to_owned(),
                        |seq| format!("#{seq}{}", if v.forced { " (forced)" } else { "" }),
                    );
                    vec![
                        format!("#{}", v.ingest_seq),
                        v.version.to_string(),
                        v.content_hash.clone(),
                        from,
                        copy,
                        v.outcome.clone().unwrap_or_else(|| "pending".to_owned()),
                    ]
                })
                .collect();
            writeln!(
                f,
                "{}",
                crate::table(
                    &["SEQ", "VERSION", "HASH", "FROM", "COPY OF", "OUTCOME"],
                    &[0],
                    rows
                )
            )?;
        }
        Ok(())
    }

    fn write_ledger(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ledger {
            Some(entry) => {
                writeln!(f, "\nledger:")?;
                if let Some(c) = &entry.confirmed {
                    writeln!(
                        f,
                        "  confirmed version {} {} (CRM id {})",
                        c.version,
                        c.hash,
                        c.crm_id.as_deref().unwrap_or("-")
                    )?;
                }
                if let Some(c) = &entry.claim {
                    writeln!(
                        f,
                        "  claim of version {} by {} (lease until {} ms{})",
                        c.version,
                        c.owner,
                        c.lease_until_ms,
                        if c.in_doubt { ", in doubt" } else { "" }
                    )?;
                }
                if let Some(fl) = &entry.failing {
                    writeln!(
                        f,
                        "  version {} failed {} delivery(ies)",
                        fl.version, fl.failures
                    )?;
                }
            }
            None => writeln!(f, "\nledger: no entry")?,
        }
        Ok(())
    }

    fn write_tables_and_crm(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.customers_row {
            Some(row) => writeln!(
                f,
                "\ncustomers: version {} {} ({} {}, {}), synced {}",
                row.version,
                row.content_hash,
                row.record.first_name,
                row.record.last_name,
                row.record.email,
                row.synced_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )?,
            None => writeln!(f, "\ncustomers: no row")?,
        }
        for d in &self.dead_letters {
            writeln!(
                f,
                "dead letter: version {} {}, {} attempt(s), {}",
                d.version, d.content_hash, d.attempts, d.reason
            )?;
        }
        for r in &self.rejected_rows {
            writeln!(
                f,
                "rejected row: {}:{} {} ({})",
                r.source_file, r.line, r.kind, r.reason
            )?;
        }
        if let Some(crm) = &self.crm {
            match crm {
                Some(record) => writeln!(
                    f,
                    "CRM: {} ({} {}, {})",
                    record.content_hash(),
                    record.first_name,
                    record.last_name,
                    record.email
                )?,
                None => writeln!(f, "CRM: not found")?,
            }
        }
        Ok(())
    }
}
