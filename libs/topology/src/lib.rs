//! The contract between the services, and the JetStream layout it lives in: names of streams,
//! subjects, consumers and buckets for a namespace; the version that orders a customer's records;
//! the ingest message's wire form; every message id and idempotency key; the ledger entry and its
//! ordering rule; the outcome bodies; the code that creates or updates the layout (`syncctl
//! setup`); and a NATS connection that checks the server. Every producer and consumer of these
//! goes through this crate, so a format is written once.

pub mod auth;
pub mod ids;
pub mod ingest;
pub mod ledger;
pub mod loads;
pub mod messages;
mod names;
mod nats;
mod prune;
mod redact;
mod setup;
mod version;

pub use ingest::{Decoded, IngestMessage, Malformed};
pub use names::{InvalidNamespace, Names};
pub use nats::{
    ConnectError, MIN_SERVER_VERSION, NatsSecurity, connect, connect_with, inbox_prefix,
};
pub use prune::{PruneError, PruneReport, StreamPrune, prune_settled};
pub use redact::redact;
pub use setup::{
    Change, DEFAULT_MAX_STREAM_BYTES, RETENTION_METADATA, SetupError, SetupReport, TeardownReport,
    TopologySettings, ensure_topology, namespace_streams, teardown,
};
pub use version::{
    InvalidVersion, MAX_CLOCK_SKEW_MS, MAX_VERSION_COMPONENT, Version, stamp_from_text,
};

/// Header carrying the path of the file a row came from.
pub const HEADER_SOURCE_FILE: &str = "Sync-Source-File";
/// Header carrying the 1-based line number at which the row starts.
pub const HEADER_SOURCE_LINE: &str = "Sync-Source-Line";
/// Header carrying the content hash of the record in the body.
pub const HEADER_CONTENT_HASH: &str = "Sync-Content-Hash";
/// Header carrying the record's [`Version`] (`stamp.load.line`), which orders a customer's records.
pub const HEADER_VERSION: &str = "Sync-Version";
/// Header set on a copy `syncctl replay` or `syncctl dlq redrive` republishes: the ingest sequence
/// of the message it copies, for tracing. The copy carries the original's version, so it can never
/// pass for a newer one.
pub const HEADER_REPLAY_OF: &str = "Sync-Replay-Of";
/// Header set by `syncctl replay --force`: send even when the ledger says this hash is confirmed,
/// once a lookup shows the CRM's copy differs (the header proves nothing of who set it).
pub const HEADER_FORCE_RESEND: &str = "Sync-Force-Resend";
