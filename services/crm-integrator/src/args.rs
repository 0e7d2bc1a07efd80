//! The `crm-integrator` command line (flags and environment), turned into an
//! [`IntegratorConfig`]. Every default shown here is read from `Settings::default()`, never
//! written twice.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use reqwest::Url;
use secrecy::SecretString;
use service_kit::NatsArgs;

use crate::policy::BreakerSettings;
use crate::settings::{CrmUrl, IntegratorConfig, Settings};

/// The defaults the flags show and fall back to.
fn defaults() -> Settings {
    Settings::default()
}

/// A default duration as clap shows and parses it (`10s`, `1m`).
fn shown(duration: Duration) -> humantime::Duration {
    duration.into()
}

/// Command-line flags (and environment) of the `crm-integrator` binary.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "crm-integrator",
    version,
    about = "Consumes customer records from NATS and syncs each to the CRM exactly once"
)]
pub struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    /// Base URL of the CRM API.
    #[arg(
        long,
        env = "CRM_URL",
        default_value_t = defaults().crm_url.0,
        hide_env_values = true,
        value_parser = service_kit::UrlParser
    )]
    crm_url: Url,
    /// Bearer token for the CRM API (never logged).
    #[arg(long, env = "CRM_API_TOKEN", hide_env_values = true)]
    crm_token: Option<SecretString>,
    /// Fixed number of CRM requests in flight. Without it the integrator adapts the number to
    /// the CRM (additive increase, multiplicative decrease on 429s, timeouts and rising latency).
    #[arg(long, env = "CRM_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Upper bound of the adaptive concurrency.
    #[arg(long, default_value_t = defaults().max_concurrency)]
    max_concurrency: usize,
    /// Requests-per-second budget for this replica.
    #[arg(long, env = "CRM_RPS")]
    rps: Option<NonZeroU32>,
    /// Longest deadline of one CRM request (`10s`, `500ms`). Within it, a request is given up as
    /// hung after ten times the CRM's recent 99th-percentile answer time, but never sooner than
    /// --min-request-timeout.
    #[arg(long, default_value_t = shown(defaults().request_timeout))]
    request_timeout: humantime::Duration,
    /// Shortest deadline of one CRM request.
    #[arg(long, default_value_t = shown(defaults().min_request_timeout))]
    min_request_timeout: humantime::Duration,
    /// Deliveries after which a record that still fails goes to the dead subject. (The consumer
    /// has no server-side cap: deliveries spent waiting for an older version are not failures.)
    #[arg(long, default_value_t = defaults().max_deliver)]
    max_deliver: u64,
    /// Address of /metrics, /healthz and /readyz (port 0 picks a free one).
    #[arg(long, env = "CRM_INTEGRATOR_METRICS_ADDR", default_value_t = defaults().metrics_addr)]
    metrics_addr: SocketAddr,
    /// Durable consumer to read from (`syncctl replay` points an integrator at its own).
    #[arg(long, default_value_t = defaults().consumer)]
    consumer: String,
    /// Messages pulled per request to the server; what is pulled but not started stays below it.
    #[arg(long, default_value_t = defaults().fetch_batch)]
    fetch_batch: usize,
    /// Retry waits up to this long happen in-process (with ack progress); longer ones hand the
    /// message back with a delayed NAK.
    #[arg(long, default_value_t = shown(defaults().max_inline_wait))]
    max_inline_wait: humantime::Duration,
    /// Share of failed answers (5xx, timeouts, connection errors) within --breaker-window that
    /// opens the circuit breaker.
    #[arg(long, default_value_t = defaults().breaker.failure_share)]
    breaker_failure_share: f64,
    /// Answers the breaker's window must hold before its share can open it.
    #[arg(long, default_value_t = defaults().breaker.min_requests)]
    breaker_min_requests: u32,
    /// The breaker's window.
    #[arg(long, default_value_t = shown(defaults().breaker.window))]
    breaker_window: humantime::Duration,
    /// First cool-down of an open breaker before one probe request; doubles while probes fail.
    #[arg(long, default_value_t = shown(defaults().breaker.cooldown))]
    breaker_cooldown: humantime::Duration,
    /// Longest fleet-wide pause, and longest wait of one record's retry, whatever the CRM's
    /// Retry-After says.
    #[arg(long, default_value_t = shown(defaults().max_pause))]
    max_pause: humantime::Duration,
    /// Send the CRM token over plain http:// to a host other than this machine (only on a private
    /// network: anyone on the path can read it).
    #[arg(long, env = "CRM_ALLOW_INSECURE")]
    allow_insecure_crm: bool,
    #[command(flatten)]
    millis: MillisecondFlags,
}

/// The millisecond flags of earlier releases (`--request-timeout-ms 500`), still accepted so
/// scripts written for them keep working, and hidden from `--help` in favour of the duration
/// flags. Each conflicts with its successor, so no value is silently overridden.
#[derive(Debug, Clone, clap::Args)]
struct MillisecondFlags {
    #[arg(long, hide = true, conflicts_with = "request_timeout")]
    request_timeout_ms: Option<u64>,
    #[arg(long, hide = true, conflicts_with = "min_request_timeout")]
    min_request_timeout_ms: Option<u64>,
    #[arg(long, hide = true, conflicts_with = "max_inline_wait")]
    max_inline_wait_ms: Option<u64>,
    #[arg(long, hide = true, conflicts_with = "breaker_window")]
    breaker_window_ms: Option<u64>,
    #[arg(long, hide = true, conflicts_with = "breaker_cooldown")]
    breaker_cooldown_ms: Option<u64>,
    #[arg(long, hide = true, conflicts_with = "max_pause")]
    max_pause_ms: Option<u64>,
}

/// The duration flag's value, unless its millisecond predecessor was given.
fn either(flag: humantime::Duration, millis: Option<u64>) -> Duration {
    millis.map_or_else(|| flag.into(), Duration::from_millis)
}

impl From<Args> for IntegratorConfig {
    fn from(args: Args) -> Self {
        let ms = args.millis;
        let settings = Settings {
            crm_url: CrmUrl(args.crm_url),
            crm_token: args.crm_token,
            allow_insecure_crm: args.allow_insecure_crm,
            concurrency: args.concurrency,
            max_concurrency: args.max_concurrency,
            rps: args.rps,
            request_timeout: either(args.request_timeout, ms.request_timeout_ms),
            min_request_timeout: either(args.min_request_timeout, ms.min_request_timeout_ms),
            max_deliver: args.max_deliver,
            metrics_addr: args.metrics_addr,
            consumer: args.consumer,
            fetch_batch: args.fetch_batch,
            max_inline_wait: either(args.max_inline_wait, ms.max_inline_wait_ms),
            breaker: BreakerSettings {
                failure_share: args.breaker_failure_share,
                min_requests: args.breaker_min_requests,
                window: either(args.breaker_window, ms.breaker_window_ms),
                cooldown: either(args.breaker_cooldown, ms.breaker_cooldown_ms),
            },
            max_pause: either(args.max_pause, ms.max_pause_ms),
        };
        IntegratorConfig {
            nats: args.nats,
            settings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::SettingsError;
    use clap::Parser as _;

    fn parse(flags: &[&str]) -> Result<Settings, clap::Error> {
        let line = std::iter::once("crm-integrator").chain(flags.iter().copied());
        Args::try_parse_from(line).map(|args| IntegratorConfig::from(args).settings)
    }

    #[test]
    fn no_flags_give_the_defaults_and_they_work_on_a_dev_machine() {
        let settings = parse(&[]).expect("defaults parse");
        assert_eq!(settings.crm_url.url().as_str(), "http://127.0.0.1:8080/");
        assert_eq!(settings.metrics_addr.to_string(), "127.0.0.1:9101");
        assert_eq!(settings.consumer, "integrators");
        assert_eq!(settings.max_deliver, 10);
        assert_eq!(settings.concurrency, None);
        assert_eq!(settings.validate(), Ok(()));
        // What --help shows is what the flags fall back to: Settings::default(), whole.
        assert_eq!(
            format!("{settings:?}"),
            format!("{:?}", Settings::default())
        );
    }

    #[test]
    fn durations_are_humantime_and_the_millisecond_flags_still_work() {
        let settings = parse(&["--request-timeout", "250ms", "--max-pause", "2m"]).expect("parse");
        assert_eq!(settings.request_timeout, Duration::from_millis(250));
        assert_eq!(settings.max_pause, Duration::from_secs(120));
        let old = parse(&[
            "--request-timeout-ms",
            "500",
            "--breaker-cooldown-ms",
            "200",
        ])
        .expect("the old flags parse");
        assert_eq!(old.request_timeout, Duration::from_millis(500));
        assert_eq!(old.breaker.cooldown, Duration::from_millis(200));
        // A bare number has no unit: refused rather than guessed.
        assert!(parse(&["--request-timeout", "500"]).is_err());
        assert!(parse(&["--request-timeout", "1s", "--request-timeout-ms", "500"]).is_err());
    }

    #[test]
    fn debug_never_shows_the_token_nor_a_password_in_the_crm_url() {
        let settings = parse(&[
            "--crm-token",
            "s3cret",
            "--crm-url",
            "http://user:hunter2@crm.example:8080",
        ])
        .expect("flags parse");
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
        assert!(shown.contains("crm.example:8080"), "{shown}");
    }

    #[test]
    fn nonsense_is_refused() {
        let settings = parse(&["--concurrency", "0"]).expect("flags parse");
        assert_eq!(settings.validate(), Err(SettingsError::Zero("concurrency")));
        assert!(parse(&["--crm-url", "not a url"]).is_err());
    }
}
