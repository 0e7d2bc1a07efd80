//! `csv-reader [OPTIONS] <FILE>`: parses the command line and runs the reader (see the library).

use std::process::ExitCode;

use clap::Parser;
use csv_reader::{Args, ReaderConfig, resume_hint, run};

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streams a customer CSV into JetStream: one message per valid row, bad rows reported, resumable.
///
/// Exit codes: 0 every row acknowledged; 1 runtime failure (NATS, missing streams); 2 usage or
/// input-file problem (or more bad rows than --max-reject-rate allows); 130 interrupted by
/// SIGINT/SIGTERM after saving the checkpoint.
#[derive(Debug, Parser)]
#[command(name = "csv-reader", version)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

/// Conventional code of a run stopped by a signal: it did not finish the file.
const EXIT_INTERRUPTED: u8 = 130;

const PROGRAM: &str = "csv-reader";

// One thread: the work per row is small, and a second worker thread mostly adds cross-thread
// wake-ups per acknowledgement; on a shared machine the freed core goes to nats-server
// (BENCHMARKS.md: about 1.5x the rows/s of the multi-threaded runtime).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli: Cli = service_kit::parse_args(PROGRAM);
    service_kit::init_telemetry();
    let config = ReaderConfig::from(cli.args);
    let shutdown = service_kit::shutdown_on_signals();
    match run(config.clone(), shutdown).await {
        Ok(summary) => {
            if config.settings.summary_json {
                match serde_json::to_string_pretty(&summary) {
                    Ok(json) => println!("{json}"),
                    Err(err) => eprintln!("cannot encode the summary as JSON: {err}"),
                }
            } else {
                println!("{summary}");
            }
            if let Some(max) = config.settings.max_reject_rate
                && summary.dry_run
                && csv_reader::guard::exceeds(summary.rejected, summary.rows_read, max)
            {
                let verdict = std::io::Error::other(format!(
                    "{}: {} of its {} rows are bad ({:.1}%), more than --max-reject-rate {max} \
                     allows: a run would stop before publishing all of it; fix the file first",
                    summary.file,
                    summary.rejected,
                    summary.rows_read,
                    100.0 * summary.reject_share()
                ));
                return service_kit::report_failure(PROGRAM, &verdict, service_kit::EXIT_USAGE);
            }
            if summary.complete {
                ExitCode::SUCCESS
            } else {
                eprintln!("{}", resume_hint(&config, &summary));
                ExitCode::from(EXIT_INTERRUPTED)
            }
        }
        Err(err) => {
            let code = u8::try_from(err.exit_code()).unwrap_or(service_kit::EXIT_FAILURE);
            service_kit::report_failure(PROGRAM, &err, code)
        }
    }
}
