//! `syncctl status`: what is in each stream, consumer and table, and whether the counts reconcile.
//!
//! Reconciliation checks that no row was lost between the reader, the integrators and the
//! persister. Each equation is shown with its difference; the total is the sum of their absolute
//! values, and the pipeline is reconciled when it is 0:
//!
//! 1. reader (checkpoints bucket, summed over files):
//!    `rows_read = published + deduplicated + rejected`
//! 2. ingest (NATS): every ingest message yields exactly one outcome on `synced` (skips of a
//!    version the CRM already holds included), `superseded` (a newer version was known, so it was
//!    never sent) or `dead`, so
//!    `ingest messages = synced + superseded + dead outcomes + integrators pending`,
//!    where pending is the consumer's `num_pending + num_ack_pending`.
//! 3. rejects (NATS): `rejected outcomes >= rejected (checkpoints)`: equal once every file is
//!    complete, more while a reader is past its checkpoint or when a file was read again after the
//!    results stream's dedup window.
//! 4. database (when not skipped), allowing for what the persister still holds
//!    (`num_pending + num_ack_pending` of its consumer):
//!    `rejected (checkpoints) - persister pending <= rejected_rows <= rejected outcomes`,
//!    `dead_letters <= dead outcomes` (a redriven letter leaves the table; one row per id and hash),
//!    `customers <= synced outcomes` (one row per customer, however many versions).

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::KeyValueErrorKind};
use futures::TryStreamExt as _;
use serde::Serialize;
use service_kit::NatsArgs;
use sync_store::TableCounts;
use sync_topology::messages::{
    Checkpoint, DEFAULT_MAX_PAUSE_MS, PAUSE_KEY, PauseNotice, REPLICA_KEY_PREFIX, ReplicaHeartbeat,
};

use crate::{CtlError, Pipeline, nats_error};

#[derive(Debug, Clone)]
pub struct StatusConfig {
    pub nats: NatsArgs,
    /// `None` leaves the database out (`--skip-db`).
    pub database_url: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub namespace: String,
    pub streams: Vec<StreamStatus>,
    pub consumers: Vec<ConsumerStatus>,
    /// Absent when the database was skipped.
    pub tables: Option<TableCounts>,
    pub schema_version: Option<i32>,
    pub checkpoints: CheckpointTotals,
    pub outcomes: OutcomeCounts,
    /// The fleet-wide CRM pause in force, if any, with its cause.
    pub crm_pause: Option<PauseNotice>,
    /// Every integrator replica's last heartbeat (breaker, pause, limit, in flight, totals), by
    /// name; a replica silent for three heartbeats is `stale`.
    pub replicas: Vec<ReplicaStatus>,
    pub equations: Vec<Equation>,
    /// Sum of the absolute differences of every equation: 0 when reconciled.
    pub difference: u64,
    pub reconciled: bool,
    /// What needs the operator soon (a stream or the JetStream store filling up).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// RFC 3339, as the server reports it.
    pub first_ts: Option<String>,
    pub last_ts: Option<String>,
    /// The stream's own size limit (-1: none).
    pub max_bytes: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStatus {
    pub stream: String,
    pub name: String,
    /// Not yet delivered.
    pub num_pending: u64,
    /// Delivered, not yet acknowledged: in flight.
    pub num_ack_pending: u64,
    pub num_redelivered: u64,
    /// Every stream message at or below this sequence is acknowledged.
    pub ack_floor_stream_seq: u64,
    pub delivered_stream_seq: u64,
    /// Pull requests waiting: roughly how many workers are connected and idle.
    pub num_waiting: u64,
}

impl ConsumerStatus {
    /// Pending plus in flight: what this consumer still has to settle.
    pub fn unsettled(&self) -> u64 {
        self.num_pending + self.num_ack_pending
    }

    pub(crate) fn from_info(info: &jetstream::consumer::Info) -> Self {
        ConsumerStatus {
            stream: info.stream_name.clone(),
            name: info.name.clone(),
            num_pending: info.num_pending,
            num_ack_pending: info.num_ack_pending as u64,
            num_redelivered: info.num_redelivered as u64,
            ack_floor_stream_seq: info.ack_floor.stream_sequence,
            delivered_stream_seq: info.delivered.stream_sequence,
            num_waiting: info.num_waiting as u64,
        }
    }
}

/// One replica as its heartbeat describes it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    #[serde(flatten)]
    pub heartbeat: ReplicaHeartbeat,
    /// No heartbeat for three intervals: stopped without saying so (killed) or cut off from NATS.
    pub stale: bool,
    /// Seconds since its last heartbeat.
    pub last_seen_secs: f64,
}

/// Sums over every file in the checkpoints bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CheckpointTotals {
    pub files: u64,
    pub complete_files: u64,
    pub rows_read: u64,
    pub published: u64,
    pub deduplicated: u64,
    pub rejected: u64,
}

impl CheckpointTotals {
    fn add(&mut self, checkpoint: &Checkpoint) {
        self.files += 1;
        self.complete_files += u64::from(checkpoint.complete);
        self.rows_read += checkpoint.rows_read;
        self.published += checkpoint.published;
        self.deduplicated += checkpoint.deduplicated;
        self.rejected += checkpoint.rejected;
    }
}

/// Messages per subject in the results stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeCounts {
    pub synced: u64,
    pub superseded: u64,
    pub rejected: u64,
    pub dead: u64,
}

/// One reconciliation check: `left` against `right`, with the signed amount by which it fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Equation {
    pub name: &'static str,
    /// The relation with the numbers filled in, e.g. `rows_read 10 = published 7 + ...`.
    pub statement: String,
    pub left: u64,
    pub right: u64,
    /// 0 when the relation holds; otherwise how far `left` is off (signed).
    pub difference: i64,
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn equality(name: &'static str, statement: String, left: u64, right: u64) -> Equation {
    Equation {
        name,
        statement,
        left,
        right,
        difference: signed(left) - signed(right),
    }
}

/// `low <= value <= high`; the difference is how far `value` lies outside.
fn within(name: &'static str, statement: String, value: u64, low: u64, high: u64) -> Equation {
    let difference = if value > high {
        signed(value) - signed(high)
    } else if value < low {
        signed(value) - signed(low)
    } else {
        0
    };
    Equation {
        name,
        statement,
        left: value,
        right: high,
        difference,
    }
}

/// The reconciliation equations (see the module docs) from the raw counts.
pub fn reconcile(
    checkpoints: &CheckpointTotals,
    ingest_messages: u64,
    outcomes: &OutcomeCounts,
    integrators: &ConsumerStatus,
    persister: &ConsumerStatus,
    tables: Option<&TableCounts>,
) -> Vec<Equation> {
    let c = checkpoints;
    let mut equations = vec![
        equality(
            "reader",
            format!(
                "rows_read {} = published {} + deduplicated {} + rejected {}",
                c.rows_read, c.published, c.deduplicated, c.rejected
            ),
            c.rows_read,
            c.published + c.deduplicated + c.rejected,
        ),
        equality(
            "ingest",
            format!(
                "ingest messages {} = synced {} + superseded {} + dead {} + integrators pending {} \
                 + in flight {}",
                ingest_messages,
                outcomes.synced,
                outcomes.superseded,
                outcomes.dead,
                integrators.num_pending,
                integrators.num_ack_pending
            ),
            ingest_messages,
            outcomes.synced + outcomes.superseded + outcomes.dead + integrators.unsettled(),
        ),
    ];
    let reading = c.files - c.complete_files;
    equations.push(within(
        "rejects",
        format!(
            "rejected outcomes {} >= rejected by the reader {} (equal once every file is read, \
             unless one was read again after the dedup window; {reading} file(s) being read)",
            outcomes.rejected, c.rejected
        ),
        outcomes.rejected,
        c.rejected,
        u64::MAX,
    ));
    if let Some(t) = tables {
        let held = persister.unsettled();
        let rows = |v: i64| u64::try_from(v).unwrap_or(0);
        // One row per file and line: a file read twice has its rejects once in the table.
        equations.push(within(
            "rejected_rows",
            format!(
                "rejected by the reader {} - persister pending {} <= rejected_rows {} <= rejected outcomes {}",
                c.rejected, held, t.rejected_rows, outcomes.rejected
            ),
            rows(t.rejected_rows),
            c.rejected.saturating_sub(held),
            outcomes.rejected,
        ));
        equations.push(within(
            "dead_letters",
            format!(
                "dead_letters {} <= dead outcomes {}",
                t.dead_letters, outcomes.dead
            ),
            rows(t.dead_letters),
            0,
            outcomes.dead,
        ));
        equations.push(within(
            "customers",
            format!(
                "customers {} <= synced outcomes {}",
                t.customers, outcomes.synced
            ),
            rows(t.customers),
            0,
            outcomes.synced,
        ));
    }
    equations
}

/// Reads every count the status shows, and reconciles them.
pub async fn collect(config: &StatusConfig) -> Result<Status, CtlError> {
    Source::connect(config).await?.collect().await
}

/// What `status` reads, connected once: `--watch` reads it again every interval.
pub struct Source {
    pipeline: Pipeline,
    /// The database and its URL, unless skipped.
    database: Option<(tokio_postgres::Client, String)>,
}

impl Source {
    pub async fn connect(config: &StatusConfig) -> Result<Self, CtlError> {
        let pipeline = Pipeline::connect(&config.nats).await?;
        let database = match &config.database_url {
            Some(url) => Some((
                crate::connect_database(url, config.nats.startup_wait).await?,
                url.clone(),
            )),
            None => None,
        };
        Ok(Source { pipeline, database })
    }

    /// Every count, the replicas' heartbeats, and the reconciliation, as they are now.
    pub async fn collect(&self) -> Result<Status, CtlError> {
        let pipeline = &self.pipeline;
        let names = &pipeline.names;

        let ingest = stream_status(pipeline, &names.ingest_stream()).await?;
        let results_stream = pipeline.stream(&names.results_stream()).await?;
        let outcomes = outcome_counts(pipeline, &results_stream).await?;
        let results = stream_status(pipeline, &names.results_stream()).await?;

        let integrators = ConsumerStatus::from_info(
            &pipeline
                .consumer_info(&names.ingest_stream(), names.integrators_consumer())
                .await?,
        );
        let persister = ConsumerStatus::from_info(
            &pipeline
                .consumer_info(&names.results_stream(), names.persister_consumer())
                .await?,
        );
        let checkpoints = checkpoint_totals(pipeline).await?;
        let crm_pause = pause_in_force(pipeline).await;
        let replicas = replicas(pipeline).await;

        let (tables, schema_version) = match &self.database {
            Some((client, url)) => {
                let version = crate::require_schema(client, url).await?;
                (Some(sync_store::table_counts(client).await?), Some(version))
            }
            None => (None, None),
        };

        let equations = reconcile(
            &checkpoints,
            ingest.messages,
            &outcomes,
            &integrators,
            &persister,
            tables.as_ref(),
        );
        let difference = equations.iter().map(|e| e.difference.unsigned_abs()).sum();
        let account = pipeline
            .js
            .query_account()
            .await
            .map_err(|e| nats_error("reading the JetStream account", e))?;
        let mut warnings = fill_warnings(
            &[&ingest, &results],
            account.storage,
            account.limits.max_storage.unwrap_or(-1),
        );
        warnings.extend(pause_warning(
            crm_pause.as_ref(),
            chrono::Utc::now().timestamp_millis(),
        ));
        Ok(Status {
            namespace: names.namespace().to_owned(),
            streams: vec![ingest, results],
            consumers: vec![integrators, persister],
            tables,
            schema_version,
            checkpoints,
            outcomes,
            crm_pause,
            replicas,
            equations,
            difference,
            reconciled: difference == 0,
            warnings,
        })
    }
}

/// A heartbeat older than this is not shown at all: that replica is long gone. (Heartbeats are
/// plain puts, so a killed replica's stays in the bucket; a clean stop removes it.)
const FORGOTTEN_AFTER: Duration = Duration::from_secs(3600);

/// The replicas' heartbeats in the control bucket, by name. Unreadable ones are left out, as is
/// everything when the bucket cannot be read: the rest of the status matters more.
async fn replicas(pipeline: &Pipeline) -> Vec<ReplicaStatus> {
    let Ok(control) = pipeline
        .js
        .get_key_value(pipeline.names.control_bucket())
        .await
    else {
        return Vec::new();
    };
    let Ok(keys) = control.keys().await else {
        return Vec::new();
    };
    let keys: Vec<String> = keys.try_collect().await.unwrap_or_default();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut replicas = Vec::new();
    for key in keys.iter().filter(|k| k.starts_with(REPLICA_KEY_PREFIX)) {
        let Ok(Some(value)) = control.get(key).await else {
            continue;
        };
        let Ok(heartbeat) = serde_json::from_slice::<ReplicaHeartbeat>(&value) else {
            continue;
        };
        let age_ms = (now_ms - heartbeat.seen_at_ms).max(0);
        if age_ms > FORGOTTEN_AFTER.as_millis() as i64 {
            continue;
        }
        replicas.push(ReplicaStatus {
            stale: heartbeat.is_stale(now_ms),
            last_seen_secs: age_ms as f64 / 1000.0,
            heartbeat,
        });
    }
    replicas.sort_by(|a, b| a.heartbeat.replica.cmp(&b.heartbeat.replica));
    replicas
}

/// What changed between two statuses, per second, and how long the backlogs take at that pace.
#[derive(Debug, Clone, Serialize)]
pub struct Rates {
    /// Seconds between the two statuses.
    pub over_secs: f64,
    pub rows_read_per_sec: f64,
    /// New ingest messages.
    pub published_per_sec: f64,
    pub synced_per_sec: f64,
    pub superseded_per_sec: f64,
    pub dead_per_sec: f64,
    pub rejected_per_sec: f64,
    /// Ingest messages that got their outcome: synced, superseded and dead.
    pub settled_per_sec: f64,
    /// Outcomes the persister acknowledged (stored).
    pub persisted_per_sec: f64,
    /// What the integrators still have to settle, and when they will be done at this pace (None:
    /// nothing settled meanwhile, so no estimate).
    pub integrators_backlog: u64,
    pub integrators_eta_secs: Option<f64>,
    pub persister_backlog: u64,
    pub persister_eta_secs: Option<f64>,
}

impl Rates {
    pub fn between(before: &Status, now: &Status, over: Duration) -> Rates {
        let secs = over.as_secs_f64().max(0.001);
        let per_sec = |from: u64, to: u64| to.saturating_sub(from) as f64 / secs;
        let (b, n) = (&before.outcomes, &now.outcomes);
        let settled = |o: &OutcomeCounts| o.synced + o.superseded + o.dead;
        let ingest_seq = |s: &Status| s.streams.first().map_or(0, |s| s.last_seq);
        let consumer = |s: &Status, at: usize| s.consumers.get(at).cloned();
        let floor = |s: &Status| consumer(s, 1).map_or(0, |c| c.ack_floor_stream_seq);
        let backlog = |at: usize| consumer(now, at).map_or(0, |c| c.unsettled());
        let eta = |backlog: u64, rate: f64| match backlog {
            0 => Some(0.0),
            _ if rate > 0.0 => Some(backlog as f64 / rate),
            _ => None,
        };
        let settled_per_sec = per_sec(settled(b), settled(n));
        let persisted_per_sec = per_sec(floor(before), floor(now));
        Rates {
            over_secs: secs,
            rows_read_per_sec: per_sec(before.checkpoints.rows_read, now.checkpoints.rows_read),
            published_per_sec: per_sec(ingest_seq(before), ingest_seq(now)),
            synced_per_sec: per_sec(b.synced, n.synced),
            superseded_per_sec: per_sec(b.superseded, n.superseded),
            dead_per_sec: per_sec(b.dead, n.dead),
            rejected_per_sec: per_sec(b.rejected, n.rejected),
            settled_per_sec,
            persisted_per_sec,
            integrators_backlog: backlog(0),
            integrators_eta_secs: eta(backlog(0), settled_per_sec),
            persister_backlog: backlog(1),
            persister_eta_secs: eta(backlog(1), persisted_per_sec),
        }
    }
}

/// One frame of `status --watch`: the status, when it was read, and the rates since the frame
/// before (None in the first).
#[derive(Debug, Clone, Serialize)]
pub struct Watched {
    /// RFC 3339.
    pub at: String,
    #[serde(flatten)]
    pub status: Status,
    pub rates: Option<Rates>,
}

/// Reads the status again and again, keeping its connections, for `status --watch`.
pub struct Watcher {
    config: StatusConfig,
    source: Option<Source>,
    last: Option<(Instant, Status)>,
}

impl Watcher {
    pub fn new(config: StatusConfig) -> Self {
        Watcher {
            config,
            source: None,
            last: None,
        }
    }

    /// The next frame. A failure (NATS restarting, PostgreSQL gone) drops the connections, so
    /// the next call connects afresh.
    pub async fn next(&mut self) -> Result<Watched, CtlError> {
        let source = match self.source.take() {
            Some(source) => source,
            None => Source::connect(&self.config).await?,
        };
        let status = source.collect().await?;
        self.source = Some(source);
        let now = Instant::now();
        let rates = self
            .last
            .as_ref()
            .map(|(then, before)| Rates::between(before, &status, now - *then));
        self.last = Some((now, status.clone()));
        Ok(Watched {
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            status,
            rates,
        })
    }
}

/// Streams refuse new messages when full (they never drop old ones), so an operator must hear
/// before that: from this share on, `status` warns.
const FILL_WARNING: f64 = 0.8;

fn fill_warnings(streams: &[&StreamStatus], used: u64, account_limit: i64) -> Vec<String> {
    let share = |used: u64, limit: i64| (limit > 0).then(|| used as f64 / limit as f64);
    let mut warnings = Vec::new();
    for s in streams {
        if let Some(full) = share(s.bytes, s.max_bytes).filter(|f| *f >= FILL_WARNING) {
            warnings.push(format!(
                "stream {} is {:.0}% full ({} of {} bytes): it will refuse new messages when \
                 full; run `syncctl prune` or raise `syncctl setup --max-stream-bytes`",
                s.name,
                full * 100.0,
                s.bytes,
                s.max_bytes
            ));
        }
    }
    if let Some(full) = share(used, account_limit).filter(|f| *f >= FILL_WARNING) {
        warnings.push(format!(
            "the JetStream store is {:.0}% full ({used} of {account_limit} bytes): streams will \
             refuse new messages when it is full; run `syncctl prune` or give JetStream more storage",
            full * 100.0
        ));
    }
    warnings
}

/// A notice asking for more than integrators hold by default: none of them writes one (their own
/// pauses are capped), so it comes from a replica with a larger cap or from someone else who can
/// write the control bucket.
fn pause_warning(notice: Option<&PauseNotice>, now_ms: i64) -> Option<String> {
    let notice = notice?;
    let asked_ms = notice.until_ms - now_ms;
    (asked_ms > DEFAULT_MAX_PAUSE_MS as i64).then(|| {
        format!(
            "the CRM pause notice (set by {:?}) asks for {:.0} s more, longer than integrators \
             hold by default ({} s, --max-pause): each holds at most its cap; if no replica \
             runs with a larger one, check who can write the control bucket",
            notice.set_by,
            asked_ms as f64 / 1000.0,
            DEFAULT_MAX_PAUSE_MS / 1000
        )
    })
}

/// The pause notice in the control bucket while it holds; unreadable or missing shows as none.
async fn pause_in_force(pipeline: &Pipeline) -> Option<PauseNotice> {
    let control = pipeline
        .js
        .get_key_value(pipeline.names.control_bucket())
        .await
        .ok()?;
    let value = control.get(PAUSE_KEY).await.ok()??;
    let notice: PauseNotice = serde_json::from_slice(&value).ok()?;
    (notice.until_ms > chrono::Utc::now().timestamp_millis()).then_some(notice)
}

async fn stream_status(pipeline: &Pipeline, name: &str) -> Result<StreamStatus, CtlError> {
    let mut stream = pipeline.stream(name).await?;
    let info = stream
        .info()
        .await
        .map_err(|e| nats_error(format!("reading stream {name}"), e))?;
    let empty = info.state.messages == 0;
    // An empty stream reports the zero time: show nothing instead.
    let rfc3339 = |time| {
        (!empty)
            .then(|| crate::utc(time).map(crate::rfc3339))
            .flatten()
    };
    Ok(StreamStatus {
        name: name.to_owned(),
        messages: info.state.messages,
        bytes: info.state.bytes,
        first_seq: info.state.first_sequence,
        last_seq: info.state.last_sequence,
        max_bytes: info.config.max_bytes,
        first_ts: rfc3339(info.state.first_timestamp),
        last_ts: rfc3339(info.state.last_timestamp),
    })
}

async fn outcome_counts(
    pipeline: &Pipeline,
    results: &jetstream::stream::Stream,
) -> Result<OutcomeCounts, CtlError> {
    let names = &pipeline.names;
    let action = || {
        format!(
            "counting outcomes per subject in {}",
            names.results_stream()
        )
    };
    let per_subject: HashMap<String, usize> = results
        .info_with_subjects(format!("{}.>", names.namespace()))
        .await
        .map_err(|e| nats_error(action(), e))?
        .try_collect()
        .await
        .map_err(|e| nats_error(action(), e))?;
    let count = |subject: String| per_subject.get(&subject).copied().unwrap_or(0) as u64;
    Ok(OutcomeCounts {
        synced: count(names.synced_subject()),
        superseded: count(names.superseded_subject()),
        rejected: count(names.rejected_subject()),
        dead: count(names.dead_subject()),
    })
}

async fn checkpoint_totals(pipeline: &Pipeline) -> Result<CheckpointTotals, CtlError> {
    let bucket = pipeline.names.checkpoints_bucket();
    let store = match pipeline.js.get_key_value(&bucket).await {
        Ok(store) => store,
        Err(err) if err.kind() == KeyValueErrorKind::GetBucket => {
            return Err(CtlError::BucketMissing {
                bucket,
                namespace: pipeline.names.namespace().to_owned(),
            });
        }
        Err(err) => return Err(nats_error(format!("opening bucket {bucket}"), err)),
    };
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| nats_error(format!("listing keys of {bucket}"), e))?
        .try_collect()
        .await
        .map_err(|e| nats_error(format!("listing keys of {bucket}"), e))?;
    let mut totals = CheckpointTotals::default();
    for key in keys {
        if !sync_topology::loads::is_checkpoint_key(&key) {
            continue;
        }
        let Some(value) = store
            .get(&key)
            .await
            .map_err(|e| nats_error(format!("reading {bucket}/{key}"), e))?
        else {
            continue; // deleted between listing and reading
        };
        let checkpoint: Checkpoint =
            serde_json::from_slice(&value).map_err(|source| CtlError::Json {
                what: format!("checkpoint {bucket}/{key}"),
                source,
            })?;
        totals.add(&checkpoint);
    }
    Ok(totals)
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "namespace {}", self.namespace)?;
        writeln!(f)?;
        write_streams(f, &self.streams)?;
        write_consumers(f, &self.consumers)?;
        write_replicas(f, &self.replicas)?;
        self.write_counts(f)?;
        writeln!(f)?;
        self.write_reconciliation(f)
    }
}

fn write_streams(f: &mut fmt::Formatter<'_>, streams: &[StreamStatus]) -> fmt::Result {
    let rows = streams
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.messages.to_string(),
                s.bytes.to_string(),
                s.first_seq.to_string(),
                s.last_seq.to_string(),
            ]
        })
        .collect();
    let headers = ["STREAM", "MESSAGES", "BYTES", "FIRST SEQ", "LAST SEQ"];
    writeln!(f, "{}", crate::table(&headers, &[1, 2, 3, 4], rows))?;
    writeln!(f)
}

fn write_consumers(f: &mut fmt::Formatter<'_>, consumers: &[ConsumerStatus]) -> fmt::Result {
    let rows = consumers
        .iter()
        .map(|c| {
            vec![
                format!("{}/{}", c.stream, c.name),
                c.num_pending.to_string(),
                c.num_ack_pending.to_string(),
                c.num_redelivered.to_string(),
                c.ack_floor_stream_seq.to_string(),
            ]
        })
        .collect();
    let headers = [
        "CONSUMER",
        "PENDING",
        "IN FLIGHT",
        "REDELIVERED",
        "ACK FLOOR",
    ];
    writeln!(f, "{}", crate::table(&headers, &[1, 2, 3, 4], rows))?;
    writeln!(f)
}

impl Status {
    /// Outcomes, the CRM pause, the reader's checkpoints and the tables, one line each.
    fn write_counts(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.outcomes;
        writeln!(
            f,
            "outcomes: synced {}  superseded {}  rejected {}  dead {}",
            o.synced, o.superseded, o.rejected, o.dead
        )?;
        if let Some(p) = &self.crm_pause {
            let left = p.until_ms - chrono::Utc::now().timestamp_millis();
            writeln!(
                f,
                "CRM pause: every integrator holds for {:.1} s more, at most its --max-pause \
                 (set by {}): {}",
                left.max(0) as f64 / 1000.0,
                p.set_by,
                p.reason
            )?;
        }
        let c = &self.checkpoints;
        writeln!(
            f,
            "reader:   {} file(s), {} complete; rows read {}  published {}  deduplicated {}  rejected {}",
            c.files, c.complete_files, c.rows_read, c.published, c.deduplicated, c.rejected
        )?;
        match (&self.tables, self.schema_version) {
            (Some(t), Some(version)) => writeln!(
                f,
                "database: customers {}  rejected_rows {}  dead_letters {}  (schema version {version})",
                t.customers, t.rejected_rows, t.dead_letters
            ),
            _ => writeln!(f, "database: skipped"),
        }
    }

    fn write_reconciliation(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "reconciliation:")?;
        let checks = self
            .equations
            .iter()
            .map(|e| {
                let verdict = if e.difference == 0 {
                    "ok".to_owned()
                } else {
                    format!("OFF BY {:+}", e.difference)
                };
                vec![e.name.to_owned(), verdict, e.statement.clone()]
            })
            .collect();
        let headers = ["CHECK", "VERDICT", "STATEMENT"];
        writeln!(f, "{}", crate::table(&headers, &[], checks))?;
        for warning in &self.warnings {
            writeln!(f, "WARNING: {warning}")?;
        }
        if self.reconciled {
            writeln!(f, "reconciled: difference 0")
        } else {
            writeln!(f, "NOT RECONCILED: total difference {}", self.difference)
        }
    }
}

/// The replicas' table, and below it why any is not ready.
fn write_replicas(f: &mut fmt::Formatter<'_>, replicas: &[ReplicaStatus]) -> fmt::Result {
    if replicas.is_empty() {
        writeln!(
            f,
            "replicas: none reporting (each integrator writes a heartbeat every few seconds)"
        )?;
        return writeln!(f);
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let rows = replicas
        .iter()
        .map(|r| {
            let h = &r.heartbeat;
            let state = if r.stale {
                "stale"
            } else if h.not_ready.is_some() {
                "not ready"
            } else {
                "ready"
            };
            let pause = h
                .paused_until_ms
                .filter(|until| *until > now_ms)
                .map_or_else(
                    || "-".to_owned(),
                    |until| format!("{:.1}s", (until - now_ms) as f64 / 1000.0),
                );
            vec![
                h.replica.clone(),
                state.to_owned(),
                h.breaker.clone(),
                pause,
                h.concurrency_limit.to_string(),
                h.requests_in_flight.to_string(),
                h.messages_in_hand.to_string(),
                h.settled().to_string(),
                h.handed_back.to_string(),
                h.retries.to_string(),
                format!("{:.0}s ago", r.last_seen_secs),
            ]
        })
        .collect();
    writeln!(
        f,
        "{}",
        crate::table(
            &[
                "REPLICA",
                "STATE",
                "BREAKER",
                "PAUSED FOR",
                "LIMIT",
                "IN FLIGHT",
                "IN HAND",
                "SETTLED",
                "HANDED BACK",
                "RETRIES",
                "LAST SEEN",
            ],
            &[4, 5, 6, 7, 8, 9],
            rows
        )
    )?;
    for r in replicas.iter().filter(|r| !r.stale) {
        if let Some(reason) = &r.heartbeat.not_ready {
            writeln!(f, "  {} not ready: {reason}", r.heartbeat.replica)?;
        }
    }
    writeln!(f)
}

impl fmt::Display for Rates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rates over {:.1}s: rows read {:.0}/s  published {:.0}/s  synced {:.0}/s  superseded \
             {:.0}/s  dead {:.0}/s  rejected {:.0}/s  stored {:.0}/s",
            self.over_secs,
            self.rows_read_per_sec,
            self.published_per_sec,
            self.synced_per_sec,
            self.superseded_per_sec,
            self.dead_per_sec,
            self.rejected_per_sec,
            self.persisted_per_sec
        )?;
        writeln!(
            f,
            "backlog: integrators {} ({})  persister {} ({})",
            self.integrators_backlog,
            eta(self.integrators_backlog, self.integrators_eta_secs),
            self.persister_backlog,
            eta(self.persister_backlog, self.persister_eta_secs)
        )
    }
}

/// "done", "ETA 2m 10s", or why there is no estimate.
fn eta(backlog: u64, secs: Option<f64>) -> String {
    match (backlog, secs) {
        (0, _) => "done".to_owned(),
        (_, Some(secs)) => format!(
            "ETA {}",
            humantime::format_duration(Duration::from_secs(secs.ceil() as u64))
        ),
        (_, None) => "no progress since the last refresh: no ETA".to_owned(),
    }
}

impl fmt::Display for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} (Ctrl-C to stop)", self.at)?;
        write!(f, "{}", self.status)?;
        writeln!(f)?;
        match &self.rates {
            Some(rates) => write!(f, "{rates}"),
            None => writeln!(f, "rates: from the next refresh on"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_stream_or_the_store_filling_up_is_warned_about() {
        let stream = |bytes, max_bytes| StreamStatus {
            name: "CUSTOMERS".to_owned(),
            messages: 1,
            bytes,
            first_seq: 1,
            last_seq: 1,
            first_ts: None,
            last_ts: None,
            max_bytes,
        };
        assert!(fill_warnings(&[&stream(10, -1)], 10, -1).is_empty());
        assert!(fill_warnings(&[&stream(79, 100)], 10, 1000).is_empty());
        let warned = fill_warnings(&[&stream(85, 100)], 900, 1000);
        assert_eq!(warned.len(), 2, "{warned:?}");
        assert!(warned[0].contains("syncctl prune"), "{warned:?}");
    }

    use super::*;

    fn consumer(pending: u64, in_flight: u64) -> ConsumerStatus {
        ConsumerStatus {
            stream: "S".to_owned(),
            name: "c".to_owned(),
            num_pending: pending,
            num_ack_pending: in_flight,
            num_redelivered: 0,
            ack_floor_stream_seq: 0,
            delivered_stream_seq: 0,
            num_waiting: 0,
        }
    }

    fn totals(read: u64, published: u64, dedup: u64, rejected: u64) -> CheckpointTotals {
        CheckpointTotals {
            files: 1,
            complete_files: 1,
            rows_read: read,
            published,
            deduplicated: dedup,
            rejected,
        }
    }

    fn total(equations: &[Equation]) -> u64 {
        equations.iter().map(|e| e.difference.unsigned_abs()).sum()
    }

    fn status_at(synced: u64, backlog: u64) -> Status {
        Status {
            namespace: "n".to_owned(),
            streams: Vec::new(),
            consumers: vec![consumer(backlog, 0), consumer(0, 0)],
            tables: None,
            schema_version: None,
            checkpoints: CheckpointTotals::default(),
            outcomes: OutcomeCounts {
                synced,
                ..OutcomeCounts::default()
            },
            crm_pause: None,
            replicas: Vec::new(),
            equations: Vec::new(),
            difference: 0,
            reconciled: true,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn rates_and_the_eta_come_from_two_reports() {
        let two_seconds = Duration::from_secs(2);
        let rates = Rates::between(&status_at(100, 500), &status_at(300, 300), two_seconds);
        assert_eq!(rates.synced_per_sec, 100.0);
        assert_eq!(rates.settled_per_sec, 100.0);
        assert_eq!(rates.integrators_backlog, 300);
        assert_eq!(rates.integrators_eta_secs, Some(3.0));
        assert_eq!(eta(300, Some(3.0)), "ETA 3s");
        let stalled = Rates::between(&status_at(300, 300), &status_at(300, 300), two_seconds);
        assert_eq!(stalled.integrators_eta_secs, None);
        assert!(eta(300, None).contains("no ETA"));
        assert_eq!(eta(0, Some(0.0)), "done");
    }

    #[test]
    fn a_finished_run_reconciles() {
        let outcomes = OutcomeCounts {
            synced: 8,
            superseded: 0,
            rejected: 2,
            dead: 1,
        };
        let tables = TableCounts {
            customers: 7,
            rejected_rows: 2,
            dead_letters: 1,
        };
        let eq = reconcile(
            &totals(13, 9, 2, 2),
            9,
            &outcomes,
            &consumer(0, 0),
            &consumer(0, 0),
            Some(&tables),
        );
        assert_eq!(total(&eq), 0, "{eq:#?}");
    }

    #[test]
    fn pending_work_is_not_a_difference_but_a_lost_outcome_is() {
        let outcomes = OutcomeCounts {
            synced: 5,
            superseded: 0,
            rejected: 2,
            dead: 0,
        };
        let pending = reconcile(
            &totals(11, 9, 0, 2),
            9,
            &outcomes,
            &consumer(3, 1),
            &consumer(0, 0),
            None,
        );
        assert_eq!(total(&pending), 0, "{pending:#?}");
        let lost = reconcile(
            &totals(11, 9, 0, 2),
            9,
            &outcomes,
            &consumer(2, 1),
            &consumer(0, 0),
            None,
        );
        let ingest = lost.iter().find(|e| e.name == "ingest").expect("ingest");
        assert_eq!(ingest.difference, 1);
    }

    #[test]
    fn rows_the_persister_still_holds_are_allowed_for() {
        let outcomes = OutcomeCounts {
            synced: 0,
            superseded: 0,
            rejected: 5,
            dead: 0,
        };
        let tables = TableCounts {
            rejected_rows: 3,
            ..TableCounts::default()
        };
        let held = reconcile(
            &totals(5, 0, 0, 5),
            0,
            &outcomes,
            &consumer(0, 0),
            &consumer(1, 1),
            Some(&tables),
        );
        assert_eq!(total(&held), 0, "{held:#?}");
        let missing = reconcile(
            &totals(5, 0, 0, 5),
            0,
            &outcomes,
            &consumer(0, 0),
            &consumer(0, 0),
            Some(&tables),
        );
        assert_eq!(total(&missing), 2, "{missing:#?}");
    }

    #[test]
    fn a_file_read_again_after_the_dedup_window_is_not_a_loss() {
        // 10 rows, 2 bad, read twice: the second run's 8 rows and 2 rejects are new messages.
        let outcomes = OutcomeCounts {
            synced: 16,
            superseded: 0,
            rejected: 4,
            dead: 0,
        };
        let tables = TableCounts {
            customers: 8,
            rejected_rows: 2,
            dead_letters: 0,
        };
        let eq = reconcile(
            &totals(10, 8, 0, 2),
            16,
            &outcomes,
            &consumer(0, 0),
            &consumer(0, 0),
            Some(&tables),
        );
        assert_eq!(total(&eq), 0, "{eq:#?}");
    }

    #[test]
    fn a_file_being_read_may_have_published_rejects_past_its_checkpoint() {
        let mut reading = totals(4, 3, 0, 1);
        reading.complete_files = 0;
        let outcomes = OutcomeCounts {
            synced: 3,
            superseded: 0,
            rejected: 2,
            dead: 0,
        };
        let eq = reconcile(
            &reading,
            3,
            &outcomes,
            &consumer(0, 0),
            &consumer(0, 0),
            None,
        );
        assert_eq!(total(&eq), 0, "{eq:#?}");
    }
}
