//! The pause every replica obeys: a replica whose fault policy finds the CRM overloaded (a large
//! share of 429s that lasted, or a long `Retry-After`) writes "pause until T, because …" to the
//! control bucket, and every replica watches that key and holds its requests until T. `syncctl
//! status` reads the same key to show a pause in force.

use async_nats::jetstream::kv;
use backon::Retryable as _;
use futures::StreamExt as _;
use std::sync::Arc;
pub use sync_topology::messages::{PAUSE_KEY, PauseNotice};
use tokio_util::sync::CancellationToken;

use crate::flow::Gate;
use crate::policy::PauseRequest;
use crate::{now_ms, schedules};

/// Publishes this replica's pauses and applies everyone's.
#[derive(Debug, Clone)]
pub struct FleetPause {
    control: kv::Store,
    gate: Arc<Gate>,
    replica: String,
}

impl FleetPause {
    pub fn new(control: kv::Store, gate: Arc<Gate>, replica: String) -> Self {
        FleetPause {
            control,
            gate,
            replica,
        }
    }

    /// Pauses this replica at once and tells the others. A failed write is logged, not fatal: this
    /// replica still pauses, and the others will draw their own 429s. The gate caps the pause at
    /// `--max-pause`.
    pub async fn announce(&self, pause: PauseRequest) {
        let since_ms = now_ms();
        let wait = pause.wait.min(self.gate.max_pause());
        let until_ms = since_ms + wait.as_millis() as i64;
        if !self.gate.pause_until(until_ms) {
            return;
        }
        tracing::warn!(
            pause_ms = wait.as_millis() as u64,
            cause = %pause.cause,
            "CRM overloaded: holding requests on every replica"
        );
        metrics::counter!("crm_integrator_pauses_total").increment(1);
        let notice = PauseNotice {
            until_ms,
            set_by: self.replica.clone(),
            reason: pause.cause,
            since_ms,
        };
        let body = match serde_json::to_vec(&notice) {
            Ok(body) => body,
            Err(err) => {
                tracing::error!(%err, "cannot encode the pause notice");
                return;
            }
        };
        if let Err(err) = self.control.put(PAUSE_KEY, body.into()).await {
            tracing::warn!(%err, key = PAUSE_KEY, "cannot share the CRM pause with other replicas");
        }
    }

    /// Applies the notice in force now, if any.
    pub async fn load_current(&self) {
        match self.control.entry(PAUSE_KEY).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => self.apply(&entry.value),
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, key = PAUSE_KEY, "cannot read the shared pause"),
        }
    }

    /// Applies the current notice, then every new one, until `shutdown`. Re-subscribes after a
    /// broken watch so a NATS restart does not leave this replica deaf.
    pub async fn follow(self, shutdown: CancellationToken) {
        loop {
            // With history: the notice in force arrives first, so nothing written between a
            // read and the subscription can slip by.
            let watching = (|| self.control.watch_with_history(PAUSE_KEY))
                .retry(schedules::pause_watch())
                .notify(|err, _| {
                    tracing::warn!(%err, key = PAUSE_KEY, "cannot watch the shared pause; retrying");
                });
            let mut watch = tokio::select! {
                () = shutdown.cancelled() => return,
                watching = watching => match watching {
                    Ok(watch) => watch,
                    // The schedule never runs out; were it to, the next round starts over.
                    Err(_) => continue,
                },
            };
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = watch.next() => match next {
                        Some(Ok(entry)) => {
                            if entry.operation == kv::Operation::Put {
                                self.apply(&entry.value);
                            }
                        }
                        Some(Err(err)) => {
                            tracing::warn!(%err, "watch on the shared pause failed; re-subscribing");
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
    }

    fn apply(&self, value: &[u8]) {
        match serde_json::from_slice::<PauseNotice>(value) {
            Ok(notice) => {
                let now = now_ms();
                if notice.set_by == self.replica || notice.until_ms <= now {
                    return;
                }
                let asked_ms = notice.until_ms - now;
                let cap_ms = i64::try_from(self.gate.max_pause().as_millis()).unwrap_or(i64::MAX);
                if asked_ms > cap_ms {
                    // Integrators cap what they write; a longer notice comes from a replica with a
                    // larger cap, or from whoever else can write the control bucket.
                    tracing::warn!(
                        set_by = %notice.set_by,
                        reason = %notice.reason,
                        asked_ms,
                        held_ms = cap_ms,
                        "a pause notice asks for longer than --max-pause: holding only that long \
                         (check who can write the control bucket if no replica has a larger cap)"
                    );
                }
                if self.gate.pause_until(notice.until_ms) {
                    tracing::info!(
                        set_by = %notice.set_by,
                        reason = %notice.reason,
                        pause_ms = asked_ms.min(cap_ms),
                        "pausing: another replica found the CRM overloaded"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(%err, key = PAUSE_KEY, "ignoring an unreadable pause notice")
            }
        }
    }
}
