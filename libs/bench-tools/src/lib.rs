//! bench-tools: the benchmarks' own programs, kept out of the services (`make release` and the
//! image build only the product binaries).
//!
//! References the integrator is measured against, on the same machine and in the same run:
//! - `crm-reference`: a stateless driver sending the integrator's exact requests (its
//!   `CrmClient`, Idempotency-Key, bearer token and concurrency) and retrying failures, with no
//!   NATS and no ledger: what the CRM side alone costs.
//! - `jetstream-reference`: the per-record JetStream work no design can avoid (pull from a
//!   pre-filled ingest stream, publish an outcome with a dedup id, await its PubAck, ack), with no
//!   CRM: what the NATS side alone costs.
//!
//! Fill and load tools:
//! - `integrator-bench-fill`: fills a namespace's ingest stream with synthetic customers, waits
//!   for it to drain, deletes it.
//! - `publish-bench`: generates CSV files and measures a raw publisher against csv-reader.
//! - `persister-bench-publish`: fills a results stream with synced outcomes for the persister.

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
