//! What every binary sets up the same way: logging (`RUST_LOG`, `LOG_FORMAT=json`), the shutdown
//! token driven by SIGINT/SIGTERM, the shared NATS flags, waiting for servers at start-up, the
//! one-line report of the failure that ends a binary, and the metrics and health endpoint.

mod failure;
mod health;
pub mod retry;
mod startup;

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use axum::{Router, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use secrecy::SecretString;
use sync_topology::NatsSecurity;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub use failure::{
    EXIT_FAILURE, EXIT_USAGE, exit_on_usage_error, json_logs, one_line, parse_args, report_failure,
    root_cause,
};
pub use health::{Health, watch_nats};
pub use startup::{connect_nats, host_port, parse_duration, retry_until_up};

/// Default of `--startup-wait`: long enough for a stack whose servers start in any order.
pub const DEFAULT_STARTUP_WAIT: Duration = Duration::from_secs(300);

/// Flags every NATS-connected binary shares. Secret-bearing values are never shown by `--help`
/// (clap would print the environment's values) nor by `Debug`.
#[derive(Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated; `tls://` requires TLS.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,
    /// NATS credentials file (JWT + NKey), for servers in operator mode.
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// File holding this service's NATS nkey seed (`SU…`), for servers that list users by nkey.
    #[arg(long, env = "NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// NATS user name (with --nats-password).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (never shown; prefer the environment to the command line).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<SecretString>,
    /// PEM file of the CA the NATS server's certificate must chain to; setting it requires TLS.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for NATS servers that verify clients (with --nats-tls-key).
    #[arg(long, env = "NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// Prefix of every subject, stream, consumer and bucket name.
    #[arg(long, env = "SYNC_NAMESPACE", default_value = "customers")]
    pub namespace: String,
    /// How long to keep trying NATS (and PostgreSQL, where used) at start-up before giving up, so
    /// services started before their servers wait for them: `5m`, `90s`, or seconds; 0 tries once.
    #[arg(long, env = "STARTUP_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub startup_wait: Duration,
}

impl NatsArgs {
    /// Settings for tests and in-process callers that have no command line.
    pub fn new(nats_url: impl Into<String>, namespace: impl Into<String>) -> Self {
        NatsArgs {
            nats_url: nats_url.into(),
            nats_creds: None,
            nats_nkey: None,
            nats_user: None,
            nats_password: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            namespace: namespace.into(),
            startup_wait: DEFAULT_STARTUP_WAIT,
        }
    }

    /// Who this client is to NATS, and its TLS settings.
    pub fn security(&self) -> NatsSecurity {
        NatsSecurity {
            creds_file: self.nats_creds.clone(),
            nkey_file: self.nats_nkey.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
        }
    }

    /// Connects as `client_name` with these settings (see [`sync_topology::connect_with`]).
    pub async fn connect(
        &self,
        client_name: &str,
    ) -> Result<async_nats::Client, sync_topology::ConnectError> {
        sync_topology::connect_with(&self.nats_url, &self.security(), client_name).await
    }

    /// The server list with credentials hidden, for log lines and messages.
    pub fn redacted_url(&self) -> String {
        sync_topology::redact(&self.nats_url)
    }
}

// By hand: a URL may carry a password, and the password flag is one.
impl std::fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsArgs")
            .field("nats_url", &self.redacted_url())
            .field("security", &self.security())
            .field("namespace", &self.namespace)
            .field("startup_wait", &self.startup_wait)
            .finish()
    }
}

/// Parses a URL flag without ever repeating it in an error: clap's own error for a bad value quotes
/// the value, and a URL may carry a password. `#[arg(value_parser = service_kit::UrlParser)]`.
#[derive(Debug, Clone, Copy)]
pub struct UrlParser;

impl clap::builder::TypedValueParser for UrlParser {
    type Value = url::Url;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let name = arg.map_or_else(|| "URL".to_owned(), ToString::to_string);
        let refuse = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{name}': {why}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("not UTF-8".to_owned()))?;
        url::Url::parse(text).map_err(|err| {
            refuse(format!(
                "{} is not a URL: {err}",
                sync_topology::redact(text)
            ))
        })
    }
}

/// Installs the global tracing subscriber. `LOG_FORMAT=json` gives one JSON object per line.
/// Logs go to stderr so a binary's stdout stays free for its output (`--json`, summaries). Every
/// line passes through [`sync_topology::redact`] on its way out: libraries log server addresses
/// too (async-nats prints its server URLs, password included, at debug level).
pub fn init_telemetry() {
    init_telemetry_with_default("info");
}

/// [`init_telemetry`] with another filter when `RUST_LOG` is unset: a CLI such as `syncctl` keeps
/// its output free of connection chatter with `"warn"`.
pub fn init_telemetry_with_default(default_directives: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_directives));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json_logs() {
        registry
            .with(fmt::layer().json().with_writer(RedactedStderr))
            .try_init()
    } else {
        // Colour codes only for a person at a terminal, never into files or collectors.
        let ansi = std::io::stderr().is_terminal();
        registry
            .with(fmt::layer().with_ansi(ansi).with_writer(RedactedStderr))
            .try_init()
    };
    // Already installed (a test started two services in one process): keep the first.
    let _ = result;
}

/// Standard error with credentials taken out of what is written. The formatter writes each event
/// whole in one call, so a URL or DSN is never split between two writes.
#[derive(Debug, Clone, Copy)]
struct RedactedStderr;

impl std::io::Write for RedactedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(sync_topology::redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> fmt::MakeWriter<'a> for RedactedStderr {
    type Writer = RedactedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// A token cancelled by the first SIGINT or SIGTERM. A second signal exits at once, for an
/// operator who does not want to wait for in-flight work.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing in-flight work (signal again to force)");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Buckets of every `*_seconds` histogram: from half a millisecond (a local CRM) to a minute (a
/// request given up, a long pause), so latencies aggregate across replicas in PromQL.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets of every `*_size` histogram (counts of items, such as the outcomes of a batch).
const SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 50000.0,
];

/// Histograms with buckets rather than summaries: a summary's quantiles cannot be added up across
/// replicas, bucket counts can.
fn prometheus_builder() -> PrometheusBuilder {
    let bucketed = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".to_owned()), SIZE_BUCKETS));
    match bucketed {
        Ok(bucketed) => bucketed,
        Err(err) => {
            tracing::warn!(%err, "histogram buckets refused; latencies are summaries");
            PrometheusBuilder::new()
        }
    }
}

/// The process-wide Prometheus recorder. Installed once; later calls return the same handle, so
/// several services started in one test process share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = prometheus_builder().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be global (a test harness); ours then just renders empty.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves `/metrics` (Prometheus text), `/healthz` (alive) and `/readyz` (ready to work: 200
/// `ready`, or 503 `not ready: ` and the reason) until `shutdown`. Returns the bound address,
/// useful when `addr` asked for port 0.
pub async fn serve_metrics(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let handle = metrics_handle();
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok")))
        .route(
            "/readyz",
            get(move || {
                let status = match health.readiness() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(reason) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {reason}\n"),
                    ),
                };
                std::future::ready(status)
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "metrics server stopped");
        }
    });
    Ok(bound)
}
