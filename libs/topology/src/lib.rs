//! The JetStream topology every service shares: names of streams, subjects, consumers and buckets
//! for a namespace, the headers and message bodies that travel between services, the code that
//! creates or updates the layout (`syncctl setup`), and a NATS connection that checks the server.

pub mod messages;
mod names;
mod nats;
mod setup;

pub use names::{InvalidNamespace, Names};
pub use nats::{ConnectError, MIN_SERVER_VERSION, connect};
pub use setup::{Change, SetupError, SetupReport, TopologySettings, ensure_topology};

/// Header carrying the path of the file a row came from.
pub const HEADER_SOURCE_FILE: &str = "Sync-Source-File";
/// Header carrying the 1-based line number at which the row starts.
pub const HEADER_SOURCE_LINE: &str = "Sync-Source-Line";
/// Header carrying the content hash of the record in the body.
pub const HEADER_CONTENT_HASH: &str = "Sync-Content-Hash";
/// Header set on a copy `syncctl replay` or `syncctl dlq redrive` republishes: the ingest sequence
/// of the version it copies. The integrator orders versions by it, not by the copy's own (newer)
/// sequence, so a copy of an old version can never pass for the newest.
pub const HEADER_REPLAY_OF: &str = "Sync-Replay-Of";
/// Header set by `syncctl replay --force`: send even when the ledger says this hash is confirmed.
pub const HEADER_FORCE_RESEND: &str = "Sync-Force-Resend";
