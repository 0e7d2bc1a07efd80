//! The CRM API contract (docs/CONTRACT.md) against the real server: answers, idempotency, duplicate
//! counting, auth, malformed bodies and reset.

mod common;

use std::time::Duration;

use common::{Mock, customer};
use crm_mock::{CrmMockConfig, FaultPlan, InjectedFault};
use serde_json::json;

#[tokio::test]
async fn create_get_and_update_follow_the_contract() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig::default()).await?;
    let ada = customer("c-1", "Ada");
    let created = mock.create(&ada, None).await?;
    assert_eq!(created.status, 201);
    assert_eq!(created.body["crm_id"], "crm-1");
    assert_eq!(created.body["customer"], ada);

    let fetched = mock.get("c-1").await?;
    assert_eq!((fetched.status, &fetched.body), (200, &created.body));

    let renamed = customer("c-1", "Augusta");
    let updated = mock.update("c-1", &renamed, None).await?;
    assert_eq!(updated.status, 200);
    assert_eq!(updated.body["crm_id"], "crm-1");
    assert_eq!(updated.body["customer"], renamed);
    assert_eq!(mock.get("c-1").await?.body["customer"], renamed);

    let unknown = mock.get("nobody").await?;
    assert_eq!(unknown.status, 404);
    assert!(unknown.body["error"].is_string());
    let update_unknown = mock
        .update("nobody", &customer("nobody", "X"), None)
        .await?;
    assert_eq!(update_unknown.status, 404);
    let mismatch = mock.update("c-1", &customer("c-2", "X"), None).await?;
    assert_eq!(
        (mismatch.status, &mismatch.body["field"]),
        (422, &json!("id"))
    );

    let stats = mock.stats().await?;
    assert_eq!(
        (
            stats.created,
            stats.updated,
            stats.customers,
            stats.duplicate_effects
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(stats.requests, 7);
    assert_eq!(stats.rejected_invalid, 1);
    mock.stop().await
}

#[tokio::test]
async fn an_idempotent_replay_returns_the_first_answer_and_applies_nothing() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig::default()).await?;
    let ada = customer("c-1", "Ada");
    let first = mock.create(&ada, Some("c-1:h1")).await?;
    let replay = mock.create(&ada, Some("c-1:h1")).await?;
    assert_eq!(first.status, 201);
    assert_eq!(
        replay, first,
        "a replay answers exactly what the first request got"
    );

    let renamed = customer("c-1", "Augusta");
    let first_update = mock.update("c-1", &renamed, Some("c-1:h2")).await?;
    let replayed_update = mock.update("c-1", &renamed, Some("c-1:h2")).await?;
    assert_eq!(first_update.status, 200);
    assert_eq!(replayed_update, first_update);

    let reused = mock
        .create(&customer("c-1", "Other"), Some("c-1:h1"))
        .await?;
    assert_eq!(reused.status, 422);
    assert_eq!(
        reused.body["error"],
        "idempotency key reused with a different request"
    );

    let stats = mock.stats().await?;
    assert_eq!(stats.created, 1);
    assert_eq!(stats.updated, 1);
    assert_eq!(stats.idempotent_replays, 2);
    assert_eq!(stats.duplicate_effects, 0, "replays are never duplicates");
    assert_eq!(stats.customers, 1);
    mock.stop().await
}

#[tokio::test]
async fn duplicate_effects_counts_true_duplicates() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig::default()).await?;
    let ada = customer("c-1", "Ada");
    let first = mock.create(&ada, None).await?;
    let second = mock.create(&ada, None).await?;
    assert_eq!((first.status, second.status), (201, 201));
    assert_ne!(
        first.body["crm_id"], second.body["crm_id"],
        "a second create makes a second customer, as a real CRM would"
    );
    assert_eq!(mock.stats().await?.duplicate_effects, 1);

    let same_again = mock.update("c-1", &ada, None).await?;
    assert_eq!(same_again.status, 200);
    assert_eq!(mock.stats().await?.duplicate_effects, 2);

    let changed = mock
        .update("c-1", &customer("c-1", "Augusta"), None)
        .await?;
    assert_eq!(changed.status, 200);
    let stats = mock.stats().await?;
    assert_eq!(
        stats.duplicate_effects, 2,
        "a real change is not a duplicate"
    );
    assert_eq!((stats.created, stats.updated), (2, 2));
    assert_eq!(
        stats.duplicate_ids,
        ["c-1 (no key)", "c-1 (no key)"],
        "the duplicates are named, for finding out why"
    );
    mock.stop().await
}

#[tokio::test]
async fn no_idempotency_applies_a_retry_again() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig {
        no_idempotency: true,
        ..CrmMockConfig::default()
    })
    .await?;
    let ada = customer("c-1", "Ada");
    assert_eq!(mock.create(&ada, Some("c-1:h1")).await?.status, 201);
    assert_eq!(mock.create(&ada, Some("c-1:h1")).await?.status, 201);
    let stats = mock.stats().await?;
    assert_eq!(stats.idempotent_replays, 0);
    assert_eq!(stats.created, 2);
    assert_eq!(stats.duplicate_effects, 1);
    mock.stop().await
}

/// The first seed under which request 0 times out after applying and request 1 goes through.
fn seed_where_first_request_lands_then_hangs(config: &CrmMockConfig) -> u64 {
    (0..10_000)
        .find(|&seed| {
            let seeded = CrmMockConfig {
                seed,
                ..config.clone()
            };
            FaultPlan::for_request(&seeded, 0).fault
                == Some(InjectedFault::Timeout {
                    applied_first: true,
                })
                && FaultPlan::for_request(&seeded, 1).fault.is_none()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_timeout_that_applied_is_remembered_so_the_retry_is_a_replay() -> anyhow::Result<()> {
    let config = CrmMockConfig {
        timeout_rate: 0.5,
        hang_ms: 50,
        ..CrmMockConfig::default()
    };
    let seed = seed_where_first_request_lands_then_hangs(&config);
    let mock = Mock::start(CrmMockConfig { seed, ..config }).await?;
    let ada = customer("c-1", "Ada");
    let lost = mock.create(&ada, Some("c-1:h1")).await?;
    assert_eq!(lost.status, 504);
    let retry = mock.create(&ada, Some("c-1:h1")).await?;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.body["customer"], ada);
    let stats = mock.stats().await?;
    assert_eq!(stats.injected.timeout, 1);
    assert_eq!(stats.created, 1, "applied once, before the hang");
    assert_eq!(stats.idempotent_replays, 1);
    assert_eq!(stats.duplicate_effects, 0);
    mock.stop().await
}

#[tokio::test]
async fn the_bearer_token_guards_the_api_stats_and_reset_but_not_health() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig {
        token: Some("s3cret".into()),
        ..CrmMockConfig::default()
    })
    .await?;
    let ada = customer("c-1", "Ada");
    let without = mock
        .http
        .post(mock.at("/customers"))
        .json(&ada)
        .send()
        .await?;
    assert_eq!(without.status().as_u16(), 401);
    let body: serde_json::Value = without.json().await?;
    assert_eq!(body["error"], "missing or wrong bearer token");
    let wrong = mock
        .http
        .get(mock.at("/customers/c-1"))
        .bearer_auth("guess")
        .send()
        .await?;
    assert_eq!(wrong.status().as_u16(), 401);
    let right = mock
        .http
        .post(mock.at("/customers"))
        .bearer_auth("s3cret")
        .json(&ada)
        .send()
        .await?;
    assert_eq!(right.status().as_u16(), 201);

    let health = mock.http.get(mock.at("/healthz")).send().await?;
    assert_eq!(health.status().as_u16(), 200, "/healthz needs no token");
    // Whoever reaches the mock must not read or wipe the evidence of a run without the token.
    let stats = mock.http.get(mock.at("/stats")).send().await?;
    assert_eq!(stats.status().as_u16(), 401, "/stats wants the token");
    let reset = mock.http.post(mock.at("/reset")).send().await?;
    assert_eq!(reset.status().as_u16(), 401, "/reset wants the token");
    let reset = mock
        .http
        .post(mock.at("/reset"))
        .bearer_auth("guess")
        .send()
        .await?;
    assert_eq!(reset.status().as_u16(), 401, "/reset wants the right token");
    let stats = mock.stats().await?;
    assert_eq!((stats.rejected_auth, stats.created), (5, 1));
    let reset = mock
        .http
        .post(mock.at("/reset"))
        .bearer_auth("s3cret")
        .send()
        .await?;
    assert_eq!(reset.status().as_u16(), 200, "/reset with the token");
    assert_eq!(mock.stats().await?.created, 0);
    mock.stop().await
}

#[tokio::test]
async fn malformed_bodies_name_the_field() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig::default()).await?;
    let not_json = mock
        .http
        .post(mock.at("/customers"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(not_json.status().as_u16(), 400);
    let body: serde_json::Value = not_json.json().await?;
    assert_eq!(body["field"], "body");

    let cases = [
        (
            json!({"first_name": "A", "last_name": "B", "email": "a@b.io"}),
            "id",
        ),
        (
            json!({"id": "", "first_name": "A", "last_name": "B", "email": "a@b.io"}),
            "id",
        ),
        (
            json!({"id": "1", "last_name": "B", "email": "a@b.io"}),
            "first_name",
        ),
        (
            json!({"id": "1", "first_name": "A", "last_name": 3, "email": "a@b.io"}),
            "last_name",
        ),
        (
            json!({"id": "1", "first_name": "A", "last_name": "B", "email": "not-an-email"}),
            "email",
        ),
        (
            json!({"id": "1", "first_name": "A", "last_name": "B", "email": "a@b.io", "phone": []}),
            "phone",
        ),
    ];
    for (body, field) in &cases {
        let reply = mock.create(body, None).await?;
        assert_eq!(reply.status, 422, "{body}");
        assert_eq!(reply.body["field"], *field, "{body}");
        assert!(
            reply.body["error"]
                .as_str()
                .is_some_and(|e| e.contains(field)),
            "{reply:?}"
        );
    }
    let stats = mock.stats().await?;
    assert_eq!(stats.rejected_invalid, 1 + cases.len() as u64);
    assert_eq!(stats.created, 0);
    mock.stop().await
}

#[tokio::test]
async fn reset_clears_customers_keys_and_counters() -> anyhow::Result<()> {
    let mock = Mock::start(CrmMockConfig::default()).await?;
    let ada = customer("c-1", "Ada");
    mock.create(&ada, Some("k")).await?;
    mock.create(&ada, Some("k")).await?;
    mock.create(&ada, None).await?;
    assert_ne!(mock.stats().await?, crm_mock::Stats::default());

    let reset = mock.http.post(mock.at("/reset")).send().await?;
    assert_eq!(reset.status().as_u16(), 200);
    assert_eq!(mock.stats().await?, crm_mock::Stats::default());
    assert_eq!(mock.get("c-1").await?.status, 404);
    let fresh = mock.create(&ada, Some("k")).await?;
    assert_eq!(fresh.status, 201);
    assert_eq!(fresh.body["crm_id"], "crm-1");
    let stats = mock.stats().await?;
    assert_eq!((stats.created, stats.idempotent_replays), (1, 0));
    mock.stop().await
}

#[tokio::test]
async fn the_binary_serves_and_exits_cleanly_on_sigterm() -> anyhow::Result<()> {
    let port = e2e::free_port()?;
    let mut child = tokio::process::Command::new(e2e::binary("crm-mock")?)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("CRM_API_TOKEN")
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}/healthz");
    let http = common::client(Duration::from_secs(2))?;
    e2e::wait_for(
        "crm-mock binary to answer /healthz",
        Duration::from_secs(10),
        || {
            let request = http.get(&url).send();
            async move { request.await.ok().filter(|r| r.status().is_success()) }
        },
    )
    .await?;
    e2e::terminate(&child)?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert!(status.success(), "crm-mock exited with {status}");
    Ok(())
}
