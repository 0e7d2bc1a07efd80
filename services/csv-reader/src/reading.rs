//! A publishing run over a file whose header was read: where to start (the checkpoint), reading
//! and publishing its rows in a bounded window of acknowledgements, saving the checkpoint as it
//! goes and at the end, and the summary or the error that says how it ended.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use csv_async::ByteRecord;
use customer_record::ColumnLayout;
use futures::{FutureExt as _, StreamExt as _, stream::FuturesOrdered};
use sync_topology::Names;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, CheckpointStore, StartPoint};
use crate::guard::{RejectGuard, Verdict};
use crate::input::{FileIdentity, InputReader};
use crate::message::{MessageContext, MessageKind, OutgoingMessage};
use crate::progress::Progress;
use crate::publish::{self, Acknowledged, RetryPolicy};
use crate::{
    ReadFailure, ReaderConfig, ReaderError, Row, RowReader, Summary, Tally, message_of,
    require_stream, stopped_mid_file,
};

/// An opened input whose header was read.
pub(crate) struct Input {
    pub rows: RowReader<InputReader>,
    pub layout: ColumnLayout,
    pub identity: FileIdentity,
    /// Bytes taken from the input so far, for progress and the size of standard input.
    pub bytes_read: Arc<AtomicU64>,
    /// The input as the operator named it.
    pub shown: String,
    pub version_column: Option<usize>,
}

/// Publishes every row of `input` after its checkpoint; see [`crate::run`].
pub(crate) async fn publish_file(
    config: &ReaderConfig,
    names: &Names,
    input: Input,
    started: Instant,
    shutdown: CancellationToken,
) -> Result<Summary, ReaderError> {
    let (js, checkpoints, max_message_bytes) = connect(config, names, &shutdown).await?;
    let (start, load) = start_point(config, &checkpoints, &input.identity).await?;
    let mut context = MessageContext::new(
        names,
        &input.identity.path,
        &input.identity.key,
        load,
        max_message_bytes,
    );
    context.version_column = input.version_column;
    let settings = &config.settings;
    let mut reading = Reading {
        guard: settings.max_reject_rate.map(RejectGuard::new),
        progress: Progress::new(settings.progress, input.identity.size),
        checkpoint_interval: settings.checkpoint_interval,
        last_save: Instant::now(),
        held: Vec::new(),
        last_line: start.line,
        rows_skipped: 0,
        record: ByteRecord::new(),
        input,
        context,
        checkpoints,
        start,
        load,
    };
    let retry = RetryPolicy {
        attempts: settings.publish_attempts,
        ..RetryPolicy::default()
    };
    let tally = Tally::new(start);
    let (ending, tally) = read_and_publish(
        &mut reading,
        &js,
        retry,
        settings.publish_window,
        tally,
        &shutdown,
    )
    .await;
    reading.finish(ending, tally, started).await
}

/// Connects (waiting for NATS at start-up) and checks the layout is there: the JetStream context,
/// the checkpoints, and the largest message the server takes.
async fn connect(
    config: &ReaderConfig,
    names: &Names,
    shutdown: &CancellationToken,
) -> Result<(jetstream::Context, CheckpointStore, usize), ReaderError> {
    let client = service_kit::connect_nats(&config.nats, "csv-reader", shutdown)
        .await?
        .ok_or(ReaderError::StoppedWhileWaiting)?;
    let max_message_bytes = client.server_info().max_payload;
    let window = config.settings.publish_window;
    let js = jetstream::ContextBuilder::new()
        .timeout(config.settings.ack_timeout)
        // Our window bounds what is in flight; the context's own limit must not be the tighter one.
        .max_ack_inflight(window.saturating_mul(2).max(16))
        .build(client);
    require_stream(&js, &names.ingest_stream()).await?;
    require_stream(&js, &names.results_stream()).await?;
    let checkpoints = CheckpointStore::open(&js, &names.checkpoints_bucket()).await?;
    Ok((js, checkpoints, max_message_bytes))
}

/// Where this run starts, from the file's checkpoint and the flags, and under which load.
async fn start_point(
    config: &ReaderConfig,
    checkpoints: &CheckpointStore,
    identity: &FileIdentity,
) -> Result<(StartPoint, u64), ReaderError> {
    let stored = if identity.is_stdin {
        None
    } else {
        checkpoints.load(&identity.key).await?
    };
    let mode = checkpoint::ReadMode {
        resume: config.settings.resume,
        force: config.settings.force,
        reload: config.settings.reload,
    };
    let start = checkpoint::start_point(identity, stored.as_ref(), mode)?;
    let load = checkpoints.load_for(identity, &start).await?;
    if start.complete {
        tracing::info!(file = %identity.path, load, "the checkpoint says this file was read completely: nothing to do (--reload reads it again as the newest data)");
    } else if config.settings.resume && start.line > 0 {
        tracing::info!(file = %identity.path, line = start.line, load, "resuming after the checkpointed line");
    }
    Ok((start, load))
}

/// Reads rows after the start point and publishes them, at most `window_size` unacknowledged, until the input ends or
/// fails, its share of bad rows is too high, or `shutdown`; then awaits what was sent (unless
/// publishing itself failed), so the checkpoint covers it.
async fn read_and_publish(
    reading: &mut Reading,
    js: &jetstream::Context,
    retry: RetryPolicy,
    window_size: usize,
    tally: Tally,
    shutdown: &CancellationToken,
) -> (Ending, Tally) {
    let mut ending = Ending::default();
    let mut window = Window::new(window_size, tally);
    'reading: while !reading.start.complete {
        let row = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                ending.interrupted = true;
                break 'reading;
            }
            row = reading.input.rows.next(&mut reading.record) => row,
        };
        let (row, at_end) = match row {
            Ok(Some(row)) => (Some(row), false),
            Ok(None) => (None, true),
            Err(failure) => {
                ending.stopped = Some(failure);
                (None, true)
            }
        };
        let verdict = match reading.take(row) {
            Ok(Some(verdict)) => verdict,
            Ok(None) => continue,
            Err(err) => {
                ending.failure = Some(err);
                break;
            }
        };
        match verdict {
            Verdict::Hold => continue,
            Verdict::TooMany => {
                ending.too_many_at = Some(reading.last_line);
                break;
            }
            Verdict::Publish => {}
        }
        for message in reading.held.drain(..) {
            let sent = publish::send(js, &message).await;
            if let Err(err) = window
                .push(publish::acknowledged(js, sent, message, retry))
                .await
            {
                ending.failure = Some(err);
                break 'reading;
            }
        }
        if at_end {
            break;
        }
        reading.save_checkpoint_in_time(&window.tally).await;
        reading.show_progress(window.sent, &window.tally);
    }
    if !matches!(ending.failure, Some(ReaderError::Publish { .. }))
        && let Err(err) = window.drain().await
    {
        ending.failure = Some(err);
    }
    (ending, window.tally)
}

/// Why the reading stopped; all false and None: the input was read to its end.
#[derive(Default)]
struct Ending {
    /// Stopped by a shutdown signal.
    interrupted: bool,
    failure: Option<ReaderError>,
    /// The input could not be read on (the row counts up to there stand).
    stopped: Option<ReadFailure>,
    /// The share of bad rows was too high at this line.
    too_many_at: Option<u64>,
}

impl Ending {
    fn complete(&self) -> bool {
        self.failure.is_none()
            && self.stopped.is_none()
            && self.too_many_at.is_none()
            && !self.interrupted
    }
}

/// The rows read and held back, the checkpoint and the progress of one run.
struct Reading {
    input: Input,
    /// The fields of the row just read.
    record: ByteRecord,
    context: MessageContext,
    checkpoints: CheckpointStore,
    start: StartPoint,
    load: u64,
    guard: Option<RejectGuard>,
    /// Rows read and not yet published: with --max-reject-rate, the first ones until their share
    /// of bad rows can be judged; otherwise only the row just read.
    held: Vec<OutgoingMessage>,
    last_line: u64,
    rows_skipped: u64,
    progress: Progress,
    checkpoint_interval: Duration,
    last_save: Instant,
}

impl Reading {
    /// Takes the row just read (None: the input ended) into `held`. What to do with what is held,
    /// or None for a row at or before the start point, which is skipped.
    fn take(&mut self, row: Option<Row>) -> Result<Option<Verdict>, ReaderError> {
        let Some(row) = row else {
            return Ok(Some(match &self.guard {
                // The file ended before enough rows to judge: the whole of it is the sample.
                Some(guard) if !self.held.is_empty() => guard.judge(),
                _ => Verdict::Publish,
            }));
        };
        if row.line() <= self.start.line {
            self.rows_skipped += 1;
            return Ok(None);
        }
        let message = message_of(&self.context, &self.input.layout, &self.record, row)?;
        // A record that held a huge field keeps its buffer; let it go rather than carry it along.
        if self.record.as_slice().len() > 1024 * 1024 {
            self.record = ByteRecord::new();
        }
        self.last_line = message.line;
        let mut verdict = Verdict::Publish;
        if let Some(guard) = &mut self.guard {
            verdict = guard.observe(matches!(message.kind, MessageKind::Rejected(_)));
        }
        self.held.push(message);
        Ok(Some(verdict))
    }

    /// Standard input has no size but what was read of it.
    fn measure_stdin(&mut self) {
        if self.input.identity.is_stdin {
            self.input.identity.size = self.input.bytes_read.load(Ordering::Relaxed);
        }
    }

    /// Saves the checkpoint when the interval since the last save has passed; a failed save is
    /// tried again at the next interval.
    async fn save_checkpoint_in_time(&mut self, tally: &Tally) {
        if self.last_save.elapsed() < self.checkpoint_interval {
            return;
        }
        self.last_save = Instant::now();
        self.measure_stdin();
        let identity = &self.input.identity;
        let current =
            checkpoint::checkpoint(identity, self.load, tally.acked_line, tally.total, false);
        if let Err(err) = self.checkpoints.save(&identity.key, &current).await {
            tracing::warn!(%err, "checkpoint not saved; will try again");
        }
    }

    fn show_progress(&mut self, rows_sent: u64, tally: &Tally) {
        if rows_sent.is_multiple_of(1024) {
            self.progress.update(
                self.input.bytes_read.load(Ordering::Relaxed),
                rows_sent,
                tally.run.rejected,
                tally.acked_line,
            );
        }
    }

    /// Saves the final checkpoint; the summary, or the error that ended the run.
    async fn finish(
        mut self,
        ending: Ending,
        tally: Tally,
        started: Instant,
    ) -> Result<Summary, ReaderError> {
        self.progress.finish();
        let complete = ending.complete();
        self.measure_stdin();
        let identity = &self.input.identity;
        let last =
            checkpoint::checkpoint(identity, self.load, tally.acked_line, tally.total, complete);
        let saved = self.checkpoints.save(&identity.key, &last).await;
        if let Some(err) = ending.failure {
            if let Err(save_err) = saved {
                tracing::warn!(%save_err, "final checkpoint not saved either");
            }
            return Err(err);
        }
        if let (Some(line), Some(guard)) = (ending.too_many_at, &self.guard) {
            if let Err(err) = &saved {
                tracing::warn!(%err, "final checkpoint not saved");
            }
            return Err(ReaderError::TooManyRejected {
                path: self.input.shown,
                line,
                rows: guard.rows(),
                rejected: guard.rejected(),
                max: guard.max(),
                resumed_from: self.start.line,
                acked_line: tally.acked_line,
                checkpoint_saved: saved.is_ok(),
            });
        }
        if let Some(stopped) = ending.stopped {
            return Err(stopped_mid_file(
                &self.input.shown,
                stopped,
                tally.acked_line,
                saved,
            ));
        }
        saved?;
        Ok(Summary {
            resumed_from_line: self.start.line,
            rows_skipped: self.rows_skipped,
            complete,
            interrupted: ending.interrupted,
            ..tally.into_summary(identity.path.clone(), identity.key.clone(), started)
        })
    }
}

/// Publishes awaiting their acknowledgement, at most `size` at once, and the count of what was
/// acknowledged, in file order.
struct Window<F: Future> {
    in_flight: FuturesOrdered<F>,
    size: usize,
    tally: Tally,
    /// Messages sent in this run.
    sent: u64,
}

impl<F: Future<Output = Result<Acknowledged, ReaderError>>> Window<F> {
    fn new(size: usize, tally: Tally) -> Self {
        Window {
            in_flight: FuturesOrdered::new(),
            size,
            tally,
            sent: 0,
        }
    }

    /// Adds the acknowledgement of a message just sent; while the window is full waits for the
    /// oldest, then counts whatever else is already acknowledged.
    async fn push(&mut self, acknowledged: F) -> Result<(), ReaderError> {
        self.in_flight.push_back(acknowledged);
        self.sent += 1;
        while self.in_flight.len() >= self.size {
            match self.in_flight.next().await {
                Some(done) => self.tally.settle(done)?,
                None => break,
            }
        }
        while let Some(Some(done)) = self.in_flight.next().now_or_never() {
            self.tally.settle(done)?;
        }
        Ok(())
    }

    /// Awaits every acknowledgement still outstanding; stops at the first failure.
    async fn drain(&mut self) -> Result<(), ReaderError> {
        while let Some(done) = self.in_flight.next().await {
            self.tally.settle(done)?;
        }
        Ok(())
    }
}
