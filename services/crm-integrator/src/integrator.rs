//! One replica's shared state: what every message's task reads and feeds (the ledger, the CRM
//! client, the gate, the limiter, the places in hand), and how it is built from the settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use governor::DefaultDirectRateLimiter;
use sync_topology::Names;
use tokio_util::sync::CancellationToken;

use crate::fleet::FleetPause;
use crate::flow::{Gate, Limiter, Slots};
use crate::ledger::LedgerStore;
use crate::telemetry;
use crm_client::CrmClient;

/// Everything `process_message` needs, shared by every message task of a replica.
pub struct Integrator {
    pub(crate) names: Names,
    pub(crate) js: jetstream::Context,
    pub(crate) ledger: LedgerStore,
    pub(crate) crm: CrmClient,
    pub(crate) gate: Arc<Gate>,
    pub(crate) fleet: FleetPause,
    pub(crate) limiter: Arc<Limiter>,
    /// Messages in hand; a record waiting for its retry lets another in meanwhile.
    pub(crate) slots: Arc<Slots>,
    pub(crate) rate: Option<DefaultDirectRateLimiter>,
    /// Failed deliveries of a version after which it is dead-lettered.
    pub(crate) max_deliver: u64,
    pub(crate) request_timeout: Duration,
    pub(crate) max_inline_wait: Duration,
    pub(crate) shutdown: CancellationToken,
    /// Messages this replica settled with an outcome (synced, superseded or dead).
    pub(crate) settled: AtomicU64,
    /// By outcome, hand-backs and retries: for the heartbeat and the log line at stop.
    pub(crate) totals: telemetry::Totals,
}

impl std::fmt::Debug for Integrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Integrator")
            .field("namespace", &self.names.namespace())
            .field("replica", &self.ledger.replica())
            .field("crm", &self.crm)
            .finish_non_exhaustive()
    }
}

impl Integrator {
    pub fn replica(&self) -> &str {
        self.ledger.replica()
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// How many messages this replica settled with an outcome.
    pub fn settled_messages(&self) -> u64 {
        self.settled.load(Ordering::Relaxed)
    }
}
