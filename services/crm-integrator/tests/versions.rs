//! The newest version wins whatever the stream does: versions stored out of file order, a value
//! changed back, superseded versions never counted as synced, waiting that is not failing, and
//! messages the integrator cannot work on (malformed, unkeyable, a refused token) handled without
//! loops and without losing anything.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use common::{Pipeline, customer, start_mock, take};
use crm_integrator::Settled;
use crm_mock::{CrmMockConfig, RunningMock};
use futures::StreamExt as _;
use sync_topology::ledger::{Claim, LedgerEntry, ledger_key};
use sync_topology::messages::SyncAction;
use sync_topology::{IngestMessage, Version, ids};
use tokio_util::sync::CancellationToken;

/// Deliveries the integrators' consumer has made so far, redeliveries included.
async fn deliveries(pipeline: &Pipeline) -> anyhow::Result<u64> {
    let mut consumer: PullConsumer = pipeline
        .js
        .get_consumer_from_stream("integrators", pipeline.names.ingest_stream())
        .await?;
    Ok(consumer.info().await?.delivered.consumer_sequence)
}

/// A NATS restart while the reader publishes stores rows out of file order (each failed publish is
/// retried on its own). The later line must win however the stream ordered them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_line_stored_first_still_wins() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let (v1, v2) = (customer("s1", "First"), customer("s1", "Second"));
    // Line 3 reaches the stream before line 2.
    pipeline.publish(&v2, 3).await?;
    pipeline.publish(&v1, 2).await?;
    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let outcomes = pipeline
        .wait_for_outcomes(2, Duration::from_secs(30))
        .await?;
    assert_eq!(common::crm_holds(&mock, "s1").await?, Some(v2.clone()));
    // Line 2 may have been sent first (both were in hand at once) or superseded; either way the
    // newest synced version is line 3, and the ledger says so.
    let newest = outcomes
        .synced
        .iter()
        .max_by_key(|o| o.version())
        .map(|o| &o.customer);
    assert_eq!(newest, Some(&v2), "{outcomes:?}");
    let entry: LedgerEntry = serde_json::from_slice(
        &pipeline
            .ledger()
            .await?
            .get("s1")
            .await?
            .ok_or_else(|| anyhow::anyhow!("no ledger entry"))?,
    )?;
    assert_eq!(
        entry.confirmed.map(|c| c.version),
        Some(Version::row(pipeline.load, 3))
    );
    assert_eq!(mock.stats().duplicate_effects, 0);
    shutdown.cancel();
    running.wait().await
}

/// A, then B, then A again: three versions, and the last one (A) is what the CRM holds, even though
/// the CRM has already answered a request with A's content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_changed_back_reaches_the_crm() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let (a, b) = (customer("aba", "Alice"), customer("aba", "Bob"));
    for (n, record) in [&a, &b, &a].into_iter().enumerate() {
        pipeline.publish(record, n as u64 + 2).await?;
        pipeline
            .wait_for_outcomes(n + 1, Duration::from_secs(30))
            .await?;
    }
    assert_eq!(common::crm_holds(&mock, "aba").await?, Some(a));
    let stats = mock.stats();
    assert_eq!((stats.created, stats.updated), (1, 2), "{stats:?}");
    assert_eq!(
        stats.idempotent_replays, 0,
        "the third write is not a replay"
    );
    assert_eq!(stats.duplicate_effects, 0);
    shutdown.cancel();
    running.wait().await
}

/// An older version skipped because a newer one is being sent is recorded as superseded, never as
/// synced; so when the newer one is then refused, nothing claims the CRM holds the older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_version_is_never_synced_even_when_the_newer_one_dies() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let older = customer("sd", "Older");
    let mut refused = customer("sd", "Newer");
    refused.email = "not-an-address".to_owned();
    pipeline.publish(&older, 2).await?;
    pipeline.publish(&refused, 3).await?;
    let integrator =
        crm_integrator::connect(&pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let mut messages = take(&pipeline, 2).await?;
    let newer_message = messages.pop().expect("two messages");
    let older_message = messages.pop().expect("two messages");
    // The newer version is claimed (a live claim of another replica), then the older arrives.
    let ledger = pipeline.ledger().await?;
    let claim = LedgerEntry {
        claim: Some(Claim {
            hash: refused.content_hash(),
            version: Version::row(pipeline.load, 3),
            owner: "another-replica".to_owned(),
            lease_until_ms: chrono::Utc::now().timestamp_millis() + 60_000,
            in_doubt: false,
            released_at_ms: 0,
        }),
        ..LedgerEntry::default()
    };
    ledger
        .put(ledger_key("sd")?, serde_json::to_vec(&claim)?.into())
        .await?;
    assert_eq!(
        crm_integrator::process_message(&integrator, older_message).await?,
        Settled::Superseded {
            by: Version::row(pipeline.load, 3)
        }
    );
    // The other replica gives up; the newer version is sent here and refused for good.
    ledger.put(ledger_key("sd")?, b"{}".to_vec().into()).await?;
    assert_eq!(
        crm_integrator::process_message(&integrator, newer_message).await?,
        Settled::DeadLettered
    );
    let outcomes = pipeline.outcomes().await?;
    assert!(outcomes.synced.is_empty(), "{outcomes:?}");
    assert_eq!(outcomes.superseded.len(), 1);
    assert_eq!(outcomes.dead.len(), 1);
    assert_eq!(common::crm_holds(&mock, "sd").await?, None);
    Ok(())
}

/// Deliveries spent waiting for an older version's claim are not failures: a record that waited
/// through more deliveries than `--max-deliver` still gets its full count of failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_is_not_failing() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(
        CrmMockConfig {
            failure_rate: 1.0,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    let pipeline = Pipeline::new().await?;
    let record = customer("w1", "Waits");
    // A replica that died holding line 2's claim; its lease runs for 4 more seconds.
    let ledger = pipeline.ledger().await?;
    let stale = LedgerEntry {
        claim: Some(Claim {
            hash: customer("w1", "Before").content_hash(),
            version: Version::row(pipeline.load, 2),
            owner: "dead-replica".to_owned(),
            lease_until_ms: chrono::Utc::now().timestamp_millis() + 4_000,
            in_doubt: false,
            released_at_ms: 0,
        }),
        ..LedgerEntry::default()
    };
    ledger
        .put(ledger_key("w1")?, serde_json::to_vec(&stale)?.into())
        .await?;
    pipeline.publish(&record, 3).await?;
    let mut config = pipeline.config(&mock.url)?;
    config.settings.max_deliver = 3;
    let running = crm_integrator::start(config, shutdown.clone()).await?;
    // Once the claim expired, line 3 is sent: the first delivery that fails counts 1 of 3.
    e2e::wait_for("a first failed send", Duration::from_secs(30), || async {
        let entry = ledger.get(ledger_key("w1").ok()?).await.ok()??;
        let entry: LedgerEntry = serde_json::from_slice(&entry).ok()?;
        (entry.failures_of(Version::row(pipeline.load, 3)) == 1).then_some(())
    })
    .await?;
    let deliveries = deliveries(&pipeline).await?;
    assert!(
        deliveries > 3,
        "the record waited through more deliveries than --max-deliver first ({deliveries})"
    );
    let mut healthy = mock.config();
    healthy.failure_rate = 0.0;
    mock.reconfigure(healthy)?;
    let outcomes = pipeline
        .wait_for_outcomes(1, Duration::from_secs(30))
        .await?;
    assert!(outcomes.dead.is_empty(), "{outcomes:?}");
    assert_eq!(outcomes.synced[0].action, SyncAction::Created);
    assert_eq!(common::crm_holds(&mock, "w1").await?, Some(record));
    shutdown.cancel();
    running.wait().await
}

/// Messages that are not customer versions are dead-lettered at once, with their bodies, and never
/// loop: not JSON, no id, an id too long to key (it used to make the ledger key overflow the
/// server's control line, disconnecting the replica forever), a version header that is garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_are_not_customers_are_dead_lettered_with_their_body() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let long_id = customer(&"L".repeat(5_000), "Long");
    let mut bad_version = async_nats::HeaderMap::new();
    bad_version.insert(sync_topology::HEADER_VERSION, "soon");
    let bodies: Vec<(Option<async_nats::HeaderMap>, Vec<u8>)> = vec![
        (None, b"not json at all".to_vec()),
        (None, b"{}".to_vec()),
        (None, serde_json::to_vec(&long_id)?),
        (
            Some(bad_version),
            serde_json::to_vec(&customer("bv", "Bad"))?,
        ),
    ];
    for (headers, body) in &bodies {
        let publish = match headers {
            Some(h) => {
                pipeline
                    .js
                    .publish_with_headers(
                        pipeline.names.ingest_subject(),
                        h.clone(),
                        body.clone().into(),
                    )
                    .await?
            }
            None => {
                pipeline
                    .js
                    .publish(pipeline.names.ingest_subject(), body.clone().into())
                    .await?
            }
        };
        publish.await?;
    }
    pipeline.publish(&customer("fine", "Fine"), 2).await?;
    let running = crm_integrator::start(pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let outcomes = pipeline
        .wait_for_outcomes(5, Duration::from_secs(30))
        .await?;
    assert_eq!(outcomes.synced.len(), 1);
    let mut dead = outcomes.dead.clone();
    dead.sort_by_key(|d| d.ingest_seq);
    assert_eq!(dead.len(), 4);
    for (letter, (_, body)) in dead.iter().zip(&bodies) {
        assert_eq!(letter.customer_id, "", "{letter:?}");
        let kept = letter.malformed_body().expect("kept").expect("base64");
        assert_eq!(&kept, body);
    }
    assert!(
        dead[2].reason.contains("over the 256-byte limit"),
        "{dead:?}"
    );
    assert!(dead[3].reason.contains("Sync-Version"), "{dead:?}");
    assert_eq!(pipeline.unacked().await?, 0);
    assert_eq!(
        mock.stats().requests,
        1,
        "only the customer reached the CRM"
    );
    shutdown.cancel();
    running.wait().await
}

/// A refused token dead-letters nothing, however long it lasts; once fixed, everything goes
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_dead_letters_nothing() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(
        CrmMockConfig {
            token: Some("right".into()),
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    let pipeline = Pipeline::new().await?;
    for i in 0..5 {
        pipeline
            .publish(&customer(&format!("t{i}"), "Token"), i + 2)
            .await?;
    }
    let wrong_stop = CancellationToken::new();
    let mut config = pipeline.config(&mock.url)?;
    config.settings.crm_token = Some("wrong".into());
    config.settings.max_deliver = 2;
    let wrong = crm_integrator::start(config.clone(), wrong_stop.clone()).await?;
    e2e::wait_for(
        "the records to be refused through more deliveries than --max-deliver",
        Duration::from_secs(60),
        || async {
            let deliveries = deliveries(&pipeline).await.ok()?;
            (deliveries >= 15 && mock.stats().rejected_auth >= 15).then_some(())
        },
    )
    .await?;
    assert!(pipeline.outcomes().await?.dead.is_empty());
    wrong_stop.cancel();
    wrong.wait().await?;

    config.settings.crm_token = Some("right".into());
    let right = crm_integrator::start(config, shutdown.clone()).await?;
    let outcomes = pipeline
        .wait_for_outcomes(5, Duration::from_secs(60))
        .await?;
    assert_eq!(outcomes.synced.len(), 5);
    assert!(outcomes.dead.is_empty());
    shutdown.cancel();
    right.wait().await
}

/// A copy made by replay carries its original version however late it comes, and its message id
/// is one the dedup window never confuses with the original.
#[test]
fn copies_keep_their_version_under_a_fresh_id() {
    let original = IngestMessage::from_row(customer("c", "C"), Version::row(9, 4), "f.csv", 4);
    let copy = original.copy(Some(17), false);
    assert_eq!(copy.version, original.version);
    assert_ne!(
        ids::ingest_copy(ids::CopyKind::Replay, &copy.version, "n1"),
        ids::ingest_row(&original.version)
    );
}

/// Takes the message at `seq` off a consumer of its own, as a redelivery would bring it again after
/// its ack was lost (a NATS node killed, a leader change); `deliveries` times, handing it back in
/// between, so the last one counts as a redelivery.
async fn deliver_again(
    pipeline: &Pipeline,
    seq: u64,
    deliveries: usize,
) -> anyhow::Result<async_nats::jetstream::Message> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    let stream = pipeline
        .js
        .get_stream(pipeline.names.ingest_stream())
        .await?;
    let consumer: PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(format!("again{seq}")),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: seq,
            },
            ..Default::default()
        })
        .await?;
    // The server may hand out a later message before it redelivers the one handed back; those
    // are acknowledged out of the way (this consumer is the test's own).
    for _ in 0..100 {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        let message = batch
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("no message at {seq}"))?
            .map_err(|e| anyhow::anyhow!("fetch failed: {e}"))?;
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("no metadata: {e}"))?;
        let (this, delivered) = (info.stream_sequence, info.delivered);
        if this != seq {
            message
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("ack failed: {e}"))?;
        } else if usize::try_from(delivered).unwrap_or(0) >= deliveries {
            return Ok(message);
        } else {
            message
                .ack_with(async_nats::jetstream::AckKind::Nak(None))
                .await
                .map_err(|e| anyhow::anyhow!("nak failed: {e}"))?;
        }
    }
    anyhow::bail!("message {seq} was not delivered {deliveries} times")
}

/// A message whose ack was lost is judged again when it comes back, maybe differently (synced the
/// first time, superseded once a newer version is confirmed): its second outcome carries the same
/// id as its first and is dropped, so it keeps exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_ack_was_lost_keeps_one_outcome() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(CrmMockConfig::default(), &shutdown).await?;
    let pipeline = Pipeline::new().await?;
    let integrator =
        crm_integrator::connect(&pipeline.config(&mock.url)?, shutdown.clone()).await?;
    let (v1, v2) = (customer("lost", "First"), customer("lost", "Second"));
    let first_seq = pipeline.publish(&v1, 2).await?;
    for message in take(&pipeline, 1).await? {
        crm_integrator::process_message(&integrator, message).await?;
    }
    pipeline.publish(&v2, 3).await?;
    for message in take(&pipeline, 1).await? {
        crm_integrator::process_message(&integrator, message).await?;
    }
    let again = deliver_again(&pipeline, first_seq, 2).await?;
    assert!(matches!(
        crm_integrator::process_message(&integrator, again).await?,
        Settled::Superseded { .. }
    ));
    let outcomes = pipeline.outcomes().await?;
    assert_eq!(outcomes.settled_seqs().len(), 2);
    assert!(outcomes.superseded.is_empty(), "dropped: {outcomes:?}");

    // A dead-lettered message that comes back is dead-lettered again, not sent.
    let mut refused = customer("lost-dead", "Refused");
    refused.email = "not-an-address".to_owned();
    let dead_seq = pipeline.publish(&refused, 4).await?;
    for message in take(&pipeline, 1).await? {
        assert_eq!(
            crm_integrator::process_message(&integrator, message).await?,
            Settled::DeadLettered
        );
    }
    let requests = mock.stats().requests;
    let again = deliver_again(&pipeline, dead_seq, 2).await?;
    assert_eq!(
        crm_integrator::process_message(&integrator, again).await?,
        Settled::DeadLettered
    );
    assert_eq!(mock.stats().requests, requests, "no second send");
    let outcomes = pipeline.outcomes().await?;
    assert_eq!(outcomes.settled_seqs().len(), 3);
    assert_eq!(outcomes.dead.len(), 1);
    Ok(())
}

/// A CRM may apply a request after the client stopped waiting for it. Another version sent in
/// that gap would race it (a second create of the same customer); a claim given up in doubt
/// holds other versions back for a grace, and the doubtful version itself goes on under its own
/// idempotency key, which turns the late copy into a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_applied_after_its_deadline_never_races_a_newer_version() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mock = start_mock(
        CrmMockConfig {
            late_apply_rate: 1.0,
            hang_ms: 1_000,
            ..CrmMockConfig::default()
        },
        &shutdown,
    )
    .await?;
    let TwoVersions {
        pipeline,
        config,
        integrator,
        older,
        newer,
        newest: v2,
    } = two_versions("late", &mock, &shutdown).await?;
    // Line 2's create times out, and the CRM will still apply it after its hang.
    assert!(matches!(
        crm_integrator::process_message(&integrator, older).await?,
        Settled::Deferred { .. }
    ));
    mock.reconfigure(CrmMockConfig::default())?;
    let late = LateCopy {
        mock: &mock,
        pipeline: &pipeline,
        id: "late",
    };
    late.holds_back(&integrator, newer).await?;
    late.then_newer_wins(config, &shutdown, v2).await
}

/// Lines 2 and 3 of one customer, published and taken off the integrators' consumer, and an
/// integrator whose every failure hands the record back at once: each request is one call of
/// `process_message`, the path where another version may go next.
struct TwoVersions {
    pipeline: Pipeline,
    config: crm_integrator::IntegratorConfig,
    integrator: Arc<crm_integrator::Integrator>,
    older: async_nats::jetstream::Message,
    newer: async_nats::jetstream::Message,
    newest: customer_record::CustomerRecord,
}

async fn two_versions(
    id: &str,
    mock: &RunningMock,
    shutdown: &CancellationToken,
) -> anyhow::Result<TwoVersions> {
    let pipeline = Pipeline::new().await?;
    let (v1, v2) = (customer(id, "First"), customer(id, "Second"));
    pipeline.publish(&v1, 2).await?;
    pipeline.publish(&v2, 3).await?;
    let mut config = pipeline.config(&mock.url)?;
    config.settings.max_inline_wait = Duration::ZERO;
    let integrator = crm_integrator::connect(&config, shutdown.clone()).await?;
    let mut messages = take(&pipeline, 2).await?;
    let (Some(newer), Some(older)) = (messages.pop(), messages.pop()) else {
        anyhow::bail!("two messages were published, fewer were taken");
    };
    Ok(TwoVersions {
        pipeline,
        config,
        integrator,
        older,
        newer,
        newest: v2,
    })
}

/// A request of an older version that the CRM applies after the client gave up on it.
struct LateCopy<'a> {
    mock: &'a RunningMock,
    pipeline: &'a Pipeline,
    id: &'a str,
}

impl LateCopy<'_> {
    /// The newer version must not be created while the late copy may still land: it waits.
    async fn holds_back(
        &self,
        integrator: &Arc<crm_integrator::Integrator>,
        newer: async_nats::jetstream::Message,
    ) -> anyhow::Result<()> {
        let settled = crm_integrator::process_message(integrator, newer).await?;
        assert!(
            matches!(&settled, Settled::Deferred { reason, .. } if reason.contains("waiting")),
            "{settled:?}"
        );
        let mock = self.mock;
        e2e::wait_for(
            "the late apply to land",
            Duration::from_secs(10),
            || async { (mock.stats().injected.late_landed >= 1).then_some(()) },
        )
        .await
    }

    /// After the grace, the newer version finds the late copy in the CRM and updates it: both
    /// versions settle, nothing is applied twice, and the CRM holds `newest`.
    async fn then_newer_wins(
        &self,
        config: crm_integrator::IntegratorConfig,
        shutdown: &CancellationToken,
        newest: customer_record::CustomerRecord,
    ) -> anyhow::Result<()> {
        let running = crm_integrator::start(config, shutdown.clone()).await?;
        self.pipeline
            .wait_for_outcomes(2, Duration::from_secs(60))
            .await?;
        let stats = self.mock.stats();
        assert_eq!(stats.duplicate_effects, 0, "{stats:?}");
        assert_eq!(common::crm_holds(self.mock, self.id).await?, Some(newest));
        shutdown.cancel();
        running.wait().await
    }
}

/// The seed under which the mock's first four requests meet: a late apply (the create lands after
/// the client gave up), nothing (the lookup), a server error (the second create), nothing.
fn seed_for_late_then_lookup_then_error(config: &CrmMockConfig) -> anyhow::Result<u64> {
    use crm_mock::{FaultPlan, InjectedFault};
    let wanted = |fault: Option<InjectedFault>, n: usize| match n {
        0 => fault == Some(InjectedFault::LateApply),
        2 => matches!(fault, Some(InjectedFault::ServerError(_))),
        _ => fault.is_none(),
    };
    (0..100_000)
        .find(|seed| {
            let config = CrmMockConfig {
                seed: *seed,
                ..config.clone()
            };
            (0..4).all(|n| wanted(FaultPlan::for_request(&config, n as u64).fault, n))
        })
        .ok_or_else(|| anyhow::anyhow!("no seed gives late, none, error, none"))
}

/// A lookup that finds nothing does not end the doubt about an earlier create: that request may
/// still land. When the create sent after the lookup then fails for certain, the claim must still
/// be given up in doubt, or the next version is created beside the late copy (a duplicate, and
/// the older content last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_finds_nothing_keeps_the_doubt_of_an_earlier_create() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let faults = CrmMockConfig {
        late_apply_rate: 0.3,
        failure_rate: 0.3,
        hang_ms: 1_200,
        ..CrmMockConfig::default()
    };
    let seed = seed_for_late_then_lookup_then_error(&faults)?;
    let mock = start_mock(CrmMockConfig { seed, ..faults }, &shutdown).await?;
    let TwoVersions {
        pipeline,
        config,
        integrator,
        older,
        newer,
        newest: v2,
    } = two_versions("doubt", &mock, &shutdown).await?;
    let older_seq = older
        .info()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .stream_sequence;
    // Request 0: line 2's create times out; the CRM applies it when its hang ends.
    let first = crm_integrator::process_message(&integrator, older).await?;
    assert!(matches!(first, Settled::Deferred { .. }), "{first:?}");
    // Requests 1 and 2: the lookup finds nothing yet, the second create fails for certain.
    let again = deliver_again(&pipeline, older_seq, 2).await?;
    let second = crm_integrator::process_message(&integrator, again).await?;
    assert!(matches!(second, Settled::Deferred { .. }), "{second:?}");
    assert_eq!(mock.stats().requests, 3, "a create, a lookup, a create");
    mock.reconfigure(CrmMockConfig::default())?;
    // Line 3 must wait while line 2's first create may still land.
    let late = LateCopy {
        mock: &mock,
        pipeline: &pipeline,
        id: "doubt",
    };
    late.holds_back(&integrator, newer).await?;
    late.then_newer_wins(config, &shutdown, v2).await
}
