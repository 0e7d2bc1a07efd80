//! `syncctl wait`: blocks until both durable consumers (integrators and persister) have nothing
//! pending and nothing in flight, for scripts and tests.

use std::time::{Duration, Instant};

use service_kit::NatsArgs;

use crate::status::ConsumerStatus;
use crate::{CtlError, Pipeline};

#[derive(Debug, Clone)]
pub struct WaitConfig {
    pub nats: NatsArgs,
    pub timeout: Duration,
    pub poll_interval: Duration,
    /// Consecutive idle polls required: one idle poll can fall between an integrator acking its
    /// ingest message and the persister's consumer seeing the outcome it published.
    pub stable_polls: u32,
}

impl WaitConfig {
    pub fn new(nats: NatsArgs, timeout: Duration) -> Self {
        WaitConfig {
            nats,
            timeout,
            poll_interval: Duration::from_millis(250),
            stable_polls: 3,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Drained {
    pub waited: Duration,
    pub polls: u64,
}

/// Returns once both consumers stayed idle for `stable_polls` polls in a row, or fails with
/// [`CtlError::Timeout`] naming what is still pending.
pub async fn run(config: &WaitConfig) -> Result<Drained, CtlError> {
    let pipeline = Pipeline::connect(&config.nats).await?;
    let names = &pipeline.names;
    let started = Instant::now();
    let mut polls = 0u64;
    let mut idle_in_a_row = 0u32;
    loop {
        polls += 1;
        let watched = [
            (names.ingest_stream(), names.integrators_consumer()),
            (names.results_stream(), names.persister_consumer()),
        ];
        let mut busy = Vec::new();
        for (stream, consumer) in &watched {
            let info = match pipeline.consumer_info(stream, consumer).await {
                Ok(info) => info,
                // A server restarting or a cluster electing a leader answers nothing for a
                // moment: that is not drained, and not a reason to give up before the timeout.
                Err(CtlError::Nats { action, message }) => {
                    tracing::warn!(%action, %message, "cannot read a consumer; trying again");
                    busy.push(format!("{stream}/{consumer}: not answering ({message})"));
                    continue;
                }
                Err(other) => return Err(other),
            };
            let status = ConsumerStatus::from_info(&info);
            if status.unsettled() > 0 {
                busy.push(format!(
                    "{stream}/{consumer}: {} pending, {} in flight",
                    status.num_pending, status.num_ack_pending
                ));
            }
        }
        if busy.is_empty() {
            idle_in_a_row += 1;
            if idle_in_a_row >= config.stable_polls.max(1) {
                return Ok(Drained {
                    waited: started.elapsed(),
                    polls,
                });
            }
        } else {
            idle_in_a_row = 0;
        }
        if started.elapsed() >= config.timeout {
            let what = if busy.is_empty() {
                "settling (idle, but not yet for long enough)".to_owned()
            } else {
                busy.join("; ")
            };
            return Err(CtlError::Timeout {
                waited: started.elapsed(),
                what,
            });
        }
        tokio::time::sleep(config.poll_interval).await;
    }
}
