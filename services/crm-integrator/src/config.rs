//! The integrator's settings: flags and environment, in one typed struct.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use reqwest::Url;
use service_kit::NatsArgs;

/// Command-line flags (and environment) of the `crm-integrator` binary.
#[derive(Clone, clap::Parser)]
#[command(
    name = "crm-integrator",
    version,
    about = "Consumes customer records from NATS and syncs each to the CRM exactly once"
)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Base URL of the CRM API.
    #[arg(
        long,
        env = "CRM_URL",
        default_value = "http://127.0.0.1:8080",
        hide_env_values = true,
        value_parser = service_kit::UrlParser
    )]
    pub crm_url: Url,
    /// Bearer token for the CRM API (never logged).
    #[arg(long, env = "CRM_API_TOKEN", hide_env_values = true)]
    pub crm_token: Option<String>,
    /// Fixed number of CRM requests in flight. Without it the integrator adapts the number to
    /// the CRM (additive increase, multiplicative decrease on 429s, timeouts and rising latency).
    #[arg(long, env = "CRM_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Upper bound of the adaptive concurrency.
    #[arg(long, default_value_t = 512)]
    pub max_concurrency: usize,
    /// Requests-per-second budget for this replica.
    #[arg(long, env = "CRM_RPS")]
    pub rps: Option<NonZeroU32>,
    /// Longest deadline of one CRM request, in milliseconds. Within it, a request is given up as
    /// hung after ten times the CRM's recent 99th-percentile answer time, but never sooner than
    /// --min-request-timeout-ms.
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Shortest deadline of one CRM request, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    pub min_request_timeout_ms: u64,
    /// Deliveries after which a record that still fails goes to the dead subject. (The consumer
    /// has no server-side cap: deliveries spent waiting for an older version are not failures.)
    #[arg(long, default_value_t = 10)]
    pub max_deliver: u64,
    /// Address of /metrics, /healthz and /readyz (port 0 picks a free one).
    #[arg(
        long,
        env = "CRM_INTEGRATOR_METRICS_ADDR",
        default_value = "127.0.0.1:9101"
    )]
    pub metrics_addr: SocketAddr,
    /// Durable consumer to read from (`syncctl replay` points an integrator at its own).
    #[arg(long, default_value = "integrators")]
    pub consumer: String,
    /// Messages pulled per request to the server; what is pulled but not started stays below it.
    #[arg(long, default_value_t = 128)]
    pub fetch_batch: usize,
    /// Retry waits up to this long happen in-process (with ack progress); longer ones hand the
    /// message back with a delayed NAK.
    #[arg(long, default_value_t = 2_000)]
    pub max_inline_wait_ms: u64,
    /// Share of failed answers (5xx, timeouts, connection errors) within --breaker-window-ms that
    /// opens the circuit breaker.
    #[arg(long, default_value_t = 0.5)]
    pub breaker_failure_share: f64,
    /// Answers the breaker's window must hold before its share can open it.
    #[arg(long, default_value_t = 20)]
    pub breaker_min_requests: u32,
    /// The breaker's window, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub breaker_window_ms: u64,
    /// First cool-down of an open breaker before one probe request, in milliseconds; doubles
    /// while probes fail.
    #[arg(long, default_value_t = 1_000)]
    pub breaker_cooldown_ms: u64,
    /// Longest fleet-wide pause, and longest wait of one record's retry, in milliseconds, whatever
    /// the CRM's Retry-After says.
    #[arg(long, default_value_t = sync_topology::messages::DEFAULT_MAX_PAUSE_MS)]
    pub max_pause_ms: u64,
    /// Send the CRM token over plain http:// to a host other than this machine (only on a private
    /// network: anyone on the path can read it).
    #[arg(long, env = "CRM_ALLOW_INSECURE")]
    pub allow_insecure_crm: bool,
}

impl Config {
    /// Settings for tests and in-process callers: everything at its default except where to
    /// find NATS and the CRM, and an ephemeral metrics port.
    pub fn new(nats_url: &str, namespace: &str, crm_url: Url) -> Self {
        Config {
            nats: NatsArgs::new(nats_url, namespace),
            crm_url,
            crm_token: None,
            concurrency: None,
            max_concurrency: 512,
            rps: None,
            request_timeout_ms: 10_000,
            min_request_timeout_ms: 1_000,
            max_deliver: 10,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            consumer: "integrators".to_owned(),
            fetch_batch: 128,
            max_inline_wait_ms: 2_000,
            breaker_failure_share: 0.5,
            breaker_min_requests: 20,
            breaker_window_ms: 10_000,
            breaker_cooldown_ms: 1_000,
            max_pause_ms: sync_topology::messages::DEFAULT_MAX_PAUSE_MS,
            allow_insecure_crm: false,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn min_request_timeout(&self) -> Duration {
        Duration::from_millis(self.min_request_timeout_ms.max(1)).min(self.request_timeout())
    }

    pub fn max_pause(&self) -> Duration {
        Duration::from_millis(self.max_pause_ms)
    }

    pub fn max_inline_wait(&self) -> Duration {
        Duration::from_millis(self.max_inline_wait_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.concurrency == Some(0) {
            return Err(ConfigError::Zero("concurrency"));
        }
        if self.max_concurrency == 0 {
            return Err(ConfigError::Zero("max-concurrency"));
        }
        if self.max_deliver == 0 {
            return Err(ConfigError::Zero("max-deliver"));
        }
        if self.fetch_batch == 0 {
            return Err(ConfigError::Zero("fetch-batch"));
        }
        if !(self.breaker_failure_share > 0.0 && self.breaker_failure_share <= 1.0) {
            return Err(ConfigError::Share("breaker-failure-share"));
        }
        if !matches!(self.crm_url.scheme(), "http" | "https") {
            return Err(ConfigError::CrmScheme(sync_topology::redact(
                self.crm_url.as_str(),
            )));
        }
        if self.crm_token.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::EmptyToken);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("--{0} must be a share above 0 and at most 1")]
    Share(&'static str),
    #[error("--crm-url {0} must be an http:// or https:// URL")]
    CrmScheme(String),
    #[error("--crm-token / CRM_API_TOKEN is set but empty (unset it to send no token)")]
    EmptyToken,
}

// Hand-written so the CRM token never reaches a log line.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("nats", &self.nats)
            .field("crm_url", &sync_topology::redact(self.crm_url.as_str()))
            .field("crm_token", &self.crm_token.as_ref().map(|_| "<redacted>"))
            .field("concurrency", &self.concurrency)
            .field("max_concurrency", &self.max_concurrency)
            .field("rps", &self.rps)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("min_request_timeout_ms", &self.min_request_timeout_ms)
            .field("max_deliver", &self.max_deliver)
            .field("metrics_addr", &self.metrics_addr)
            .field("consumer", &self.consumer)
            .field("fetch_batch", &self.fetch_batch)
            .field("max_inline_wait_ms", &self.max_inline_wait_ms)
            .field("breaker_failure_share", &self.breaker_failure_share)
            .field("breaker_min_requests", &self.breaker_min_requests)
            .field("breaker_window_ms", &self.breaker_window_ms)
            .field("breaker_cooldown_ms", &self.breaker_cooldown_ms)
            .field("max_pause_ms", &self.max_pause_ms)
            .field("allow_insecure_crm", &self.allow_insecure_crm)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn defaults_work_on_a_dev_machine() {
        let config = Config::try_parse_from(["crm-integrator"]).expect("defaults parse");
        assert_eq!(config.crm_url.as_str(), "http://127.0.0.1:8080/");
        assert_eq!(config.metrics_addr.to_string(), "127.0.0.1:9101");
        assert_eq!(config.consumer, "integrators");
        assert_eq!(config.max_deliver, 10);
        assert_eq!(config.concurrency, None);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let config = Config::try_parse_from(["crm-integrator", "--crm-token", "s3cret"])
            .expect("flags parse");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn nonsense_is_refused() {
        let config =
            Config::try_parse_from(["crm-integrator", "--concurrency", "0"]).expect("flags parse");
        assert_eq!(config.validate(), Err(ConfigError::Zero("concurrency")));
        assert!(Config::try_parse_from(["crm-integrator", "--crm-url", "not a url"]).is_err());
    }
}
