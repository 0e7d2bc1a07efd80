//! The gate every request passes: the CRM-requested pause (this replica's copy of the fleet's),
//! the overload rule that calls for one, and the circuit breaker.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::policy::{BreakerSettings, Overload, PauseRequest, Recent, Signal};
use crate::{now_ms, schedules};
use crm_client::Transient;

/// Whether a request may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go { probe: bool },
    Wait(Duration),
}

/// The CRM-requested pause (local copy of the fleet's), the overload rule that calls for one,
/// and the circuit breaker.
#[derive(Debug)]
pub struct Gate {
    pause_until_ms: AtomicI64,
    breaker: Mutex<Breaker>,
    overload: Mutex<Overload>,
    settings: BreakerSettings,
    max_pause: Duration,
    probe_timeout: Duration,
    /// `CRM at host:port`, for log lines and the readiness reason.
    crm: String,
    /// What the last failed request said (`cannot connect: … connection refused`): why the
    /// breaker opened or stays open.
    last_failure: Mutex<String>,
    /// Pauses this replica began holding (its own or the fleet's), and breaker openings: totals
    /// for the log line at stop and the heartbeat.
    pauses: AtomicU64,
    breaker_openings: AtomicU64,
}

#[derive(Debug)]
struct Breaker {
    window: Recent,
    state: BreakerState,
    cooldown: Duration,
    /// When it last opened, for how long it was open.
    opened_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_started: Instant },
}

const MAX_COOLDOWN: Duration = Duration::from_secs(30);

impl Gate {
    pub fn new(settings: BreakerSettings, max_pause: Duration, probe_timeout: Duration) -> Self {
        let settings = BreakerSettings {
            failure_share: settings.failure_share.clamp(0.01, 1.0),
            min_requests: settings.min_requests.max(1),
            ..settings
        };
        Gate {
            pause_until_ms: AtomicI64::new(0),
            breaker: Mutex::new(Breaker {
                window: Recent::new(settings.window, 10),
                state: BreakerState::Closed,
                cooldown: settings.cooldown,
                opened_at: None,
            }),
            overload: Mutex::new(Overload::new(max_pause)),
            settings,
            max_pause,
            probe_timeout,
            crm: "the CRM".to_owned(),
            last_failure: Mutex::new(String::new()),
            pauses: AtomicU64::new(0),
            breaker_openings: AtomicU64::new(0),
        }
    }

    /// Names the CRM in log lines and readiness reasons by its `host:port` (never its path or
    /// credentials).
    pub fn naming_crm(mut self, crm_url: &str) -> Self {
        self.crm = format!("CRM at {}", service_kit::host_port(crm_url));
        self
    }

    /// Remembers what a failed request said, for the breaker's log lines and readiness reason.
    pub fn note_failure(&self, detail: String) {
        *self.last_failure.lock() = detail;
    }

    fn last_failure(&self) -> String {
        let last = self.last_failure.lock();
        if last.is_empty() {
            "no detail".to_owned()
        } else {
            last.clone()
        }
    }

    /// `closed`, `open` or `half-open` (a probe is out).
    pub fn breaker_state(&self) -> &'static str {
        match self.breaker.lock().state {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half-open",
        }
    }

    /// Why this replica is not ready because of the CRM: None while the breaker is closed.
    pub fn breaker_problem(&self) -> Option<String> {
        let breaker = self.breaker.lock();
        if breaker.state == BreakerState::Closed {
            return None;
        }
        drop(breaker);
        // Worded the same for as long as the cause stays the same: a change is logged.
        Some(format!(
            "{} failing ({}): circuit breaker open, probing until it answers",
            self.crm,
            self.last_failure()
        ))
    }

    /// Pauses this replica began holding, and times its breaker opened, since it started.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.pauses.load(Ordering::Relaxed),
            self.breaker_openings.load(Ordering::Relaxed),
        )
    }

    /// The longest pause, and the longest wait of one record's retry.
    pub fn max_pause(&self) -> Duration {
        self.max_pause
    }

    /// When a record that failed with `failure` tries again (see
    /// `schedules::crm_retry_delay`).
    pub fn retry_delay(&self, failure: &Transient, delivered: u64, attempt: u32) -> Duration {
        schedules::crm_retry_delay(failure, delivered, attempt, self.max_pause)
    }

    /// Extends the pause to `until_ms` (Unix ms), at most the longest pause from now; never
    /// shortens it. True when it was extended.
    pub fn pause_until(&self, until_ms: i64) -> bool {
        let now = now_ms();
        let until_ms = until_ms.min(now + self.max_pause.as_millis() as i64);
        let previous = self.pause_until_ms.fetch_max(until_ms, Ordering::AcqRel);
        let extended = until_ms > previous;
        if extended {
            metrics::gauge!("crm_integrator_paused_until_ms").set(until_ms as f64);
            if previous <= now {
                self.pauses.fetch_add(1, Ordering::Relaxed);
            }
        }
        extended
    }

    pub fn paused_for(&self) -> Option<Duration> {
        let remaining = self.pause_until_ms.load(Ordering::Acquire) - now_ms();
        (remaining > 0).then(|| Duration::from_millis(remaining as u64))
    }

    /// How long sending is held: by a pause, or by an open breaker still cooling down. Unlike
    /// [`Gate::admit`] this never hands out the probe.
    pub fn holding(&self) -> Option<Duration> {
        if let Some(wait) = self.paused_for() {
            return Some(wait);
        }
        match self.breaker.lock().state {
            BreakerState::Open { until } => {
                let now = Instant::now();
                (until > now).then(|| until - now)
            }
            _ => None,
        }
    }

    pub fn breaker_open(&self) -> bool {
        !matches!(self.breaker.lock().state, BreakerState::Closed)
    }

    pub fn admit(&self) -> Admission {
        if let Some(wait) = self.paused_for() {
            return Admission::Wait(wait);
        }
        let now = Instant::now();
        let mut breaker = self.breaker.lock();
        match breaker.state {
            BreakerState::Closed => Admission::Go { probe: false },
            BreakerState::Open { until } if now < until => Admission::Wait(until - now),
            BreakerState::HalfOpen { probe_started }
                if now.duration_since(probe_started) < self.probe_timeout =>
            {
                Admission::Wait(Duration::from_millis(50))
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => {
                breaker.state = BreakerState::HalfOpen { probe_started: now };
                Admission::Go { probe: true }
            }
        }
    }

    /// Feeds the breaker and the overload rule with one answer; returns the fleet pause the
    /// overload rule calls for, if any.
    pub fn record(
        &self,
        signal: Signal,
        retry_after: Option<Duration>,
        probe: bool,
    ) -> Option<PauseRequest> {
        let now = Instant::now();
        self.feed_breaker(signal, probe, now);
        self.overload.lock().observe(now, signal, retry_after)
    }

    fn feed_breaker(&self, signal: Signal, probe: bool, now: Instant) {
        // A 429 says the CRM works and is busy: neither health nor failure.
        let healthy = match signal {
            Signal::Answered => Some(true),
            Signal::RateLimited => None,
            Signal::Failed | Signal::TimedOut => Some(false),
        };
        let mut breaker = self.breaker.lock();
        match breaker.state {
            BreakerState::Closed => {
                if let Some(healthy) = healthy {
                    self.open_on_failures(&mut breaker, healthy, now);
                }
            }
            // Open or half-open: only the probe's answer decides; late answers of requests sent
            // before it opened say nothing new.
            _ if !probe => {}
            _ => self.judge_probe(&mut breaker, healthy, now),
        }
    }

    /// A closed breaker opens once enough of the window's answers failed.
    fn open_on_failures(&self, breaker: &mut Breaker, healthy: bool, now: Instant) {
        breaker.window.observe(now, !healthy, None);
        let tally = breaker.window.tally(now);
        if tally.total >= self.settings.min_requests && tally.share() >= self.settings.failure_share
        {
            breaker.state = BreakerState::Open {
                until: now + breaker.cooldown,
            };
            breaker.opened_at = Some(now);
            self.breaker_openings.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("crm_integrator_breaker_openings_total").increment(1);
            metrics::gauge!("crm_integrator_breaker_open").set(1.0);
            let error = self.last_failure();
            tracing::warn!(
                crm = %self.crm,
                failed = tally.marked,
                answers = tally.total,
                window_s = tally.span.as_secs_f64(),
                cooldown = ?breaker.cooldown,
                "{} keeps failing ({error}): circuit breaker open, sending stopped; \
                 one probe in {:?}",
                self.crm,
                breaker.cooldown
            );
        }
    }

    /// The probe's answer closes the breaker, or keeps it open for a doubled cool-down.
    fn judge_probe(&self, breaker: &mut Breaker, healthy: Option<bool>, now: Instant) {
        match healthy {
            None => {
                // A probe that drew a 429 still showed the CRM answers; hand the turn back.
                breaker.state = BreakerState::Open { until: now };
            }
            Some(true) => {
                let open_for = breaker
                    .opened_at
                    .map_or(Duration::ZERO, |at| now.duration_since(at));
                tracing::info!(
                    crm = %self.crm,
                    open_s = open_for.as_secs_f64(),
                    "{} answers again: circuit breaker closed after {:.1}s",
                    self.crm,
                    open_for.as_secs_f64()
                );
                metrics::gauge!("crm_integrator_breaker_open").set(0.0);
                breaker.window.clear();
                breaker.state = BreakerState::Closed;
                breaker.cooldown = self.settings.cooldown;
            }
            Some(false) => {
                breaker.cooldown = (breaker.cooldown * 2).min(MAX_COOLDOWN);
                breaker.state = BreakerState::Open {
                    until: now + breaker.cooldown,
                };
                let error = self.last_failure();
                tracing::warn!(
                    crm = %self.crm,
                    cooldown = ?breaker.cooldown,
                    "{} still failing ({error}): circuit breaker stays open, next probe in {:?}",
                    self.crm,
                    breaker.cooldown
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    fn gate() -> Gate {
        Gate::new(
            BreakerSettings {
                failure_share: 0.5,
                min_requests: 20,
                window: Duration::from_secs(10),
                cooldown: Duration::ZERO,
            },
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
    }
    #[test]
    fn pause_only_extends_and_is_capped() {
        let gate = gate();
        let until = now_ms() + 10_000;
        assert!(gate.pause_until(until));
        assert!(!gate.pause_until(until - 5_000));
        assert!(matches!(gate.admit(), Admission::Wait(d) if d > Duration::from_secs(5)));
        gate.pause_until(now_ms() + 3_600_000);
        let held = gate.paused_for().expect("paused");
        assert!(held <= Duration::from_secs(60), "{held:?}");
    }

    #[test]
    fn the_breaker_stays_closed_under_random_failures_and_opens_when_most_fail() {
        let gate = gate();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
        for _ in 0..20_000 {
            let signal = crate::flow::fault_mix(&mut rng);
            gate.record(signal, None, false);
            assert!(!gate.breaker_open(), "opened on noise");
        }
        // Too few answers say nothing, however bad.
        let fresh = gate_with_min(20);
        for _ in 0..19 {
            fresh.record(Signal::Failed, None, false);
        }
        assert!(!fresh.breaker_open());
        fresh.record(Signal::Failed, None, false);
        assert!(fresh.breaker_open(), "20 failures of 20");
        // Most requests failing, with successes among them, opens it too.
        let mostly = gate_with_min(20);
        for n in 0..100 {
            let signal = if n % 3 == 0 {
                Signal::Answered
            } else {
                Signal::Failed
            };
            mostly.record(signal, None, false);
        }
        assert!(mostly.breaker_open());
        // Zero cool-down: one probe may go, the next caller waits for its answer.
        assert_eq!(mostly.admit(), Admission::Go { probe: true });
        assert!(matches!(mostly.admit(), Admission::Wait(_)));
        // A late success of an older request does not close it; the probe's does.
        mostly.record(Signal::Answered, None, false);
        assert!(mostly.breaker_open());
        mostly.record(Signal::Answered, None, true);
        assert!(!mostly.breaker_open());
        assert_eq!(mostly.admit(), Admission::Go { probe: false });
    }

    fn gate_with_min(min_requests: u32) -> Gate {
        Gate::new(
            BreakerSettings {
                failure_share: 0.5,
                min_requests,
                window: Duration::from_secs(10),
                cooldown: Duration::ZERO,
            },
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
    }
}
