//! One replica's shared state: what every message's task reads and feeds (the ledger, the CRM
//! client, the gate, the limiter, the places in hand), and how it is built from the settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::PullConsumer, kv};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::ExposeSecret as _;
use sync_topology::Names;
use tokio_util::sync::CancellationToken;

use crate::fleet::FleetPause;
use crate::flow::{Gate, Limiter, Slots, message_capacity};
use crate::ledger::LedgerStore;
use crate::settings::{IntegratorConfig, Settings};
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

/// One replica's state and what it reads and writes besides.
pub(crate) struct Connected {
    pub integrator: Arc<Integrator>,
    pub consumer: PullConsumer,
    pub client: async_nats::Client,
    pub control: kv::Store,
}

/// Shutdown was asked for while NATS was still out of reach: nothing was started.
#[derive(Debug, thiserror::Error)]
#[error("stopped while waiting for NATS at start-up: nothing was consumed")]
pub struct StoppedWhileWaiting;

/// Connects to NATS (waiting up to `--startup-wait`) and builds one replica's state from its
/// settings.
pub(crate) async fn connect(
    config: &IntegratorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Connected> {
    let settings = &config.settings;
    settings
        .validate()
        .context("invalid crm-integrator configuration")?;
    let names = Names::new(&config.nats.namespace)?;
    // Before NATS: a CRM URL the client refuses (a token in clear text) is a configuration error.
    let crm = crm_client(settings)?;
    let client = service_kit::connect_nats(&config.nats, "crm-integrator", &shutdown)
        .await?
        .ok_or(StoppedWhileWaiting)?;
    let js = jetstream::new(client.clone());
    let (ledger, control, consumer) = open(&js, &names, &settings.consumer).await?;
    let ack_wait = consumer.cached_info().config.ack_wait;
    let limiter = Arc::new(limiter(settings));
    let gate = Arc::new(gate(settings));
    let replica = replica_name();
    let integrator = Integrator {
        names,
        js,
        ledger: ledger_store(ledger, replica.clone(), ack_wait, settings),
        crm,
        fleet: FleetPause::new(control.clone(), gate.clone(), replica),
        gate,
        slots: Slots::new(message_capacity(limiter.limit())),
        limiter,
        rate: settings
            .rps
            .map(|rps| RateLimiter::direct(Quota::per_second(rps))),
        max_deliver: settings.max_deliver,
        request_timeout: settings.longest_deadline(),
        max_inline_wait: settings.max_inline_wait,
        shutdown,
        settled: Default::default(),
        totals: Default::default(),
    };
    Ok(Connected {
        integrator: Arc::new(integrator),
        consumer,
        client,
        control,
    })
}

fn crm_client(settings: &Settings) -> anyhow::Result<CrmClient> {
    let max_connections = settings.concurrency.unwrap_or(settings.max_concurrency);
    let client = CrmClient::new(
        settings.crm_url.url().clone(),
        settings
            .crm_token
            .as_ref()
            .map(|token| token.expose_secret()),
        settings.longest_deadline(),
        max_connections,
        settings.allow_insecure_crm,
    )?;
    Ok(client)
}

/// The ledger and control buckets and the consumer, which `syncctl setup` made.
async fn open(
    js: &jetstream::Context,
    names: &Names,
    consumer: &str,
) -> anyhow::Result<(kv::Store, kv::Store, PullConsumer)> {
    let bucket = |what: &'static str, name: String| async move {
        js.get_key_value(&name)
            .await
            .with_context(|| format!("cannot open the {what} bucket {name} (run `syncctl setup`)"))
    };
    let ledger = bucket("ledger", names.ledger_bucket()).await?;
    let control = bucket("control", names.control_bucket()).await?;
    let stream = names.ingest_stream();
    let consumer = js
        .get_consumer_from_stream(consumer, &stream)
        .await
        .with_context(|| {
            format!("cannot find consumer {consumer} on stream {stream} (run `syncctl setup`)")
        })?;
    Ok((ledger, control, consumer))
}

/// The ledger as this replica writes it. A claim lives as long as an unacknowledged delivery,
/// and always longer than one request, so no one takes over while our request may still land.
fn ledger_store(
    bucket: kv::Store,
    replica: String,
    ack_wait: Duration,
    settings: &Settings,
) -> LedgerStore {
    let request_may_land = settings.longest_deadline() * 2 + Duration::from_secs(1);
    let claim_lease = ack_wait.max(request_may_land);
    // A claim given up in doubt holds as long as its own lease assumes a request may still land.
    LedgerStore::new(bucket, replica, claim_lease, request_may_land)
}

fn limiter(settings: &Settings) -> Limiter {
    match settings.concurrency {
        Some(fixed) => Limiter::fixed(fixed),
        None => Limiter::adaptive(INITIAL_ADAPTIVE_LIMIT, settings.max_concurrency),
    }
    .with_deadlines(settings.shortest_deadline(), settings.longest_deadline())
}

/// Requests in flight an adaptive limiter starts with, before it learns the CRM.
const INITIAL_ADAPTIVE_LIMIT: usize = 16;

fn gate(settings: &Settings) -> Gate {
    // A probe is given up after one request deadline, and a little more.
    let probe_timeout = settings.longest_deadline() + Duration::from_secs(1);
    Gate::new(settings.breaker, settings.max_pause, probe_timeout)
        .naming_crm(settings.crm_url.url().as_str())
}

/// `integrator-{host}-{pid}-{random}`: the host tells replicas in containers apart (each is pid 1
/// there), the random part two runs of one process id. Used in ledger claims, pause notices and
/// the heartbeat key, so only characters a KV key allows.
fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let pid = std::process::id();
    let random = rand::random::<u16>();
    if host.is_empty() {
        format!("integrator-{pid}-{random:04x}")
    } else {
        format!("integrator-{host}-{pid}-{random:04x}")
    }
}
