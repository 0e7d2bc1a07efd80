//! Waiting for the servers a binary needs at start-up: a stack whose services start before NATS or
//! PostgreSQL must come up in any order instead of crash-looping, and an operator must read what is
//! awaited, why it fails and for how much longer.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;
use tokio_util::sync::CancellationToken;

use crate::NatsArgs;

/// Calls `attempt` until it succeeds, fails with an error `retryable` refuses, `give_up_after` has
/// passed since the first attempt (then the last error is returned), or `shutdown` is cancelled
/// (`Ok(None)`). Between attempts it waits as [`crate::retry::server_startup`] says and
/// logs `"{server} not reachable yet ({cause}); retrying in 2s, giving up after 5m"`. A zero
/// `give_up_after` tries once.
pub async fn retry_until_up<T, E, F, Fut>(
    server: &str,
    give_up_after: Duration,
    shutdown: &CancellationToken,
    retryable: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Result<Option<T>, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + 'static,
{
    let started = Instant::now();
    let mut delays = crate::retry::server_startup().build();
    let mut failures = 0u32;
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            result = attempt() => result,
        };
        let err = match result {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(
                        server,
                        waited = %shown(started.elapsed()),
                        "{server} reachable after {}",
                        shown(started.elapsed())
                    );
                }
                return Ok(Some(value));
            }
            Err(err) => err,
        };
        let waited = started.elapsed();
        if !retryable(&err) {
            return Err(err);
        }
        if waited >= give_up_after {
            if failures > 0 {
                tracing::error!(
                    server,
                    waited = %shown(waited),
                    "{server} still not reachable after {}: giving up",
                    shown(waited)
                );
            }
            return Err(err);
        }
        failures += 1;
        // The schedule never ends (`without_max_times`); the deadline above ends the waiting.
        let next = delays.next().unwrap_or(give_up_after);
        let pause = next.min(give_up_after - waited);
        let cause = crate::root_cause(&err);
        tracing::warn!(
            server,
            error = %cause,
            retry_in = %shown(pause),
            give_up_after = %shown(give_up_after),
            "{server} not reachable yet ({cause}); retrying in {}, giving up after {}",
            shown(pause),
            shown(give_up_after)
        );
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Connects to NATS as `client_name` (refusing servers that are too old, see
/// [`sync_topology::connect`]), waiting up to `--startup-wait` for a server that does not answer
/// yet. `Ok(None)`: shut down while waiting.
pub async fn connect_nats(
    nats: &NatsArgs,
    client_name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<async_nats::Client>, sync_topology::ConnectError> {
    let server = format!("NATS at {}", host_port(&nats.nats_url));
    retry_until_up(
        &server,
        nats.startup_wait,
        shutdown,
        sync_topology::ConnectError::is_transient,
        || nats.connect(client_name),
    )
    .await
}

/// A duration flag: humantime (`90s`, `5m`, `1h 30m`), or a bare number of seconds (`120`, `0.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{text} is not a number of seconds of at least 0"));
    }
    humantime::parse_duration(text).map_err(|err| {
        format!("{text:?} is not a duration ({err}): write it as 90s, 5m or 1h, or in seconds")
    })
}

/// `host:port` of each server a URL (or a comma-separated list of them) names, without scheme,
/// user, password, path or query: what a log line or a readiness reason may show. A missing port
/// is the scheme's default; a `key=value` PostgreSQL string gives its `host` and `port`.
pub fn host_port(url: &str) -> String {
    url.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(one_host_port)
        .collect::<Vec<_>>()
        .join(",")
}

fn one_host_port(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        if url.contains('=') {
            return key_value_host_port(url);
        }
        // A bare `host:port`, as NATS accepts.
        return url.split(['/', '?']).next().unwrap_or(url).to_owned();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let has_port = match host.rsplit_once(':') {
        // `[::1]` alone has colons inside its brackets.
        Some((_, port)) => !port.contains(']'),
        None => false,
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "nats" | "tls" => Some(4222),
        "postgres" | "postgresql" => Some(5432),
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    match default_port {
        Some(port) if !has_port && !host.is_empty() => format!("{host}:{port}"),
        _ => host.to_owned(),
    }
}

fn key_value_host_port(text: &str) -> String {
    let value = |key: &str| {
        text.split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.trim_matches('\'').to_owned())
    };
    format!(
        "{}:{}",
        value("host").unwrap_or_else(|| "localhost".to_owned()),
        value("port").unwrap_or_else(|| "5432".to_owned())
    )
}

/// A duration as a person writes it: `500ms`, `2s`, `5m`, `1m 30s`.
fn shown(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        return format!("{}ms", duration.as_millis());
    }
    humantime::format_duration(Duration::from_secs(duration.as_secs_f64().round() as u64))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_hides_credentials_and_paths() {
        assert_eq!(
            host_port("nats://user:secret@10.0.0.1:4222"),
            "10.0.0.1:4222"
        );
        assert_eq!(host_port("nats://a, nats://b:5222"), "a:4222,b:5222");
        assert_eq!(
            host_port("postgres://postgres:pw@db:15432/app?sslmode=disable"),
            "db:15432"
        );
        assert_eq!(host_port("postgres://db/app"), "db:5432");
        assert_eq!(host_port("http://127.0.0.1:8080/api"), "127.0.0.1:8080");
        assert_eq!(host_port("https://crm.example.com"), "crm.example.com:443");
        assert_eq!(host_port("nats://[::1]"), "[::1]:4222");
        assert_eq!(host_port("127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(host_port("host=db port=6543 user=x password=y"), "db:6543");
    }

    #[test]
    fn durations_are_humantime_or_seconds() {
        assert_eq!(parse_duration("120"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(shown(Duration::from_millis(500)), "500ms");
        assert_eq!(shown(Duration::from_millis(2_100)), "2s");
        assert_eq!(shown(Duration::from_secs(300)), "5m");
    }

    #[tokio::test]
    async fn gives_up_after_the_wait_with_the_last_error() {
        let shutdown = CancellationToken::new();
        let mut attempts = 0;
        let started = Instant::now();
        let result: Result<Option<()>, std::io::Error> = retry_until_up(
            "test server",
            Duration::from_millis(600),
            &shutdown,
            |_| true,
            || {
                attempts += 1;
                std::future::ready(Err(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))
            },
        )
        .await;
        assert!(result.is_err());
        // 0.5 s, then the 0.1 s left.
        assert_eq!(attempts, 3);
        assert!(started.elapsed() < Duration::from_secs(5));

        let mut calls = 0;
        let succeeded: Result<Option<u8>, std::io::Error> = retry_until_up(
            "test server",
            Duration::from_secs(60),
            &shutdown,
            |_| true,
            || {
                calls += 1;
                std::future::ready(if calls < 2 {
                    Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                } else {
                    Ok(7)
                })
            },
        )
        .await;
        assert_eq!(succeeded.ok().flatten(), Some(7));

        shutdown.cancel();
        let cancelled: Result<Option<()>, std::io::Error> = retry_until_up(
            "test server",
            Duration::from_secs(60),
            &shutdown,
            |_| true,
            std::future::pending,
        )
        .await;
        assert!(matches!(cancelled, Ok(None)));
    }
}
