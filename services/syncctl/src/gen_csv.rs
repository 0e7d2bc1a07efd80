//! `syncctl gen-csv`: a realistic customer CSV of any size for demos, tests and benchmarks, written
//! as it is generated (memory does not depend on the row count), with exact statistics of what was
//! written so scripts know what the pipeline must end with.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

pub use csv_gen::{GenOptions, GenStats};

use crate::CtlError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct GenCsvConfig {
    pub options: GenOptions,
    pub output: Output,
    /// Also writes the statistics as JSON to this file.
    pub stats_json: Option<PathBuf>,
}

/// Generates the file. Blocking I/O: call it outside the async runtime or via `spawn_blocking`.
pub fn run(config: &GenCsvConfig) -> Result<GenStats, CtlError> {
    for (name, rate) in [
        ("--bad-rate", config.options.bad_rate),
        ("--dup-rate", config.options.dup_rate),
        ("--change-rate", config.options.change_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return Err(CtlError::Usage(format!(
                "{name} {rate} is not a probability between 0 and 1"
            )));
        }
    }
    let total = config.options.bad_rate + config.options.dup_rate + config.options.change_rate;
    if total > 1.0 {
        return Err(CtlError::Usage(format!(
            "--bad-rate + --dup-rate + --change-rate is {total}, more than 1"
        )));
    }
    let stats = match &config.output {
        Output::Stdout => {
            let stdout = io::stdout();
            generate_into(&config.options, stdout.lock(), "standard output")?
        }
        Output::File(path) => {
            let file = File::create(path).map_err(|source| CtlError::Io {
                action: format!("creating {}", path.display()),
                source,
            })?;
            generate_into(&config.options, file, &path.display().to_string())?
        }
    };
    if let Some(path) = &config.stats_json {
        let json = serde_json::to_vec_pretty(&stats).map_err(|source| CtlError::Json {
            what: "generator statistics".to_owned(),
            source,
        })?;
        std::fs::write(path, json).map_err(|source| CtlError::Io {
            action: format!("writing statistics to {}", path.display()),
            source,
        })?;
    }
    Ok(stats)
}

fn generate_into(
    options: &GenOptions,
    out: impl Write,
    target: &str,
) -> Result<GenStats, CtlError> {
    let mut writer = BufWriter::with_capacity(1 << 16, out);
    let io_error = |source| CtlError::Io {
        action: format!("writing the generated CSV to {target}"),
        source,
    };
    let stats = csv_gen::generate(options, &mut writer).map_err(io_error)?;
    writer.flush().map_err(io_error)?;
    Ok(stats)
}
