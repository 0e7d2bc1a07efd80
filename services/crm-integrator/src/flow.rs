//! How hard the integrator pushes the CRM: the request concurrency limit (fixed, or adaptive
//! AIMD), the pause a CRM asks for with `Retry-After`, and the circuit breaker that stops sending
//! while the CRM is down. All of it is per replica except the pause, which `fleet.rs` shares.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain numbers behind, still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How one request went, as a congestion signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered (any answer that is not congestion, including refusals and random 5xx).
    Answered,
    /// 429: the CRM refused for load. Lowers the ceiling to what was in flight.
    RateLimited,
    /// A client-side timeout: the CRM is struggling.
    Congested,
}

/// Concurrency of CRM requests. Fixed mode keeps `--concurrency`; adaptive mode starts small,
/// grows while answers come back at the usual latency, and backs off multiplicatively on 429s,
/// timeouts and rising latency. Either way a 429 teaches a ceiling (the requests still in flight
/// when it came back) that is probed again only after a quiet while, because every 429 costs a
/// fleet pause.
#[derive(Debug)]
pub struct Limiter {
    adaptive: bool,
    min: usize,
    max: usize,
    state: Mutex<LimiterState>,
    in_flight: AtomicUsize,
    freed: Notify,
}

#[derive(Debug)]
struct LimiterState {
    limit: f64,
    slow_start: bool,
    ceiling: Option<(usize, Instant)>,
    last_decrease: Option<Instant>,
    /// Lowest latency seen lately: the CRM's unloaded answer time.
    base_latency: Option<Duration>,
    base_latency_at: Instant,
    smoothed_latency: Option<Duration>,
}

/// After this long without a 429, the learned ceiling is probed 5% upward. A probe that overshoots
/// costs one `Retry-After` pause of the fleet, so this is a trade: a ceiling learned low (requests
/// reordered on their way to the CRM make it err low) recovers within a few minutes, while
/// overshooting costs at most one pause per half minute.
const CEILING_QUIET: Duration = Duration::from_secs(30);
const DECREASE_FACTOR: f64 = 0.8;

impl Limiter {
    pub fn fixed(concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self::build(false, 1, concurrency, concurrency)
    }

    pub fn adaptive(initial: usize, max: usize) -> Self {
        let max = max.max(1);
        Self::build(true, 1, max, initial.clamp(1, max))
    }

    fn build(adaptive: bool, min: usize, max: usize, initial: usize) -> Self {
        Limiter {
            adaptive,
            min,
            max,
            state: Mutex::new(LimiterState {
                limit: initial as f64,
                slow_start: true,
                ceiling: None,
                last_decrease: None,
                base_latency: None,
                base_latency_at: Instant::now(),
                smoothed_latency: None,
            }),
            in_flight: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    pub fn is_adaptive(&self) -> bool {
        self.adaptive
    }

    /// The number of requests allowed in flight now.
    pub fn limit(&self) -> usize {
        let state = lock(&self.state);
        Self::effective(&state, self.max)
    }

    fn effective(state: &LimiterState, max: usize) -> usize {
        let limit = (state.limit.floor() as usize).clamp(1, max);
        match state.ceiling {
            Some((ceiling, _)) => limit.min(ceiling.max(1)),
            None => limit,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits for a free request slot.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let freed = self.freed.notified();
            let limit = self.limit();
            let current = self.in_flight.load(Ordering::Acquire);
            if current < limit
                && self
                    .in_flight
                    .compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Permit {
                    limiter: self,
                    started: Instant::now(),
                    done: false,
                };
            }
            if current < limit {
                continue;
            }
            freed.await;
        }
    }

    fn record(&self, signal: Signal, latency: Duration) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        if let Some((_, since)) = state.ceiling
            && now.duration_since(since) > CEILING_QUIET
        {
            // Quiet for a while: let the limit probe a little above the old ceiling.
            state.ceiling = state
                .ceiling
                .map(|(c, _)| (c + (c / 20).max(1), now))
                .filter(|(c, _)| *c < self.max);
        }
        // Only ordinary answers say how long the CRM takes: a 429 comes back at once and would
        // teach a base latency the real requests can never match.
        let latency_rose = self.adaptive
            && signal == Signal::Answered
            && Self::observe_latency(&mut state, latency, now);
        let congested = match signal {
            Signal::Answered => latency_rose,
            Signal::RateLimited => {
                // What the CRM holds is what is still in flight when its 429 comes back: the
                // requests it accepted and has not answered (a 429 comes back at once, and the
                // pause it triggers stops new requests, so later 429s of a burst see fewer). The
                // count when this request started says little when many start together, since
                // they reach the CRM in any order. Our count runs ahead of the CRM's (it
                // includes the answers' way back), so keep a small margin; taking the minimum
                // (never compounding) keeps one burst of 429s from collapsing the ceiling.
                let still_in_flight = self.in_flight.load(Ordering::Acquire) as f64;
                let ceiling = ((still_in_flight * 0.97) as usize).max(self.min);
                let lower = state.ceiling.is_none_or(|(c, _)| ceiling < c);
                if lower {
                    state.ceiling = Some((ceiling, now));
                } else if let Some((c, _)) = state.ceiling {
                    state.ceiling = Some((c, now));
                }
                true
            }
            Signal::Congested => true,
        };
        if !self.adaptive {
            return;
        }
        if congested {
            // One decrease per round trip: the answers of one overloaded window all say the same.
            let window = state
                .base_latency
                .unwrap_or(latency)
                .max(Duration::from_millis(20));
            if state
                .last_decrease
                .is_none_or(|at| now.duration_since(at) > window)
            {
                state.limit = (state.limit * DECREASE_FACTOR).max(self.min as f64);
                state.slow_start = false;
                state.last_decrease = Some(now);
            }
        } else if signal == Signal::Answered {
            let cap = state.ceiling.map_or(self.max, |(c, _)| c.min(self.max)) as f64;
            let step = if state.slow_start {
                1.0
            } else {
                1.0 / state.limit.max(1.0)
            };
            state.limit = (state.limit + step).min(cap.max(self.min as f64));
        }
        drop(state);
        let limit = self.limit();
        metrics::gauge!("crm_integrator_concurrency_limit").set(limit as f64);
        self.freed.notify_waiters();
    }

    /// Tracks the unloaded latency and says whether this answer took markedly longer.
    fn observe_latency(state: &mut LimiterState, latency: Duration, now: Instant) -> bool {
        // The base is re-learned every minute so a CRM that got slower for good is accepted.
        let stale = now.duration_since(state.base_latency_at) > Duration::from_secs(60);
        if stale || state.base_latency.is_none_or(|base| latency < base) {
            state.base_latency = Some(latency);
            state.base_latency_at = now;
        }
        let smoothed = match state.smoothed_latency {
            Some(previous) => previous.mul_f64(0.95) + latency.mul_f64(0.05),
            None => latency,
        };
        state.smoothed_latency = Some(smoothed);
        let base = state.base_latency.unwrap_or(latency);
        // Generous on purpose: on a busy host our own scheduling delays show up as latency too,
        // and a CRM that queues shows a rise far beyond this.
        smoothed > base * 3 + Duration::from_millis(50)
    }
}

/// One request in flight. Report how it went with [`Permit::finish`]; dropping it unreported
/// (a cancelled request) frees the slot without teaching the limiter anything.
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a Limiter,
    started: Instant,
    done: bool,
}

impl Permit<'_> {
    pub fn finish(mut self, signal: Signal) {
        self.release();
        self.limiter.record(signal, self.started.elapsed());
    }

    fn release(&mut self) {
        if !self.done {
            self.done = true;
            self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.limiter.freed.notify_waiters();
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether a request may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go { probe: bool },
    Wait(Duration),
}

/// The CRM-requested pause (local copy of the fleet's) and the circuit breaker.
#[derive(Debug)]
pub struct Gate {
    pause_until_ms: AtomicI64,
    breaker: Mutex<Breaker>,
    threshold: u32,
    base_cooldown: Duration,
    probe_timeout: Duration,
}

#[derive(Debug)]
struct Breaker {
    consecutive_failures: u32,
    state: BreakerState,
    cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_started: Instant },
}

const MAX_COOLDOWN: Duration = Duration::from_secs(30);

impl Gate {
    pub fn new(threshold: u32, cooldown: Duration, probe_timeout: Duration) -> Self {
        Gate {
            pause_until_ms: AtomicI64::new(0),
            breaker: Mutex::new(Breaker {
                consecutive_failures: 0,
                state: BreakerState::Closed,
                cooldown,
            }),
            threshold: threshold.max(1),
            base_cooldown: cooldown,
            probe_timeout,
        }
    }

    /// Extends the pause to `until_ms` (Unix ms); never shortens it. True when it was extended.
    pub fn pause_until(&self, until_ms: i64) -> bool {
        let previous = self.pause_until_ms.fetch_max(until_ms, Ordering::AcqRel);
        let extended = until_ms > previous;
        if extended {
            metrics::gauge!("crm_integrator_paused_until_ms").set(until_ms as f64);
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
        match lock(&self.breaker).state {
            BreakerState::Open { until } => {
                let now = Instant::now();
                (until > now).then(|| until - now)
            }
            _ => None,
        }
    }

    pub fn breaker_open(&self) -> bool {
        !matches!(lock(&self.breaker).state, BreakerState::Closed)
    }

    pub fn admit(&self) -> Admission {
        if let Some(wait) = self.paused_for() {
            return Admission::Wait(wait);
        }
        let now = Instant::now();
        let mut breaker = lock(&self.breaker);
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

    /// Feeds the breaker: `Some(true)` an answer that shows the CRM works, `Some(false)` a
    /// failure that suggests it does not (5xx, timeout), `None` neither (429, 4xx).
    pub fn record(&self, healthy: Option<bool>) {
        let mut breaker = lock(&self.breaker);
        match healthy {
            None => {
                // A probe that drew a 429 still showed the CRM answers; hand the turn back.
                if let BreakerState::HalfOpen { .. } = breaker.state {
                    breaker.state = BreakerState::Open {
                        until: Instant::now(),
                    };
                }
            }
            Some(true) => {
                if breaker.state != BreakerState::Closed {
                    tracing::info!("CRM answers again: circuit breaker closed");
                    metrics::gauge!("crm_integrator_breaker_open").set(0.0);
                }
                breaker.consecutive_failures = 0;
                breaker.state = BreakerState::Closed;
                breaker.cooldown = self.base_cooldown;
            }
            Some(false) => {
                breaker.consecutive_failures = breaker.consecutive_failures.saturating_add(1);
                let now = Instant::now();
                match breaker.state {
                    BreakerState::HalfOpen { .. } => {
                        breaker.cooldown = (breaker.cooldown * 2).min(MAX_COOLDOWN);
                        breaker.state = BreakerState::Open {
                            until: now + breaker.cooldown,
                        };
                        tracing::warn!(cooldown = ?breaker.cooldown, "CRM probe failed: breaker stays open");
                    }
                    BreakerState::Closed if breaker.consecutive_failures >= self.threshold => {
                        breaker.state = BreakerState::Open {
                            until: now + breaker.cooldown,
                        };
                        metrics::gauge!("crm_integrator_breaker_open").set(1.0);
                        tracing::warn!(
                            failures = breaker.consecutive_failures,
                            cooldown = ?breaker.cooldown,
                            "CRM keeps failing: circuit breaker open, sending stopped"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Messages taken from the consumer and not yet settled, bounded so that what is pulled but not
/// started stays small next to the ack wait.
#[derive(Debug, Default)]
pub struct Slots {
    in_use: AtomicUsize,
    freed: Notify,
}

impl Slots {
    pub async fn acquire(&self, capacity: usize) {
        loop {
            let freed = self.freed.notified();
            let current = self.in_use.load(Ordering::Acquire);
            if current < capacity {
                if self
                    .in_use
                    .compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            freed.await;
        }
    }

    pub fn release(&self) {
        self.in_use.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_waiters();
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fixed_limit_holds_and_a_rate_limit_sets_a_ceiling() {
        let limiter = Limiter::fixed(8);
        let permits: Vec<_> = futures::future::join_all((0..8).map(|_| limiter.acquire())).await;
        assert_eq!(limiter.in_flight(), 8);
        let ninth = tokio::time::timeout(Duration::from_millis(20), limiter.acquire()).await;
        assert!(ninth.is_err(), "a ninth request must wait");
        let mut permits = permits.into_iter();
        // A 429 came back while 7 others were still in flight: at most 97% of 7 from now on.
        let last = permits.next_back().expect("eight permits");
        last.finish(Signal::RateLimited);
        assert_eq!(limiter.limit(), 6);
        drop(permits);
        assert_eq!(limiter.in_flight(), 0);
    }

    #[tokio::test]
    async fn adaptive_limit_grows_on_success_and_shrinks_on_congestion() {
        let limiter = Limiter::adaptive(4, 100);
        for _ in 0..20 {
            limiter.acquire().await.finish(Signal::Answered);
        }
        let grown = limiter.limit();
        assert!(grown > 4, "slow start should grow the limit, got {grown}");
        limiter.acquire().await.finish(Signal::Congested);
        let shrunk = limiter.limit();
        assert!(shrunk < grown, "{shrunk} !< {grown}");
        // Several congestion answers of the same window count once.
        limiter.acquire().await.finish(Signal::Congested);
        assert_eq!(limiter.limit(), shrunk);
    }

    #[tokio::test]
    async fn a_burst_of_429s_teaches_the_count_the_crm_accepted() {
        // 256 requests start together; the CRM takes 200 and refuses the rest at once, in any
        // order of their start.
        let limiter = Limiter::fixed(256);
        let mut permits: Vec<_> =
            futures::future::join_all((0..256).map(|_| limiter.acquire())).await;
        let refused: Vec<_> = permits.drain(..56).collect();
        for permit in refused {
            permit.finish(Signal::RateLimited);
        }
        assert_eq!(limiter.limit(), 194, "97% of the 200 still in flight");
    }

    #[test]
    fn an_instant_429_does_not_make_ordinary_answers_look_slow() {
        let limiter = Limiter::adaptive(100, 500);
        let ms = Duration::from_millis;
        for _ in 0..50 {
            limiter.record(Signal::Answered, ms(80));
        }
        limiter.record(Signal::RateLimited, Duration::from_micros(200));
        // Were the 429's 0.2 ms the base, every 80 ms answer would read as a latency rise.
        assert_eq!(lock(&limiter.state).base_latency, Some(ms(80)));
    }

    #[test]
    fn pause_only_extends() {
        let gate = Gate::new(3, Duration::from_millis(100), Duration::from_secs(1));
        let until = now_ms() + 10_000;
        assert!(gate.pause_until(until));
        assert!(!gate.pause_until(until - 5_000));
        assert!(matches!(gate.admit(), Admission::Wait(d) if d > Duration::from_secs(5)));
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
        let gate = Gate::new(3, Duration::ZERO, Duration::from_secs(1));
        gate.record(Some(false));
        gate.record(Some(false));
        gate.record(Some(true));
        gate.record(Some(false));
        gate.record(Some(false));
        assert!(
            !gate.breaker_open(),
            "a success in between resets the count"
        );
        gate.record(Some(false));
        assert!(gate.breaker_open());
        // Zero cool-down: one probe may go, the next caller waits for its answer.
        assert_eq!(gate.admit(), Admission::Go { probe: true });
        assert!(matches!(gate.admit(), Admission::Wait(_)));
        gate.record(Some(true));
        assert!(!gate.breaker_open());
        assert_eq!(gate.admit(), Admission::Go { probe: false });
    }

    #[tokio::test]
    async fn slots_block_at_capacity() {
        let slots = Slots::default();
        slots.acquire(2).await;
        slots.acquire(2).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(20), slots.acquire(2))
                .await
                .is_err()
        );
        slots.release();
        slots.acquire(2).await;
        assert_eq!(slots.in_use(), 2);
    }
}
