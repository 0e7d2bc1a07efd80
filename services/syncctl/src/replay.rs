//! `syncctl replay`: reprocesses part of the ingest stream through the normal integrator path.
//!
//! Chosen design: republishing. The selected messages are read with an ephemeral consumer
//! (no acks) and published again onto the ingest subject as copies of the same version (see
//! `sync_topology::ingest`): same body, source and `Sync-Version`, a fresh `Nats-Msg-Id`
//! (`replay:{version}:{nonce}`, so the stream's dedup window does not drop them) and
//! `Sync-Replay-Of: {original seq}`. The running integrators pick them up from their one durable
//! consumer: no second consumer to point replicas at, no flag to remember to remove, and the usual
//! guarantees apply (the ledger skips a version it already confirmed). `--force` adds
//! `Sync-Force-Resend: true`, which makes the integrators send even confirmed records again, for
//! example after the CRM lost data.
//!
//! The range is read up to the stream's last sequence when the replay starts, so the replay never
//! reads its own republished copies.
//!
//! A copy keeps its version, so it can never pass for a newer one: the integrators would record it
//! as superseded. Such messages (the ledger knows a newer version of the customer) are left out
//! here already, with or without `--force`, and counted.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt as _};
use service_kit::NatsArgs;
use sync_topology::ids::{self, CopyKind};
use sync_topology::ledger::{Decision, LedgerEntry, decide};
use sync_topology::{Decoded, IngestMessage, Version};

use crate::{CtlError, Pipeline, nats_error};

/// Publish acks awaited at most this many at a time: bounds memory and keeps the server busy.
const ACK_WINDOW: usize = 256;

/// Ledger look-ups in flight at once.
const LEDGER_LOOKAHEAD: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Inclusive stream sequences.
    Sequences { from: u64, to: u64 },
    /// Messages the stream stored at or after `since` and at or before `until`.
    Times {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    },
}

impl Selection {
    /// Refuses an empty-by-construction range, which is always a typo.
    pub fn validate(&self) -> Result<(), CtlError> {
        match self {
            Selection::Sequences { from, to } if from > to => Err(CtlError::Usage(format!(
                "--from-seq {from} is after --to-seq {to}"
            ))),
            Selection::Times { since, until } if since > until => Err(CtlError::Usage(format!(
                "--since {since} is after --until {until}"
            ))),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub nats: NatsArgs,
    pub selection: Selection,
    pub force: bool,
    /// How long the server may stay silent before the range counts as read to its end (messages at
    /// the end of the range can have been deleted).
    pub idle_timeout: Duration,
}

impl ReplayConfig {
    pub fn new(nats: NatsArgs, selection: Selection, force: bool) -> Self {
        ReplayConfig {
            nats,
            selection,
            force,
            idle_timeout: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub republished: u64,
    /// Selected messages left out because the ledger holds a later, different version.
    pub skipped_superseded: u64,
    /// Original sequences of the first and last message republished.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub forced: bool,
}

fn nats_time(time: DateTime<Utc>) -> Result<async_nats::datetime::DateTime, CtlError> {
    let nanos = time
        .timestamp_nanos_opt()
        .ok_or_else(|| CtlError::Usage(format!("time {time} is out of range")))?;
    async_nats::datetime::from_nanos(i128::from(nanos))
        .map_err(|e| CtlError::Usage(format!("time {time} is out of range: {e}")))
}

/// Republishes the selected ingest messages; see the module docs.
pub async fn run(config: &ReplayConfig) -> Result<ReplayOutcome, CtlError> {
    config.selection.validate()?;
    let pipeline = Pipeline::connect(&config.nats).await?;
    let names = &pipeline.names;
    let stream_name = names.ingest_stream();
    let mut stream = pipeline.stream(&stream_name).await?;
    let mut outcome = ReplayOutcome {
        forced: config.force,
        ..ReplayOutcome::default()
    };
    let Some(range) = Range::of(&config.selection, &mut stream, &stream_name).await? else {
        return Ok(outcome);
    };
    let messages = crate::read_stream(
        &pipeline,
        &stream_name,
        names.ingest_subject(),
        range.deliver_policy,
        "replay",
    )
    .await?
    .messages;

    if config.force {
        tracing::warn!(
            "--force: replayed records will be SENT TO THE CRM AGAIN even where the ledger says \
             the CRM already holds them"
        );
    }
    let ledger = open_ledger(&pipeline).await?;
    // Ledger look-ups are round trips: run a window of them ahead, in order, so the replay is not
    // one round trip per message. Look-ups past the end of the range are wasted, never published.
    let checked = messages
        .map(|next| check(next, ledger.clone(), stream_name.clone()))
        .buffered(LEDGER_LOOKAHEAD);
    tokio::pin!(checked);
    republish(config, &pipeline, &range, checked, &mut outcome).await?;
    Ok(outcome)
}

/// The part of the ingest stream a replay reads.
#[derive(Debug)]
struct Range {
    /// Where its consumer starts.
    deliver_policy: DeliverPolicy,
    /// The last sequence it may republish.
    upper_seq: u64,
    /// For a time selection: the latest store time it may republish.
    until: Option<async_nats::datetime::DateTime>,
}

impl Range {
    /// The range `selection` names in the stream as it is now; None when the stream holds none of
    /// it.
    async fn of(
        selection: &Selection,
        stream: &mut jetstream::stream::Stream,
        stream_name: &str,
    ) -> Result<Option<Range>, CtlError> {
        let state = stream
            .info()
            .await
            .map_err(|e| nats_error(format!("reading stream {stream_name}"), e))?
            .state
            .clone();
        if state.messages == 0 {
            return Ok(None);
        }
        // Never read past what was there when we started: our own copies land after it.
        let end_seq = state.last_sequence;
        let range = match selection {
            Selection::Sequences { from, .. } if *from > end_seq => return Ok(None),
            Selection::Sequences { from, to } => Range {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: (*from).max(state.first_sequence).max(1),
                },
                upper_seq: (*to).min(end_seq),
                until: None,
            },
            Selection::Times { since, until } => {
                if state.last_timestamp < nats_time(*since)? {
                    return Ok(None);
                }
                Range {
                    deliver_policy: DeliverPolicy::ByStartTime {
                        start_time: nats_time(*since)?,
                    },
                    upper_seq: end_seq,
                    until: Some(nats_time(*until)?),
                }
            }
        };
        Ok((range.upper_seq >= state.first_sequence).then_some(range))
    }
}

/// One message read for a replay, decoded, and whether the ledger knows a newer version.
struct Checked {
    message: jetstream::Message,
    seq: u64,
    published: async_nats::datetime::DateTime,
    decoded: Option<Decoded>,
    superseded: bool,
}

async fn check<E: std::fmt::Display>(
    next: Result<jetstream::Message, E>,
    ledger: kv::Store,
    stream_name: String,
) -> Result<Checked, CtlError> {
    let message = next.map_err(|e| nats_error(format!("reading {stream_name}"), e))?;
    let (seq, published) = {
        let info = message
            .info()
            .map_err(|e| nats_error(format!("reading metadata of a {stream_name} message"), e))?;
        (info.stream_sequence, info.published)
    };
    let decoded = IngestMessage::decode(message.headers.as_ref(), &message.payload, seq).ok();
    let superseded = match &decoded {
        Some(decoded) => superseded(&ledger, decoded).await?,
        None => false,
    };
    Ok(Checked {
        message,
        seq,
        published,
        decoded,
        superseded,
    })
}

/// Republishes the checked messages up to the end of `range` (or until the server stays silent
/// for the idle timeout), leaving out the superseded; counts into `outcome`.
async fn republish(
    config: &ReplayConfig,
    pipeline: &Pipeline,
    range: &Range,
    mut checked: Pin<&mut impl Stream<Item = Result<Checked, CtlError>>>,
    outcome: &mut ReplayOutcome,
) -> Result<(), CtlError> {
    let stream_name = pipeline.names.ingest_stream();
    let subject = pipeline.names.ingest_subject();
    let nonce = crate::nonce();
    let mut acks = VecDeque::new();
    loop {
        let next = match tokio::time::timeout(config.idle_timeout, checked.next()).await {
            Ok(Some(next)) => next,
            // Silence: the rest of the range was deleted; nothing more to read.
            Ok(None) | Err(_) => break,
        };
        let Checked {
            message,
            seq,
            published,
            decoded,
            superseded,
        } = next?;
        if seq > range.upper_seq || range.until.is_some_and(|until| published > until) {
            break;
        }
        if superseded {
            outcome.skipped_superseded += 1;
        } else {
            let (headers, body) = copy_of(&message, seq, decoded.as_ref(), config.force, &nonce)?;
            let ack = pipeline
                .js
                .publish_with_headers(subject.clone(), headers, body)
                .await
                .map_err(|e| nats_error(format!("republishing {stream_name} message {seq}"), e))?;
            acks.push_back((seq, ack));
            if acks.len() >= ACK_WINDOW {
                await_ack(&mut acks, &stream_name).await?;
            }
            outcome.first_seq.get_or_insert(seq);
            outcome.last_seq = Some(seq);
            outcome.republished += 1;
        }
        if seq >= range.upper_seq {
            break;
        }
    }
    while !acks.is_empty() {
        await_ack(&mut acks, &stream_name).await?;
    }
    Ok(())
}

/// The copy of one stored ingest message: the same version, marked as a copy. A message that is
/// not a customer is copied byte for byte under a fresh id: the integrators dead-letter it again,
/// with its body, which is what a replay of it can do.
fn copy_of(
    message: &jetstream::Message,
    seq: u64,
    decoded: Option<&Decoded>,
    force: bool,
    nonce: &str,
) -> Result<(HeaderMap, Bytes), CtlError> {
    match decoded {
        Some(decoded) => {
            let copy = decoded.message.copy(Some(seq), force);
            copy.encode(&ids::ingest_copy(CopyKind::Replay, &copy.version, nonce))
                .map_err(|e| nats_error(format!("encoding the copy of ingest message {seq}"), e))
        }
        None => {
            let mut headers = message.headers.clone().unwrap_or_default();
            let id = ids::ingest_copy(CopyKind::Replay, &Version::legacy(seq), nonce);
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            Ok((headers, message.payload.clone()))
        }
    }
}

pub(crate) async fn open_ledger(pipeline: &Pipeline) -> Result<kv::Store, CtlError> {
    use async_nats::jetstream::context::KeyValueErrorKind;
    let bucket = pipeline.names.ledger_bucket();
    match pipeline.js.get_key_value(&bucket).await {
        Ok(store) => Ok(store),
        Err(err) if err.kind() == KeyValueErrorKind::GetBucket => Err(CtlError::BucketMissing {
            bucket,
            namespace: pipeline.names.namespace().to_owned(),
        }),
        Err(err) => Err(nats_error(format!("opening bucket {bucket}"), err)),
    }
}

/// True when the ledger knows a newer version of this customer: the copy would only be recorded
/// as superseded.
pub(crate) async fn superseded(ledger: &kv::Store, decoded: &Decoded) -> Result<bool, CtlError> {
    let key = &decoded.ledger_key;
    let Some(value) = ledger
        .get(key)
        .await
        .map_err(|e| nats_error(format!("reading ledger entry {key}"), e))?
    else {
        return Ok(false);
    };
    let Ok(entry) = serde_json::from_slice::<LedgerEntry>(&value) else {
        tracing::warn!(%key, "ledger entry not understood; replaying without the version check");
        return Ok(false);
    };
    let decision = decide(
        Some(&entry),
        decoded.message.version,
        &decoded.hash,
        false,
        chrono::Utc::now().timestamp_millis(),
    );
    Ok(matches!(decision, Decision::Superseded { .. }))
}

async fn await_ack(
    acks: &mut VecDeque<(u64, jetstream::context::PublishAckFuture)>,
    stream_name: &str,
) -> Result<(), CtlError> {
    if let Some((seq, ack)) = acks.pop_front() {
        ack.await.map_err(|e| {
            nats_error(
                format!("republishing {stream_name} message {seq} (waiting for its ack)"),
                e,
            )
        })?;
    }
    Ok(())
}

/// Parses `--since`/`--until`: an RFC 3339 time, or a duration meaning that long ago (`15m`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        format!(
            "{text:?} is neither an RFC 3339 time (2026-01-31T12:00:00Z) nor a duration ago (15m)"
        )
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|e| format!("{text:?}: {e}"))?;
    now.checked_sub_signed(ago)
        .ok_or_else(|| format!("{text:?} reaches before the calendar starts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backwards_ranges_are_usage_mistakes() {
        assert!(Selection::Sequences { from: 5, to: 4 }.validate().is_err());
        assert!(Selection::Sequences { from: 4, to: 4 }.validate().is_ok());
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(1);
        assert!(
            Selection::Times {
                since: later,
                until: now
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn times_are_absolute_or_ago() {
        let now = DateTime::parse_from_rfc3339("2026-01-31T12:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        assert_eq!(
            parse_time("2026-01-31T11:00:00Z", now).expect("absolute"),
            now - chrono::Duration::hours(1)
        );
        assert_eq!(
            parse_time("15m", now).expect("ago"),
            now - chrono::Duration::minutes(15)
        );
        assert!(parse_time("yesterday-ish", now).is_err());
    }
}
