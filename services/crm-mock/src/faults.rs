//! Which fate a request meets, decided from the seed and the request's number alone, so a fixed
//! seed reproduces the same faults without a shared random generator behind a lock.

use std::time::Duration;

use axum::http::StatusCode;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

use crate::CrmMockConfig;

/// A fault injected before (or, for half the timeouts, after) the request is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// Answer 500, 502 or 503 without applying anything.
    ServerError(StatusCode),
    /// Answer 429 with `Retry-After` without applying anything.
    RateLimited,
    /// Hang, then 504; `applied_first` means the change landed before the hang.
    Timeout { applied_first: bool },
    /// Hang, then 504, while the change lands at the end of the hang whether or not the client
    /// is still there: a backend that finishes work its gateway has given up on.
    LateApply,
}

/// What happens to one request: its added latency and at most one fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    pub latency: Duration,
    pub fault: Option<InjectedFault>,
}

const SERVER_ERRORS: [StatusCode; 3] = [
    StatusCode::INTERNAL_SERVER_ERROR,
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
];

impl FaultPlan {
    /// The plan for request number `request_number` (0-based) under `config`.
    pub fn for_request(config: &CrmMockConfig, request_number: u64) -> Self {
        // The golden-ratio multiplier spreads consecutive numbers over the seed space, so requests
        // n and n+1 do not get correlated generators.
        let mut rng = SmallRng::seed_from_u64(
            config.seed ^ request_number.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let jitter = if config.jitter_ms > 0 {
            rng.random_range(0..=config.jitter_ms)
        } else {
            0
        };
        let latency = Duration::from_millis(config.latency_ms.saturating_add(jitter));
        let roll: f64 = rng.random();
        let error_until = config.failure_rate;
        let rate_limit_until = error_until + config.rate_limit_rate;
        let timeout_until = rate_limit_until + config.timeout_rate;
        let late_until = timeout_until + config.late_apply_rate;
        let fault = if roll < error_until {
            let status = SERVER_ERRORS[rng.random_range(0..SERVER_ERRORS.len())];
            Some(InjectedFault::ServerError(status))
        } else if roll < rate_limit_until {
            Some(InjectedFault::RateLimited)
        } else if roll < timeout_until {
            Some(InjectedFault::Timeout {
                applied_first: rng.random_bool(0.5),
            })
        } else if roll < late_until {
            Some(InjectedFault::LateApply)
        } else {
            None
        };
        FaultPlan { latency, fault }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(failure: f64, rate_limit: f64, timeout: f64) -> CrmMockConfig {
        CrmMockConfig {
            failure_rate: failure,
            rate_limit_rate: rate_limit,
            timeout_rate: timeout,
            seed: 42,
            ..CrmMockConfig::default()
        }
    }

    #[test]
    fn no_rates_means_no_faults_and_no_latency() {
        let config = config(0.0, 0.0, 0.0);
        for n in 0..10_000 {
            let plan = FaultPlan::for_request(&config, n);
            assert_eq!(plan.fault, None);
            assert_eq!(plan.latency, Duration::ZERO);
        }
    }

    #[test]
    fn the_same_seed_and_number_give_the_same_plan() {
        let config = config(0.3, 0.3, 0.3);
        let first: Vec<_> = (0..1000)
            .map(|n| FaultPlan::for_request(&config, n))
            .collect();
        let again: Vec<_> = (0..1000)
            .map(|n| FaultPlan::for_request(&config, n))
            .collect();
        assert_eq!(first, again);
        let other_seed = CrmMockConfig { seed: 43, ..config };
        let other: Vec<_> = (0..1000)
            .map(|n| FaultPlan::for_request(&other_seed, n))
            .collect();
        assert_ne!(first, other);
    }

    #[test]
    fn rates_are_met_and_half_the_timeouts_apply_first() {
        let config = CrmMockConfig {
            late_apply_rate: 0.02,
            ..config(0.2, 0.1, 0.05)
        };
        let total = 100_000u64;
        let (mut errors, mut limited, mut timeouts, mut applied) = (0u64, 0u64, 0u64, 0u64);
        let mut late = 0u64;
        let mut statuses = std::collections::BTreeSet::new();
        for n in 0..total {
            match FaultPlan::for_request(&config, n).fault {
                Some(InjectedFault::ServerError(status)) => {
                    errors += 1;
                    statuses.insert(status.as_u16());
                }
                Some(InjectedFault::RateLimited) => limited += 1,
                Some(InjectedFault::Timeout { applied_first }) => {
                    timeouts += 1;
                    applied += u64::from(applied_first);
                }
                Some(InjectedFault::LateApply) => late += 1,
                None => {}
            }
        }
        assert!(
            (late as f64 / total as f64 - 0.02).abs() < 0.005,
            "late {late}"
        );
        let share = |count: u64| count as f64 / total as f64;
        assert!((share(errors) - 0.2).abs() < 0.01, "errors {errors}");
        assert!(
            (share(limited) - 0.1).abs() < 0.01,
            "rate limited {limited}"
        );
        assert!((share(timeouts) - 0.05).abs() < 0.01, "timeouts {timeouts}");
        let applied_share = applied as f64 / timeouts as f64;
        assert!(
            (applied_share - 0.5).abs() < 0.05,
            "applied first {applied}/{timeouts}"
        );
        assert_eq!(
            statuses.into_iter().collect::<Vec<_>>(),
            vec![500, 502, 503]
        );
    }

    #[test]
    fn latency_stays_within_base_plus_jitter() {
        let config = CrmMockConfig {
            latency_ms: 20,
            jitter_ms: 10,
            ..CrmMockConfig::default()
        };
        let latencies: Vec<_> = (0..5000)
            .map(|n| FaultPlan::for_request(&config, n).latency.as_millis())
            .collect();
        assert!(latencies.iter().all(|ms| (20..=30).contains(ms)));
        assert!(latencies.contains(&20) && latencies.contains(&30));
    }
}
