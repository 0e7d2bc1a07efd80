//! Metric handles built once and reused: `metrics::counter!`/`histogram!` hash the name and labels
//! and look the series up in the recorder on every call, which per record adds up. And the
//! replica's own totals, for its heartbeat and the log line at stop.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use metrics::{Counter, Histogram};

use std::time::Instant;

use crate::process::Settled;

type Labels = (&'static str, &'static str, &'static str);

#[derive(Default)]
struct Cache {
    counters: RwLock<HashMap<Labels, Counter>>,
    histograms: RwLock<HashMap<&'static str, Histogram>>,
}

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Cache::default)
}

fn counter(key: Labels, build: impl FnOnce() -> Counter) -> Counter {
    let counters = &cache().counters;
    if let Some(counter) = counters.read().get(&key) {
        return counter.clone();
    }
    counters.write().entry(key).or_insert_with(build).clone()
}

/// `crm_integrator_phase_seconds{phase}`: where a record's time goes.
pub fn phase(phase: &'static str) -> Histogram {
    let histograms = &cache().histograms;
    if let Some(histogram) = histograms.read().get(phase) {
        return histogram.clone();
    }
    histograms
        .write()
        .entry(phase)
        .or_insert_with(|| metrics::histogram!("crm_integrator_phase_seconds", "phase" => phase))
        .clone()
}

/// Records how long a phase of one record took, from `started`: where a record's time goes.
pub fn time_phase(name: &'static str, started: Instant) {
    phase(name).record(started.elapsed().as_secs_f64());
}

/// `crm_integrator_records_total{outcome, action}`.
pub fn records(outcome: &'static str, action: &'static str) -> Counter {
    counter(
        ("records", outcome, action),
        || metrics::counter!("crm_integrator_records_total", "outcome" => outcome, "action" => action),
    )
}

/// `crm_integrator_crm_responses_total{status, kind}`; `status` is "2xx", "no_answer" or a code.
pub fn crm_response(status: &'static str, kind: &'static str) -> Counter {
    counter(
        ("crm", status, kind),
        || metrics::counter!("crm_integrator_crm_responses_total", "status" => status, "kind" => kind),
    )
}

/// A counter without labels.
pub fn plain(name: &'static str) -> Counter {
    counter((name, "", ""), || metrics::counter!(name))
}

/// An HTTP status as a static label: the common ones by name, anything else by class.
pub fn status_label(status: u16) -> &'static str {
    const NAMED: [&str; 12] = [
        "400", "401", "403", "404", "408", "409", "422", "429", "500", "502", "503", "504",
    ];
    if let Some(name) = NAMED.iter().find(|name| name.parse() == Ok(status)) {
        return name;
    }
    match status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// What this replica did since it started, for its heartbeat and the log line at stop.
#[derive(Debug, Default)]
pub struct Totals {
    pub synced: AtomicU64,
    pub superseded: AtomicU64,
    pub dead: AtomicU64,
    /// Handed back to the server for later (a retry, a pause, a wait for an older version).
    pub handed_back: AtomicU64,
    /// NATS failed mid-way: nothing acknowledged, the message comes back.
    pub not_settled: AtomicU64,
    /// CRM requests that failed and were tried again (in-process or after a hand-back).
    pub retries: AtomicU64,
}

impl Totals {
    pub fn count(&self, settled: &Settled) {
        let counter = match settled {
            Settled::Synced(_) => &self.synced,
            Settled::Superseded { .. } => &self.superseded,
            Settled::DeadLettered => &self.dead,
            Settled::Deferred { .. } => &self.handed_back,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
