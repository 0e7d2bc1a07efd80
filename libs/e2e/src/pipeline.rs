//! The whole pipeline as separate processes of the real binaries: crm-mock, persister and N
//! crm-integrator replicas, on a namespace and database of their own.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::{binary, free_port, terminate, unique_namespace, wait_for};

/// Where the pipeline's services find their dependencies.
#[derive(Debug, Clone)]
pub struct PipelineEnv {
    pub nats_url: String,
    pub database_url: String,
    pub namespace: String,
    pub crm_token: String,
    /// Extra flags of every `syncctl setup` this pipeline runs (say, a short dedup window, or
    /// `--replicas 3` on a cluster).
    pub setup_args: Vec<String>,
    /// Environment of one binary beyond the above (its NATS user, TLS files), by binary name.
    pub service_env: std::collections::HashMap<String, Vec<(String, String)>>,
}

impl PipelineEnv {
    pub fn new(nats_url: &str, database_url: &str) -> Self {
        PipelineEnv {
            nats_url: nats_url.to_owned(),
            database_url: database_url.to_owned(),
            namespace: unique_namespace(),
            crm_token: format!("token-{:08x}", rand::random::<u32>()),
            setup_args: Vec::new(),
            service_env: Default::default(),
        }
    }

    /// Sets `key=value` in the environment of each of `binaries`.
    pub fn set_env(&mut self, binaries: &[&str], key: &str, value: impl AsRef<str>) {
        for binary in binaries {
            self.service_env
                .entry((*binary).to_owned())
                .or_default()
                .push((key.to_owned(), value.as_ref().to_owned()));
        }
    }

    /// A command for one of the workspace's binaries with this pipeline's environment.
    pub fn command(&self, name: &str) -> anyhow::Result<Command> {
        let mut command = Command::new(binary(name)?);
        command
            .env("NATS_URL", &self.nats_url)
            .env("DATABASE_URL", &self.database_url)
            .env("SYNC_NAMESPACE", &self.namespace)
            .env("CRM_API_TOKEN", &self.crm_token)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (key, value) in self.service_env.get(name).into_iter().flatten() {
            command.env(key, value);
        }
        Ok(command)
    }

    /// Runs a binary to completion, capturing its output.
    pub async fn run(&self, name: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.command(name)?
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {name} {args:?}"))
    }

    /// `syncctl setup`, failing the test with its output if it fails.
    pub async fn setup(&self) -> anyhow::Result<()> {
        let mut args = vec!["setup"];
        args.extend(self.setup_args.iter().map(String::as_str));
        // A cluster that has just formed can still time out creating replicated streams; setup is
        // idempotent, so it is run again, a few times.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let out = self.run("syncctl", &args).await?;
            if out.status.success() {
                return Ok(());
            }
            if attempts >= 3 {
                bail!("syncctl setup failed {attempts} times: {}", describe(&out));
            }
            eprintln!("syncctl setup failed, running it again: {}", describe(&out));
        }
    }

    /// `syncctl verify --json` (with `--crm` against `crm_url` when given): the report, or an
    /// error with the whole report when anything differs or is pending.
    pub async fn verify(&self, crm_url: Option<&str>) -> anyhow::Result<serde_json::Value> {
        let mut args = vec!["verify", "--json"];
        if let Some(url) = crm_url {
            // Every customer is asked for, and the tests' CRMs stay faulty to the end: each 429
            // waits its Retry-After and each hang its timeout, so more lookups in flight than the
            // operator's default keep that wait short.
            args.extend(["--crm", "--crm-url", url, "--crm-concurrency", "256"]);
        }
        let out = self.run("syncctl", &args).await?;
        if !out.status.success() {
            bail!("syncctl verify found differences: {}", describe(&out));
        }
        serde_json::from_slice(&out.stdout).context("parsing syncctl verify --json")
    }

    /// `syncctl status --json`.
    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.run("syncctl", &["status", "--json"]).await?;
        if !out.status.success() {
            bail!("syncctl status failed: {}", describe(&out));
        }
        serde_json::from_slice(&out.stdout).context("parsing syncctl status --json")
    }
}

/// Exit status, stdout and stderr of a finished process, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running service with its log file, so a failing test can show what it said.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    pub async fn spawn(
        env: &PipelineEnv,
        name: &str,
        args: &[String],
        log_dir: &Path,
        label: &str,
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{label}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = file.try_clone()?;
        let child = env
            .command(name)?
            .args(args)
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Service {
            name: label.to_owned(),
            child,
            log,
        })
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL: a crash, no chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill().ok();
        self.child
            .wait()
            .await
            .context("waiting for killed process")?;
        Ok(())
    }

    /// SIGTERM and wait for a graceful exit; fails if it does not exit 0 within `timeout`.
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        terminate(&self.child)?;
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} did not stop within {timeout:?}", self.name))??;
        if !status.success() {
            bail!("{} exited with {status}:\n{}", self.name, self.log_tail());
        }
        Ok(())
    }
}

/// crm-mock settings used by the end-to-end tests.
#[derive(Debug, Clone, Default)]
pub struct MockFaults {
    pub failure_rate: f64,
    pub rate_limit_rate: f64,
    pub timeout_rate: f64,
    pub hang_ms: u64,
    pub latency_ms: u64,
    pub extra: Vec<String>,
}

/// crm-mock, persister and integrator replicas, running.
#[derive(Debug)]
pub struct Pipeline {
    pub env: PipelineEnv,
    pub crm_url: String,
    pub mock: Service,
    pub persister: Service,
    pub integrators: Vec<Service>,
    pub log_dir: tempfile::TempDir,
    integrator_args: Vec<String>,
}

impl Pipeline {
    pub async fn start(
        env: PipelineEnv,
        faults: MockFaults,
        replicas: usize,
        integrator_args: &[&str],
    ) -> anyhow::Result<Self> {
        // E2E_KEEP_LOGS=1 keeps the services' logs after the test, for a failure to be read.
        let log_dir = tempfile::Builder::new()
            .prefix("e2e-logs-")
            .disable_cleanup(std::env::var_os("E2E_KEEP_LOGS").is_some())
            .tempdir()?;
        eprintln!("service logs: {}", log_dir.path().display());
        env.setup().await?;
        let port = free_port()?;
        let crm_url = format!("http://127.0.0.1:{port}");
        let mut mock_args: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            // The token comes from CRM_API_TOKEN in the environment: never on a command line.
            "--seed".into(),
            "11".into(),
            "--failure-rate".into(),
            faults.failure_rate.to_string(),
            "--rate-limit-rate".into(),
            faults.rate_limit_rate.to_string(),
            "--timeout-rate".into(),
            faults.timeout_rate.to_string(),
            "--latency-ms".into(),
            faults.latency_ms.to_string(),
        ];
        if faults.hang_ms > 0 {
            mock_args.extend(["--hang-ms".into(), faults.hang_ms.to_string()]);
        }
        mock_args.extend(faults.extra.iter().cloned());
        let mock = Service::spawn(&env, "crm-mock", &mock_args, log_dir.path(), "crm-mock").await?;
        let http = reqwest::Client::new();
        wait_for("crm-mock to answer", Duration::from_secs(20), || {
            let http = http.clone();
            let url = format!("{crm_url}/healthz");
            async move {
                http.get(url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await?;
        let persister = Service::spawn(
            &env,
            "persister",
            &["--metrics-addr".into(), "127.0.0.1:0".into()],
            log_dir.path(),
            "persister",
        )
        .await?;
        let mut pipeline = Pipeline {
            env,
            crm_url,
            mock,
            persister,
            integrators: Vec::new(),
            log_dir,
            integrator_args: integrator_args.iter().map(|s| s.to_string()).collect(),
        };
        for _ in 0..replicas {
            pipeline.add_integrator().await?;
        }
        Ok(pipeline)
    }

    pub async fn add_integrator(&mut self) -> anyhow::Result<()> {
        let service = self.spawn_integrator(self.integrators.len()).await?;
        self.integrators.push(service);
        Ok(())
    }

    /// Replaces integrator `index` with a fresh process (after a kill).
    pub async fn respawn_integrator(&mut self, index: usize) -> anyhow::Result<()> {
        self.integrators[index] = self.spawn_integrator(index).await?;
        Ok(())
    }

    async fn spawn_integrator(&self, index: usize) -> anyhow::Result<Service> {
        let label = format!("crm-integrator-{index}");
        let mut args = vec![
            "--crm-url".to_owned(),
            self.crm_url.clone(),
            "--metrics-addr".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend(self.integrator_args.iter().cloned());
        Service::spawn(
            &self.env,
            "crm-integrator",
            &args,
            self.log_dir.path(),
            &label,
        )
        .await
    }

    pub async fn respawn_persister(&mut self) -> anyhow::Result<()> {
        self.persister = Service::spawn(
            &self.env,
            "persister",
            &["--metrics-addr".into(), "127.0.0.1:0".into()],
            self.log_dir.path(),
            "persister",
        )
        .await?;
        Ok(())
    }

    /// crm-mock's `/stats` as JSON (it wants the pipeline's token).
    pub async fn crm_stats(&self) -> anyhow::Result<serde_json::Value> {
        let stats = reqwest::Client::new()
            .get(format!("{}/stats", self.crm_url))
            .bearer_auth(&self.env.crm_token)
            .send()
            .await
            .context("asking crm-mock for /stats")?
            .error_for_status()
            .context("crm-mock /stats refused")?
            .json()
            .await
            .context("parsing crm-mock /stats")?;
        Ok(stats)
    }

    /// `syncctl verify --crm` against this pipeline's crm-mock: every customer's newest version in
    /// `customers`, the ledger and the CRM.
    pub async fn verify(&self) -> anyhow::Result<serde_json::Value> {
        self.env.verify(Some(&self.crm_url)).await
    }

    /// `syncctl wait` until nothing is pending or in flight, failing with the services' logs.
    pub async fn wait_drained(&self, timeout: Duration) -> anyhow::Result<()> {
        let secs = format!("{}s", timeout.as_secs());
        let out = self
            .env
            .run("syncctl", &["wait", "--timeout", &secs])
            .await?;
        if !out.status.success() {
            bail!(
                "pipeline did not drain: {}\n{}",
                describe(&out),
                self.logs()
            );
        }
        Ok(())
    }

    /// The last lines of every service's log.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for service in std::iter::once(&self.mock)
            .chain(std::iter::once(&self.persister))
            .chain(self.integrators.iter())
        {
            text.push_str(&format!(
                "\n=== {} ===\n{}\n",
                service.name,
                service.log_tail()
            ));
        }
        text
    }

    /// Stops everything with SIGTERM; every long-running service must exit 0.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for integrator in &mut self.integrators {
            integrator.stop(Duration::from_secs(30)).await?;
        }
        self.persister.stop(Duration::from_secs(30)).await?;
        self.mock.stop(Duration::from_secs(10)).await?;
        Ok(())
    }
}
