//! crm-mock: an in-memory, deliberately unreliable CRM HTTP API for demos, tests and benchmarks.
//! It owns the CRM side of the contract in docs/CONTRACT.md: create/update/get customers, idempotency
//! keys, bearer auth, injected faults (5xx, 429, hangs, latency, concurrency cap, rps quota) and
//! the `/stats` counters, above all `duplicate_effects`, which proves no customer was sent twice.

mod faults;
mod http;
mod store;
mod validate;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use anyhow::Context as _;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use faults::{FaultPlan, InjectedFault};

/// Everything that shapes the mock's behaviour, and the `crm-mock` binary's flags (and
/// environment). `Default` (the flags' defaults, written once in [`CrmMockConfig::DEFAULT`]) is a
/// well-behaved CRM on 127.0.0.1:8080.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "crm-mock",
    version,
    about = "A mock CRM JSON API with injectable faults, for demos, tests and benchmarks"
)]
pub struct CrmMockConfig {
    /// Address to serve on (port 0 picks a free one).
    #[arg(long, env = "CRM_MOCK_LISTEN", default_value_t = Self::DEFAULT.listen)]
    pub listen: SocketAddr,
    /// Share of API requests answered 500/502/503 before anything is applied (0..1).
    #[arg(long, default_value_t = Self::DEFAULT.failure_rate)]
    pub failure_rate: f64,
    /// Share of API requests answered 429 with `Retry-After: --retry-after-secs` (0..1).
    #[arg(long, default_value_t = Self::DEFAULT.rate_limit_rate)]
    pub rate_limit_rate: f64,
    /// Seconds sent in Retry-After with an injected 429.
    #[arg(long, default_value_t = Self::DEFAULT.retry_after_secs)]
    pub retry_after_secs: u64,
    /// Share of API requests that hang for --hang-ms, then 504; half of them (seeded) apply the
    /// change before hanging (0..1).
    #[arg(long, default_value_t = Self::DEFAULT.timeout_rate)]
    pub timeout_rate: f64,
    /// How long an injected timeout hangs, in milliseconds.
    #[arg(long, default_value_t = Self::DEFAULT.hang_ms)]
    pub hang_ms: u64,
    /// Share of API requests that hang for --hang-ms, then 504, while the change lands at the end
    /// of the hang whether or not the client is still there (0..1).
    #[arg(long, default_value_t = Self::DEFAULT.late_apply_rate)]
    pub late_apply_rate: f64,
    /// Latency added to every API request, in milliseconds.
    #[arg(long, default_value_t = Self::DEFAULT.latency_ms)]
    pub latency_ms: u64,
    /// Extra uniform random latency 0..=N ms on every API request.
    #[arg(long, default_value_t = Self::DEFAULT.jitter_ms)]
    pub jitter_ms: u64,
    /// Requests beyond this many in flight get 429 with Retry-After: 1 at once.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests-per-second quota; requests over it get 429 with Retry-After: 1.
    #[arg(long)]
    pub rps: Option<u32>,
    /// Bearer token every API request must present (none: auth off).
    #[arg(long, env = "CRM_API_TOKEN", hide_env_values = true)]
    pub token: Option<SecretString>,
    /// Seed of the fault sequence: the n-th request gets the same fate in every run.
    #[arg(long, default_value_t = Self::DEFAULT.seed)]
    pub seed: u64,
    /// Ignore Idempotency-Key headers, like a CRM without idempotency support, so a retried request
    /// is applied again.
    #[arg(long)]
    pub no_idempotency: bool,
}

impl CrmMockConfig {
    /// The only place the defaults are written: a well-behaved CRM on 127.0.0.1:8080.
    pub const DEFAULT: CrmMockConfig = CrmMockConfig {
        listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)),
        failure_rate: 0.0,
        rate_limit_rate: 0.0,
        retry_after_secs: 1,
        timeout_rate: 0.0,
        hang_ms: 30_000,
        late_apply_rate: 0.0,
        latency_ms: 0,
        jitter_ms: 0,
        max_concurrency: None,
        rps: None,
        token: None,
        seed: 0,
        no_idempotency: false,
    };
}

impl Default for CrmMockConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A configuration the mock cannot honour.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} must be between 0 and 1, got {value}")]
    RateOutOfRange { flag: &'static str, value: f64 },
    #[error(
        "--failure-rate + --rate-limit-rate + --timeout-rate + --late-apply-rate must not exceed \
         1, got {sum} \
         (each request suffers at most one of them)"
    )]
    RatesExceedOne { sum: f64 },
    #[error("--{flag} must be at least 1 when given")]
    ZeroLimit { flag: &'static str },
    #[error("--token must not be empty when given (omit it to turn auth off)")]
    EmptyToken,
}

impl CrmMockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, value) in [
            ("failure-rate", self.failure_rate),
            ("rate-limit-rate", self.rate_limit_rate),
            ("timeout-rate", self.timeout_rate),
            ("late-apply-rate", self.late_apply_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::RateOutOfRange { flag, value });
            }
        }
        let sum =
            self.failure_rate + self.rate_limit_rate + self.timeout_rate + self.late_apply_rate;
        if sum > 1.0 + 1e-9 {
            return Err(ConfigError::RatesExceedOne { sum });
        }
        if self.max_concurrency == Some(0) {
            return Err(ConfigError::ZeroLimit {
                flag: "max-concurrency",
            });
        }
        if self.rps == Some(0) {
            return Err(ConfigError::ZeroLimit { flag: "rps" });
        }
        if self
            .token
            .as_ref()
            .is_some_and(|token| token.expose_secret().is_empty())
        {
            return Err(ConfigError::EmptyToken);
        }
        Ok(())
    }
}

/// The `/stats` JSON document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Every request to a customer route, whatever its answer.
    pub requests: u64,
    /// Creates applied (duplicates included).
    pub created: u64,
    /// Updates applied (identical ones included).
    pub updated: u64,
    /// Requests answered from idempotency memory, applying nothing.
    pub idempotent_replays: u64,
    /// Creates of an id already held plus creates/updates that re-applied identical data.
    pub duplicate_effects: u64,
    /// The first duplicate effects, as `customer id (idempotency key)`, for finding out why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicate_ids: Vec<String>,
    /// Distinct customer ids held.
    pub customers: u64,
    pub injected: InjectedCounts,
    pub concurrency_current: u64,
    /// Highest number of requests admitted in flight at once (never above --max-concurrency).
    pub concurrency_peak: u64,
    pub rejected_auth: u64,
    /// Malformed bodies (400/422).
    pub rejected_invalid: u64,
}

/// Faults the mock produced, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedCounts {
    /// 500/502/503 from --failure-rate.
    pub error: u64,
    /// 429 from --rate-limit-rate.
    pub rate_limited: u64,
    /// Hangs followed by 504, from --timeout-rate.
    pub timeout: u64,
    /// Hangs followed by 504 and a change applied after them, from --late-apply-rate.
    #[serde(default)]
    pub late_applied: u64,
    /// Of those, the changes that have landed (applied, refused or replayed) by now.
    #[serde(default)]
    pub late_landed: u64,
    /// 429 because --max-concurrency requests were already in flight.
    #[serde(default)]
    pub concurrency_limited: u64,
    /// 429 because the --rps quota was spent.
    #[serde(default)]
    pub quota_limited: u64,
}

/// A mock serving in the background until its shutdown token is cancelled.
pub struct RunningMock {
    pub addr: SocketAddr,
    /// `http://{addr}`, without a trailing slash.
    pub url: String,
    app: Arc<http::App>,
    tracker: TaskTracker,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningMock {
    /// The same figures `GET /stats` returns, read without HTTP.
    pub fn stats(&self) -> Stats {
        self.app.stats()
    }

    /// The settings in force.
    pub fn config(&self) -> CrmMockConfig {
        self.app.config()
    }

    /// Switches faults, limits, token or `no_idempotency` for requests arriving from now on (say,
    /// a CRM that goes down and comes back); customers, idempotency memory and counters are kept.
    /// `config.listen` is ignored: the mock keeps its address.
    pub fn reconfigure(&self, config: CrmMockConfig) -> Result<(), ConfigError> {
        config.validate()?;
        self.app.reconfigure(CrmMockConfig {
            listen: self.addr,
            ..config
        });
        Ok(())
    }

    /// Waits until the server has stopped (after the shutdown token was cancelled and in-flight
    /// requests were answered).
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.tracker.wait().await;
        self.server
            .await
            .context("the crm-mock server task panicked")?
    }
}

/// Binds `config.listen` and serves in the background until `shutdown` is cancelled.
pub async fn start(
    config: CrmMockConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningMock> {
    config
        .validate()
        .context("invalid crm-mock configuration")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("no local address for the listener on {}", config.listen))?;
    let app = Arc::new(http::App::new(config, shutdown.clone()));
    let router = http::router(app.clone());
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        // Small JSON answers: without NODELAY a keep-alive client can wait on delayed ACKs.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY on an accepted connection");
        }
    });
    let tracker = TaskTracker::new();
    let server = tracker.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .with_context(|| format!("crm-mock server on {addr} failed"))
    });
    tracker.close();
    Ok(RunningMock {
        addr,
        url: format!("http://{addr}"),
        app,
        tracker,
        server,
    })
}

/// Serves until `shutdown` is cancelled; what `main` runs.
pub async fn run(config: CrmMockConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let summary = format!("{config:?}");
    let mock = start(config, shutdown).await?;
    tracing::info!(url = %mock.url, config = %summary, "crm-mock listening");
    mock.stopped().await?;
    tracing::info!("crm-mock stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_fault_free() {
        let config = CrmMockConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(
            config.failure_rate + config.rate_limit_rate + config.timeout_rate,
            0.0
        );
    }

    #[test]
    fn rejects_impossible_rates_and_limits() {
        let bad = CrmMockConfig {
            failure_rate: 1.5,
            ..CrmMockConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::RateOutOfRange {
                flag: "failure-rate",
                ..
            })
        ));
        let sum = CrmMockConfig {
            failure_rate: 0.6,
            timeout_rate: 0.6,
            ..CrmMockConfig::default()
        };
        assert!(matches!(
            sum.validate(),
            Err(ConfigError::RatesExceedOne { .. })
        ));
        let zero = CrmMockConfig {
            max_concurrency: Some(0),
            ..CrmMockConfig::default()
        };
        assert!(matches!(
            zero.validate(),
            Err(ConfigError::ZeroLimit { .. })
        ));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let config = CrmMockConfig {
            token: Some("s3cret".into()),
            ..CrmMockConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
    }

    #[test]
    fn flags_parse_into_the_config() {
        use clap::Parser as _;
        let config = CrmMockConfig::try_parse_from([
            "crm-mock",
            "--listen",
            "127.0.0.1:0",
            "--failure-rate",
            "0.2",
            "--max-concurrency",
            "200",
            "--token",
            "t",
            "--no-idempotency",
        ])
        .expect("flags should parse");
        assert_eq!(config.failure_rate, 0.2);
        assert_eq!(config.max_concurrency, Some(200));
        assert_eq!(
            config.token.as_ref().map(ExposeSecret::expose_secret),
            Some("t")
        );
        assert!(config.no_idempotency);
        assert_eq!(config.hang_ms, 30_000);
    }
}
