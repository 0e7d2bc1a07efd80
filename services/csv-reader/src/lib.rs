//! csv-reader: streams a customer CSV of any size into JetStream, one message per valid row with a
//! dedup id, bad rows to the rejected subject, acknowledgements pipelined in a bounded window, and a
//! checkpoint of the line up to which every row is acknowledged so a killed run can be resumed.

pub mod checkpoint;
pub mod input;
pub mod message;
pub mod progress;
pub mod publish;
pub mod rows;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, ErrorCode, context::GetStreamErrorKind};
use backon::{ExponentialBuilder, Retryable};
use csv_async::ByteRecord;
use customer_record::{ColumnLayout, HeaderError};
use futures::{FutureExt, StreamExt, stream::FuturesOrdered};
use serde::Serialize;
use service_kit::NatsArgs;
use sync_topology::{ConnectError, Names};
use tokio_util::sync::CancellationToken;

pub use crate::rows::{ReadFailure, Row, RowReader};

use crate::checkpoint::{CheckpointStore, Counters, StartPoint};
use crate::input::InputReader;
use crate::message::{MessageContext, MessageKind, OutgoingMessage};
use crate::progress::{Progress, ProgressMode};
use crate::publish::{Acknowledged, RetryPolicy};

/// Chosen by benchmark (BENCHMARKS.md): beyond it the rate no longer rises on a local server,
/// and the window's memory (a few hundred bytes per message) stays far below the RSS target.
pub const DEFAULT_PUBLISH_WINDOW: usize = 1024;

/// Far above any real line (fields are at most 1 KiB), far below the memory target.
pub const DEFAULT_MAX_ROW_BYTES: u64 = 16 * 1024 * 1024;

/// Everything a run needs; the binary fills it from flags and the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct ReaderConfig {
    /// The CSV file to read (`.gz` is decompressed); `-` reads standard input.
    pub input: PathBuf,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Publishes awaiting their acknowledgement at once.
    #[arg(long, env = "CSV_READER_PUBLISH_WINDOW", default_value_t = DEFAULT_PUBLISH_WINDOW,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub publish_window: usize,
    /// Continue after the line checkpointed by an earlier run of this file.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue even though the file changed since its checkpoint.
    #[arg(long, requires = "resume")]
    pub force: bool,
    /// Read the file again as a new load, even if it was read completely before: its rows become
    /// the newest versions of their customers (how an older file is deliberately loaded again).
    #[arg(long, conflicts_with = "resume")]
    pub reload: bool,
    /// A column whose value orders a customer's rows, as reverse-ETL tools do: a whole number, or a
    /// date-time such as `updated_at` (RFC 3339, `YYYY-MM-DD HH:MM:SS` in UTC, or `YYYY-MM-DD`). Of
    /// two rows of a customer the one with the greater value wins, whatever file or line it is
    /// on; the load and the line only break ties. A row without a readable value is rejected.
    #[arg(long, env = "CSV_READER_VERSION_COLUMN")]
    pub version_column: Option<String>,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub summary_json: bool,
    /// How progress is shown.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// How often the checkpoint is saved while reading.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub checkpoint_interval: Duration,
    /// How long to wait for one acknowledgement before publishing again.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ack_timeout: Duration,
    /// A line longer than this without a line break is rejected (row_too_long) and skipped, not
    /// held in memory: it is not a CSV row (fields are at most 1 KiB).
    #[arg(long, default_value_t = DEFAULT_MAX_ROW_BYTES)]
    pub max_row_bytes: u64,
    /// Attempts per message (with exponential backoff, at most 5 s apart) before the run fails.
    #[arg(long, default_value_t = 20, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub publish_attempts: usize,
}

impl ReaderConfig {
    /// Defaults for tests and in-process callers.
    pub fn new(input: impl Into<PathBuf>, nats: NatsArgs) -> Self {
        ReaderConfig {
            input: input.into(),
            nats,
            publish_window: DEFAULT_PUBLISH_WINDOW,
            resume: false,
            force: false,
            reload: false,
            version_column: None,
            summary_json: false,
            progress: ProgressMode::Off,
            checkpoint_interval: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(10),
            publish_attempts: RetryPolicy::default().attempts,
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("input file {path} does not exist")]
    Missing { path: String },
    #[error("cannot read input file {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is a directory, not a CSV file")]
    IsDirectory { path: String },
    #[error("input file {path} is empty: a CSV needs at least a header row")]
    Empty { path: String },
    #[error("{path} is not a CSV file: {reason}")]
    NotCsv { path: String, reason: String },
    #[error("header of {path}: {source}")]
    BadHeader { path: String, source: HeaderError },
    #[error("cannot read {path} at line {line}: {source}")]
    Read {
        path: String,
        line: u64,
        source: csv_async::Error,
    },
    #[error(
        "cannot read {path} at line {line}: {source}. {}",
        stopped_mid_file_advice(path, *acked_line, *checkpoint_saved)
    )]
    StoppedMidFile {
        path: String,
        line: u64,
        source: csv_async::Error,
        /// Every row up to this line is acknowledged by the stream; none after it was sent.
        acked_line: u64,
        checkpoint_saved: bool,
    },
    #[error("--resume needs a file: standard input cannot be resumed")]
    ResumeNeedsFile,
    #[error(
        "{path} changed since its checkpoint at line {line} ({detail}): refusing to resume. \
         Run without --resume to read it from the top, or add --force to continue at line {line} anyway"
    )]
    FileChanged {
        path: String,
        detail: String,
        line: u64,
    },
    #[error(transparent)]
    Namespace(#[from] sync_topology::InvalidNamespace),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{what} does not exist: run `syncctl setup` (with the same --namespace) first")]
    TopologyMissing { what: String },
    #[error("cannot {action} {object}: {message}")]
    JetStream {
        action: &'static str,
        object: String,
        message: String,
    },
    #[error(transparent)]
    Load(#[from] sync_topology::loads::LoadError),
    #[error("cannot {action} checkpoint {key}: {message}")]
    Checkpoint {
        action: &'static str,
        key: String,
        message: String,
    },
    #[error(
        "publishing line {line} to {subject} (message id {message_id}) failed for good: {source}"
    )]
    Publish {
        line: u64,
        subject: String,
        message_id: String,
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("line {line}: value {value:?} cannot be a NATS header")]
    Header { line: u64, value: String },
    #[error("line {line}: cannot encode the message: {source}")]
    Encode {
        line: u64,
        source: serde_json::Error,
    },
    #[error("line {line}: cannot encode the ingest message: {source}")]
    Ingest {
        line: u64,
        source: sync_topology::ingest::EncodeError,
    },
}

impl ReaderError {
    /// 2 for usage and input-file problems the operator fixes in the file or the command line,
    /// 1 for runtime failures (NATS, the topology).
    pub fn exit_code(&self) -> i32 {
        match self {
            ReaderError::Missing { .. }
            | ReaderError::Unreadable { .. }
            | ReaderError::IsDirectory { .. }
            | ReaderError::Empty { .. }
            | ReaderError::NotCsv { .. }
            | ReaderError::BadHeader { .. }
            | ReaderError::Read { .. }
            | ReaderError::StoppedMidFile { .. }
            | ReaderError::ResumeNeedsFile
            | ReaderError::FileChanged { .. }
            | ReaderError::Namespace(_) => 2,
            ReaderError::Connect(_)
            | ReaderError::TopologyMissing { .. }
            | ReaderError::JetStream { .. }
            | ReaderError::Checkpoint { .. }
            | ReaderError::Load(_)
            | ReaderError::Publish { .. }
            | ReaderError::Header { .. }
            | ReaderError::Encode { .. }
            | ReaderError::Ingest { .. } => 1,
        }
    }
}

/// What a run did. Counters are this run's; the checkpoint holds the file's totals.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub file: String,
    pub checkpoint_key: String,
    /// Rows up to this line were acknowledged by an earlier run and not sent again.
    pub resumed_from_line: u64,
    pub rows_skipped: u64,
    /// Rows read and acknowledged in this run: `published + deduplicated + rejected`.
    pub rows_read: u64,
    /// Stored by the stream as new messages.
    pub published: u64,
    /// Dropped by the stream as duplicates of a message it already had (same id and content).
    pub deduplicated: u64,
    pub rejected: u64,
    pub rejected_by_kind: BTreeMap<String, u64>,
    /// Every row starting at or before this line is acknowledged.
    pub acked_line: u64,
    /// The whole file was read and acknowledged.
    pub complete: bool,
    /// Stopped by a shutdown signal: resume with `--resume`.
    pub interrupted: bool,
    pub elapsed_secs: f64,
    pub rows_per_sec: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.complete {
            "complete"
        } else if self.interrupted {
            "interrupted"
        } else {
            "incomplete"
        };
        writeln!(f, "{}: {state}", self.file)?;
        if self.resumed_from_line > 0 {
            writeln!(
                f,
                "  resumed after line {} ({} rows skipped)",
                self.resumed_from_line, self.rows_skipped
            )?;
        }
        writeln!(f, "  rows read:     {}", self.rows_read)?;
        writeln!(f, "  published:     {}", self.published)?;
        writeln!(f, "  deduplicated:  {}", self.deduplicated)?;
        write!(f, "  rejected:      {}", self.rejected)?;
        if !self.rejected_by_kind.is_empty() {
            let kinds: Vec<String> = self
                .rejected_by_kind
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            write!(f, " ({})", kinds.join(", "))?;
        }
        writeln!(f)?;
        write!(
            f,
            "  elapsed:       {:.1} s, {:.0} rows/s",
            self.elapsed_secs, self.rows_per_sec
        )
    }
}

/// Reads the whole input (or until `shutdown`), publishing every row and awaiting every
/// acknowledgement. Returns only once nothing is in flight and the checkpoint is saved.
pub async fn run(
    config: ReaderConfig,
    shutdown: CancellationToken,
) -> Result<Summary, ReaderError> {
    let started = Instant::now();
    let names = Names::new(&config.nats.namespace)?;
    if config.resume && config.input.as_os_str() == "-" {
        return Err(ReaderError::ResumeNeedsFile);
    }
    let opened = input::open(&config.input).await?;
    let identity = opened.identity;
    let shown = config.input.display().to_string();

    let (mut rows, layout) = read_header(opened.reader, config.max_row_bytes, &shown).await?;
    let version_column = version_column(&config, &layout, &shown)?;
    let mut record = ByteRecord::new();

    let client = connect(&config.nats).await?;
    let max_message_bytes = client.server_info().max_payload;
    let js = jetstream::ContextBuilder::new()
        .timeout(config.ack_timeout)
        // Our window bounds what is in flight; the context's own limit must not be the tighter one.
        .max_ack_inflight(config.publish_window.saturating_mul(2).max(16))
        .build(client);
    require_stream(&js, &names.ingest_stream()).await?;
    require_stream(&js, &names.results_stream()).await?;
    let checkpoints = CheckpointStore::open(&js, &names.checkpoints_bucket()).await?;
    let stored = if identity.is_stdin {
        None
    } else {
        checkpoints.load(&identity.key).await?
    };
    let mode = checkpoint::ReadMode {
        resume: config.resume,
        force: config.force,
        reload: config.reload,
    };
    let start = checkpoint::start_point(&identity, stored.as_ref(), mode)?;
    let load = checkpoints.load_for(&identity, &start).await?;
    if start.complete {
        tracing::info!(file = %identity.path, load, "the checkpoint says this file was read completely: nothing to do (--reload reads it again as the newest data)");
    } else if config.resume && start.line > 0 {
        tracing::info!(file = %identity.path, line = start.line, load, "resuming after the checkpointed line");
    }

    let mut context = MessageContext::new(
        &names,
        &identity.path,
        &identity.key,
        load,
        max_message_bytes,
    );
    context.version_column = version_column;
    let retry = RetryPolicy {
        attempts: config.publish_attempts,
        ..RetryPolicy::default()
    };
    let mut tally = Tally::new(start);
    let mut progress = Progress::new(config.progress, identity.size);
    let mut in_flight = FuturesOrdered::new();
    let mut last_save = Instant::now();
    let mut interrupted = false;
    let mut failure: Option<ReaderError> = None;
    let mut stopped: Option<ReadFailure> = None;
    let mut rows_skipped = 0u64;
    let mut rows_sent = 0u64;
    let mut identity = identity;

    'reading: loop {
        if start.complete {
            break;
        }
        let row = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                interrupted = true;
                break 'reading;
            }
            row = rows.next(&mut record) => row,
        };
        let row = match row {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(failure) => {
                stopped = Some(failure);
                break;
            }
        };
        if row.line() <= start.line {
            rows_skipped += 1;
            continue;
        }
        let message = match message_of(&context, &layout, &record, row) {
            Ok(message) => message,
            Err(err) => {
                failure = Some(err);
                break;
            }
        };
        let sent = publish::send(&js, &message).await;
        in_flight.push_back(publish::acknowledged(&js, sent, message, retry));
        rows_sent += 1;
        // A record that held a huge field keeps its buffer; let it go rather than carry it along.
        if record.as_slice().len() > 1024 * 1024 {
            record = ByteRecord::new();
        }

        while in_flight.len() >= config.publish_window {
            match in_flight.next().await {
                Some(done) => {
                    if let Err(err) = tally.settle(done) {
                        failure = Some(err);
                        break 'reading;
                    }
                }
                None => break,
            }
        }
        while let Some(Some(done)) = in_flight.next().now_or_never() {
            if let Err(err) = tally.settle(done) {
                failure = Some(err);
                break 'reading;
            }
        }
        if last_save.elapsed() >= config.checkpoint_interval {
            last_save = Instant::now();
            if identity.is_stdin {
                identity.size = opened.bytes_read.load(Ordering::Relaxed);
            }
            let saved = checkpoints
                .save(
                    &identity.key,
                    &checkpoint::checkpoint(&identity, load, tally.acked_line, tally.total, false),
                )
                .await;
            if let Err(err) = saved {
                tracing::warn!(%err, "checkpoint not saved; will try again");
            }
        }
        if rows_sent.is_multiple_of(1024) {
            progress.update(
                opened.bytes_read.load(Ordering::Relaxed),
                rows_sent,
                tally.run.rejected,
                tally.acked_line,
            );
        }
    }

    // Whatever stopped the reading, what was sent is awaited, so the checkpoint covers it.
    let publishing_failed = matches!(failure, Some(ReaderError::Publish { .. }));
    if !publishing_failed {
        while let Some(done) = in_flight.next().await {
            if let Err(err) = tally.settle(done) {
                failure = Some(err);
                break;
            }
        }
    }
    drop(in_flight);
    progress.finish();
    let complete = failure.is_none() && stopped.is_none() && !interrupted;
    if identity.is_stdin {
        identity.size = opened.bytes_read.load(Ordering::Relaxed);
    }
    let final_checkpoint =
        checkpoint::checkpoint(&identity, load, tally.acked_line, tally.total, complete);
    let saved = checkpoints.save(&identity.key, &final_checkpoint).await;
    if let Some(err) = failure {
        if let Err(save_err) = saved {
            tracing::warn!(%save_err, "final checkpoint not saved either");
        }
        return Err(err);
    }
    if let Some(stopped) = stopped {
        return Err(stopped_mid_file(&shown, stopped, tally.acked_line, saved));
    }
    saved?;

    let elapsed = started.elapsed().as_secs_f64();
    Ok(Summary {
        file: identity.path.clone(),
        checkpoint_key: identity.key.clone(),
        resumed_from_line: start.line,
        rows_skipped,
        rows_read: tally.run.rows_read,
        published: tally.run.published,
        deduplicated: tally.run.deduplicated,
        rejected: tally.run.rejected,
        rejected_by_kind: tally.rejected_by_kind,
        acked_line: tally.acked_line,
        complete,
        interrupted,
        elapsed_secs: elapsed,
        rows_per_sec: tally.run.rows_read as f64 / elapsed.max(0.001),
    })
}

/// Reads the header, which decides whether this is a customer file at all, before anything is
/// published.
async fn read_header(
    input: InputReader,
    max_row_bytes: u64,
    shown: &str,
) -> Result<(RowReader<InputReader>, ColumnLayout), ReaderError> {
    let unreadable = |failure: ReadFailure| ReaderError::Read {
        path: shown.to_owned(),
        line: failure.line,
        source: failure.source,
    };
    let mut rows = RowReader::new(input, max_row_bytes);
    let mut record = ByteRecord::new();
    if !rows.read_header(&mut record).await.map_err(unreadable)? {
        return Err(ReaderError::Empty {
            path: shown.to_owned(),
        });
    }
    let layout = ColumnLayout::from_header(record.iter()).map_err(|source| match source {
        HeaderError::NotUtf8 => ReaderError::NotCsv {
            path: shown.to_owned(),
            reason: "its first row is not UTF-8 text".to_owned(),
        },
        source => ReaderError::BadHeader {
            path: shown.to_owned(),
            source,
        },
    })?;
    rows.expect_width(layout.width()).map_err(unreadable)?;
    Ok((rows, layout))
}

/// Where the `--version-column` sits; a column missing from the header is a file-level problem.
fn version_column(
    config: &ReaderConfig,
    layout: &ColumnLayout,
    shown: &str,
) -> Result<Option<usize>, ReaderError> {
    let Some(name) = &config.version_column else {
        return Ok(None);
    };
    layout
        .column_index(name)
        .map(Some)
        .ok_or_else(|| ReaderError::BadHeader {
            path: shown.to_owned(),
            source: HeaderError::MissingColumns {
                missing: format!("{name} (named by --version-column)"),
                found: layout.column_names().join(", "),
            },
        })
}

/// The message of what the reader found: a row's customer or rejection, or a line it rejected.
fn message_of(
    context: &MessageContext,
    layout: &ColumnLayout,
    record: &ByteRecord,
    row: Row,
) -> Result<OutgoingMessage, ReaderError> {
    match row {
        Row::Fields { line } => message::row_message(context, layout, record.iter(), line),
        Row::Rejected {
            line,
            rejection,
            raw,
        } => message::rejected_message(context, &rejection, raw, line),
    }
}

/// The error of a file that could not be read to its end, once the rows before the failure are
/// acknowledged and the checkpoint is saved (or not).
fn stopped_mid_file(
    shown: &str,
    stopped: ReadFailure,
    acked_line: u64,
    saved: Result<(), ReaderError>,
) -> ReaderError {
    if let Err(err) = &saved {
        tracing::warn!(%err, "final checkpoint not saved");
    }
    ReaderError::StoppedMidFile {
        path: shown.to_owned(),
        line: stopped.line,
        source: stopped.source,
        acked_line,
        checkpoint_saved: saved.is_ok(),
    }
}

/// What a file that stopped mid-way left behind, and how to finish it.
fn stopped_mid_file_advice(path: &str, acked_line: u64, checkpoint_saved: bool) -> String {
    let published = if acked_line <= 1 {
        "No row was sent.".to_owned()
    } else {
        format!(
            "Every row up to line {acked_line} was published (or rejected){}; nothing after it \
             was sent.",
            if checkpoint_saved {
                " and is checkpointed"
            } else {
                " but the final checkpoint could not be saved (a resumed run starts at the last \
                 saved one and sends the rows after it again, which the stream drops as duplicates)"
            }
        )
    };
    let resume = if path == "-" {
        "Standard input cannot be resumed: fix the input and read all of it again.".to_owned()
    } else {
        format!(
            "Fix or replace the file, then run `csv-reader --resume --force {path}` (same \
             --namespace) to read on after line {acked_line}; --force accepts the changed file, \
             which must hold the same rows up to that line (without --force an unchanged file \
             resumes too)."
        )
    };
    format!("{published} {resume}")
}

/// Counts acknowledgements, which arrive in file order, so the checkpoint line only ever covers a
/// prefix of the file that is entirely acknowledged.
struct Tally {
    acked_line: u64,
    total: Counters,
    run: Counters,
    rejected_by_kind: BTreeMap<String, u64>,
}

impl Tally {
    fn new(start: StartPoint) -> Self {
        Tally {
            acked_line: start.line,
            total: start.counters,
            run: Counters::default(),
            rejected_by_kind: BTreeMap::new(),
        }
    }

    fn settle(&mut self, done: Result<Acknowledged, ReaderError>) -> Result<(), ReaderError> {
        let done = done?;
        for counters in [&mut self.total, &mut self.run] {
            counters.rows_read += 1;
            match done.kind {
                MessageKind::Customer if done.duplicate => counters.deduplicated += 1,
                MessageKind::Customer => counters.published += 1,
                MessageKind::Rejected(_) => counters.rejected += 1,
            }
        }
        if let MessageKind::Rejected(kind) = done.kind {
            *self.rejected_by_kind.entry(kind.to_owned()).or_default() += 1;
        }
        self.acked_line = done.line;
        Ok(())
    }
}

/// Connects, retrying a few times: the reader is often started right beside a NATS that is still
/// coming up.
async fn connect(nats: &NatsArgs) -> Result<async_nats::Client, ReaderError> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(4))
        .with_max_times(3);
    let client = (|| nats.connect("csv-reader"))
        .retry(backoff)
        .when(|err| matches!(err, ConnectError::Connect { .. }))
        .notify(|err, delay| tracing::warn!(%err, ?delay, "NATS not reachable yet; retrying"))
        .await?;
    Ok(client)
}

async fn require_stream(js: &jetstream::Context, stream: &str) -> Result<(), ReaderError> {
    match js.get_stream_no_info(stream).await {
        Ok(_) => Ok(()),
        Err(err)
            if matches!(err.kind(), GetStreamErrorKind::JetStream(ref e)
                if e.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            Err(ReaderError::TopologyMissing {
                what: format!("stream {stream}"),
            })
        }
        Err(err) => Err(ReaderError::JetStream {
            action: "look up",
            object: format!("stream {stream}"),
            message: err.to_string(),
        }),
    }
}

/// The summary line that tells an operator how to continue an interrupted run.
pub fn resume_hint(config: &ReaderConfig, summary: &Summary) -> String {
    format!(
        "stopped after line {}: run `csv-reader --resume {}` (same --namespace) to continue",
        summary.acked_line,
        config.input.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_stopped_mid_way_says_what_was_published_and_how_to_go_on() {
        let err = ReaderError::StoppedMidFile {
            path: "in.csv.gz".to_owned(),
            line: 1201,
            source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
            acked_line: 1200,
            checkpoint_saved: true,
        };
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(
            text.starts_with("cannot read in.csv.gz at line 1201: "),
            "{text}"
        );
        assert!(text.contains("Every row up to line 1200 was published (or rejected) and is checkpointed; nothing after it was sent."), "{text}");
        assert!(
            text.contains("`csv-reader --resume --force in.csv.gz`"),
            "{text}"
        );

        let unsaved = stopped_mid_file_advice("in.csv", 1200, false);
        assert!(unsaved.contains("could not be saved"), "{unsaved}");
        assert!(stopped_mid_file_advice("-", 1200, true).contains("cannot be resumed"));
        assert!(stopped_mid_file_advice("in.csv", 0, true).starts_with("No row was sent."));
    }
}
