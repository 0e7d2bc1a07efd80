//! Checking a file before and while loading it: `--dry-run` counts what a run would publish and
//! reject without any NATS, and `--max-reject-rate` stops a file with too many bad rows before more
//! of it is published, saying where it stopped and how to go on.

mod common;

use std::io::Write as _;

use common::Pipeline;
use csv_reader::ReaderError;
use tokio_util::sync::CancellationToken;

const HEADER: &str = "id,first_name,last_name,email\n";

/// A CSV file of `rows` (each `true` for a good row), lines numbered from 2.
fn file_of(rows: &[bool]) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new().suffix(".csv").tempfile()?;
    file.write_all(HEADER.as_bytes())?;
    for (n, good) in rows.iter().enumerate() {
        let line = if *good {
            format!("{n},First{n},Last{n},p{n}@example.com\n")
        } else {
            format!("{n},First{n},Last{n},not-an-address\n")
        };
        file.write_all(line.as_bytes())?;
    }
    file.flush()?;
    Ok(file)
}

#[tokio::test]
async fn a_dry_run_counts_rows_and_rejections_and_needs_no_nats() -> anyhow::Result<()> {
    let mut rows = vec![true; 6];
    rows.extend([false; 4]);
    let file = file_of(&rows)?;
    let nowhere = format!("nats://127.0.0.1:{}", e2e::free_port()?);
    let dry_run = |extra: &[&str]| {
        let mut command = tokio::process::Command::new(e2e::binary("csv-reader")?);
        command
            .arg(file.path())
            .args(["--dry-run", "--summary-json", "--nats-url", &nowhere])
            .args(["--startup-wait", "0"])
            .args(extra);
        anyhow::Ok(command)
    };
    let out = dry_run(&[])?.output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(summary["dry_run"], true, "{summary}");
    assert_eq!(summary["rows_read"], 10, "{summary}");
    assert_eq!(summary["published"], 6, "{summary}");
    assert_eq!(summary["rejected_by_kind"]["invalid_email"], 4, "{summary}");

    // 40% bad: a run with --max-reject-rate 0.25 would stop; the dry run says so, exit 2.
    let out = dry_run(&["--max-reject-rate", "0.25"])?.output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("4 of its 10 rows are bad"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    // An out-of-range share is a usage mistake.
    let out = dry_run(&["--max-reject-rate", "1.5"])?.output().await?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

#[tokio::test]
async fn a_short_file_with_too_many_bad_rows_publishes_nothing() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let mut rows = vec![true; 4];
    rows.extend([false; 6]);
    let file = file_of(&rows)?;
    let mut config = pipeline.config(file.path());
    config.settings.max_reject_rate = Some(0.5);
    let err = csv_reader::run(config, CancellationToken::new())
        .await
        .expect_err("60% bad rows is more than 50%");
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    assert!(text.contains("6 of the 10 rows"), "{text}");
    assert!(text.contains("Nothing of it was published"), "{text}");
    for stream in [
        pipeline.names.ingest_stream(),
        pipeline.names.results_stream(),
    ] {
        assert_eq!(pipeline.message_count(&stream).await?, 0, "{stream}");
    }
    pipeline.delete_streams().await
}

#[tokio::test]
async fn bad_rows_past_the_limit_stop_the_file_where_they_pass_it() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    // 1,000 good rows (lines 2..=1001), 300 bad, 100 good.
    let mut rows = vec![true; 1000];
    rows.extend([false; 300]);
    rows.extend([true; 100]);
    let file = file_of(&rows)?;
    let mut config = pipeline.config(file.path());
    config.settings.max_reject_rate = Some(0.2);
    let err = csv_reader::run(config.clone(), CancellationToken::new())
        .await
        .expect_err("the bad rows pass 20%");
    // The 251st bad row (line 1252) makes 251 of 1,251: over 20%. It and all after stay unsent.
    let ReaderError::TooManyRejected {
        line, acked_line, ..
    } = &err
    else {
        panic!("not stopped for its bad rows: {err}");
    };
    assert_eq!((*line, *acked_line), (1252, 1251), "{err}");
    let text = err.to_string();
    assert!(text.contains("up to line 1252"), "{text}");
    assert!(
        text.contains(&format!(
            "csv-reader --resume --force {}",
            file.path().display()
        )),
        "{text}"
    );
    let ingest = pipeline.names.ingest_stream();
    let results = pipeline.names.results_stream();
    assert_eq!(pipeline.message_count(&ingest).await?, 1000);
    assert_eq!(pipeline.message_count(&results).await?, 250);

    // Accepting the rest as it is: resumed after line 1251, every row once.
    config.settings.resume = true;
    config.settings.max_reject_rate = Some(1.0);
    let summary = csv_reader::run(config, CancellationToken::new()).await?;
    assert!(summary.complete, "{summary}");
    assert_eq!(summary.resumed_from_line, 1251);
    assert_eq!(pipeline.message_count(&ingest).await?, 1100);
    assert_eq!(pipeline.message_count(&results).await?, 300);
    pipeline.delete_streams().await
}
