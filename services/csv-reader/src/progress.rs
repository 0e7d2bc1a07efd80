//! Progress for the operator: a bar on a terminal, periodic log lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    Bar,
    Log,
    Off,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    log: bool,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// `total_bytes` is the file's size, 0 when unknown (standard input).
    pub fn new(mode: ProgressMode, total_bytes: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar =
            matches!(mode, ProgressMode::Bar) || (matches!(mode, ProgressMode::Auto) && terminal);
        let log =
            matches!(mode, ProgressMode::Log) || (matches!(mode, ProgressMode::Auto) && !terminal);
        let bar = bar.then(|| {
            let bar = if total_bytes > 0 {
                ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr())
            } else {
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            };
            let template = if total_bytes > 0 {
                "{elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {msg}"
            } else {
                "{elapsed_precise} {spinner} {binary_bytes} {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            log,
            started: now,
            last_log: now,
        }
    }

    pub fn update(&mut self, bytes: u64, rows: u64, rejected: u64, acked_line: u64) {
        let rate = rows as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
            bar.set_message(format!(
                "{rows} rows, {rate:.0} rows/s, {rejected} rejected"
            ));
        }
        if self.log && self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            tracing::info!(
                rows,
                bytes,
                rejected,
                acked_line,
                rows_per_sec = rate.round(),
                "progress"
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
