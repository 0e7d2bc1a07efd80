//! `syncctl status` shows each integrator replica from its heartbeat (stale once it stops writing,
//! forgotten after an hour), and `--watch` refreshes it with rates and an ETA: one JSON object per
//! line when asked for JSON.

mod common;

use std::time::Duration;

use anyhow::Context as _;
use sync_topology::messages::{ReplicaHeartbeat, replica_key};
use syncctl::status::{StatusConfig, collect};
use tokio::io::AsyncBufReadExt as _;

fn heartbeat(replica: &str, seen_ago_ms: i64, breaker: &str) -> ReplicaHeartbeat {
    let now = chrono::Utc::now().timestamp_millis();
    ReplicaHeartbeat {
        replica: replica.to_owned(),
        seen_at_ms: now - seen_ago_ms,
        started_at_ms: now - 60_000,
        every_ms: 3_000,
        not_ready: (breaker != "closed").then(|| "CRM at h:80 failing".to_owned()),
        breaker: breaker.to_owned(),
        paused_until_ms: None,
        concurrency_limit: 64,
        requests_in_flight: 3,
        messages_in_hand: 10,
        synced: 100,
        superseded: 2,
        dead: 1,
        handed_back: 5,
        retries: 7,
    }
}

#[tokio::test]
async fn replicas_are_shown_from_their_heartbeats_fresh_stale_or_forgotten() -> anyhow::Result<()> {
    let (nats, pipeline) = common::prepared(None).await?;
    let control = pipeline
        .js
        .get_key_value(pipeline.names.control_bucket())
        .await?;
    let long_name = "integrator-a-very-long-container-host-name-0123456789-1-beef";
    for beat in [
        heartbeat(long_name, 1_000, "open"),
        heartbeat("integrator-killed", 60_000, "closed"),
        heartbeat("integrator-long-gone", 2 * 3_600_000, "closed"),
    ] {
        control
            .put(
                replica_key(&beat.replica),
                serde_json::to_vec(&beat)?.into(),
            )
            .await?;
    }
    let status = collect(&StatusConfig {
        nats,
        database_url: None,
    })
    .await?;
    let shown: Vec<(&str, bool)> = status
        .replicas
        .iter()
        .map(|r| (r.heartbeat.replica.as_str(), r.stale))
        .collect();
    assert_eq!(
        shown,
        vec![(long_name, false), ("integrator-killed", true)],
        "{status}"
    );
    let text = status.to_string();
    let row = text
        .lines()
        .find(|line| line.starts_with(long_name))
        .context("the long name has its own row")?;
    assert!(row.contains("not ready") && row.contains("open"), "{row}");
    assert!(
        text.contains(&format!("{long_name} not ready: CRM at h:80 failing")),
        "{text}"
    );
    let json = serde_json::to_value(&status)?;
    assert_eq!(json["replicas"][0]["synced"], 100, "{json}");
    assert_eq!(json["replicas"][1]["stale"], true, "{json}");
    Ok(())
}

#[tokio::test]
async fn watch_prints_a_report_per_interval_with_rates_from_the_second_on() -> anyhow::Result<()> {
    let (nats, pipeline) = common::prepared(None).await?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncctl"))
        .args([
            "status",
            "--watch",
            "--interval",
            "0.2",
            "--json",
            "--skip-db",
        ])
        .env("NATS_URL", &nats.nats_url)
        .env("SYNC_NAMESPACE", &nats.namespace)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut next = async || -> anyhow::Result<serde_json::Value> {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("no report within 20 s")??
            .context("syncctl stopped")?;
        Ok(serde_json::from_str(&line)?)
    };
    let first = next().await?;
    assert!(first["rates"].is_null(), "{first}");
    assert_eq!(first["namespace"], pipeline.names.namespace());
    // Something to count between two reports.
    common::publish_row(&pipeline, &common::customer("w1", "w1@example.com"), 2).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let later = loop {
        let report = next().await?;
        if report["rates"]["integrators_backlog"] == 1 {
            break report;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no report saw the row: {report}"
        );
    };
    assert!(
        later["rates"]["integrators_eta_secs"].is_null(),
        "nothing settled, so no ETA: {later}"
    );
    assert!(
        later["reconciled"].is_boolean(),
        "the whole status: {later}"
    );
    child.start_kill()?;
    Ok(())
}
