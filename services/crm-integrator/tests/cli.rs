//! How the binary ends when it cannot run: one line on stderr naming what failed (JSON with
//! `LOG_FORMAT=json`), never a "Caused by" chain or a backtrace, exit code 2 for a mistake in the
//! flags (out-of-range values included) and 1 for a failure at run time.

use std::process::Output;

use anyhow::Context as _;

async fn integrator(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-integrator"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "off")
        .output()
        .await
        .context("running crm-integrator")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn failures_are_one_line_with_the_right_exit_code() -> anyhow::Result<()> {
    let out = integrator(&["--breaker-failure-share", "2"], &[]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        "crm-integrator: error: --breaker-failure-share must be a share above 0 and at most 1"
    );

    let out = integrator(&["--concurrency", "many"], &[]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("--concurrency"), "{}", stderr(&out));

    let nowhere = format!("nats://127.0.0.1:{}", e2e::free_port()?);
    let args = [
        "--nats-url",
        nowhere.as_str(),
        "--startup-wait",
        "0",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let out = integrator(&args, &[]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains(&nowhere) && text.contains("refused"),
        "{text}"
    );
    assert!(
        !text.contains("Caused by") && !text.contains("backtrace"),
        "{text}"
    );

    let out = integrator(&args, &[("LOG_FORMAT", "json")]).await?;
    let line: serde_json::Value = serde_json::from_str(stderr(&out).trim())?;
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["fields"]["exit_code"], 1, "{line}");
    assert!(
        line["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&nowhere)),
        "{line}"
    );
    Ok(())
}
