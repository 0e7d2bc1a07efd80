//! What a replica tells the operator about itself while it runs: its readiness (not ready while
//! the breaker is open), the gauges that go stale when no message arrives, the consumer's backlog,
//! and a heartbeat in the control bucket (`replica.{name}`) that `syncctl status` shows per
//! replica: breaker, pause, limit, in flight, records settled, last seen.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::kv;
use service_kit::Health;
use sync_topology::messages::{ReplicaHeartbeat, replica_key};
use tokio_util::sync::CancellationToken;

use crate::integrator::Integrator;
use crate::now_ms;
use crate::telemetry::{self, Totals};

/// How often readiness and the gauges are brought up to date.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How often the heartbeat is written (every this many checks).
const BEATS_EVERY: u32 = 6;

/// Runs until `shutdown`, then removes this replica's heartbeat: a replica that stopped cleanly is
/// gone from `syncctl status`, one that was killed shows as stale.
pub(crate) async fn run(
    integrator: Arc<Integrator>,
    control: kv::Store,
    consumer: PullConsumer,
    health: Health,
    shutdown: CancellationToken,
) {
    let key = replica_key(integrator.replica());
    let started_at_ms = now_ms();
    let every_ms = (CHECK_EVERY * BEATS_EVERY).as_millis() as u64;
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = 0u32;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        health.set_problem("crm", integrator.gate().breaker_problem());
        gauges(&integrator);
        if tick.is_multiple_of(BEATS_EVERY) {
            // Bounded: with NATS away a request waits for its timeout, and readiness must not.
            let beat = heartbeat(&integrator, &health, started_at_ms, every_ms);
            let writing = async {
                backlog(&consumer).await;
                match serde_json::to_vec(&beat) {
                    Ok(body) => {
                        if let Err(err) = control.put(&key, body.into()).await {
                            tracing::debug!(%err, %key, "heartbeat not written");
                        }
                    }
                    Err(err) => tracing::warn!(%err, "cannot encode the heartbeat"),
                }
            };
            if tokio::time::timeout(CHECK_EVERY * 2, writing)
                .await
                .is_err()
            {
                tracing::debug!(%key, "heartbeat not written in time");
            }
        }
        tick = tick.wrapping_add(1);
    }
    if let Err(err) = control.purge(&key).await {
        tracing::debug!(%err, %key, "heartbeat not removed; it will show as stale");
    }
}

fn heartbeat(
    integrator: &Integrator,
    health: &Health,
    started_at_ms: i64,
    every_ms: u64,
) -> ReplicaHeartbeat {
    let totals = &integrator.totals;
    ReplicaHeartbeat {
        replica: integrator.replica().to_owned(),
        seen_at_ms: now_ms(),
        started_at_ms,
        every_ms,
        not_ready: health.readiness().err(),
        breaker: integrator.gate().breaker_state().to_owned(),
        paused_until_ms: integrator
            .gate()
            .paused_for()
            .map(|left| now_ms() + left.as_millis() as i64),
        concurrency_limit: integrator.limiter().limit() as u64,
        requests_in_flight: integrator.limiter().in_flight() as u64,
        messages_in_hand: integrator.slots.in_use() as u64,
        synced: Totals::get(&totals.synced),
        superseded: Totals::get(&totals.superseded),
        dead: Totals::get(&totals.dead),
        handed_back: Totals::get(&totals.handed_back),
        retries: Totals::get(&totals.retries),
    }
}

/// The gauges the consume loop sets per message, kept current while none arrives.
fn gauges(integrator: &Integrator) {
    let limiter = integrator.limiter();
    metrics::gauge!("crm_integrator_concurrency_limit").set(limiter.limit() as f64);
    metrics::gauge!("crm_integrator_requests_in_flight").set(limiter.in_flight() as f64);
    metrics::gauge!("crm_integrator_messages_in_hand").set(integrator.slots.in_use() as f64);
    metrics::gauge!("crm_integrator_messages_waiting").set(integrator.slots.parked() as f64);
    let open = integrator.gate().breaker_state() != "closed";
    metrics::gauge!("crm_integrator_breaker_open").set(f64::from(u8::from(open)));
    let paused_until = integrator
        .gate()
        .paused_for()
        .map_or(0, |left| now_ms() + left.as_millis() as i64);
    metrics::gauge!("crm_integrator_paused_until_ms").set(paused_until as f64);
    // Exported from the start, so a dashboard shows 0 rather than no data.
    metrics::counter!("crm_integrator_pauses_total").increment(0);
    metrics::counter!("crm_integrator_breaker_openings_total").increment(0);
    telemetry::plain("crm_integrator_retries_total").increment(0);
    telemetry::plain("crm_integrator_deferred_total").increment(0);
}

/// `crm_integrator_consumer_pending`: what the shared consumer still has to settle (not yet
/// delivered plus in flight), the backlog behind the fleet's ETA. Every replica reports the same
/// number; dashboards take the max.
async fn backlog(consumer: &PullConsumer) {
    match consumer.get_info().await {
        Ok(info) => metrics::gauge!("crm_integrator_consumer_pending")
            .set((info.num_pending + info.num_ack_pending as u64) as f64),
        Err(err) => tracing::debug!(%err, "cannot read the consumer's backlog"),
    }
}
