//! Injected faults observed over real HTTP: each kind at about its configured rate (exactly the
//! seeded plan, in fact), hangs that block nothing else, the concurrency cap and the rps quota.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use common::{Mock, client, customer};
use crm_mock::{CrmMockConfig, FaultPlan, InjectedFault};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_kind_appears_at_its_configured_rate() -> anyhow::Result<()> {
    let config = CrmMockConfig {
        failure_rate: 0.10,
        rate_limit_rate: 0.05,
        retry_after_secs: 3,
        timeout_rate: 0.03,
        hang_ms: 50,
        seed: 7,
        ..CrmMockConfig::default()
    };
    let total = 3000;
    let mock = Mock::start(config.clone()).await?;
    let answers = mock
        .create_many(&client(Duration::from_secs(10))?, "c-", total, 64)
        .await;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for answer in &answers {
        let (status, retry_after) = answer.clone().expect("every request is answered");
        *by_status.entry(status).or_default() += 1;
        if status == 429 {
            assert_eq!(retry_after.as_deref(), Some("3"));
        }
    }
    let count = |statuses: &[u16]| -> usize {
        statuses
            .iter()
            .map(|s| by_status.get(s).copied().unwrap_or(0))
            .sum()
    };
    let share = |n: usize| n as f64 / total as f64;
    let (errors, limited, timeouts, ok) = (
        count(&[500, 502, 503]),
        count(&[429]),
        count(&[504]),
        count(&[201]),
    );
    assert_eq!(errors + limited + timeouts + ok, total, "{by_status:?}");
    assert!((share(errors) - 0.10).abs() < 0.02, "{by_status:?}");
    assert!((share(limited) - 0.05).abs() < 0.015, "{by_status:?}");
    assert!((share(timeouts) - 0.03).abs() < 0.01, "{by_status:?}");
    for status in [500, 502, 503] {
        assert!(
            by_status.contains_key(&status),
            "no {status} in {by_status:?}"
        );
    }

    // Request numbers 0..total were each used once, so the seed fixes the exact counts.
    let planned: Vec<_> = (0..total as u64)
        .filter_map(|n| FaultPlan::for_request(&config, n).fault)
        .collect();
    let planned_count =
        |pick: fn(&InjectedFault) -> bool| planned.iter().filter(|f| pick(f)).count();
    assert_eq!(
        errors,
        planned_count(|f| matches!(f, InjectedFault::ServerError(_)))
    );
    assert_eq!(
        limited,
        planned_count(|f| matches!(f, InjectedFault::RateLimited))
    );
    let applied_then_hung = planned_count(|f| {
        matches!(
            f,
            InjectedFault::Timeout {
                applied_first: true
            }
        )
    });
    assert_eq!(
        timeouts,
        planned_count(|f| matches!(f, InjectedFault::Timeout { .. }))
    );

    let stats = mock.stats().await?;
    assert_eq!(stats.requests, total as u64);
    assert_eq!(stats.injected.error as usize, errors);
    assert_eq!(stats.injected.rate_limited as usize, limited);
    assert_eq!(stats.injected.timeout as usize, timeouts);
    assert_eq!(
        stats.created as usize,
        ok + applied_then_hung,
        "half the timeouts apply before hanging"
    );
    assert!(
        applied_then_hung * 4 >= timeouts && applied_then_hung * 4 <= timeouts * 3,
        "{applied_then_hung} of {timeouts} timeouts applied first"
    );
    assert_eq!(stats.duplicate_effects, 0);
    mock.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_outlasts_the_client_timeout_without_blocking_others_or_shutdown()
-> anyhow::Result<()> {
    // hang_ms keeps its default of 30 s: far longer than this client waits.
    let config = CrmMockConfig {
        timeout_rate: 0.5,
        seed: 11,
        ..CrmMockConfig::default()
    };
    let mock = Mock::start(config.clone()).await?;
    let impatient = client(Duration::from_millis(500))?;
    let started = Instant::now();
    let answers = mock.create_many(&impatient, "h-", 40, 40).await;
    let elapsed = started.elapsed();
    let hung = answers.iter().filter(|a| a.is_none()).count();
    let planned_hangs = (0..40)
        .filter(|&n| FaultPlan::for_request(&config, n).fault.is_some())
        .count();
    assert_eq!(hung, planned_hangs, "{answers:?}");
    assert!(hung > 0 && hung < 40);
    assert!(answers.iter().flatten().all(|(status, _)| *status == 201));
    assert!(
        elapsed < Duration::from_secs(5),
        "answers waited on hangs: {elapsed:?}"
    );
    // The hangs are still in flight on the server; shutdown must not wait 30 s for them.
    let stopping = Instant::now();
    mock.stop().await?;
    assert!(stopping.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_and_jitter_delay_every_answer() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig {
        latency_ms: 100,
        jitter_ms: 20,
        ..CrmMockConfig::default()
    })
    .await?;
    for n in 0..3 {
        let started = Instant::now();
        let reply = mock
            .create(&customer(&format!("l-{n}"), "Ada"), None)
            .await?;
        assert_eq!(reply.status, 201);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
    mock.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_concurrency_cap_get_429_at_once() -> anyhow::Result<()> {
    let cap = 8;
    let mock = Mock::start(CrmMockConfig {
        max_concurrency: Some(cap),
        latency_ms: 500,
        ..CrmMockConfig::default()
    })
    .await?;
    let fired = 40;
    let answers = mock
        .create_many(&client(Duration::from_secs(10))?, "k-", fired, fired)
        .await;
    let answers: Vec<_> = answers.into_iter().flatten().collect();
    assert_eq!(answers.len(), fired);
    let rejected: Vec<_> = answers.iter().filter(|(s, _)| *s == 429).collect();
    let ok = answers.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(ok + rejected.len(), fired);
    assert!(!rejected.is_empty(), "nothing was turned away: {answers:?}");
    assert!(
        rejected
            .iter()
            .all(|(_, retry)| retry.as_deref() == Some("1"))
    );
    let stats = mock.stats().await?;
    assert!(stats.concurrency_peak <= cap as u64, "{stats:?}");
    assert!(stats.concurrency_peak >= 1);
    assert_eq!(stats.injected.concurrency_limited as usize, rejected.len());
    assert_eq!(stats.created as usize, ok);
    mock.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_rps_quota_get_429() -> anyhow::Result<()> {
    let rps = 50;
    let mock = Mock::start(CrmMockConfig {
        rps: Some(rps),
        ..CrmMockConfig::default()
    })
    .await?;
    let started = Instant::now();
    let answers = mock
        .create_many(&client(Duration::from_secs(10))?, "q-", 300, 16)
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let answers: Vec<_> = answers.into_iter().flatten().collect();
    let ok = answers.iter().filter(|(s, _)| *s == 201).count() as f64;
    let limited = answers.iter().filter(|(s, _)| *s == 429).count();
    assert!(limited > 0, "quota never applied");
    // A burst of one second's quota, then refills at `rps` per second.
    let allowed = f64::from(rps) * (1.0 + elapsed) + 1.0;
    assert!(
        ok <= allowed,
        "{ok} admitted in {elapsed:.2}s, quota allows {allowed}"
    );
    assert!(ok >= f64::from(rps) * 0.9, "only {ok} admitted");
    let stats = mock.stats().await?;
    assert_eq!(stats.injected.quota_limited as usize, limited);
    mock.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfigure_takes_the_crm_down_and_back_up_keeping_its_customers() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig::default()).await?;
    let running = mock.running.as_ref().expect("the mock is running");
    assert_eq!(
        mock.create(&customer("r-1", "Ada"), None).await?.status,
        201
    );

    let healthy = running.config();
    running.reconfigure(CrmMockConfig {
        failure_rate: 1.0,
        ..healthy.clone()
    })?;
    for n in 2..6 {
        let reply = mock
            .create(&customer(&format!("r-{n}"), "Ada"), None)
            .await?;
        assert!([500, 502, 503].contains(&reply.status), "{reply:?}");
    }
    assert!(
        running
            .reconfigure(CrmMockConfig {
                failure_rate: 2.0,
                ..healthy.clone()
            })
            .is_err(),
        "an invalid configuration is refused"
    );

    running.reconfigure(healthy)?;
    assert_eq!(mock.get("r-1").await?.status, 200, "customers survive");
    assert_eq!(
        mock.create(&customer("r-6", "Ada"), None).await?.status,
        201
    );
    let stats = running.stats();
    assert_eq!((stats.created, stats.injected.error), (2, 4));
    assert_eq!(stats, mock.stats().await?);
    mock.stop().await
}

/// A late apply lands after the hang even when the client gave up long before: the case a client
/// timeout cannot rule out, which the integrator's grace after a doubtful send is for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_apply_lands_after_the_client_gave_up() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig {
        late_apply_rate: 1.0,
        hang_ms: 300,
        ..CrmMockConfig::default()
    })
    .await?;
    let impatient = client(Duration::from_millis(50))?;
    let sent = impatient
        .post(mock.at("/customers"))
        .json(&customer("late-1", "Lena"))
        .send()
        .await;
    assert!(sent.is_err(), "the client gives up before the answer");
    mock.running
        .as_ref()
        .context("mock running")?
        .reconfigure(CrmMockConfig::default())?;
    assert_eq!(mock.get("late-1").await?.status, 404, "not applied yet");
    e2e::wait_for("the late apply", Duration::from_secs(5), || async {
        (mock.get("late-1").await.ok()?.status == 200).then_some(())
    })
    .await?;
    let stats = mock.stats().await?;
    assert_eq!(
        (
            stats.created,
            stats.injected.late_applied,
            stats.injected.late_landed
        ),
        (1, 1, 1)
    );
    mock.stop().await
}
