//! A stack started in the wrong order comes up by itself: the persister, an integrator, `syncctl
//! wait` and csv-reader started while NATS is down each say what they wait for and connect once it
//! is there. Readiness follows NATS: when it goes away the long-running services say so, naming
//! the server and the error, and are ready again when it is back.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use e2e::pipeline::{PipelineEnv, Service};
use e2e::{PrivateNats, TestDatabase, free_port, wait_for};

/// `/readyz` of a service: its status code and body.
async fn readyz(http: &reqwest::Client, addr: &str) -> Option<(u16, String)> {
    let response = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

async fn spawn(
    env: &PipelineEnv,
    name: &str,
    args: &[&str],
    logs: &Path,
) -> anyhow::Result<Service> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    Service::spawn(env, name, &args, logs, name).await
}

/// Every metric the Grafana dashboard (deploy/grafana/customer-sync.json) queries is one the
/// services export, so a renamed metric cannot leave a panel empty unnoticed.
async fn dashboard_metrics_are_exported(
    http: &reqwest::Client,
    addrs: &[&str],
) -> anyhow::Result<()> {
    let path = e2e::workspace_root().join("deploy/grafana/customer-sync.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut exported = String::new();
    for addr in addrs {
        let metrics = http.get(format!("http://{addr}/metrics")).send().await?;
        exported.push_str(&metrics.text().await?);
    }
    let panels = dashboard["panels"].as_array().context("panels")?;
    let exprs = panels
        .iter()
        .filter_map(|panel| panel["targets"].as_array())
        .flatten()
        .filter_map(|target| target["expr"].as_str());
    let mut queried = Vec::new();
    for expr in exprs {
        for prefix in ["crm_integrator_", "persister_"] {
            for (at, _) in expr.match_indices(prefix) {
                // `$persister_job` is a dashboard variable, not a metric.
                if expr[..at].ends_with('$') {
                    continue;
                }
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                queried.push(name);
            }
        }
    }
    anyhow::ensure!(!queried.is_empty(), "no metric found in {}", path.display());
    for name in queried {
        let line_start = |line: &str| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        };
        anyhow::ensure!(
            exported.lines().any(line_start),
            "the dashboard queries {name}, which no service exports"
        );
    }
    Ok(())
}

/// Waits for a one-shot command to exit 0.
async fn exits_0(service: &mut Service) -> anyhow::Result<()> {
    let status = tokio::time::timeout(Duration::from_secs(60), service.child.wait())
        .await
        .with_context(|| format!("{} did not finish", service.name))??;
    anyhow::ensure!(
        status.success(),
        "{} exited with {status}:\n{}",
        service.name,
        service.log_tail()
    );
    Ok(())
}

#[tokio::test]
async fn services_started_before_nats_wait_for_it_and_follow_it_in_their_readiness()
-> anyhow::Result<()> {
    let mut nats = PrivateNats::start().await?;
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats.url(), &db.url);
    env.setup().await?;
    nats.stop().await?;

    let logs = tempfile::tempdir()?;
    let crm_port = free_port()?;
    let crm_listen = format!("127.0.0.1:{crm_port}");
    let crm_url = format!("http://{crm_listen}");
    let token = env.crm_token.clone();
    let mut mock = spawn(
        &env,
        "crm-mock",
        &["--listen", &crm_listen, "--token", &token],
        logs.path(),
    )
    .await?;
    let persister_addr = format!("127.0.0.1:{}", free_port()?);
    let integrator_addr = format!("127.0.0.1:{}", free_port()?);
    let mut persister = spawn(
        &env,
        "persister",
        &["--metrics-addr", &persister_addr],
        logs.path(),
    )
    .await?;
    let mut integrator = spawn(
        &env,
        "crm-integrator",
        &["--metrics-addr", &integrator_addr, "--crm-url", &crm_url],
        logs.path(),
    )
    .await?;
    let file = logs.path().join("customers.csv");
    let mut rows = String::from("id,first_name,last_name,email\n");
    for n in 0..50 {
        rows.push_str(&format!("s{n},First{n},Last{n},s{n}@example.com\n"));
    }
    std::fs::write(&file, rows)?;
    let mut waiter = spawn(&env, "syncctl", &["wait", "--timeout", "60s"], logs.path()).await?;
    let file_arg = file.display().to_string();
    let mut reader = spawn(
        &env,
        "csv-reader",
        &["--progress", "off", &file_arg],
        logs.path(),
    )
    .await?;

    let waiting = format!("NATS at 127.0.0.1:{} not reachable yet", nats.port);
    wait_for(
        "every service to say it waits for NATS",
        Duration::from_secs(20),
        || async {
            [&persister, &integrator, &waiter, &reader]
                .iter()
                .all(|s| s.log_tail().contains(&waiting))
                .then_some(())
        },
    )
    .await?;
    let (status, reason) = readyz(&reqwest::Client::new(), &integrator_addr)
        .await
        .context("the integrator serves /readyz while it waits")?;
    assert_eq!(status, 503, "{reason}");

    nats.start_again().await?;
    exits_0(&mut reader).await?;
    exits_0(&mut waiter).await?;
    let http = reqwest::Client::new();
    for addr in [&persister_addr, &integrator_addr] {
        wait_for("ready once NATS is up", Duration::from_secs(30), || async {
            let (status, _) = readyz(&http, addr).await?;
            (status == 200).then_some(())
        })
        .await?;
    }
    let drained = env.run("syncctl", &["wait", "--timeout", "60s"]).await?;
    assert!(drained.status.success(), "{}", integrator.log_tail());
    let status = env.status().await?;
    assert_eq!(status["outcomes"]["synced"], 50, "{status}");
    assert_eq!(status["reconciled"], true, "{status}");
    dashboard_metrics_are_exported(&http, &[&integrator_addr, &persister_addr]).await?;

    // NATS goes away: not ready, naming NATS and why; back: ready again.
    nats.stop().await?;
    let gone = format!(
        "NATS at 127.0.0.1:{} disconnected (connection refused)",
        nats.port
    );
    for addr in [&persister_addr, &integrator_addr] {
        wait_for(
            "not ready without NATS",
            Duration::from_secs(20),
            || async {
                let (status, body) = readyz(&http, addr).await?;
                (status == 503 && body.contains(&gone)).then_some(())
            },
        )
        .await?;
    }
    nats.start_again().await?;
    for addr in [&persister_addr, &integrator_addr] {
        wait_for("ready again with NATS", Duration::from_secs(30), || async {
            let (status, _) = readyz(&http, addr).await?;
            (status == 200).then_some(())
        })
        .await?;
    }

    integrator.stop(Duration::from_secs(30)).await?;
    persister.stop(Duration::from_secs(30)).await?;
    mock.stop(Duration::from_secs(10)).await?;
    Ok(())
}
