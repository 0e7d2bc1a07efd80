//! `syncctl verify`: checks content, not counts. For every customer, the newest version the
//! pipeline knows (the newest in the ingest stream, or the ledger's confirmed one if that is newer,
//! say after a prune) against the row in `customers` (version, content hash, and the hash of the
//! row's own fields), against the ledger, and with `--crm` against what the CRM returns for it. It
//! names every customer that differs.
//!
//! The stream and the ledger are copied into temporary tables of the verifying session (COPY, in
//! one pass each) and compared in one streaming query, so memory stays flat however many customers
//! there are.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use backon::Retryable as _;
use crm_client::{CrmClient, CrmReply, Transient};
use customer_record::{ContentHash, CustomerRecord};
use futures::{StreamExt as _, TryStreamExt as _, pin_mut};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;
use service_kit::NatsArgs;
use sync_topology::Version;
use sync_topology::ledger::{LedgerEntry, customer_id_of};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use crate::{CtlError, Pipeline, nats_error};

/// How to ask the CRM.
#[derive(Debug, Clone)]
pub struct CrmCheck {
    pub url: crm_client::Url,
    pub token: Option<SecretString>,
    /// Check this many customers chosen at random; None: all.
    pub sample: Option<usize>,
    pub concurrency: usize,
    /// Send the token over plain http:// to another host.
    pub allow_insecure: bool,
    /// Further tries of a lookup that failed for a transient reason
    /// ([`service_kit::retry::CRM_LOOKUP_RETRIES`] from the command line).
    pub lookup_retries: usize,
}

impl CrmCheck {
    /// A client of the CRM, named in errors with its credentials hidden.
    pub fn client(&self, concurrency: usize) -> Result<CrmClient, CtlError> {
        CrmClient::new(
            self.url.clone(),
            self.token.as_ref().map(|t| t.expose_secret()),
            Duration::from_secs(10),
            concurrency,
            self.allow_insecure,
        )
        .map_err(|e| {
            CtlError::Usage(format!(
                "cannot talk to the CRM at {}: {e}",
                sync_topology::redact(self.url.as_str())
            ))
        })
    }
}

#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub nats: NatsArgs,
    pub database_url: String,
    pub crm: Option<CrmCheck>,
}

/// A version and content, as one of the places holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    pub version: Version,
    pub hash: String,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.version, self.hash)
    }
}

fn shown(held: &Option<Held>) -> String {
    held.as_ref()
        .map_or_else(|| "nothing".to_owned(), ToString::to_string)
}

/// One customer whose places disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub customer_id: String,
    pub problem: String,
    pub newest: Option<Held>,
    pub customers_row: Option<Held>,
    pub ledger: Option<Held>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (newest {}; customers {}; ledger {})",
            self.customer_id,
            self.problem,
            shown(&self.newest),
            shown(&self.customers_row),
            shown(&self.ledger)
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CrmReport {
    pub checked: u64,
    pub differences: Vec<Difference>,
    /// Customers the CRM did not answer for (timeouts, 5xx): neither right nor wrong.
    pub unanswered: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub customers: u64,
    pub ok: u64,
    /// Customers whose newest version is dead-lettered (`syncctl dlq`): `customers` keeps the last
    /// version the CRM confirmed, which was checked.
    pub dead_lettered: u64,
    /// Customers not settled yet: the pipeline has pending or in-flight work.
    pub pending: u64,
    /// Both consumers had nothing pending or in flight when the check started.
    pub drained: bool,
    /// Ingest messages that are not customers (dead-lettered with their body).
    pub malformed_messages: u64,
    pub differences: Vec<Difference>,
    pub crm: Option<CrmReport>,
}

impl VerifyReport {
    /// Every customer holds its newest version (or is dead-lettered), nothing pending, and the CRM
    /// agrees where it was asked. A customer the CRM never answered for is not verified.
    pub fn clean(&self) -> bool {
        self.differences.is_empty()
            && self.pending == 0
            && self
                .crm
                .as_ref()
                .is_none_or(|c| c.differences.is_empty() && c.unanswered.is_empty())
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for difference in &self.differences {
            writeln!(f, "DIFFERS {difference}")?;
        }
        if let Some(crm) = &self.crm {
            for difference in &crm.differences {
                writeln!(f, "CRM DIFFERS {difference}")?;
            }
            if !crm.unanswered.is_empty() {
                const SHOWN: usize = 20;
                let more = crm.unanswered.len().saturating_sub(SHOWN);
                writeln!(
                    f,
                    "NOT VERIFIED: the CRM did not answer for {} customer(s) after retries: {}{}",
                    crm.unanswered.len(),
                    crm.unanswered[..crm.unanswered.len().min(SHOWN)].join(", "),
                    if more > 0 {
                        format!(" and {more} more (--json lists all)")
                    } else {
                        String::new()
                    }
                )?;
            }
        }
        writeln!(
            f,
            "customers {}: ok {}, dead-lettered {}, pending {}, differing {}{}",
            self.customers,
            self.ok,
            self.dead_lettered,
            self.pending,
            self.differences.len(),
            if self.drained {
                ""
            } else {
                " (the pipeline is not drained: run `syncctl wait` first)"
            }
        )?;
        if let Some(crm) = &self.crm {
            writeln!(
                f,
                "CRM: checked {}, differing {}, unanswered {}",
                crm.checked,
                crm.differences.len(),
                crm.unanswered.len()
            )?;
        }
        if self.malformed_messages > 0 {
            writeln!(
                f,
                "{} ingest message(s) are not customers (dead-lettered with their body)",
                self.malformed_messages
            )?;
        }
        writeln!(
            f,
            "{}",
            if self.clean() {
                "verified: every customer holds its newest version"
            } else {
                "NOT VERIFIED"
            }
        )
    }
}

/// Runs the check; see the module docs.
pub async fn run(config: &VerifyConfig) -> Result<VerifyReport, CtlError> {
    let pipeline = Pipeline::connect(&config.nats).await?;
    let mut client =
        crate::connect_database(&config.database_url, config.nats.startup_wait).await?;
    crate::require_schema(&client, &config.database_url).await?;
    let drained = drained(&pipeline).await?;
    let tx = client
        .transaction()
        .await
        .map_err(sync_store::StoreError::query("starting the verify session"))?;
    tx.batch_execute(
        "CREATE TEMP TABLE verify_stream (id text, stamp int8, load int8, line int8, hash text) \
             ON COMMIT DROP; \
         CREATE TEMP TABLE verify_ledger (id text, stamp int8, load int8, line int8, hash text) \
             ON COMMIT DROP",
    )
    .await
    .map_err(sync_store::StoreError::query("creating the verify tables"))?;
    let malformed_messages = copy_stream(&pipeline, &tx).await?;
    copy_ledger(&pipeline, &tx).await?;
    let mut report = VerifyReport {
        drained,
        malformed_messages,
        ..VerifyReport::default()
    };
    let expected_in_crm = compare(&tx, &mut report, config.crm.as_ref()).await?;
    tx.commit()
        .await
        .map_err(sync_store::StoreError::query("ending the verify session"))?;
    if let Some(check) = &config.crm {
        report.crm = Some(check_crm(check, expected_in_crm).await?);
    }
    Ok(report)
}

async fn drained(pipeline: &Pipeline) -> Result<bool, CtlError> {
    let names = &pipeline.names;
    for (stream, consumer) in [
        (names.ingest_stream(), names.integrators_consumer()),
        (names.results_stream(), names.persister_consumer()),
    ] {
        let info = pipeline.consumer_info(&stream, consumer).await?;
        if info.num_pending + info.num_ack_pending as u64 > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn columns(version: Version) -> Result<[i64; 3], CtlError> {
    version
        .to_i64s()
        .ok_or_else(|| CtlError::Usage(format!("version {version} is out of range")))
}

/// Copies (id, version, hash) of every customer message of the ingest stream; returns how many
/// messages were not customers.
async fn copy_stream(
    pipeline: &Pipeline,
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<u64, CtlError> {
    let messages = crate::ingest_messages(pipeline, "verify").await?;
    pin_mut!(messages);
    let sink = tx
        .copy_in("COPY verify_stream FROM STDIN (FORMAT binary)")
        .await
        .map_err(sync_store::StoreError::query("copying the ingest stream"))?;
    let types = [Type::TEXT, Type::INT8, Type::INT8, Type::INT8, Type::TEXT];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    let mut malformed = 0;
    while let Some(stored) = messages.next().await {
        let Ok(decoded) = stored?.decoded else {
            malformed += 1;
            continue;
        };
        let [stamp, load, line] = columns(decoded.message.version)?;
        let row: [&(dyn ToSql + Sync); 5] = [
            &decoded.message.record.id,
            &stamp,
            &load,
            &line,
            &decoded.hash.as_str(),
        ];
        writer
            .as_mut()
            .write(&row)
            .await
            .map_err(sync_store::StoreError::query("copying the ingest stream"))?;
    }
    writer
        .as_mut()
        .finish()
        .await
        .map_err(sync_store::StoreError::query("copying the ingest stream"))?;
    Ok(malformed)
}

/// Copies every customer's confirmed version from the ledger bucket (its last value per key).
async fn copy_ledger(
    pipeline: &Pipeline,
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<(), CtlError> {
    let bucket = pipeline.names.ledger_bucket();
    let prefix = format!("$KV.{bucket}.");
    let read = crate::read_stream(
        pipeline,
        &format!("KV_{bucket}"),
        format!("{prefix}>"),
        DeliverPolicy::LastPerSubject,
        "verify",
    )
    .await?;
    let sink = tx
        .copy_in("COPY verify_ledger FROM STDIN (FORMAT binary)")
        .await
        .map_err(sync_store::StoreError::query("copying the ledger"))?;
    let types = [Type::TEXT, Type::INT8, Type::INT8, Type::INT8, Type::TEXT];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    let mut messages = read.messages.take(read.pending_at_start as usize);
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| nats_error(format!("reading bucket {bucket}"), e))?;
        let Some(id) = message
            .subject
            .strip_prefix(prefix.as_str())
            .and_then(customer_id_of)
        else {
            continue;
        };
        // A deleted key carries an operation header and no entry.
        let Some(confirmed) = serde_json::from_slice::<LedgerEntry>(&message.payload)
            .ok()
            .and_then(|entry| entry.confirmed)
        else {
            continue;
        };
        let [stamp, load, line] = columns(confirmed.version)?;
        let row: [&(dyn ToSql + Sync); 5] = [&id, &stamp, &load, &line, &confirmed.hash.as_str()];
        writer
            .as_mut()
            .write(&row)
            .await
            .map_err(sync_store::StoreError::query("copying the ledger"))?;
    }
    writer
        .as_mut()
        .finish()
        .await
        .map_err(sync_store::StoreError::query("copying the ledger"))?;
    Ok(())
}

const COMPARE: &str = "\
WITH newest AS (
    SELECT DISTINCT ON (id) id, stamp, load, line, hash FROM verify_stream
    ORDER BY id, stamp DESC, load DESC, line DESC
), ids AS (
    SELECT id FROM newest UNION SELECT id FROM verify_ledger UNION SELECT id FROM customers
)
SELECT ids.id,
       n.stamp, n.load, n.line, n.hash,
       l.stamp, l.load, l.line, l.hash,
       c.version_stamp, c.version_load, c.version_line, c.content_hash,
       c.first_name, c.last_name, c.email, c.phone, c.attributes::text,
       d.version_stamp, d.version_load, d.version_line
FROM ids
LEFT JOIN newest n ON n.id = ids.id
LEFT JOIN verify_ledger l ON l.id = ids.id
LEFT JOIN customers c ON c.id = ids.id
LEFT JOIN LATERAL (
    SELECT version_stamp, version_load, version_line FROM dead_letters
    WHERE customer_id = ids.id
    ORDER BY version_stamp DESC, version_load DESC, version_line DESC LIMIT 1
) d ON true
ORDER BY ids.id";

fn held_at(row: &tokio_postgres::Row, first: usize) -> Option<Held> {
    let stamp: Option<i64> = row.get(first);
    let hash: Option<String> = row.get(first + 3);
    Some(Held {
        version: Version::from_i64s(stamp?, row.get(first + 1), row.get(first + 2)),
        hash: hash?,
    })
}

/// The hash of the row's own fields: a row whose stored hash does not match its content was
/// changed (or written) wrongly.
fn row_content_hash(row: &tokio_postgres::Row) -> Option<ContentHash> {
    let id: String = row.get(0);
    let first_name: Option<String> = row.get(13);
    let attributes: Option<String> = row.get(17);
    let attributes: BTreeMap<String, String> = serde_json::from_str(&attributes?).ok()?;
    let record = CustomerRecord {
        id,
        first_name: first_name?,
        last_name: row.get(14),
        email: row.get(15),
        phone: row.get(16),
        attributes,
    };
    Some(record.content_hash())
}

/// What the CRM should hold for a customer: the content the ledger confirmed (None: nothing).
type ExpectedInCrm = Vec<(String, Option<String>)>;

async fn compare(
    tx: &tokio_postgres::Transaction<'_>,
    report: &mut VerifyReport,
    crm: Option<&CrmCheck>,
) -> Result<ExpectedInCrm, CtlError> {
    let rows = tx
        .query_raw(COMPARE, std::iter::empty::<&(dyn ToSql + Sync)>())
        .await
        .map_err(sync_store::StoreError::query("comparing customers"))?;
    pin_mut!(rows);
    let mut expected_in_crm = Vec::new();
    let mut sampler = crm.and_then(|c| c.sample).map(Sampler::new);
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(sync_store::StoreError::query("comparing customers"))?
    {
        report.customers += 1;
        let id: String = row.get(0);
        let newest_in_stream = held_at(&row, 1);
        let ledger = held_at(&row, 5);
        let customers_row = held_at(&row, 9);
        let dead: Option<i64> = row.get(18);
        let dead = dead.map(|stamp| Version::from_i64s(stamp, row.get(19), row.get(20)));
        let verdict = judge(
            &newest_in_stream,
            &ledger,
            &customers_row,
            row_content_hash(&row),
            dead,
            report.drained,
        );
        if crm.is_some() {
            let expected = (id.clone(), ledger.as_ref().map(|l| l.hash.clone()));
            match &mut sampler {
                Some(sampler) => sampler.offer(expected),
                None => expected_in_crm.push(expected),
            }
        }
        match verdict {
            Verdict::Ok => report.ok += 1,
            Verdict::DeadLettered => report.dead_lettered += 1,
            Verdict::Pending => report.pending += 1,
            Verdict::Differs(problem) => report.differences.push(Difference {
                customer_id: id,
                problem,
                newest: newest(&newest_in_stream, &ledger).cloned(),
                customers_row,
                ledger,
            }),
        }
    }
    Ok(sampler.map_or(expected_in_crm, Sampler::into_sample))
}

enum Verdict {
    Ok,
    DeadLettered,
    Pending,
    Differs(String),
}

/// The newest version anything holds: the stream's, or the ledger's when it is newer (messages
/// pruned, or a stream recreated).
fn newest<'a>(stream: &'a Option<Held>, ledger: &'a Option<Held>) -> Option<&'a Held> {
    match (stream, ledger) {
        (Some(s), Some(l)) => Some(if l.version > s.version { l } else { s }),
        (s, l) => s.as_ref().or(l.as_ref()),
    }
}

fn judge(
    stream: &Option<Held>,
    ledger: &Option<Held>,
    row: &Option<Held>,
    row_content: Option<ContentHash>,
    dead: Option<Version>,
    drained: bool,
) -> Verdict {
    if let Some(row) = row
        && row_content.as_ref().is_none_or(|c| c.as_str() != row.hash)
    {
        return Verdict::Differs(
            "the customers row's fields do not hash to its content_hash".into(),
        );
    }
    let Some(expected) = newest(stream, ledger) else {
        return Verdict::Differs(
            "in customers, but neither in the ingest stream nor the ledger".into(),
        );
    };
    if row.as_ref() == Some(expected) {
        return if ledger.as_ref() == Some(expected) {
            Verdict::Ok
        } else if drained {
            Verdict::Differs("the ledger does not record the version customers holds".into())
        } else {
            Verdict::Pending
        };
    }
    if dead.is_some_and(|d| d >= expected.version) {
        // The newest version is dead-lettered; customers must still match what the CRM confirmed.
        return if row == ledger {
            Verdict::DeadLettered
        } else if drained {
            Verdict::Differs(
                "newest version dead-lettered, and customers differs from the ledger".into(),
            )
        } else {
            Verdict::Pending
        };
    }
    if !drained {
        return Verdict::Pending;
    }
    let problem = match row {
        None => "the newest version never reached customers".to_owned(),
        Some(r) if r.version > expected.version => {
            "customers holds a version newer than any the pipeline knows".to_owned()
        }
        Some(r) if r.version < expected.version => {
            "customers holds an older version than the newest".to_owned()
        }
        Some(_) => "customers holds the newest version with other content".to_owned(),
    };
    Verdict::Differs(problem)
}

/// Reservoir sampling: a uniform sample of a stream of unknown length in fixed memory.
struct Sampler<T> {
    size: usize,
    seen: usize,
    kept: Vec<T>,
}

impl<T> Sampler<T> {
    fn new(size: usize) -> Self {
        Sampler {
            size,
            seen: 0,
            kept: Vec::with_capacity(size),
        }
    }

    fn offer(&mut self, item: T) {
        self.seen += 1;
        if self.kept.len() < self.size {
            self.kept.push(item);
        } else {
            let slot = rand::random_range(0..self.seen);
            if slot < self.size {
                self.kept[slot] = item;
            }
        }
    }

    fn into_sample(self) -> Vec<T> {
        self.kept
    }
}

/// Asks the CRM for `id`, trying again after a transient failure as
/// [`service_kit::retry::crm_lookup`] says, and never sooner than the CRM's own `Retry-After`: a
/// flaky CRM must not leave customers unverified.
async fn look_up_patiently(client: &CrmClient, id: &str, retries: usize) -> CrmReply {
    let attempt = || async {
        match client.look_up(id, LOOKUP_DEADLINE).await {
            CrmReply::Transient(failure) => Err(failure),
            answered => Ok(answered),
        }
    };
    attempt
        .retry(service_kit::retry::crm_lookup(retries))
        // `None` means the schedule is spent: stop then, whatever the CRM asked.
        .adjust(|failure: &Transient, delay| {
            delay.map(|delay| failure.retry_after.map_or(delay, |asked| asked.max(delay)))
        })
        .await
        .unwrap_or_else(CrmReply::Transient)
}

/// How long one lookup may take before it counts as a transient failure.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(10);

async fn check_crm(check: &CrmCheck, expected: ExpectedInCrm) -> Result<CrmReport, CtlError> {
    let client = check.client(check.concurrency)?;
    let mut report = CrmReport::default();
    let answers = futures::stream::iter(expected)
        .map(|(id, hash)| {
            let client = client.clone();
            async move {
                let reply = look_up_patiently(&client, &id, check.lookup_retries).await;
                (id, hash, reply)
            }
        })
        .buffer_unordered(check.concurrency.max(1));
    pin_mut!(answers);
    while let Some((id, expected, reply)) = answers.next().await {
        report.checked += 1;
        let held = match reply {
            CrmReply::Stored(stored) => Some(stored.customer.content_hash().to_string()),
            CrmReply::NotFound => None,
            CrmReply::Unauthorized { status, .. } => {
                return Err(CtlError::Usage(format!(
                    "the CRM refused our credentials (HTTP {status}): set --crm-token / \
                     CRM_API_TOKEN"
                )));
            }
            CrmReply::Refused { .. } | CrmReply::Transient(_) => {
                report.unanswered.push(id);
                continue;
            }
        };
        if held != expected {
            report.differences.push(Difference {
                problem: format!(
                    "the CRM holds {}, the ledger confirmed {}",
                    held.as_deref().unwrap_or("nothing"),
                    expected.as_deref().unwrap_or("nothing")
                ),
                customer_id: id,
                newest: None,
                customers_row: None,
                ledger: None,
            });
        }
    }
    report
        .differences
        .sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CRM holding `count` customers, then failing as `faults` says; the expected hashes.
    async fn flaky_crm(
        count: usize,
        faults: crm_mock::CrmMockConfig,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<(CrmCheck, ExpectedInCrm)> {
        let mock = crm_mock::start(
            crm_mock::CrmMockConfig {
                listen: "127.0.0.1:0".parse()?,
                ..Default::default()
            },
            shutdown.clone(),
        )
        .await?;
        let check = CrmCheck {
            url: mock.url.parse()?,
            token: None,
            sample: None,
            concurrency: 8,
            allow_insecure: false,
            lookup_retries: 3,
        };
        let client = check.client(8)?;
        let mut expected = Vec::new();
        for n in 0..count {
            let record = CustomerRecord::normalised(
                &format!("c{n}"),
                "Ada",
                "Lovelace",
                &format!("c{n}@example.com"),
                None,
                Default::default(),
            );
            let key = format!("key{n}");
            let reply = client
                .write(crm_client::Write::Create, &record, &key, LOOKUP_DEADLINE)
                .await;
            anyhow::ensure!(matches!(reply, CrmReply::Stored(_)), "{reply:?}");
            expected.push((record.id.clone(), Some(record.content_hash().to_string())));
        }
        mock.reconfigure(crm_mock::CrmMockConfig {
            listen: mock.addr,
            ..faults
        })?;
        Ok((check, expected))
    }

    #[tokio::test]
    async fn a_flaky_crm_leaves_no_customer_unverified() -> anyhow::Result<()> {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let faults = crm_mock::CrmMockConfig {
            failure_rate: 0.5,
            seed: 7,
            ..Default::default()
        };
        let (mut check, expected) = flaky_crm(40, faults, &shutdown).await?;
        check.lookup_retries = service_kit::retry::CRM_LOOKUP_RETRIES;
        let report = check_crm(&check, expected).await?;
        assert_eq!(report.checked, 40);
        assert!(report.unanswered.is_empty(), "{:?}", report.unanswered);
        assert!(report.differences.is_empty());
        shutdown.cancel();
        Ok(())
    }

    #[tokio::test]
    async fn customers_the_crm_never_answered_for_are_not_verified() -> anyhow::Result<()> {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let faults = crm_mock::CrmMockConfig {
            failure_rate: 1.0,
            ..Default::default()
        };
        let (check, expected) = flaky_crm(2, faults, &shutdown).await?;
        let crm = check_crm(&check, expected).await?;
        assert_eq!(crm.unanswered.len(), 2);
        let report = VerifyReport {
            crm: Some(crm),
            ..VerifyReport::default()
        };
        assert!(!report.clean(), "unanswered customers are not verified");
        assert!(report.to_string().contains("NOT VERIFIED"), "{report}");
        shutdown.cancel();
        Ok(())
    }

    fn held(line: u64, hash: &str) -> Option<Held> {
        Some(Held {
            version: Version::row(1, line),
            hash: hash.to_owned(),
        })
    }

    fn hash_of(text: &str) -> Option<ContentHash> {
        ContentHash::from_hex(text)
    }

    const A: &str = "0000000000000000000000000000000a";
    const B: &str = "0000000000000000000000000000000b";

    #[test]
    fn the_newest_version_everywhere_is_ok() {
        let v = held(5, A);
        assert!(matches!(
            judge(&v, &v, &v, hash_of(A), None, true),
            Verdict::Ok
        ));
    }

    #[test]
    fn an_older_version_in_customers_differs_once_drained() {
        let (newest, old) = (held(5, B), held(3, A));
        assert!(matches!(
            judge(&newest, &old, &old, hash_of(A), None, true),
            Verdict::Differs(p) if p.contains("older")
        ));
        assert!(matches!(
            judge(&newest, &old, &old, hash_of(A), None, false),
            Verdict::Pending
        ));
    }

    #[test]
    fn a_row_whose_fields_do_not_match_its_hash_differs() {
        let v = held(5, A);
        assert!(matches!(
            judge(&v, &v, &v, hash_of(B), None, true),
            Verdict::Differs(p) if p.contains("hash")
        ));
    }

    #[test]
    fn a_dead_lettered_newest_version_is_reported_as_such() {
        let (newest, confirmed) = (held(5, B), held(3, A));
        assert!(matches!(
            judge(
                &newest,
                &confirmed,
                &confirmed,
                hash_of(A),
                Some(Version::row(1, 5)),
                true
            ),
            Verdict::DeadLettered
        ));
        assert!(matches!(
            judge(&newest, &None, &None, None, Some(Version::row(1, 5)), true),
            Verdict::DeadLettered
        ));
    }

    #[test]
    fn after_a_prune_the_ledger_stands_for_the_stream() {
        let v = held(5, A);
        assert!(matches!(
            judge(&None, &v, &v, hash_of(A), None, true),
            Verdict::Ok
        ));
        assert!(matches!(
            judge(&None, &None, &v, hash_of(A), None, true),
            Verdict::Differs(_)
        ));
    }

    #[test]
    fn a_sample_is_bounded_and_drawn_from_everything() {
        let mut sampler = Sampler::new(10);
        for i in 0..1000 {
            sampler.offer(i);
        }
        let sample = sampler.into_sample();
        assert_eq!(sample.len(), 10);
        assert!(sample.iter().any(|i| *i >= 10), "{sample:?}");
    }
}
