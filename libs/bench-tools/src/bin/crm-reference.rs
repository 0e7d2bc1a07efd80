//! Reference (1): sends `--count` synthetic customers to the CRM as the integrator would (the same
//! `CrmClient`, Idempotency-Key `{id}:{hash}`, bearer token, `--concurrency` requests in flight),
//! retrying each until the CRM stores or refuses it, with no state beyond a counter. Prints one
//! JSON line with the seconds, requests and successes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser as _;
use crm_client::{CrmClient, CrmReply, Write};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, clap::Parser)]
#[command(about = "Stateless CRM driver sending the integrator's exact requests")]
struct Args {
    #[arg(long, env = "CRM_URL", default_value = "http://127.0.0.1:8080")]
    crm_url: reqwest::Url,
    #[arg(long, env = "CRM_API_TOKEN", hide_env_values = true)]
    crm_token: Option<String>,
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    #[arg(long, default_value = "bench-")]
    prefix: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
}

#[derive(Default)]
struct Counts {
    next: AtomicU64,
    requests: AtomicU64,
    stored: AtomicU64,
    refused: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.request_timeout_ms.max(1));
    let crm = CrmClient::new(
        args.crm_url.clone(),
        args.crm_token.as_deref(),
        timeout,
        args.concurrency,
        false,
    )
    .context("building the CRM client")?;
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (crm, counts, prefix) = (crm.clone(), counts.clone(), args.prefix.clone());
            let count = args.count;
            tokio::spawn(async move {
                loop {
                    let n = counts.next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return;
                    }
                    let record = bench_tools::bench_customer(&prefix, n);
                    // The integrator's own key for a row of a load: the same request, byte for byte.
                    let version = sync_topology::Version::row(1, n + 2);
                    let key = sync_topology::ids::idempotency_key(&version, &record.content_hash());
                    let mut attempt = 0u32;
                    loop {
                        counts.requests.fetch_add(1, Ordering::Relaxed);
                        match crm.write(Write::Create, &record, &key, timeout).await {
                            CrmReply::Stored(_) | CrmReply::NotFound => {
                                counts.stored.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            CrmReply::Refused { .. } | CrmReply::Unauthorized { .. } => {
                                counts.refused.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            CrmReply::Transient(failure) => {
                                // The same key makes a retry of an applied request a replay.
                                attempt += 1;
                                let backoff = Duration::from_millis(10 << attempt.min(6));
                                tokio::time::sleep(failure.retry_after.unwrap_or(backoff)).await;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.context("a worker panicked")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let stored = counts.stored.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds,
            "records": args.count,
            "requests": counts.requests.load(Ordering::Relaxed),
            "stored": stored,
            "refused": counts.refused.load(Ordering::Relaxed),
            "stored_per_second": stored as f64 / seconds,
        })
    );
    Ok(())
}
