//! The fault policy: what one CRM answer says about that record and what it says about the CRM.
//!
//! A 5xx, a timeout or a 429 is first one request's trouble: the record's own retry waits (a 429's
//! `Retry-After` applies to it) and the limiter lowers the concurrency in proportion to how often
//! trouble comes back. Only a persistent pattern says something about the CRM as a whole: a large
//! share of 429s over a window that lasted (or a long `Retry-After`) pauses the fleet, and a
//! sustained share of failures with enough volume opens the breaker. The reasons for each number
//! are in the README (crm-integrator section).

use std::time::{Duration, Instant};

use crate::flow::{Gate, Permit};
use crm_client::CrmReply;

/// How one request went, as the limiter and the policy see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered: a 2xx, a 404 lookup or a refusal. The CRM works.
    Answered,
    /// 5xx, a refused credential, a connection error, an unreadable 2xx.
    Failed,
    /// 429: refused for load.
    RateLimited,
    /// No answer within the request's deadline.
    TimedOut,
}

impl Signal {
    pub fn of(reply: &CrmReply) -> Signal {
        match reply {
            CrmReply::Stored(_) | CrmReply::NotFound | CrmReply::Refused { .. } => Signal::Answered,
            // Our credentials, refused: the CRM cannot be used, which is the breaker's business.
            CrmReply::Unauthorized { .. } => Signal::Failed,
            CrmReply::Transient(t) if t.status == Some(429) => Signal::RateLimited,
            CrmReply::Transient(t) if t.congestion && t.status.is_none() => Signal::TimedOut,
            CrmReply::Transient(_) => Signal::Failed,
        }
    }

    pub fn is_trouble(self) -> bool {
        self != Signal::Answered
    }
}

/// A fleet-wide pause the policy calls for, with its cause for the log and `syncctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseRequest {
    pub wait: Duration,
    pub cause: String,
}

/// A `Retry-After` at least this long pauses the fleet on its own (capped by `--max-pause`).
pub const LONG_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Window over which the share of 429s is judged for a fleet pause.
pub const OVERLOAD_WINDOW: Duration = Duration::from_secs(5);
/// Share of 429s among the window's answers that pauses the fleet.
pub const OVERLOAD_SHARE: f64 = 0.5;
/// Fewer answers than this in the window say nothing.
pub const OVERLOAD_MIN_ANSWERS: u32 = 20;
/// The 429s must have lasted this long: a burst from crossing a concurrency cap all at once comes
/// back within milliseconds and is the limiter's business (a ceiling), not a reason to stop.
pub const OVERLOAD_MIN_SPAN: Duration = Duration::from_secs(1);

/// Counts over a sliding time window, in buckets.
#[derive(Debug, Clone)]
pub struct Recent {
    origin: Instant,
    bucket: Duration,
    buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    total: u32,
    marked: u32,
    longest_retry_after_ms: u64,
}

/// What a [`Recent`] window holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    pub total: u32,
    pub marked: u32,
    /// From the oldest bucket with answers to now.
    pub span: Duration,
    pub longest_retry_after: Duration,
}

impl Tally {
    pub fn share(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            f64::from(self.marked) / f64::from(self.total)
        }
    }
}

impl Recent {
    pub fn new(window: Duration, buckets: usize) -> Self {
        let buckets = buckets.max(1);
        Recent {
            origin: Instant::now(),
            bucket: (window / buckets as u32).max(Duration::from_millis(1)),
            buckets: vec![Bucket::default(); buckets],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_millis() / self.bucket.as_millis().max(1))
            as u64
            + 1
    }

    pub fn observe(&mut self, now: Instant, marked: bool, retry_after: Option<Duration>) {
        let epoch = self.epoch(now);
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(epoch % len) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        bucket.total = bucket.total.saturating_add(1);
        bucket.marked = bucket.marked.saturating_add(u32::from(marked));
        if let Some(after) = retry_after {
            bucket.longest_retry_after_ms =
                bucket.longest_retry_after_ms.max(after.as_millis() as u64);
        }
    }

    pub fn tally(&self, now: Instant) -> Tally {
        let epoch = self.epoch(now);
        let len = self.buckets.len() as u64;
        let mut tally = Tally::default();
        let mut oldest = epoch;
        for bucket in &self.buckets {
            if bucket.total == 0 || bucket.epoch + len <= epoch || bucket.epoch > epoch {
                continue;
            }
            tally.total += bucket.total;
            tally.marked += bucket.marked;
            oldest = oldest.min(bucket.epoch);
            tally.longest_retry_after = tally
                .longest_retry_after
                .max(Duration::from_millis(bucket.longest_retry_after_ms));
        }
        tally.span = self.bucket * (epoch - oldest) as u32;
        tally
    }

    pub fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }
}

/// Decides when 429s are the CRM's state rather than one request's luck.
#[derive(Debug)]
pub struct Overload {
    window: Recent,
    max_pause: Duration,
    /// End and length of the last pause this replica called for by share, to lengthen the next
    /// one when the refusals go on right after it.
    last: Option<(Instant, Duration)>,
}

impl Overload {
    pub fn new(max_pause: Duration) -> Self {
        Overload {
            window: Recent::new(OVERLOAD_WINDOW, 10),
            max_pause,
            last: None,
        }
    }

    pub fn observe(
        &mut self,
        now: Instant,
        signal: Signal,
        retry_after: Option<Duration>,
    ) -> Option<PauseRequest> {
        let limited = signal == Signal::RateLimited;
        if let Some(after) = retry_after
            && after >= LONG_RETRY_AFTER
        {
            let what = if limited { "429" } else { "an error" };
            return Some(PauseRequest {
                wait: after.min(self.max_pause),
                cause: format!(
                    "the CRM answered {what} with Retry-After: {} s (at least {} s pauses the fleet)",
                    after.as_secs(),
                    LONG_RETRY_AFTER.as_secs()
                ),
            });
        }
        self.window
            .observe(now, limited, retry_after.filter(|_| limited));
        if !limited {
            return None;
        }
        let tally = self.window.tally(now);
        if tally.total < OVERLOAD_MIN_ANSWERS
            || tally.share() < OVERLOAD_SHARE
            || tally.span < OVERLOAD_MIN_SPAN
        {
            return None;
        }
        let mut wait = tally.longest_retry_after.max(Duration::from_secs(1));
        if let Some((ended, length)) = self.last
            && now.saturating_duration_since(ended) < OVERLOAD_WINDOW * 2
        {
            // Refusals went on right after the last pause: the CRM needs longer.
            wait = wait.max(length * 2);
        }
        let wait = wait.min(self.max_pause);
        self.window.clear();
        self.last = Some((now + wait, wait));
        Some(PauseRequest {
            wait,
            cause: format!(
                "{} of the last {} CRM answers ({:.0}%) over {:.1} s were 429",
                tally.marked,
                tally.total,
                tally.share() * 100.0,
                tally.span.as_secs_f64()
            ),
        })
    }
}

/// The circuit breaker's evidence: failures among the answers of a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Share of failures (5xx, timeouts, connection errors) that opens the breaker.
    pub failure_share: f64,
    /// Answers the window must hold before its share means anything.
    pub min_requests: u32,
    pub window: Duration,
    /// First cool-down of an open breaker; doubles while probes fail.
    pub cooldown: Duration,
}

/// Feeds one CRM answer to the limiter, the breaker and the overload rule. Returns the fleet pause
/// it calls for, if any. `probe` says the request was the open breaker's probe.
pub fn answered(
    permit: Permit<'_>,
    gate: &Gate,
    reply: &CrmReply,
    probe: bool,
) -> Option<PauseRequest> {
    let signal = Signal::of(reply);
    permit.finish(signal);
    let retry_after = match reply {
        CrmReply::Transient(t) => t.retry_after,
        _ => None,
    };
    if matches!(signal, Signal::Failed | Signal::TimedOut) {
        gate.note_failure(failure_detail(reply));
    }
    gate.record(signal, retry_after, probe)
}

/// A failed answer in words, for the breaker's log lines and the readiness reason.
fn failure_detail(reply: &CrmReply) -> String {
    match reply {
        // "cannot connect: error sending request for url (…): client error (Connect): tcp
        // connect error: Connection refused (os error 111)": its first words and the operating
        // system's say it all.
        CrmReply::Transient(t) if t.status.is_none() && t.detail.contains(" (os error ") => {
            let kind = t.detail.split(": ").next().unwrap_or_default();
            let cause = service_kit::root_cause(&std::io::Error::other(t.detail.clone()));
            format!("{kind}: {cause}")
        }
        CrmReply::Transient(t) => t.to_string(),
        CrmReply::Unauthorized { status, .. } => {
            format!("HTTP {status}: our credentials are refused (check CRM_API_TOKEN)")
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers at `per_second`, each a 429 with probability `share` (seeded), for `seconds`.
    fn run_overload(share: f64, per_second: u32, seconds: u32) -> Vec<PauseRequest> {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let mut overload = Overload::new(Duration::from_secs(60));
        let start = Instant::now();
        let mut pauses = Vec::new();
        for n in 0..per_second * seconds {
            let now = start + Duration::from_secs_f64(f64::from(n) / f64::from(per_second));
            let (signal, after) = if rng.random_bool(share) {
                (Signal::RateLimited, Some(Duration::from_secs(1)))
            } else {
                (Signal::Answered, None)
            };
            pauses.extend(overload.observe(now, signal, after));
        }
        pauses
    }

    #[test]
    fn random_429s_never_pause_the_fleet() {
        // 5% (the mix) and even 30% at a high and at a low rate.
        for share in [0.05, 0.3] {
            for per_second in [5_000, 30] {
                let pauses = run_overload(share, per_second, 60);
                assert!(pauses.is_empty(), "{share} at {per_second}/s: {pauses:?}");
            }
        }
    }

    #[test]
    fn a_sustained_share_of_429s_pauses_the_fleet_capped_and_longer_while_it_lasts() {
        let mut overload = Overload::new(Duration::from_secs(3));
        let start = Instant::now();
        let mut pauses = Vec::new();
        // 80% 429s for a minute, 100 answers a second.
        for n in 0..6_000u32 {
            let now = start + Duration::from_millis(u64::from(n) * 10);
            let (signal, after) = if n % 5 != 0 {
                (Signal::RateLimited, Some(Duration::from_secs(1)))
            } else {
                (Signal::Answered, None)
            };
            pauses.extend(overload.observe(now, signal, after));
        }
        assert!(pauses.len() >= 5, "{pauses:?}");
        assert_eq!(pauses[0].wait, Duration::from_secs(1), "{pauses:?}");
        assert!(pauses[0].cause.contains("429"), "{}", pauses[0].cause);
        assert!(pauses[1].wait >= Duration::from_secs(2), "{pauses:?}");
        assert!(pauses.iter().all(|p| p.wait <= Duration::from_secs(3)));
    }

    #[test]
    fn a_burst_of_429s_within_milliseconds_is_no_pause() {
        let mut overload = Overload::new(Duration::from_secs(60));
        let start = Instant::now();
        // 56 requests over a cap of 200 refused at once, then the other 200 answered.
        for n in 0..56u64 {
            let now = start + Duration::from_micros(n * 10);
            let pause = overload.observe(now, Signal::RateLimited, Some(Duration::from_secs(1)));
            assert_eq!(pause, None);
        }
        for n in 0..200u64 {
            let now = start + Duration::from_millis(20 + n / 10);
            assert_eq!(overload.observe(now, Signal::Answered, None), None);
        }
    }

    #[test]
    fn a_long_retry_after_pauses_at_once_but_never_beyond_the_cap() {
        let mut overload = Overload::new(Duration::from_secs(60));
        let now = Instant::now();
        let pause = overload
            .observe(now, Signal::RateLimited, Some(Duration::from_secs(3_600)))
            .expect("a long Retry-After pauses");
        assert_eq!(pause.wait, Duration::from_secs(60));
        assert!(pause.cause.contains("3600"), "{}", pause.cause);
        assert_eq!(
            overload.observe(now, Signal::RateLimited, Some(Duration::from_secs(2))),
            None
        );
    }

    #[test]
    fn a_window_forgets_old_answers() {
        let mut window = Recent::new(Duration::from_secs(1), 10);
        let start = Instant::now();
        window.observe(start, true, None);
        window.observe(start + Duration::from_millis(500), false, None);
        let tally = window.tally(start + Duration::from_millis(500));
        assert_eq!((tally.total, tally.marked), (2, 1));
        assert_eq!(tally.span, Duration::from_millis(500));
        let later = window.tally(start + Duration::from_millis(1_200));
        assert_eq!((later.total, later.marked), (1, 0));
    }
}
