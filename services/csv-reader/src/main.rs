//! `csv-reader [OPTIONS] <FILE>`: parses the command line and runs the reader (see the library).

use std::process::ExitCode;

use clap::Parser;
use csv_reader::{ReaderConfig, resume_hint, run};

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streams a customer CSV into JetStream: one message per valid row, bad rows reported, resumable.
///
/// Exit codes: 0 every row acknowledged; 1 runtime failure (NATS, missing streams); 2 usage or
/// input-file problem; 130 interrupted by SIGINT/SIGTERM after saving the checkpoint.
#[derive(Debug, Parser)]
#[command(name = "csv-reader", version)]
struct Cli {
    #[command(flatten)]
    reader: ReaderConfig,
}

/// Conventional code of a run stopped by a signal: it did not finish the file.
const EXIT_INTERRUPTED: u8 = 130;

// One thread: the work per row is small, and a second worker thread mostly adds cross-thread
// wake-ups per acknowledgement; on a shared machine the freed core goes to nats-server
// (BENCHMARKS.md: about 1.5x the rows/s of the multi-threaded runtime).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    service_kit::init_telemetry();
    let config = cli.reader;
    let shutdown = service_kit::shutdown_on_signals();
    match run(config.clone(), shutdown).await {
        Ok(summary) => {
            if config.summary_json {
                match serde_json::to_string_pretty(&summary) {
                    Ok(json) => println!("{json}"),
                    Err(err) => eprintln!("cannot encode the summary as JSON: {err}"),
                }
            } else {
                println!("{summary}");
            }
            if summary.complete {
                ExitCode::SUCCESS
            } else {
                eprintln!("{}", resume_hint(&config, &summary));
                ExitCode::from(EXIT_INTERRUPTED)
            }
        }
        Err(err) => {
            eprintln!("csv-reader: {}", sync_topology::redact(&err.to_string()));
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(1))
        }
    }
}
