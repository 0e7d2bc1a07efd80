//! csv-reader: streams a customer CSV of any size into JetStream, one message per valid row with a
//! dedup id, bad rows to the rejected subject, acknowledgements pipelined in a bounded window, and a
//! checkpoint of the line up to which every row is acknowledged so a killed run can be resumed.

pub mod checkpoint;
pub mod config;
pub mod guard;
pub mod input;
pub mod message;
pub mod progress;
pub mod publish;
mod reading;
pub mod rows;

use std::collections::BTreeMap;
use std::time::Instant;

use async_nats::jetstream::{self, ErrorCode, context::GetStreamErrorKind};
use csv_async::ByteRecord;
use customer_record::{ColumnLayout, HeaderError};
use serde::Serialize;
use sync_topology::{ConnectError, Names};
use tokio_util::sync::CancellationToken;

pub use crate::config::{
    Args, DEFAULT_MAX_ROW_BYTES, DEFAULT_PUBLISH_WINDOW, ReaderConfig, Settings,
};
pub use crate::rows::{ReadFailure, Row, RowReader};

use crate::checkpoint::{Counters, StartPoint};
use crate::input::InputReader;
use crate::message::{MessageContext, MessageKind, OutgoingMessage};
use crate::publish::Acknowledged;

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
    #[error(
        "{path}: {rejected} of the {rows} rows read up to line {line} are bad ({:.1}%), more than \
         --max-reject-rate {max} allows: stopped before publishing more. {}",
        100.0 * *rejected as f64 / (*rows).max(1) as f64,
        too_many_rejected_advice(path, *resumed_from, *acked_line, *checkpoint_saved, *max)
    )]
    TooManyRejected {
        path: String,
        line: u64,
        rows: u64,
        rejected: u64,
        max: f64,
        /// This run started after this line.
        resumed_from: u64,
        /// Every row up to this line is acknowledged by the stream; none after it was sent.
        acked_line: u64,
        checkpoint_saved: bool,
    },
    #[error("stopped while waiting for NATS at start-up: nothing was read")]
    StoppedWhileWaiting,
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
            | ReaderError::TooManyRejected { .. }
            | ReaderError::Namespace(_) => 2,
            ReaderError::StoppedWhileWaiting => 130,
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
    /// `--dry-run`: the counts say what a run would publish and reject; nothing was published.
    pub dry_run: bool,
}

impl Summary {
    /// The share of this run's rows that were bad (0 when none was read).
    pub fn reject_share(&self) -> f64 {
        self.rejected as f64 / self.rows_read.max(1) as f64
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.dry_run && self.complete {
            "dry run, nothing published"
        } else if self.complete {
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
        if self.dry_run {
            writeln!(f, "  would publish: {}", self.published)?;
        } else {
            writeln!(f, "  published:     {}", self.published)?;
        }
        if !self.dry_run {
            writeln!(f, "  deduplicated:  {}", self.deduplicated)?;
        }
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
    let settings = &config.settings;
    if settings.resume && config.input.as_os_str() == "-" {
        return Err(ReaderError::ResumeNeedsFile);
    }
    let opened = input::open(&config.input).await?;
    let shown = config.input.display().to_string();
    let (rows, layout) = read_header(opened.reader, settings.max_row_bytes, &shown).await?;
    let version_column = version_column(settings, &layout, &shown)?;
    if settings.dry_run {
        let mut context = MessageContext::new(
            &names,
            &opened.identity.path,
            &opened.identity.key,
            chrono::Utc::now().timestamp_millis().unsigned_abs(),
            DRY_RUN_MAX_PAYLOAD,
        );
        context.version_column = version_column;
        return dry_run(&context, &layout, rows, &shown, started, shutdown).await;
    }
    let input = reading::Input {
        rows,
        layout,
        identity: opened.identity,
        bytes_read: opened.bytes_read,
        shown,
        version_column,
    };
    reading::publish_file(&config, &names, input, started, shutdown).await
}

/// `--dry-run` sizes rows against NATS's default `max_payload` (1 MiB), there being no server to
/// ask: a row over it would be rejected as `record_too_large` by a real run against such a server.
pub const DRY_RUN_MAX_PAYLOAD: usize = 1024 * 1024;

/// Reads the whole file as a run would, counting what it would publish and reject, publishing
/// nothing.
async fn dry_run(
    context: &MessageContext,
    layout: &ColumnLayout,
    mut rows: RowReader<InputReader>,
    shown: &str,
    started: Instant,
    shutdown: CancellationToken,
) -> Result<Summary, ReaderError> {
    let mut record = ByteRecord::new();
    let mut tally = Tally::new(StartPoint::default());
    let mut interrupted = false;
    loop {
        let row = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                interrupted = true;
                break;
            }
            row = rows.next(&mut record) => row,
        };
        let row = match row {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(failure) => {
                return Err(ReaderError::Read {
                    path: shown.to_owned(),
                    line: failure.line,
                    source: failure.source,
                });
            }
        };
        let message = message_of(context, layout, &record, row)?;
        tally.settle(Ok(Acknowledged {
            line: message.line,
            kind: message.kind,
            duplicate: false,
        }))?;
    }
    Ok(Summary {
        complete: !interrupted,
        interrupted,
        dry_run: true,
        ..tally.into_summary(
            context.source_file.clone(),
            context.file_key.clone(),
            started,
        )
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
    config: &Settings,
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
pub(crate) fn message_of(
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
pub(crate) fn stopped_mid_file(
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

/// What a file stopped for its share of bad rows left behind, and how to go on.
fn too_many_rejected_advice(
    path: &str,
    resumed_from: u64,
    acked_line: u64,
    checkpoint_saved: bool,
    max: f64,
) -> String {
    if acked_line <= resumed_from {
        return format!(
            "Nothing of it was published. Fix the file and read it again, or accept its bad \
             rows with a higher --max-reject-rate (now {max})."
        );
    }
    let saved = if checkpoint_saved {
        "and checkpointed"
    } else {
        "(the final checkpoint could not be saved: a resumed run sends some of them again, which \
         the stream drops as duplicates)"
    };
    if path == "-" {
        return format!(
            "Every row up to line {acked_line} was published (or rejected) {saved}; nothing after \
             it was sent. Standard input cannot be resumed: fix the input and read all of it again."
        );
    }
    format!(
        "Every row up to line {acked_line} was published (or rejected) {saved}; nothing after it \
         was sent. Fix the rest of the file, then run `csv-reader --resume --force {path}` (same \
         --namespace) to read on after line {acked_line}, or `csv-reader --resume {path} \
         --max-reject-rate <higher>` to accept the rest as it is."
    )
}

/// Counts acknowledgements, which arrive in file order, so the checkpoint line only ever covers a
/// prefix of the file that is entirely acknowledged.
pub(crate) struct Tally {
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

    /// The summary of a run that counted this, as of now; the caller says how it ended.
    fn into_summary(self, file: String, checkpoint_key: String, started: Instant) -> Summary {
        let elapsed = started.elapsed().as_secs_f64();
        Summary {
            file,
            checkpoint_key,
            resumed_from_line: 0,
            rows_skipped: 0,
            rows_read: self.run.rows_read,
            published: self.run.published,
            deduplicated: self.run.deduplicated,
            rejected: self.run.rejected,
            rejected_by_kind: self.rejected_by_kind,
            acked_line: self.acked_line,
            complete: false,
            interrupted: false,
            elapsed_secs: elapsed,
            rows_per_sec: self.run.rows_read as f64 / elapsed.max(0.001),
            dry_run: false,
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

pub(crate) async fn require_stream(
    js: &jetstream::Context,
    stream: &str,
) -> Result<(), ReaderError> {
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
