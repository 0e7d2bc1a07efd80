//! The reader against the real NATS: exact messages for a tricky file, dedup on re-run, resume
//! after SIGKILL and after a graceful stop, changed files, and the exit codes of bad input.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use common::{Pipeline, checkpoint_key, header};
use csv_gen::{GenOptions, generate};
use customer_record::CustomerRecord;
use sync_topology::messages::RejectedRow;
use sync_topology::{HEADER_CONTENT_HASH, HEADER_SOURCE_FILE, HEADER_SOURCE_LINE, HEADER_VERSION};
use tokio_util::sync::CancellationToken;

fn tricky_file() -> Vec<u8> {
    let mut csv = Vec::new();
    csv.extend_from_slice(
        "\u{feff}ID, First_Name ,last_name,Email,phone,Company,notes\r\n".as_bytes(),
    );
    // line 2: quoted comma and doubled quotes
    csv.extend_from_slice(
        b"1,Ann,Lee,Ann@Example.com,+1 555 0100,\"Acme, Inc.\",\"said \"\"hi\"\"\"\r\n",
    );
    // lines 3-4: a line break inside quotes, unicode
    csv.extend_from_slice("2,Zoë,Müller,zoe@example.de,,\"Multi\r\nline\",ok\r\n".as_bytes());
    // line 5: empty id
    csv.extend_from_slice(b" ,No,Id,noid@example.com,,,\r\n");
    // line 6: implausible e-mail
    csv.extend_from_slice(b"3,Bad,Mail,not-an-email,,,\r\n");
    // line 7: too few fields
    csv.extend_from_slice(b"4,Too,Few\r\n");
    // line 8: a field over 1 KiB
    csv.extend_from_slice(
        format!("5,Long,Field,long@example.com,,{},\r\n", "x".repeat(1500)).as_bytes(),
    );
    // line 9: invalid UTF-8
    csv.extend_from_slice(b"6,Bin,\xff\xfe,bin@example.com,,,\r\n");
    // line 10: a control character
    csv.extend_from_slice(b"7,Ctl,Char\x01,ctl@example.com,,,\r\n");
    // line 11: exact repeat of line 2
    csv.extend_from_slice(
        b"1,Ann,Lee,Ann@Example.com,+1 555 0100,\"Acme, Inc.\",\"said \"\"hi\"\"\"\r\n",
    );
    // lines 12-13: id 2 again with a new e-mail and phone
    csv.extend_from_slice(
        "2,Zoë,Müller,zoe.new@example.de,+49 1,\"Multi\r\nline\",ok\r\n".as_bytes(),
    );
    // line 14: unicode everywhere, too many fields
    csv.extend_from_slice("8,李,王,li@example.cn,,東京,,surplus\r\n".as_bytes());
    // line 15: unicode, last row without a line break
    csv.extend_from_slice("9,李,王,li@example.cn,,東京,".as_bytes());
    csv
}

fn write_temp(contents: &[u8], suffix: &str) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new().suffix(suffix).tempfile()?;
    file.write_all(contents)?;
    file.flush()?;
    Ok(file)
}

#[tokio::test]
async fn tricky_file_gives_exactly_the_expected_messages_and_a_rerun_adds_none()
-> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let file = write_temp(&tricky_file(), ".csv")?;
    let summary = csv_reader::run(pipeline.config(file.path()), CancellationToken::new()).await?;
    assert!(summary.complete);
    assert_eq!(
        (
            summary.rows_read,
            summary.published,
            summary.deduplicated,
            summary.rejected
        ),
        // The exact repeat on line 11 is a version of its own (a value may change and change
        // back), so it is published; the integrators find its content confirmed and send nothing.
        (12, 5, 0, 7),
        "{summary:#?}"
    );

    let ingest = pipeline.messages(&pipeline.names.ingest_stream()).await?;
    let records: Vec<(u64, CustomerRecord)> = ingest
        .iter()
        .map(|m| {
            let line = header(m, HEADER_SOURCE_LINE).unwrap_or_default().parse()?;
            Ok((line, serde_json::from_slice(&m.payload)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let lines_and_ids: Vec<(u64, &str)> =
        records.iter().map(|(l, r)| (*l, r.id.as_str())).collect();
    assert_eq!(
        lines_and_ids,
        [(2, "1"), (3, "2"), (11, "1"), (12, "2"), (15, "9")]
    );
    let ann = &records[0].1;
    assert_eq!(ann.email, "ann@example.com");
    assert_eq!(ann.phone.as_deref(), Some("+1 555 0100"));
    assert_eq!(
        ann.attributes.get("company").map(String::as_str),
        Some("Acme, Inc.")
    );
    assert_eq!(
        ann.attributes.get("notes").map(String::as_str),
        Some("said \"hi\"")
    );
    assert_eq!(records[1].1.first_name, "Zoë");
    assert_eq!(
        records[1].1.attributes.get("company").map(String::as_str),
        Some("Multi\nline")
    );
    assert_eq!(records[2].1, records[0].1);
    assert_eq!(records[3].1.email, "zoe.new@example.de");
    assert_eq!(
        records[4].1.attributes.get("company").map(String::as_str),
        Some("東京")
    );
    let checkpoint = pipeline
        .checkpoint(&summary.checkpoint_key)
        .await?
        .context("checkpoint saved")?;
    let load = checkpoint.load;
    assert!(load > 0, "the run got a load number");
    for (message, (line, record)) in ingest.iter().zip(&records) {
        let hash = record.content_hash();
        let id = format!("row:{load}:{line}");
        assert_eq!(header(message, "Nats-Msg-Id"), Some(id.as_str()));
        let version = format!("{load}.{load}.{line}");
        assert_eq!(header(message, HEADER_VERSION), Some(version.as_str()));
        assert_eq!(header(message, HEADER_CONTENT_HASH), Some(hash.as_str()));
        assert_eq!(
            header(message, HEADER_SOURCE_FILE),
            Some(summary.file.as_str())
        );
    }

    let rejected: Vec<RejectedRow> = pipeline
        .messages(&pipeline.names.results_stream())
        .await?
        .iter()
        .map(|m| serde_json::from_slice(&m.payload))
        .collect::<Result<_, _>>()?;
    let kinds: Vec<(u64, &str)> = rejected.iter().map(|r| (r.line, r.kind.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (5, "empty_id"),
            (6, "invalid_email"),
            (7, "field_count"),
            (8, "field_too_long"),
            (9, "invalid_utf8"),
            (10, "control_character"),
            (14, "field_count"),
        ]
    );
    assert_eq!(rejected[2].raw, "4,Too,Few");
    assert!(
        rejected[1].reason.contains("not-an-email"),
        "{}",
        rejected[1].reason
    );
    let by_kind: BTreeMap<&str, u64> = summary
        .rejected_by_kind
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(by_kind.get("field_count"), Some(&2));

    assert!(checkpoint.complete);
    assert_eq!(checkpoint.line, 15);
    assert_eq!(
        checkpoint.rows_read,
        checkpoint.published + checkpoint.deduplicated + checkpoint.rejected
    );

    // The same file again, plainly or resumed: it was read completely, so nothing happens (its
    // rows must not come back as newer than a file read after it).
    for resume in [false, true] {
        let mut config = pipeline.config(file.path());
        config.settings.resume = resume;
        let again = csv_reader::run(config, CancellationToken::new()).await?;
        assert!(again.complete);
        assert_eq!((again.rows_read, again.resumed_from_line), (0, 15));
    }
    assert_eq!(
        pipeline
            .message_count(&pipeline.names.ingest_stream())
            .await?,
        5
    );

    // --reload reads it again as a new, newer load; the rejections are not repeated.
    let mut config = pipeline.config(file.path());
    config.settings.reload = true;
    let reloaded = csv_reader::run(config, CancellationToken::new()).await?;
    assert_eq!(
        (reloaded.published, reloaded.deduplicated, reloaded.rejected),
        (5, 0, 7)
    );
    let reload = pipeline
        .checkpoint(&summary.checkpoint_key)
        .await?
        .context("checkpoint saved")?
        .load;
    assert!(reload > load, "a reload is a later load: {reload} > {load}");
    assert_eq!(
        pipeline
            .message_count(&pipeline.names.ingest_stream())
            .await?,
        10
    );
    assert_eq!(
        pipeline
            .message_count(&pipeline.names.results_stream())
            .await?,
        7
    );
    pipeline.delete_streams().await
}

fn generated_file(rows: u64) -> anyhow::Result<(tempfile::NamedTempFile, csv_gen::GenStats)> {
    let file = tempfile::Builder::new().suffix(".csv").tempfile()?;
    let options = GenOptions {
        rows,
        bad_rate: 0.01,
        dup_rate: 0.02,
        change_rate: 0.02,
        seed: 42,
        extra_columns: true,
    };
    let stats = generate(&options, std::io::BufWriter::new(file.as_file()))?;
    Ok((file, stats))
}

#[tokio::test]
async fn killed_mid_file_and_resumed_publishes_every_row_exactly_once() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let (file, stats) = generated_file(150_000)?;
    let key = checkpoint_key(file.path())?;
    let mut child = pipeline
        .reader_command(file.path())?
        .args(["--checkpoint-interval", "100ms", "--progress", "off"])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting csv-reader")?;
    let progressed = e2e::wait_for(
        "a checkpoint past line 1000",
        Duration::from_secs(60),
        || async {
            let checkpoint = pipeline.checkpoint(&key).await.ok()??;
            (checkpoint.line > 1000).then_some(checkpoint)
        },
    )
    .await?;
    child.kill().await.context("SIGKILL csv-reader")?;
    assert!(
        !progressed.complete,
        "the reader finished before it could be killed: use a bigger file"
    );

    let mut config = pipeline.config(file.path());
    config.settings.resume = true;
    let summary = csv_reader::run(config, CancellationToken::new()).await?;
    assert!(summary.complete);
    assert!(summary.resumed_from_line > 1000);

    // Every valid row is a version of its own: exactly one message each, however often the
    // killed run's last rows were sent.
    assert_eq!(
        pipeline
            .message_count(&pipeline.names.ingest_stream())
            .await?,
        stats.valid
    );
    assert_eq!(
        pipeline
            .message_count(&pipeline.names.results_stream())
            .await?,
        stats.bad
    );
    let checkpoint = pipeline.checkpoint(&key).await?.context("checkpoint")?;
    assert!(checkpoint.complete);
    assert_eq!(checkpoint.rows_read, stats.rows);
    assert_eq!(checkpoint.rejected, stats.bad);
    // Rows sent after the last checkpoint of the killed run count as deduplicated on resume.
    assert_eq!(checkpoint.published + checkpoint.deduplicated, stats.valid);
    pipeline.delete_streams().await
}

#[tokio::test]
async fn stopped_gracefully_then_resumed_counts_every_row_exactly() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let (file, stats) = generated_file(100_000)?;
    let key = checkpoint_key(file.path())?;
    let shutdown = CancellationToken::new();
    let mut config = pipeline.config(file.path());
    config.settings.checkpoint_interval = Duration::from_millis(50);
    let running = tokio::spawn(csv_reader::run(config.clone(), shutdown.clone()));
    e2e::wait_for(
        "a checkpoint past line 1000",
        Duration::from_secs(60),
        || async {
            let checkpoint = pipeline.checkpoint(&key).await.ok()??;
            (checkpoint.line > 1000).then_some(())
        },
    )
    .await?;
    shutdown.cancel();
    let first = running.await??;
    assert!(first.interrupted && !first.complete, "{first:#?}");
    let checkpoint = pipeline.checkpoint(&key).await?.context("checkpoint")?;
    assert_eq!(checkpoint.line, first.acked_line);
    assert_eq!(checkpoint.rows_read, first.rows_read);

    config.settings.resume = true;
    let second = csv_reader::run(config, CancellationToken::new()).await?;
    assert!(second.complete);
    assert_eq!(second.resumed_from_line, first.acked_line);
    assert_eq!(second.rows_skipped, first.rows_read);
    assert_eq!(first.rows_read + second.rows_read, stats.rows);
    // Nothing was in flight unacknowledged at the stop, so even the split counts are exact.
    assert_eq!(first.published + second.published, stats.valid);
    assert_eq!(first.deduplicated + second.deduplicated, 0);
    assert_eq!(first.rejected + second.rejected, stats.bad);
    let total = pipeline.checkpoint(&key).await?.context("checkpoint")?;
    assert_eq!(
        (
            total.rows_read,
            total.published,
            total.deduplicated,
            total.rejected
        ),
        (stats.rows, stats.valid, 0, stats.bad)
    );
    pipeline.delete_streams().await
}

#[tokio::test]
async fn sigterm_drains_saves_the_checkpoint_and_says_how_to_resume() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let (file, stats) = generated_file(100_000)?;
    let key = checkpoint_key(file.path())?;
    let child = pipeline
        .reader_command(file.path())?
        .args([
            "--checkpoint-interval",
            "100ms",
            "--progress",
            "off",
            "--summary-json",
        ])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting csv-reader")?;
    e2e::wait_for(
        "a checkpoint past line 1000",
        Duration::from_secs(60),
        || async {
            let checkpoint = pipeline.checkpoint(&key).await.ok()??;
            (checkpoint.line > 1000).then_some(())
        },
    )
    .await?;
    e2e::terminate(&child)?;
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("csv-reader did not stop after SIGTERM")??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(summary["interrupted"], true);
    let checkpoint = pipeline.checkpoint(&key).await?.context("checkpoint")?;
    assert!(!checkpoint.complete);
    assert_eq!(Some(checkpoint.line), summary["acked_line"].as_u64());
    assert!(checkpoint.rows_read < stats.rows);
    pipeline.delete_streams().await
}

#[tokio::test]
async fn standard_input_is_read_but_cannot_be_resumed() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let file = write_temp(
        b"id,first_name,last_name,email\n1,Ann,Lee,a@b.io\n2,Bo,Ek,nope\n",
        ".csv",
    )?;
    let output = pipeline
        .reader_command("-")?
        .arg("--summary-json")
        .stdin(std::fs::File::open(file.path())?)
        .output()
        .await?;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(
        (summary["published"].as_u64(), summary["rejected"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(summary["file"], "-");

    let mut config = pipeline.config(std::path::Path::new("-"));
    config.settings.resume = true;
    let err = csv_reader::run(config, CancellationToken::new())
        .await
        .expect_err("stdin cannot be resumed");
    assert_eq!(err.exit_code(), 2);
    pipeline.delete_streams().await
}

/// Runs the csv-reader binary on `file` (with `extra` flags) and returns its exit code, summary
/// (when it printed one) and stderr.
async fn run_binary(
    pipeline: &Pipeline,
    file: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<(Option<i32>, Option<serde_json::Value>, String)> {
    let output = pipeline
        .reader_command(file)?
        .args(["--summary-json", "--progress", "off"])
        .args(extra)
        .output()
        .await?;
    let summary = serde_json::from_slice(&output.stdout).ok();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    Ok((output.status.code(), summary, stderr))
}

/// The source line of every message in the ingest stream, in stream order.
async fn ingest_lines(pipeline: &Pipeline) -> anyhow::Result<Vec<u64>> {
    pipeline
        .header_values(&pipeline.names.ingest_stream(), HEADER_SOURCE_LINE)
        .await?
        .iter()
        .map(|line| Ok(line.parse()?))
        .collect()
}

async fn rejections(pipeline: &Pipeline) -> anyhow::Result<Vec<RejectedRow>> {
    pipeline
        .messages(&pipeline.names.results_stream())
        .await?
        .iter()
        .map(|m| Ok(serde_json::from_slice(&m.payload)?))
        .collect()
}

/// `count` valid rows with ids from `first_id`, one per line.
fn valid_rows(first_id: u64, count: u64) -> Vec<u8> {
    let mut rows = Vec::new();
    for id in first_id..first_id + count {
        rows.extend_from_slice(
            format!("{id},First{id},Last{id},person{id}@example.com,555-{id}\n").as_bytes(),
        );
    }
    rows
}

const HEADER: &[u8] = b"id,first_name,last_name,email,phone\n";

#[tokio::test]
async fn a_10_mb_field_is_rejected_and_a_20_mb_line_is_skipped() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let mut contents = b"id,first_name,last_name,email\n1,Ann,Lee,a@b.io\n".to_vec();
    contents.extend_from_slice(b"2,");
    contents.extend(std::iter::repeat_n(b'x', 10 * 1024 * 1024)); // line 3: a 10 MB field
    contents.extend_from_slice(b",Lee,b@c.io\n");
    contents.extend(std::iter::repeat_n(b'y', 20_000_000)); // line 4: 20 MB, no line break
    contents.extend_from_slice(b"\n3,Cy,Oh,c@d.io\n4,Di,Ek,d@e.io\n");
    let file = write_temp(&contents, ".csv")?;
    let (code, summary, stderr) = run_binary(&pipeline, file.path(), &[]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    let summary = summary.context("summary")?;
    assert_eq!(summary["complete"], true);
    assert_eq!(summary["published"], 3);
    assert_eq!(summary["rejected_by_kind"]["field_too_long"], 1);
    assert_eq!(summary["rejected_by_kind"]["row_too_long"], 1);

    assert_eq!(ingest_lines(&pipeline).await?, [2, 5, 6]);
    let rejected = rejections(&pipeline).await?;
    let kinds: Vec<(u64, &str)> = rejected.iter().map(|r| (r.line, r.kind.as_str())).collect();
    assert_eq!(kinds, [(3, "field_too_long"), (4, "row_too_long")]);
    let too_long = &rejected[1];
    assert!(
        too_long.reason.contains("20000000 bytes"),
        "{}",
        too_long.reason
    );
    assert!(too_long.raw.starts_with("yyyy"), "{}", too_long.raw);
    assert!(too_long.raw.len() <= 4096, "{}", too_long.raw.len());
    pipeline.delete_streams().await
}

#[tokio::test]
async fn an_unterminated_quote_costs_its_own_line_and_the_10000_rows_after_it_go_through()
-> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let mut contents = HEADER.to_vec();
    contents.extend_from_slice(&valid_rows(1, 1)); // line 2
    let stray = "2,\"Unterminated,Poe,u@example.com,2";
    contents.extend_from_slice(format!("{stray}\n").as_bytes()); // line 3
    contents.extend_from_slice(&valid_rows(3, 10_000)); // lines 4-10003
    let file = write_temp(&contents, ".csv")?;
    let (code, summary, stderr) = run_binary(&pipeline, file.path(), &[]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    let summary = summary.context("summary")?;
    assert_eq!(summary["published"], 10_001);
    assert_eq!(summary["rejected"], 1);
    assert_eq!(summary["rejected_by_kind"]["unterminated_quote"], 1);

    let expected: Vec<u64> = std::iter::once(2).chain(4..=10_003).collect();
    assert_eq!(ingest_lines(&pipeline).await?, expected);
    let rejected = rejections(&pipeline).await?;
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        (rejected[0].line, rejected[0].kind.as_str()),
        (3, "unterminated_quote")
    );
    assert_eq!(rejected[0].raw, stray);
    assert!(
        rejected[0].reason.contains("opened on line 3"),
        "{}",
        rejected[0].reason
    );
    pipeline.delete_streams().await
}

#[tokio::test]
async fn a_stray_quote_closed_by_another_30_lines_later_loses_no_row() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let mut contents = HEADER.to_vec();
    contents.extend_from_slice(&valid_rows(1, 1)); // line 2
    contents.extend_from_slice(b"2,\"Stray,Poe,s@example.com,2\n"); // line 3
    contents.extend_from_slice(&valid_rows(3, 29)); // lines 4-32
    contents.extend_from_slice(b"32,\"Ann,Lee,ann@example.com,3\n"); // line 33 closes it
    contents.extend_from_slice(&valid_rows(33, 10)); // lines 34-43
    let file = write_temp(&contents, ".csv")?;
    let summary = csv_reader::run(pipeline.config(file.path()), CancellationToken::new()).await?;
    assert!(summary.complete);
    assert_eq!((summary.published, summary.rejected), (40, 2));

    let expected: Vec<u64> = std::iter::once(2).chain(4..=32).chain(34..=43).collect();
    assert_eq!(ingest_lines(&pipeline).await?, expected);
    let rejected = rejections(&pipeline).await?;
    let kinds: Vec<(u64, &str)> = rejected.iter().map(|r| (r.line, r.kind.as_str())).collect();
    assert_eq!(
        kinds,
        [(3, "unterminated_quote"), (33, "unterminated_quote")]
    );
    // Line 3's quote ran to line 33, where the stray quote there closed it.
    assert!(
        rejected[0].reason.contains("runs on to line 33"),
        "{}",
        rejected[0].reason
    );
    pipeline.delete_streams().await
}

#[tokio::test]
async fn a_truncated_gz_stops_at_the_last_acknowledged_line_and_resumes_from_it()
-> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    // Enough rows that the damage lies past the first 256 KiB, which the reader checks on opening.
    let rows = 12_000;
    let mut contents = HEADER.to_vec();
    contents.extend_from_slice(&valid_rows(1, rows));
    let full = tempfile::Builder::new().suffix(".csv.gz").tempfile()?;
    std::io::Write::write_all(&mut flate2_free_gzip(full.as_file())?, &contents)?;
    let full = std::fs::read(full.path())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("customers.csv.gz");
    std::fs::write(&path, &full[..full.len() * 4 / 5])?;

    let (code, _, stderr) = run_binary(&pipeline, &path, &[]).await?;
    assert_eq!(code, Some(2), "{stderr}");
    let acked: u64 = stderr
        .split("Every row up to line ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no acknowledged line in: {stderr}"))?;
    assert!((1000..rows).contains(&acked), "{stderr}");
    let shown = std::fs::canonicalize(&path)?.display().to_string();
    assert!(
        stderr.contains(&format!("csv-reader --resume --force {}", path.display()))
            || stderr.contains(&format!("csv-reader --resume --force {shown}")),
        "{stderr}"
    );
    // Exactly the rows before the damage are in the stream, and the checkpoint says so.
    assert_eq!(
        ingest_lines(&pipeline).await?,
        (2..=acked).collect::<Vec<_>>()
    );
    let checkpoint = pipeline
        .checkpoint(&checkpoint_key(&path)?)
        .await?
        .context("checkpoint")?;
    assert_eq!((checkpoint.line, checkpoint.complete), (acked, false));

    // What the message says to do: replace the file, resume with --force.
    std::fs::write(&path, &full)?;
    let (code, summary, stderr) = run_binary(&pipeline, &path, &["--resume", "--force"]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(summary.context("summary")?["resumed_from_line"], acked);
    assert_eq!(
        ingest_lines(&pipeline).await?,
        (2..=rows + 1).collect::<Vec<_>>()
    );
    pipeline.delete_streams().await
}

#[tokio::test]
async fn a_row_bigger_than_the_servers_max_payload_is_rejected_not_fatal() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    // Every field within its own limit, the row as a whole over the server's 1 MiB.
    let extra = 1100;
    let mut contents = b"id,first_name,last_name,email".to_vec();
    for column in 0..extra {
        contents.extend_from_slice(format!(",note{column}").as_bytes());
    }
    contents.push(b'\n');
    let value = "v".repeat(1000);
    for (id, wide) in [(1, false), (2, true), (3, false)] {
        contents.extend_from_slice(format!("{id},Ann,Lee,a{id}@b.io").as_bytes());
        let field = if wide { value.as_str() } else { "" };
        contents.extend_from_slice(format!(",{field}").repeat(extra).as_bytes());
        contents.push(b'\n');
    }
    let file = write_temp(&contents, ".csv")?;
    let summary = csv_reader::run(pipeline.config(file.path()), CancellationToken::new()).await?;
    assert_eq!((summary.published, summary.rejected), (2, 1));
    assert_eq!(summary.rejected_by_kind.get("record_too_large"), Some(&1));
    pipeline.delete_streams().await
}

#[tokio::test]
async fn a_changed_file_is_refused_on_resume_unless_forced() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let mut file = write_temp(b"id,first_name,last_name,email\n1,Ann,Lee,a@b.io\n", ".csv")?;
    csv_reader::run(pipeline.config(file.path()), CancellationToken::new()).await?;
    file.write_all(b"2,Bo,Ek,b@c.io\n")?;
    file.flush()?;

    let mut config = pipeline.config(file.path());
    config.settings.resume = true;
    let err = csv_reader::run(config.clone(), CancellationToken::new())
        .await
        .expect_err("a changed file must be refused");
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("changed since its checkpoint"),
        "{err}"
    );

    config.settings.force = true;
    let forced = csv_reader::run(config, CancellationToken::new()).await?;
    assert_eq!((forced.resumed_from_line, forced.published), (2, 1));
    assert_eq!(
        pipeline
            .message_count(&pipeline.names.ingest_stream())
            .await?,
        2
    );
    pipeline.delete_streams().await
}

#[tokio::test]
async fn file_problems_exit_2_before_anything_is_published() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let dir = tempfile::tempdir()?;
    let empty = write_temp(b"", ".csv")?;
    let binary = write_temp(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10", ".csv")?;
    let missing_column = write_temp(b"id,first_name,email\n1,Ann,a@b.io\n", ".csv")?;
    let not_utf8_header = write_temp(b"id,f\xffirst,last_name,email\n", ".csv")?;
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (dir.path().join("nope.csv"), "does not exist"),
        (dir.path().to_path_buf(), "is a directory"),
        (empty.path().to_path_buf(), "is empty"),
        (binary.path().to_path_buf(), "binary"),
        (missing_column.path().to_path_buf(), "last_name"),
        (not_utf8_header.path().to_path_buf(), "not UTF-8"),
    ];
    for (path, expected) in &cases {
        let err = csv_reader::run(pipeline.config(path), CancellationToken::new())
            .await
            .expect_err("bad input must fail");
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(
            err.to_string().contains(expected),
            "{err} should mention {expected}"
        );
    }
    assert_eq!(
        pipeline
            .message_count(&pipeline.names.ingest_stream())
            .await?,
        0
    );
    assert_eq!(
        pipeline
            .message_count(&pipeline.names.results_stream())
            .await?,
        0
    );

    // The real binary turns them into its exit status.
    let output = pipeline
        .reader_command(missing_column.path())?
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("last_name"));
    pipeline.delete_streams().await
}

#[tokio::test]
async fn missing_streams_exit_1_and_say_to_run_setup() -> anyhow::Result<()> {
    let pipeline = Pipeline::without_topology().await?;
    let file = write_temp(b"id,first_name,last_name,email\n1,Ann,Lee,a@b.io\n", ".csv")?;
    let output = pipeline.reader_command(file.path())?.output().await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("syncctl setup"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn gzip_input_is_read_transparently() -> anyhow::Result<()> {
    let pipeline = Pipeline::new().await?;
    let file = tempfile::Builder::new().suffix(".csv.gz").tempfile()?;
    let encoder = flate2_free_gzip(file.as_file())?;
    let stats = generate(
        &GenOptions {
            rows: 500,
            ..GenOptions::default()
        },
        encoder,
    )?;
    let summary = csv_reader::run(pipeline.config(file.path()), CancellationToken::new()).await?;
    assert_eq!(summary.published, stats.valid);
    pipeline.delete_streams().await
}

/// Compresses through the system's `gzip`, so the test needs no compression crate of its own.
fn flate2_free_gzip(target: &std::fs::File) -> anyhow::Result<impl std::io::Write> {
    let child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(target.try_clone()?)
        .spawn()
        .context("running gzip")?;
    Ok(GzipPipe { child })
}

struct GzipPipe {
    child: std::process::Child,
}

impl std::io::Write for GzipPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.child
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("gzip stdin closed"))?
            .write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for GzipPipe {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A nightly export written over yesterday's file: same path, same size, same first 64 KiB, one
/// phone number changed deep inside. It is new content, so it must be read again as a new load,
/// not taken for the file already read.
#[tokio::test]
async fn a_file_rewritten_in_place_with_the_same_size_and_head_is_read_again() -> anyhow::Result<()>
{
    let pipeline = Pipeline::new().await?;
    let mut csv = String::from("id,first_name,last_name,email,phone\n");
    for i in 0..3_000 {
        csv.push_str(&format!("{i},Ann,Lee,a{i}@example.com,+1 555 {i:04}\n"));
    }
    let file = write_temp(csv.as_bytes(), ".csv")?;
    let first = csv_reader::run(pipeline.config(file.path()), CancellationToken::new()).await?;
    assert_eq!((first.published, first.complete), (3_000, true));

    let edited = csv.replace("+1 555 2999", "+1 555 9999");
    assert_eq!(edited.len(), csv.len());
    assert!(csv.find("+1 555 2999").is_some_and(|at| at > 64 * 1024));
    std::fs::write(file.path(), &edited)?;
    let later = std::time::SystemTime::now() + Duration::from_secs(1);
    std::fs::File::options()
        .write(true)
        .open(file.path())?
        .set_modified(later)?;

    let second = csv_reader::run(pipeline.config(file.path()), CancellationToken::new()).await?;
    assert_eq!(
        (second.rows_read, second.published),
        (3_000, 3_000),
        "read again as a new load: {second:#?}"
    );
    pipeline.delete_streams().await
}
