//! What a replica is told: the typed [`Settings`], whose `Default` is the one place every default
//! is written (the flags in `args.rs` show and fall back to it, and tests start from it), and
//! [`IntegratorConfig`], the settings with how to reach NATS.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use reqwest::Url;
use secrecy::{ExposeSecret as _, SecretString};
use service_kit::NatsArgs;
use sync_topology::Names;
use sync_topology::messages::DEFAULT_MAX_PAUSE_MS;

use crate::policy::BreakerSettings;

/// How to reach NATS, and the rest.
#[derive(Debug, Clone)]
pub struct IntegratorConfig {
    pub nats: NatsArgs,
    pub settings: Settings,
}

impl IntegratorConfig {
    /// The default settings with the CRM at `crm_url` and an ephemeral metrics port: for tests
    /// and other in-process runs.
    pub fn new(nats: NatsArgs, crm_url: Url) -> Self {
        IntegratorConfig {
            nats,
            settings: Settings {
                crm_url: CrmUrl(crm_url),
                metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..Settings::default()
            },
        }
    }
}

/// Everything a replica is told besides how to reach NATS: where the CRM is, and how hard to
/// push it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL of the CRM API.
    pub crm_url: CrmUrl,
    /// Bearer token for the CRM API.
    pub crm_token: Option<SecretString>,
    /// Send the token over plain http:// to a host other than this machine.
    pub allow_insecure_crm: bool,
    /// Fixed number of CRM requests in flight; `None` adapts it to the CRM.
    pub concurrency: Option<usize>,
    /// Upper bound of the adaptive concurrency.
    pub max_concurrency: usize,
    /// Requests-per-second budget for this replica.
    pub rps: Option<NonZeroU32>,
    /// Longest deadline of one CRM request (the limiter learns shorter ones).
    pub request_timeout: Duration,
    /// Shortest deadline of one CRM request.
    pub min_request_timeout: Duration,
    /// Failed deliveries of a version after which it is dead-lettered.
    pub max_deliver: u64,
    /// Address of /metrics, /healthz and /readyz (port 0 picks a free one).
    pub metrics_addr: SocketAddr,
    /// Durable consumer to read from.
    pub consumer: String,
    /// Messages pulled per request to the server.
    pub fetch_batch: usize,
    /// Longest retry wait spent in-process; longer ones hand the message back.
    pub max_inline_wait: Duration,
    /// When the circuit breaker opens, and how long it cools down.
    pub breaker: BreakerSettings,
    /// Longest fleet-wide pause, and longest wait of one record's retry.
    pub max_pause: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            crm_url: CrmUrl::from_literal("http://127.0.0.1:8080"),
            crm_token: None,
            allow_insecure_crm: false,
            concurrency: None,
            max_concurrency: 512,
            rps: None,
            request_timeout: Duration::from_secs(10),
            min_request_timeout: Duration::from_secs(1),
            max_deliver: 10,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9101)),
            consumer: Names::default().integrators_consumer().to_owned(),
            fetch_batch: 128,
            max_inline_wait: Duration::from_secs(2),
            breaker: BreakerSettings {
                failure_share: 0.5,
                min_requests: 20,
                window: Duration::from_secs(10),
                cooldown: Duration::from_secs(1),
            },
            max_pause: Duration::from_millis(DEFAULT_MAX_PAUSE_MS),
        }
    }
}

impl Settings {
    /// The longest request deadline in force: a zero one would give up every request at once.
    pub(crate) fn longest_deadline(&self) -> Duration {
        self.request_timeout.max(Duration::from_millis(1))
    }

    /// The shortest request deadline in force, at most the longest.
    pub(crate) fn shortest_deadline(&self) -> Duration {
        self.min_request_timeout
            .max(Duration::from_millis(1))
            .min(self.longest_deadline())
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.concurrency == Some(0) {
            return Err(SettingsError::Zero("concurrency"));
        }
        if self.max_concurrency == 0 {
            return Err(SettingsError::Zero("max-concurrency"));
        }
        if self.max_deliver == 0 {
            return Err(SettingsError::Zero("max-deliver"));
        }
        if self.fetch_batch == 0 {
            return Err(SettingsError::Zero("fetch-batch"));
        }
        let share = self.breaker.failure_share;
        if !(share > 0.0 && share <= 1.0) {
            return Err(SettingsError::Share("breaker-failure-share"));
        }
        if !matches!(self.crm_url.url().scheme(), "http" | "https") {
            return Err(SettingsError::CrmScheme(self.crm_url.redacted()));
        }
        if self
            .crm_token
            .as_ref()
            .is_some_and(|token| token.expose_secret().is_empty())
        {
            return Err(SettingsError::EmptyToken);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("--{0} must be a share above 0 and at most 1")]
    Share(&'static str),
    #[error("--crm-url {0} must be an http:// or https:// URL")]
    CrmScheme(String),
    #[error("--crm-token / CRM_API_TOKEN is set but empty (unset it to send no token)")]
    EmptyToken,
}

/// The CRM's base URL. It may carry a password, so its `Debug` (the settings are logged at
/// start-up) shows it redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct CrmUrl(pub Url);

impl CrmUrl {
    fn from_literal(url: &'static str) -> Self {
        CrmUrl(Url::parse(url).expect("a literal URL in the source parses"))
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The URL with any password replaced, for messages.
    pub fn redacted(&self) -> String {
        sync_topology::redact(self.0.as_str())
    }
}

impl fmt::Debug for CrmUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}
