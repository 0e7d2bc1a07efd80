//! Readiness as the service judges it: working (consuming) and nothing it depends on failing. Each
//! dependency is a named check with the reason it fails, shown by `/readyz` and logged when it
//! changes, so an operator reads "NATS at host:port disconnected (connection refused)" rather than
//! a bare 503.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Health as the service itself judges it. Cloned handles share one state.
#[derive(Debug, Clone, Default)]
pub struct Health {
    state: Arc<Mutex<HealthState>>,
}

#[derive(Debug, Default)]
struct HealthState {
    phase: Phase,
    /// Failing checks and why, by check name (`nats`, `crm`, `postgres`).
    problems: BTreeMap<&'static str, String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Starting,
    Working,
    Stopping,
}

impl Health {
    fn state(&self) -> MutexGuard<'_, HealthState> {
        self.state.lock()
    }

    /// Whether the service is doing its work: true once it consumes, false again when it stops.
    pub fn set_ready(&self, ready: bool) {
        let mut state = self.state();
        state.phase = match (ready, state.phase) {
            (true, _) => Phase::Working,
            (false, Phase::Starting) => Phase::Starting,
            (false, _) => Phase::Stopping,
        };
    }

    /// Ready: working, and every check passes.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// `Err(reason)` while not ready: what fails, naming the server and the error.
    pub fn readiness(&self) -> Result<(), String> {
        let state = self.state();
        let mut reasons: Vec<String> = match state.phase {
            Phase::Starting => vec!["starting: not consuming yet".to_owned()],
            Phase::Stopping => vec!["stopping: finishing in-flight work".to_owned()],
            Phase::Working => Vec::new(),
        };
        reasons.extend(state.problems.values().cloned());
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    /// Records whether `check` fails (`Some(reason)`) or passes (`None`). A new or changed reason is
    /// logged as a warning, a recovery as info, so the log tells the same story as `/readyz`.
    pub fn set_problem(&self, check: &'static str, problem: Option<String>) {
        let mut state = self.state();
        match problem {
            Some(reason) => {
                if state.problems.get(check) != Some(&reason) {
                    tracing::warn!(check, "not ready: {reason}");
                    state.problems.insert(check, reason);
                }
            }
            None => {
                if let Some(reason) = state.problems.remove(check) {
                    let ready = state.problems.is_empty() && state.phase == Phase::Working;
                    tracing::info!(check, was = %reason, ready, "{check} is fine again");
                }
            }
        }
    }
}

/// How often the NATS connection is looked at for readiness.
const NATS_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Keeps the `nats` check of `health` current until `shutdown`: failing while the client is not
/// connected, with why (the server's address answers a plain TCP connect or not: "connection
/// refused" says the server is down, a connect that works says NATS itself refuses us).
pub fn watch_nats(
    client: async_nats::Client,
    nats_url: &str,
    health: Health,
    shutdown: CancellationToken,
) {
    let server = crate::host_port(nats_url);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(NATS_CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let problem = match client.connection_state() {
                async_nats::connection::State::Connected => None,
                _ => {
                    let why = tcp_probe(&server).await;
                    Some(format!(
                        "NATS at {server} disconnected ({why}); reconnecting"
                    ))
                }
            };
            health.set_problem("nats", problem);
        }
    });
}

/// What a plain TCP connect to the first address of `servers` says.
async fn tcp_probe(servers: &str) -> String {
    let first = servers.split(',').next().unwrap_or_default().to_owned();
    let connect = tokio::net::TcpStream::connect(first);
    match tokio::time::timeout(Duration::from_secs(1), connect).await {
        Ok(Ok(_)) => "the port answers; the NATS handshake does not complete yet".to_owned(),
        Ok(Err(err)) => crate::root_cause(&err),
        Err(_) => "no answer within 1s".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_working_without_problems() {
        let health = Health::default();
        assert_eq!(
            health.readiness(),
            Err("starting: not consuming yet".to_owned())
        );
        health.set_ready(true);
        assert!(health.is_ready());
        health.set_problem("nats", Some("NATS at h:4222 disconnected".to_owned()));
        health.set_problem("crm", Some("CRM at h:80 failing".to_owned()));
        assert_eq!(
            health.readiness(),
            Err("CRM at h:80 failing; NATS at h:4222 disconnected".to_owned())
        );
        health.set_problem("crm", None);
        health.set_problem("nats", None);
        assert!(health.is_ready());
        health.set_ready(false);
        assert_eq!(
            health.readiness(),
            Err("stopping: finishing in-flight work".to_owned())
        );
    }
}
