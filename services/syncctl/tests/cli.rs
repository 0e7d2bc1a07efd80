//! The `syncctl` binary itself: exit codes, output that scripts rely on, flags read from the
//! environment.

use std::process::Output;

use anyhow::Context as _;
use e2e::TestDatabase;
use tokio::process::Command;

async fn syncctl(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_syncctl"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("SYNC_NAMESPACE")
        .output()
        .await
        .context("running syncctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn setup_twice_then_status_through_the_binary() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let nats_url = e2e::nats_url()?;
    let namespace = e2e::unique_namespace();
    let env = [
        ("NATS_URL", nats_url.as_str()),
        ("DATABASE_URL", db.url.as_str()),
        ("SYNC_NAMESPACE", namespace.as_str()),
    ];
    let args = ["setup", "--namespace", &namespace];
    let first = syncctl(&args, &env).await?;
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        text(&first.stdout).contains("Created: stream"),
        "{}",
        text(&first.stdout)
    );

    let second = syncctl(&args, &env).await?;
    assert!(second.status.success(), "{}", text(&second.stderr));
    let out = text(&second.stdout);
    assert!(out.contains("nothing changed"), "{out}");
    assert!(
        !out.contains("Created") && !out.contains("Updated"),
        "{out}"
    );

    let status = syncctl(&["status", "--json", "--namespace", &namespace], &env).await?;
    assert!(status.status.success(), "{}", text(&status.stderr));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(json["difference"], 0, "{json}");
    assert_eq!(json["reconciled"], true);

    let wait = syncctl(
        &["wait", "--timeout", "10s", "--namespace", &namespace],
        &env,
    )
    .await?;
    assert!(wait.status.success(), "{}", text(&wait.stderr));
    Ok(())
}

#[tokio::test]
async fn failures_exit_1_and_usage_mistakes_exit_2() -> anyhow::Result<()> {
    let nats_url = e2e::nats_url()?;
    let namespace = e2e::unique_namespace();
    let env = [("NATS_URL", nats_url.as_str())];
    let missing = syncctl(&["status", "--skip-db", "--namespace", &namespace], &env).await?;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("syncctl setup"),
        "{}",
        text(&missing.stderr)
    );

    let no_range = syncctl(&["replay", "--namespace", &namespace], &env).await?;
    assert_eq!(
        no_range.status.code(),
        Some(2),
        "{}",
        text(&no_range.stderr)
    );
    let bad_flag = syncctl(&["dlq", "redrive"], &env).await?;
    assert_eq!(
        bad_flag.status.code(),
        Some(2),
        "{}",
        text(&bad_flag.stderr)
    );
    let bad_namespace = syncctl(&["wait", "--namespace", "Not.Valid"], &env).await?;
    assert_eq!(
        bad_namespace.status.code(),
        Some(2),
        "{}",
        text(&bad_namespace.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn gen_csv_statistics_match_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let csv_path = dir.path().join("customers.csv");
    let stats_path = dir.path().join("stats.json");
    let out = syncctl(
        &[
            "gen-csv",
            "--rows",
            "2000",
            "--bad-rate",
            "0.05",
            "--dup-rate",
            "0.05",
            "--change-rate",
            "0.05",
            "--seed",
            "9",
            "--output",
            csv_path.to_str().context("utf-8 path")?,
            "--stats-json",
            stats_path.to_str().context("utf-8 path")?,
        ],
        &[],
    )
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stderr)?;
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats_path)?)?;
    assert_eq!(printed, written);

    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(false)
        .from_path(&csv_path)?;
    let mut records = reader.byte_records();
    let header = records.next().context("header row")??;
    let layout = customer_record::ColumnLayout::from_header(header.iter())?;
    let (mut rows, mut valid, mut bad) = (0u64, 0u64, 0u64);
    let mut ids = std::collections::HashSet::new();
    for record in records {
        let record = record?;
        rows += 1;
        match layout.parse_row(record.iter()) {
            Ok(customer) => {
                valid += 1;
                ids.insert(customer.id);
            }
            Err(_) => bad += 1,
        }
    }
    assert_eq!(printed["rows"], rows);
    assert_eq!(printed["valid"], valid);
    assert_eq!(printed["bad"], bad);
    assert_eq!(printed["distinct_ids"], ids.len() as u64);
    assert!(bad > 0 && printed["exact_duplicates"].as_u64() > Some(0));

    let to_stdout = syncctl(&["gen-csv", "--rows", "3", "--seed", "9"], &[]).await?;
    assert!(to_stdout.status.success());
    assert_eq!(
        text(&to_stdout.stdout).lines().count(),
        4,
        "header and 3 rows"
    );
    let bad_rate = syncctl(&["gen-csv", "--rows", "3", "--bad-rate", "1.5"], &[]).await?;
    assert_eq!(bad_rate.status.code(), Some(2));
    Ok(())
}

#[tokio::test]
async fn status_check_fails_unless_reconciled_and_teardown_removes_the_namespace()
-> anyhow::Result<()> {
    let nats_url = e2e::nats_url()?;
    let namespace = e2e::unique_namespace();
    let env = [("NATS_URL", nats_url.as_str())];
    let run = |args: Vec<&'static str>| {
        let mut args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        args.extend(["--namespace".to_owned(), namespace.clone()]);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            syncctl(&args, &env).await
        }
    };
    let setup = run(vec!["setup", "--skip-db"]).await?;
    assert!(setup.status.success(), "{}", text(&setup.stderr));
    let check = run(vec!["status", "--skip-db", "--check"]).await?;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stdout));

    // An outcome no ingest message accounts for: the ingest equation is off by one.
    let names = sync_topology::Names::new(&namespace)?;
    let client = e2e::connect_nats(&nats_url).await?;
    let js = async_nats::jetstream::new(client);
    js.publish(names.synced_subject(), "{}".into())
        .await?
        .await?;
    let off = run(vec!["status", "--skip-db", "--check"]).await?;
    assert_eq!(off.status.code(), Some(1), "{}", text(&off.stdout));
    assert!(
        text(&off.stdout).contains("NOT RECONCILED"),
        "{}",
        text(&off.stdout)
    );
    let informative = run(vec!["status", "--skip-db"]).await?;
    assert_eq!(informative.status.code(), Some(0));

    let refused = run(vec!["teardown"]).await?;
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    let teardown = run(vec!["teardown", "--yes"]).await?;
    assert!(teardown.status.success(), "{}", text(&teardown.stderr));
    let printed = text(&teardown.stdout);
    assert_eq!(printed.matches("deleted ").count(), 5, "{printed}");
    for stream in sync_topology::namespace_streams(&names) {
        assert!(printed.contains(&stream), "{stream} missing from {printed}");
    }
    let again = run(vec!["teardown", "--yes"]).await?;
    assert_eq!(text(&again.stdout).matches("absent ").count(), 5);
    let gone = run(vec!["status", "--skip-db"]).await?;
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone.stderr));
    Ok(())
}
