//! bench-tools: reference programs the benchmarks measure the integrator against, on the same
//! machine and in the same run. Not shipped: `make release` builds only the product binaries.
//!
//! - `crm-reference`: a stateless driver sending the integrator's exact requests (its
//!   `CrmClient`, Idempotency-Key, bearer token and concurrency) and retrying failures, with no
//!   NATS and no ledger: what the CRM side alone costs.
//! - `jetstream-reference`: the per-record JetStream work no design can avoid (pull from a
//!   pre-filled ingest stream, publish an outcome with a dedup id, await its PubAck, ack), with no
//!   CRM: what the NATS side alone costs.

use std::collections::BTreeMap;

use customer_record::CustomerRecord;

/// The synthetic customer number `n`, exactly as `integrator-bench-fill` publishes it.
pub fn bench_customer(prefix: &str, n: u64) -> CustomerRecord {
    CustomerRecord::normalised(
        &format!("{prefix}{n}"),
        "Bench",
        &format!("Customer{n}"),
        &format!("c{n}@bench.example.com"),
        Some("+1 555 0100"),
        BTreeMap::from([("segment".to_owned(), "b".to_owned())]),
    )
}
