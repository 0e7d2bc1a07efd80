//! What a run is told: the typed [`ReaderConfig`] the library runs with, its [`Settings`] (whose
//! `Default` is the one place a default is written), and the command line ([`Args`]) that converts
//! into it, taking its defaults from there.

use std::path::PathBuf;
use std::time::Duration;

use service_kit::NatsArgs;

use crate::guard;
use crate::progress::ProgressMode;
use crate::publish::RetryPolicy;

/// Chosen by benchmark (BENCHMARKS.md): beyond it the rate no longer rises on a local server,
/// and the window's memory (a few hundred bytes per message) stays far below the RSS target.
pub const DEFAULT_PUBLISH_WINDOW: usize = 1024;

/// Far above any real line (fields are at most 1 KiB), far below the memory target.
pub const DEFAULT_MAX_ROW_BYTES: u64 = 16 * 1024 * 1024;

/// Everything a run needs: which file, which NATS, and how.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// The CSV file to read (`.gz` is decompressed); `-` reads standard input.
    pub input: PathBuf,
    pub nats: NatsArgs,
    pub settings: Settings,
}

impl ReaderConfig {
    /// Reads `input` from `nats` with the default settings.
    pub fn new(input: impl Into<PathBuf>, nats: NatsArgs) -> Self {
        ReaderConfig {
            input: input.into(),
            nats,
            settings: Settings::default(),
        }
    }
}

/// How a run reads and publishes; see [`Args`] for what each one means.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub publish_window: usize,
    pub resume: bool,
    pub force: bool,
    pub reload: bool,
    pub version_column: Option<String>,
    pub summary_json: bool,
    pub progress: ProgressMode,
    pub checkpoint_interval: Duration,
    pub ack_timeout: Duration,
    pub max_row_bytes: u64,
    pub publish_attempts: usize,
    pub dry_run: bool,
    pub max_reject_rate: Option<f64>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            publish_window: DEFAULT_PUBLISH_WINDOW,
            resume: false,
            force: false,
            reload: false,
            version_column: None,
            summary_json: false,
            progress: ProgressMode::Auto,
            checkpoint_interval: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(10),
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
            publish_attempts: RetryPolicy::default().attempts,
            dry_run: false,
            max_reject_rate: None,
        }
    }
}

/// The command line and environment of `csv-reader`; every default comes from [`Settings`].
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The CSV file to read (`.gz` is decompressed); `-` reads standard input.
    pub input: PathBuf,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Publishes awaiting their acknowledgement at once.
    #[arg(long, env = "CSV_READER_PUBLISH_WINDOW",
          default_value_t = Settings::default().publish_window,
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
    #[arg(long, value_enum, default_value_t = Settings::default().progress)]
    pub progress: ProgressMode,
    /// How often the checkpoint is saved while reading.
    #[arg(long, default_value_t = Settings::default().checkpoint_interval.into())]
    pub checkpoint_interval: humantime::Duration,
    /// How long to wait for one acknowledgement before publishing again.
    #[arg(long, default_value_t = Settings::default().ack_timeout.into())]
    pub ack_timeout: humantime::Duration,
    /// A line longer than this without a line break is rejected (row_too_long) and skipped, not
    /// held in memory: it is not a CSV row (fields are at most 1 KiB).
    #[arg(long, default_value_t = Settings::default().max_row_bytes)]
    pub max_row_bytes: u64,
    /// Attempts per message (with exponential backoff, at most 5 s apart) before the run fails.
    #[arg(long, default_value_t = Settings::default().publish_attempts,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub publish_attempts: usize,
    /// Parse and validate the whole file and print what a run would publish and reject, by kind,
    /// without publishing anything: needs no NATS.
    #[arg(long, env = "CSV_READER_DRY_RUN")]
    pub dry_run: bool,
    /// Stop the file, before publishing more of it, once the share of its bad rows is above this
    /// (from 0 to 1), judged from the first 1,000 rows (or the whole file if shorter, held back
    /// until then) and at every row after them. Exit code 2; rows published so far stay
    /// published and checkpointed.
    #[arg(long, env = "CSV_READER_MAX_REJECT_RATE", value_parser = guard::parse_share)]
    pub max_reject_rate: Option<f64>,
}

impl From<Args> for ReaderConfig {
    fn from(args: Args) -> Self {
        ReaderConfig {
            input: args.input,
            nats: args.nats,
            settings: Settings {
                publish_window: args.publish_window,
                resume: args.resume,
                force: args.force,
                reload: args.reload,
                version_column: args.version_column,
                summary_json: args.summary_json,
                progress: args.progress,
                checkpoint_interval: args.checkpoint_interval.into(),
                ack_timeout: args.ack_timeout.into(),
                max_row_bytes: args.max_row_bytes,
                publish_attempts: args.publish_attempts,
                dry_run: args.dry_run,
                max_reject_rate: args.max_reject_rate,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_command_line_defaults_are_the_settings_defaults() {
        let cli = Cli::try_parse_from(["csv-reader", "in.csv"]).expect("parses");
        let config = ReaderConfig::from(cli.args);
        assert_eq!(config.settings, Settings::default());
    }

    #[test]
    fn durations_are_humantime() {
        let cli = Cli::try_parse_from([
            "csv-reader",
            "--checkpoint-interval",
            "500ms",
            "--ack-timeout",
            "1m",
            "in.csv",
        ])
        .expect("parses");
        let config = ReaderConfig::from(cli.args);
        assert_eq!(
            config.settings.checkpoint_interval,
            Duration::from_millis(500)
        );
        assert_eq!(config.settings.ack_timeout, Duration::from_secs(60));
    }
}
