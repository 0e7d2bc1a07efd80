//! End to end, bad input: every file-level problem found before the first row is a clear error
//! with exit code 2 and publishes nothing; row-level problems (an unterminated quote among them) are
//! rejected with line and reason while the rest of the file goes through; unreachable or unprepared
//! infrastructure is exit code 1 with a message that says what to do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use e2e::pipeline::{PipelineEnv, describe};
use e2e::{TestDatabase, free_port, nats_url, stream_messages, wait_for};
use sync_topology::Names;
use sync_topology::messages::RejectedRow;

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
}

fn write(dir: &Path, case: &Case) -> anyhow::Result<PathBuf> {
    let path = dir.join(case.name);
    std::fs::write(&path, &case.bytes)?;
    Ok(path)
}

async fn prepared_env() -> anyhow::Result<(PipelineEnv, TestDatabase)> {
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats_url()?, &db.url);
    env.setup().await?;
    Ok((env, db))
}

async fn ingest_and_results(env: &PipelineEnv) -> anyhow::Result<(u64, u64)> {
    let names = Names::new(&env.namespace)?;
    let ingest = stream_messages(&env.nats_url, &names.ingest_stream())
        .await
        .unwrap_or(0);
    let results = stream_messages(&env.nats_url, &names.results_stream())
        .await
        .unwrap_or(0);
    Ok((ingest, results))
}

#[tokio::test]
async fn file_level_problems_exit_2_and_publish_nothing() -> anyhow::Result<()> {
    let (env, _db) = prepared_env().await?;
    let dir = tempfile::tempdir()?;
    let header = b"id,first_name,last_name,email,phone\n".to_vec();
    let mut binary = vec![0u8; 4096];
    for (i, byte) in binary.iter_mut().enumerate() {
        *byte = (i * 7 % 256) as u8;
    }
    let cases = [
        Case {
            name: "empty.csv",
            bytes: Vec::new(),
        },
        Case {
            name: "missing_column.csv",
            bytes: b"id,first_name,email\n1,Ann,a@b.io\n".to_vec(),
        },
        Case {
            name: "binary.bin",
            bytes: binary,
        },
    ];
    for case in &cases {
        let path = write(dir.path(), case)?;
        let out = env
            .run("csv-reader", &[&path.display().to_string()])
            .await?;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {}",
            case.name,
            describe(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(case.name),
            "{}: the error names the file: {stderr}",
            case.name
        );
    }
    let missing = dir.path().join("does-not-exist.csv");
    let out = env
        .run("csv-reader", &[&missing.display().to_string()])
        .await?;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let out = env
        .run("csv-reader", &[&dir.path().display().to_string()])
        .await?;
    assert_eq!(out.status.code(), Some(2), "directory: {}", describe(&out));
    let missing_column = env
        .run(
            "csv-reader",
            &[&dir.path().join("missing_column.csv").display().to_string()],
        )
        .await?;
    assert!(
        String::from_utf8_lossy(&missing_column.stderr).contains("last_name"),
        "names the missing column: {}",
        describe(&missing_column)
    );

    // A header and nothing else is a valid, empty file: nothing to publish, nothing to reject.
    let header_only = write(
        dir.path(),
        &Case {
            name: "header_only.csv",
            bytes: header,
        },
    )?;
    let out = env
        .run("csv-reader", &[&header_only.display().to_string()])
        .await?;
    assert!(
        matches!(out.status.code(), Some(0) | Some(2)),
        "header only: {}",
        describe(&out)
    );

    assert_eq!(
        ingest_and_results(&env).await?,
        (0, 0),
        "file-level errors publish nothing"
    );
    Ok(())
}

#[tokio::test]
async fn bad_rows_are_rejected_with_line_and_reason_and_the_rest_goes_through() -> anyhow::Result<()>
{
    let (env, _db) = prepared_env().await?;
    let dir = tempfile::tempdir()?;
    let mut bytes = b"id,first_name,last_name,email,phone\n".to_vec();
    bytes.extend_from_slice(b"1,Ann,Lee,ann@example.com,1\n"); // line 2: good
    bytes.extend_from_slice(b"2,Bob,Ray,bob@example.com\n"); // line 3: wrong field count
    bytes.extend_from_slice(b"3,B\xffob,Ray,bob@example.com,2\n"); // line 4: invalid UTF-8
    bytes.extend_from_slice(b"4,Nul\x00l,Ray,nul@example.com,3\n"); // line 5: NUL byte
    bytes.extend_from_slice(b"5,Big,");
    bytes.extend(std::iter::repeat_n(b'x', 10 * 1024 * 1024)); // line 6: a 10 MB field
    bytes.extend_from_slice(b",big@example.com,4\n");
    bytes.extend_from_slice(b"6,Cat,Poe,cat@example.com,5\n"); // line 7: good
    bytes.extend_from_slice(format!("{},Id,Long,id@example.com,6\n", "8".repeat(300)).as_bytes()); // line 8: id over 256 bytes
    bytes.extend_from_slice(b"7,\"Unterminated,Poe,u@example.com,6\n"); // line 9: quote never closed
    let path = write(
        dir.path(),
        &Case {
            name: "bad_rows.csv",
            bytes,
        },
    )?;
    let out = env
        .run("csv-reader", &[&path.display().to_string()])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    let names = Names::new(&env.namespace)?;
    let url = env.nats_url.clone();
    let ingest = names.ingest_stream();
    wait_for("the two good rows", Duration::from_secs(10), || {
        let (url, ingest) = (url.clone(), ingest.clone());
        async move { stream_messages(&url, &ingest).await.filter(|n| *n == 2) }
    })
    .await?;

    let client = async_nats::connect(&env.nats_url).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream(names.results_stream()).await?;
    let mut rejected = Vec::new();
    let mut seq = 1;
    while let Ok(message) = stream.get_raw_message(seq).await {
        seq += 1;
        if message.subject.as_str() == names.rejected_subject() {
            let row: RejectedRow = serde_json::from_slice(&message.payload)?;
            rejected.push(row);
        }
    }
    let lines: Vec<(u64, String)> = rejected.iter().map(|r| (r.line, r.kind.clone())).collect();
    assert_eq!(
        lines,
        vec![
            (3, "field_count".to_owned()),
            (4, "invalid_utf8".to_owned()),
            (5, "control_character".to_owned()),
            (6, "field_too_long".to_owned()),
            (8, "id_too_long".to_owned()),
            (9, "unterminated_quote".to_owned()),
        ],
        "{rejected:#?}"
    );
    for row in &rejected {
        assert!(row.source_file.ends_with("bad_rows.csv"), "{row:?}");
        assert!(!row.reason.is_empty(), "{row:?}");
        assert!(
            row.raw.len() < 64 * 1024,
            "raw text of a huge row is bounded"
        );
    }
    assert!(
        rejected[4].reason.contains("256-byte limit"),
        "{:?}",
        rejected[4]
    );
    let unterminated = &rejected[5];
    assert!(
        unterminated
            .reason
            .contains("quote opened on line 9 is never closed"),
        "{unterminated:?}"
    );
    assert_eq!(unterminated.raw, "7,\"Unterminated,Poe,u@example.com,6");
    Ok(())
}

#[tokio::test]
async fn unreachable_or_unprepared_infrastructure_is_a_clear_runtime_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("ok.csv");
    std::fs::write(
        &file,
        "id,first_name,last_name,email\n1,Ann,Lee,ann@example.com\n",
    )?;
    let file_arg = file.display().to_string();

    // NATS unreachable: retries for --startup-wait, then exit 1 naming the server.
    let dead_nats = format!("nats://127.0.0.1:{}", free_port()?);
    let env = PipelineEnv::new(&dead_nats, "postgres://postgres@127.0.0.1:1/none");
    let out = env
        .run("csv-reader", &["--startup-wait", "1s", &file_arg])
        .await?;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&dead_nats),
        "{}",
        describe(&out)
    );

    // Streams never set up: exit 1 telling the operator to run `syncctl setup`.
    let env = PipelineEnv::new(&nats_url()?, "postgres://postgres@127.0.0.1:1/none");
    let out = env.run("csv-reader", &[&file_arg]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("syncctl setup"),
        "{}",
        describe(&out)
    );

    // Database unreachable: syncctl says which database it could not reach.
    let dead_db = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port()?);
    let env = PipelineEnv::new(&nats_url()?, &dead_db);
    let out = env
        .run("syncctl", &["setup", "--startup-wait", "1s"])
        .await?;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("127.0.0.1"),
        "{}",
        describe(&out)
    );
    Ok(())
}
