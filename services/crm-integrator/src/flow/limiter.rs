//! The request concurrency limit (fixed, or adaptive AIMD lowered in proportion to the share of
//! troubled answers) and each request's deadline, learned from the CRM's answer times.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use super::capacity::Capacity;
use crate::policy::Signal;
use crm_client::{CrmReply, Transient};

/// Weight of one answer in the trouble share (about the last 100 answers).
const TROUBLE_WEIGHT: f64 = 1.0 / 100.0;
/// The limit is lowered by this fraction of the trouble share: 20% troubled answers, 10% fewer
/// requests in flight.
const TROUBLE_REDUCTION: f64 = 0.5;
/// Short and long memories of the 429 and timeout shares; a burst is a short share of at least
/// [`BURST_SHARE`] and twice the long one.
const BURST_WEIGHT: f64 = 1.0 / 64.0;
const BASELINE_WEIGHT: f64 = 1.0 / 2048.0;
const BURST_SHARE: f64 = 0.2;
/// A request is given up after this many times the recent 99th-percentile answer time, but never
/// later than [`DEADLINE_BASE_FACTOR`] times the fastest recent answer: when our own host is the
/// bottleneck every answer looks slow, and a deadline learned from that would let hung requests
/// hold their slots for many seconds.
const DEADLINE_FACTOR: u32 = 10;
const DEADLINE_BASE_FACTOR: u32 = 50;
const LATENCY_SAMPLES: usize = 256;

/// Concurrency of CRM requests. Fixed mode keeps `--concurrency`; adaptive mode starts small,
/// grows while answers come back at the usual latency, and backs off multiplicatively on rising
/// latency and on bursts of 429s or timeouts. Either way a burst of 429s teaches a ceiling (the
/// requests still in flight when it came back), and the limit in force is lowered in proportion
/// to the share of troubled answers (5xx, 429, timeouts), never collapsed by them.
#[derive(Debug)]
pub struct Limiter {
    adaptive: bool,
    min: usize,
    max: usize,
    state: Mutex<LimiterState>,
    slots: Capacity,
    in_flight: AtomicUsize,
    applied: AtomicUsize,
    deadline_ms: AtomicU64,
    shortest_deadline: Duration,
    longest_deadline: Duration,
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
    trouble: f64,
    limited_short: f64,
    limited_long: f64,
    timeouts_short: f64,
    timeouts_long: f64,
    /// Answer times of the last successful requests, for the deadline.
    latencies: Vec<Duration>,
    next_latency: usize,
    since_estimate: usize,
}

/// Which kinds of trouble one answer showed as a burst rather than as noise.
struct Bursts {
    limited: bool,
    timed_out: bool,
}

impl LimiterState {
    /// Feeds the trouble share and the short and long 429 and timeout shares.
    fn observe_shares(&mut self, signal: Signal) -> Bursts {
        let limited = signal == Signal::RateLimited;
        let timed_out = signal == Signal::TimedOut;
        self.trouble = ewma(self.trouble, signal.is_trouble(), TROUBLE_WEIGHT);
        self.limited_short = ewma(self.limited_short, limited, BURST_WEIGHT);
        self.limited_long = ewma(self.limited_long, limited, BASELINE_WEIGHT);
        self.timeouts_short = ewma(self.timeouts_short, timed_out, BURST_WEIGHT);
        self.timeouts_long = ewma(self.timeouts_long, timed_out, BASELINE_WEIGHT);
        // Random 429s or hangs keep the short share near the long one; crossing a cap or a CRM
        // that stalls makes it jump.
        Bursts {
            limited: limited && self.limited_short >= BURST_SHARE.max(2.0 * self.limited_long),
            timed_out: timed_out
                && self.timeouts_short >= BURST_SHARE.max(2.0 * self.timeouts_long),
        }
    }
}

/// After this long without a burst of 429s, the learned ceiling is probed 5% upward. A probe that
/// overshoots costs a burst of 429s (each record retried after its Retry-After), so this is a
/// trade: a ceiling learned low recovers within a few minutes, while overshooting costs at most
/// one burst per half minute.
const CEILING_QUIET: Duration = Duration::from_secs(30);
const DECREASE_FACTOR: f64 = 0.8;

fn ewma(current: f64, hit: bool, weight: f64) -> f64 {
    current + (f64::from(u8::from(hit)) - current) * weight
}

impl Limiter {
    pub fn fixed(concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self::build(false, 1, concurrency, concurrency)
    }

    pub fn adaptive(initial: usize, max: usize) -> Self {
        let max = max.max(1);
        Self::build(true, 1, max, initial.clamp(1, max))
    }

    /// Request deadlines between `shortest` and `longest` (default 1 s and 10 s).
    pub fn with_deadlines(mut self, shortest: Duration, longest: Duration) -> Self {
        self.longest_deadline = longest.max(Duration::from_millis(1));
        self.shortest_deadline = shortest.min(self.longest_deadline);
        self.deadline_ms
            .store(self.longest_deadline.as_millis() as u64, Ordering::Release);
        self
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
                trouble: 0.0,
                limited_short: 0.0,
                limited_long: 0.0,
                timeouts_short: 0.0,
                timeouts_long: 0.0,
                latencies: Vec::with_capacity(LATENCY_SAMPLES),
                next_latency: 0,
                since_estimate: 0,
            }),
            slots: Capacity::new(initial),
            in_flight: AtomicUsize::new(0),
            applied: AtomicUsize::new(initial),
            deadline_ms: AtomicU64::new(10_000),
            shortest_deadline: Duration::from_secs(1),
            longest_deadline: Duration::from_secs(10),
        }
    }

    pub fn is_adaptive(&self) -> bool {
        self.adaptive
    }

    /// The number of requests allowed in flight now.
    pub fn limit(&self) -> usize {
        self.applied.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// How long the next request may take before it is given up as hung: ten times the recent
    /// 99th-percentile answer time, between the shortest and the longest deadline.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms.load(Ordering::Acquire))
    }

    /// Waits for a free request slot (woken alone, in turn).
    pub async fn acquire(&self) -> Permit<'_> {
        let permit = self.slots.acquire().await;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Permit {
            limiter: self,
            permit: Some(permit),
            started: Instant::now(),
            deadline: self.deadline(),
        }
    }

    fn effective(&self, state: &LimiterState) -> usize {
        let mut base = state.limit;
        if let Some((ceiling, _)) = state.ceiling {
            base = base.min(ceiling as f64);
        }
        let lowered = base * (1.0 - state.trouble * TROUBLE_REDUCTION);
        (lowered.floor() as usize).clamp(self.min, self.max)
    }

    fn record(&self, signal: Signal, latency: Duration) {
        self.record_at(signal, latency, Instant::now());
    }

    fn record_at(&self, signal: Signal, latency: Duration, now: Instant) {
        let mut state = self.state.lock();
        self.probe_above_ceiling(&mut state, now);
        let bursts = state.observe_shares(signal);
        if signal == Signal::Answered {
            self.observe_deadline(&mut state, latency);
        }
        if bursts.limited {
            self.learn_ceiling(&mut state, now);
        }
        if self.adaptive {
            // Only ordinary answers say how long the CRM takes: a 429 comes back at once and
            // would teach a base latency the real requests can never match.
            let latency_rose =
                signal == Signal::Answered && Self::observe_latency(&mut state, latency, now);
            if latency_rose || bursts.limited || bursts.timed_out {
                self.decrease(&mut state, latency, now);
            } else if signal == Signal::Answered {
                self.increase(&mut state);
            }
        }
        let applied = self.effective(&state);
        if applied != self.applied.swap(applied, Ordering::AcqRel) {
            self.slots.resize(applied);
            metrics::gauge!("crm_integrator_concurrency_limit").set(applied as f64);
        }
    }

    fn probe_above_ceiling(&self, state: &mut LimiterState, now: Instant) {
        if let Some((_, since)) = state.ceiling
            && now.duration_since(since) > CEILING_QUIET
        {
            // Quiet for a while: let the limit probe a little above the old ceiling.
            state.ceiling = state
                .ceiling
                .map(|(c, _)| (c + (c / 20).max(1), now))
                .filter(|(c, _)| *c < self.max);
        }
    }

    /// A burst of 429s: what the CRM holds is what is still in flight when its 429 comes back.
    fn learn_ceiling(&self, state: &mut LimiterState, now: Instant) {
        // The requests it accepted and has not answered. Our count runs ahead of the CRM's (it
        // includes the answers' way back), so keep a small margin; taking the minimum (never
        // compounding) keeps one burst of 429s from collapsing the ceiling.
        let still_in_flight = self.in_flight.load(Ordering::Acquire) as f64;
        let ceiling = ((still_in_flight * 0.97) as usize).max(self.min);
        let lower = state.ceiling.is_none_or(|(c, _)| ceiling < c);
        let kept = state.ceiling.map(|(c, _)| c);
        state.ceiling = Some((
            if lower {
                ceiling
            } else {
                kept.unwrap_or(ceiling)
            },
            now,
        ));
    }

    /// Multiplicative decrease, at most once per round trip as it is now (not as it was
    /// unloaded): the answers of one overloaded window all say the same, and decreasing faster
    /// than answers come back collapses the limit.
    fn decrease(&self, state: &mut LimiterState, latency: Duration, now: Instant) {
        let window = state
            .smoothed_latency
            .unwrap_or(latency)
            .max(latency.min(Duration::from_secs(1)))
            .max(Duration::from_millis(20));
        if state
            .last_decrease
            .is_none_or(|at| now.duration_since(at) > window)
        {
            state.limit = (state.limit * DECREASE_FACTOR).max(self.min as f64);
            state.slow_start = false;
            state.last_decrease = Some(now);
        }
    }

    /// Additive increase (one per answer in slow start), up to the learned ceiling.
    fn increase(&self, state: &mut LimiterState) {
        let cap = state.ceiling.map_or(self.max, |(c, _)| c.min(self.max)) as f64;
        let step = if state.slow_start {
            1.0
        } else {
            1.0 / state.limit.max(1.0)
        };
        state.limit = (state.limit + step).min(cap.max(self.min as f64));
    }

    fn observe_deadline(&self, state: &mut LimiterState, latency: Duration) {
        if state.latencies.len() < LATENCY_SAMPLES {
            state.latencies.push(latency);
        } else {
            let at = state.next_latency;
            state.latencies[at] = latency;
        }
        state.next_latency = (state.next_latency + 1) % LATENCY_SAMPLES;
        state.since_estimate += 1;
        // Early on every answer counts: the first requests must not keep the longest deadline.
        let every = if state.latencies.len() < 64 { 1 } else { 32 };
        if state.latencies.len() < 8 || state.since_estimate < every {
            return;
        }
        state.since_estimate = 0;
        let mut sorted = state.latencies.clone();
        let fastest = sorted.iter().min().copied().unwrap_or_default();
        let at = sorted.len() * 99 / 100;
        let (_, p99, _) = sorted.select_nth_unstable(at);
        let deadline = (*p99 * DEADLINE_FACTOR)
            .min(fastest * DEADLINE_BASE_FACTOR)
            .clamp(self.shortest_deadline, self.longest_deadline);
        self.deadline_ms
            .store(deadline.as_millis() as u64, Ordering::Release);
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
    permit: Option<OwnedSemaphorePermit>,
    started: Instant,
    deadline: Duration,
}

impl Permit<'_> {
    /// Runs `request` until it answers or its deadline passes. The deadline is read again when
    /// it is reached, so a request sent before the limiter learned the CRM's answer times is held
    /// to what it learned meanwhile, not to the longest deadline it started with.
    pub async fn bounded(
        &self,
        earlier_deliveries: u64,
        is_write: bool,
        request: impl std::future::Future<Output = CrmReply>,
    ) -> CrmReply {
        let mut request = std::pin::pin!(request);
        loop {
            // Looked at again at least every quarter second: what the limiter learns meanwhile
            // (the first answers of a run) applies to the requests already out.
            let due = (self.started + self.current_deadline(earlier_deliveries))
                .min(Instant::now() + Duration::from_millis(250));
            tokio::select! {
                reply = &mut request => return reply,
                () = tokio::time::sleep_until(due.into()) => {
                    let deadline = self.current_deadline(earlier_deliveries);
                    if self.started.elapsed() >= deadline {
                        return CrmReply::Transient(Transient {
                            status: None,
                            retry_after: None,
                            // Sent and unanswered: it may have been applied.
                            maybe_applied: is_write,
                            congestion: true,
                            unreachable: false,
                            detail: format!(
                                "timed out: no answer within {deadline:?} (the deadline learned \
                                 from the CRM's answer times)"
                            ),
                        });
                    }
                }
            }
        }
    }

    fn current_deadline(&self, earlier_deliveries: u64) -> Duration {
        let doublings = earlier_deliveries.saturating_sub(2).min(8) as u32;
        (self.limiter.deadline() * 2u32.pow(doublings)).min(self.limiter.longest_deadline)
    }

    /// How long this request may take before it is given up as hung: the learned deadline,
    /// doubled for each delivery of the same record after its third (so a record whose requests
    /// are slow rather than hung still gets through within `--max-deliver`, while the few records
    /// handed back after a run of random faults keep the short deadline), at most the longest.
    pub fn deadline(&self, earlier_deliveries: u64) -> Duration {
        let doublings = earlier_deliveries.saturating_sub(2).min(8) as u32;
        (self.deadline * 2u32.pow(doublings)).min(self.limiter.longest_deadline)
    }

    pub fn finish(mut self, signal: Signal) {
        self.release();
        self.limiter.record(signal, self.started.elapsed());
    }

    fn release(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.limiter.slots.release(permit);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};
    use std::sync::Arc;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn fixed_limit_holds_and_one_429_costs_little() {
        let limiter = Limiter::fixed(8);
        let permits: Vec<_> = futures::future::join_all((0..8).map(|_| limiter.acquire())).await;
        assert_eq!(limiter.in_flight(), 8);
        let ninth = tokio::time::timeout(Duration::from_millis(20), limiter.acquire()).await;
        assert!(ninth.is_err(), "a ninth request must wait");
        let mut permits = permits.into_iter();
        // One 429 is one record's trouble: it lowers the limit by half its share of the recent
        // answers, and teaches no ceiling.
        let last = permits.next_back().expect("eight permits");
        last.finish(Signal::RateLimited);
        assert_eq!(limiter.limit(), 7);
        assert_eq!(limiter.state.lock().ceiling, None);
        drop(permits);
        assert_eq!(limiter.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_freed_slot_wakes_one_waiter_and_a_shrunk_limit_holds() {
        let limiter = Arc::new(Limiter::fixed(2));
        let first = limiter.acquire().await;
        let second = limiter.acquire().await;
        let woken = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..5 {
            let (limiter, woken) = (limiter.clone(), woken.clone());
            waiters.push(tokio::spawn(async move {
                let permit = limiter.acquire().await;
                woken.fetch_add(1, Ordering::SeqCst);
                // Hold it so the count shows who got through.
                std::future::pending::<()>().await;
                drop(permit);
            }));
        }
        tokio::task::yield_now().await;
        drop(first);
        e2e_like_wait(|| woken.load(Ordering::SeqCst) == 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(woken.load(Ordering::SeqCst), 1, "one slot, one waiter");
        // Shrinking below what is out: the next release is kept, nobody else gets in.
        limiter.slots.resize(1);
        drop(second);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        limiter.slots.resize(3);
        e2e_like_wait(|| woken.load(Ordering::SeqCst) == 3).await;
        for waiter in waiters {
            waiter.abort();
        }
    }

    async fn e2e_like_wait(done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done() {
                tokio::time::sleep(MS).await;
            }
        })
        .await
        .expect("condition within 5 s");
    }

    #[tokio::test]
    async fn adaptive_limit_grows_on_success_and_shrinks_on_rising_latency() {
        let limiter = Limiter::adaptive(4, 100);
        for _ in 0..20 {
            limiter.record(Signal::Answered, 5 * MS);
        }
        let grown = limiter.limit();
        assert!(grown > 4, "slow start should grow the limit, got {grown}");
        for _ in 0..200 {
            limiter.record(Signal::Answered, 500 * MS);
        }
        let shrunk = limiter.limit();
        assert!(shrunk < grown, "{shrunk} !< {grown}");
    }

    #[test]
    fn a_burst_of_429s_teaches_the_count_the_crm_accepted() {
        // 256 requests start together; the CRM takes 200 and refuses the rest at once.
        let limiter = Limiter::fixed(256);
        limiter.in_flight.store(256, Ordering::SeqCst);
        for _ in 0..56 {
            limiter.in_flight.fetch_sub(1, Ordering::SeqCst);
            limiter.record(Signal::RateLimited, MS);
        }
        let ceiling = limiter.state.lock().ceiling.map(|(c, _)| c);
        assert_eq!(ceiling, Some(194), "97% of the 200 still in flight");
    }

    /// Feeds `answers` answers to `limiter`, 1,000 a second from `start`, each troubled
    /// (`trouble`) with probability `share`, while the limiter believes it has its whole limit in
    /// flight.
    fn feed(
        limiter: &Limiter,
        start: Instant,
        answers: u32,
        share: f64,
        trouble: Signal,
        seed: u64,
    ) -> Instant {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut now = start;
        for _ in 0..answers {
            now += MS;
            limiter
                .in_flight
                .store(limiter.limit().saturating_sub(1), Ordering::SeqCst);
            let signal = if rng.random_bool(share) {
                trouble
            } else {
                Signal::Answered
            };
            limiter.record_at(signal, 5 * MS, now);
        }
        now
    }

    #[test]
    fn random_timeouts_and_429s_lower_the_limit_in_proportion_never_collapse_it() {
        for (trouble, share) in [
            (Signal::TimedOut, 0.02),
            (Signal::RateLimited, 0.05),
            (Signal::Failed, 0.20),
        ] {
            let limiter = Limiter::adaptive(16, 500);
            feed(&limiter, Instant::now(), 50_000, share, trouble, 3);
            let limit = limiter.limit() as f64;
            // The limit in force is what the CRM could take, less half the trouble share.
            let floor = 500.0 * (1.0 - share * TROUBLE_REDUCTION) * 0.9;
            assert!(
                limit >= floor,
                "{share} random {trouble:?}: limit {limit} < {floor}"
            );
            assert!(limit < 500.0, "{trouble:?} lowers the limit a little");
            assert_eq!(
                limiter.state.lock().ceiling,
                None,
                "{trouble:?}: no ceiling"
            );
        }
    }

    #[test]
    fn a_fixed_limit_keeps_its_level_under_the_issues_fault_mix() {
        let limiter = Limiter::fixed(256);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
        for _ in 0..50_000 {
            limiter
                .in_flight
                .store(limiter.limit().saturating_sub(1), Ordering::SeqCst);
            let signal = crate::flow::fault_mix(&mut rng);
            limiter.record(signal, 5 * MS);
        }
        let limit = limiter.limit();
        assert!((200..=230).contains(&limit), "limit {limit}");
    }

    #[test]
    fn a_stalling_crm_still_brings_the_adaptive_limit_down() {
        let limiter = Limiter::adaptive(16, 500);
        let now = feed(&limiter, Instant::now(), 5_000, 0.0, Signal::TimedOut, 1);
        assert_eq!(limiter.limit(), 500);
        // Half of all requests hang from now on.
        feed(&limiter, now, 2_000, 0.5, Signal::TimedOut, 2);
        assert!(limiter.limit() < 250, "limit {}", limiter.limit());
    }

    #[test]
    fn the_deadline_follows_the_answer_times_within_its_bounds() {
        let limiter = Limiter::adaptive(16, 500)
            .with_deadlines(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(
            limiter.deadline(),
            Duration::from_secs(10),
            "nothing learned yet"
        );
        for n in 0..1_000u64 {
            limiter.record(Signal::Answered, Duration::from_millis(20 + n % 5));
        }
        assert_eq!(limiter.deadline(), Duration::from_millis(240));
        for _ in 0..1_000 {
            limiter.record(Signal::Answered, MS);
        }
        assert_eq!(limiter.deadline(), Duration::from_millis(100));
    }

    #[test]
    fn an_instant_429_does_not_make_ordinary_answers_look_slow() {
        let limiter = Limiter::adaptive(100, 500);
        for _ in 0..50 {
            limiter.record(Signal::Answered, 80 * MS);
        }
        limiter.record(Signal::RateLimited, Duration::from_micros(200));
        // Were the 429's 0.2 ms the base, every 80 ms answer would read as a latency rise.
        assert_eq!(limiter.state.lock().base_latency, Some(80 * MS));
    }
}
