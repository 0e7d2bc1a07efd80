//! No secret is ever printed: every binary's `--help` with secrets in its environment, its start-up
//! logs (debug level included, where libraries log server addresses) and its error messages, with
//! passwords in NATS and PostgreSQL URLs, in a key-value DSN, in the NATS password and CRM token
//! variables and in the CRM URL. The real binaries run; their stdout and stderr are searched for
//! the secret texts, and the messages must still name the server.

use std::process::Output;
use std::time::Duration;

use anyhow::Context as _;
use e2e::pipeline::{PipelineEnv, describe};
use e2e::{TestDatabase, free_port, wait_for};
use tokio::io::AsyncBufReadExt as _;

const NATS_URL_SECRET: &str = "nats-url-s3cret";
const NATS_PASSWORD_SECRET: &str = "nats-password-s3cret";
const DB_SECRET: &str = "db-url-s3cret";
const DSN_SECRET: &str = "dsn-s3cret";
const CRM_URL_SECRET: &str = "crm-url-s3cret";
const TOKEN_SECRET: &str = "crm-token-s3cret";
const SECRETS: [&str; 6] = [
    NATS_URL_SECRET,
    NATS_PASSWORD_SECRET,
    DB_SECRET,
    DSN_SECRET,
    CRM_URL_SECRET,
    TOKEN_SECRET,
];

fn assert_no_secret(what: &str, out: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} printed {secret:?}:\n{}",
            describe(out)
        );
    }
}

const BINARIES: [&str; 5] = [
    "csv-reader",
    "crm-integrator",
    "persister",
    "crm-mock",
    "syncctl",
];

/// An environment full of secrets, with debug logs: a NATS server list whose URLs carry a
/// password, a NATS user and password, the CRM token. `nats` is host:port (the shared server, or a
/// port where nothing listens).
fn secret_env(nats: &str, database_url: &str) -> PipelineEnv {
    let mut env = PipelineEnv::new(
        &format!("nats://sync:{NATS_URL_SECRET}@{nats},nats://sync:{NATS_URL_SECRET}@{nats}"),
        database_url,
    );
    env.crm_token = TOKEN_SECRET.to_owned();
    env.set_env(&BINARIES, "RUST_LOG", "debug");
    env.set_env(&BINARIES, "NATS_USER", "sync");
    env.set_env(&BINARIES, "NATS_PASSWORD", NATS_PASSWORD_SECRET);
    env
}

/// A CRM URL with a password in it (sent as basic auth, so only where no request must succeed).
fn with_crm_password(env: &mut PipelineEnv, crm: &str) {
    env.set_env(
        &BINARIES,
        "CRM_URL",
        format!("http://crm:{CRM_URL_SECRET}@{crm}"),
    );
}

#[tokio::test]
async fn help_never_shows_secret_environment_values() -> anyhow::Result<()> {
    let mut env = secret_env(
        "127.0.0.1:1",
        &format!("postgres://sync:{DB_SECRET}@127.0.0.1:1/db"),
    );
    with_crm_password(&mut env, "127.0.0.1:1");
    let mut runs = Vec::new();
    for binary in ["csv-reader", "crm-integrator", "persister", "crm-mock"] {
        runs.push((binary.to_owned(), vec!["--help".to_owned()]));
    }
    for command in [
        "setup",
        "status",
        "wait",
        "verify",
        "show",
        "prune",
        "replay",
        "dlq list",
        "dlq redrive",
    ] {
        let mut args: Vec<String> = command.split(' ').map(str::to_owned).collect();
        args.push("--help".to_owned());
        runs.push(("syncctl".to_owned(), args));
    }
    for (binary, args) in runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.run(&binary, &args).await?;
        assert!(
            out.status.success(),
            "{binary} {args:?}: {}",
            describe(&out)
        );
        assert_no_secret(&format!("{binary} {args:?}"), &out);
        // The variables are still named, so an operator knows where a value comes from.
        let help = String::from_utf8_lossy(&out.stdout);
        let named = ["NATS_PASSWORD", "DATABASE_URL", "CRM_API_TOKEN"];
        assert!(
            named.iter().any(|v| help.contains(&format!("[env: {v}]"))),
            "{binary} {args:?}: {help}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn errors_name_the_server_without_its_credentials() -> anyhow::Result<()> {
    let nowhere = format!("127.0.0.1:{}", free_port()?);
    let mut env = secret_env(
        &nowhere,
        &format!("postgres://sync:{DB_SECRET}@{nowhere}/db?sslmode=prefer"),
    );
    with_crm_password(&mut env, &nowhere);
    let csv = tempfile::NamedTempFile::new()?;
    std::fs::write(csv.path(), "id,first_name,last_name,email\n1,A,B,a@b.io\n")?;
    let csv = csv.path().display().to_string();
    let dsn = format!(
        "host=127.0.0.1 port={} user=sync password={DSN_SECRET} dbname=db",
        nowhere.rsplit(':').next().unwrap_or("1")
    );
    let runs: Vec<(&str, Vec<&str>)> = vec![
        ("csv-reader", vec![csv.as_str()]),
        ("crm-integrator", vec!["--metrics-addr", "127.0.0.1:0"]),
        ("syncctl", vec!["status"]),
        ("syncctl", vec!["setup"]),
        ("syncctl", vec!["dlq", "list"]),
        (
            "syncctl",
            vec!["dlq", "list", "--database-url", dsn.as_str()],
        ),
    ];
    // One try each: what is checked is the failure's wording, not the waiting (below).
    let mut once = env.clone();
    once.set_env(&BINARIES, "STARTUP_WAIT", "0");
    let outputs =
        futures::future::join_all(runs.iter().map(|(binary, args)| once.run(binary, args))).await;
    for ((binary, args), out) in runs.iter().zip(outputs) {
        let out = out?;
        assert!(
            !out.status.success(),
            "{binary} {args:?}: {}",
            describe(&out)
        );
        assert_no_secret(&format!("{binary} {args:?}"), &out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&nowhere) || stderr.contains("127.0.0.1"),
            "{binary} {args:?} must still say which server: {stderr}"
        );
    }

    // A URL clap cannot parse: its own message would quote the value, password and all.
    let mut bad_url = env.clone();
    bad_url.set_env(
        &BINARIES,
        "CRM_URL",
        format!("http://crm:{CRM_URL_SECRET}@{nowhere}:no-port"),
    );
    for (binary, args) in [
        ("crm-integrator", vec![]),
        ("syncctl", vec!["verify", "--crm"]),
    ] {
        let out = bad_url.run(binary, &args).await?;
        assert_eq!(out.status.code(), Some(2), "{binary}: {}", describe(&out));
        assert_no_secret(&format!("{binary} with a bad CRM_URL"), &out);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--crm-url"),
            "{}",
            describe(&out)
        );
    }

    // The persister waits for its servers (it must not crash-loop); what it says meanwhile. NATS
    // is awaited first, so that is what it names.
    let mut persister = env
        .command("persister")?
        .args(["--metrics-addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = persister.stderr.take().context("the persister's stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut said = String::new();
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .context("waiting for the persister to say it waits for NATS")??;
        let Some(line) = line else {
            anyhow::bail!("the persister exited:\n{said}");
        };
        said.push_str(&line);
        said.push('\n');
        if line.contains("not reachable yet") {
            break;
        }
    }
    persister.start_kill()?;
    persister.wait().await?;
    assert!(said.contains(&nowhere), "{said}");
    for secret in SECRETS {
        assert!(
            !said.contains(secret),
            "persister printed {secret:?}:\n{said}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn start_up_logs_and_output_of_working_services_hold_no_secret() -> anyhow::Result<()> {
    // The shared servers take no passwords and ignore the ones in these URLs: every binary runs
    // for real, with debug logs, and its whole output is searched.
    let db = TestDatabase::create().await?;
    let nats = e2e::nats_url()?;
    let nats = nats.trim_start_matches("nats://");
    let database_url = db
        .url
        .replacen("://postgres@", &format!("://postgres:{DB_SECRET}@"), 1);
    anyhow::ensure!(database_url.contains(DB_SECRET), "{database_url}");
    let crm = format!("127.0.0.1:{}", free_port()?);
    let mut env = secret_env(nats, &database_url);
    env.set_env(&BINARIES, "CRM_URL", format!("http://{crm}"));

    let out = env.run("syncctl", &["setup"]).await?;
    assert!(out.status.success(), "{}", describe(&out));
    assert_no_secret("syncctl setup", &out);

    let logs = tempfile::tempdir()?;
    let mock_listen = crm.clone();
    let mut services = Vec::new();
    for (binary, args, ready) in [
        (
            "crm-mock",
            vec!["--listen", mock_listen.as_str()],
            "crm-mock listening",
        ),
        (
            "persister",
            vec!["--metrics-addr", "127.0.0.1:0"],
            "persisting outcomes",
        ),
        (
            "crm-integrator",
            vec!["--metrics-addr", "127.0.0.1:0"],
            "crm-integrator consuming",
        ),
    ] {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let service =
            e2e::pipeline::Service::spawn(&env, binary, &args, logs.path(), binary).await?;
        let log = service.log.clone();
        wait_for(
            &format!("{binary} to start"),
            Duration::from_secs(30),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                async move { text.contains(ready).then_some(()) }
            },
        )
        .await?;
        services.push(service);
    }
    let csv = logs.path().join("two.csv");
    std::fs::write(
        &csv,
        "id,first_name,last_name,email\n1,Ada,Lovelace,ada@example.com\n2,Alan,Turing,alan@example.com\n",
    )?;
    let out = env.run("csv-reader", &[&csv.display().to_string()]).await?;
    assert!(out.status.success(), "{}", describe(&out));
    assert_no_secret("csv-reader", &out);
    for args in [
        vec!["wait", "--timeout", "60s"],
        vec!["status"],
        vec!["verify", "--crm"],
    ] {
        let out = env.run("syncctl", &args).await?;
        assert!(out.status.success(), "syncctl {args:?}: {}", describe(&out));
        assert_no_secret(&format!("syncctl {args:?}"), &out);
    }
    // One more integrator, whose CRM URL carries a password: its start-up log names the CRM.
    let mut with_password = env.clone();
    with_crm_password(&mut with_password, &crm);
    let extra = e2e::pipeline::Service::spawn(
        &with_password,
        "crm-integrator",
        &["--metrics-addr".to_owned(), "127.0.0.1:0".to_owned()],
        logs.path(),
        "crm-integrator-with-crm-password",
    )
    .await?;
    let log = extra.log.clone();
    wait_for(
        "the second integrator to start",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { text.contains("crm-integrator consuming").then_some(()) }
        },
    )
    .await?;
    services.push(extra);
    for mut service in services {
        service.stop(Duration::from_secs(30)).await?;
        let text = std::fs::read_to_string(&service.log)?;
        // The NATS client logs its servers at debug level, where a URL's password used to show.
        assert!(
            service.name == "crm-mock" || text.contains("async_nats"),
            "{} logged at debug level:\n{text}",
            service.name
        );
        for secret in SECRETS {
            assert!(
                !text.contains(secret),
                "{} printed {secret:?}:\n{text}",
                service.name
            );
        }
    }
    Ok(())
}
