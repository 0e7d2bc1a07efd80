//! Checkpoints: the line up to which every row of a file is acknowledged, with exact counters,
//! kept in the checkpoints KV bucket under the file's identity, and where a resumed run starts.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::Serialize;
use sync_topology::messages::Checkpoint;

use crate::ReaderError;
use crate::input::FileIdentity;

/// Rows acknowledged by the stream, by outcome. `rows_read = published + deduplicated + rejected`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub rows_read: u64,
    pub published: u64,
    pub deduplicated: u64,
    pub rejected: u64,
}

/// Where a run starts: after `line`, with the counters of the rows before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartPoint {
    pub line: u64,
    pub counters: Counters,
    /// An earlier run acknowledged the whole (unchanged) file: there is nothing left to read.
    pub complete: bool,
}

/// Decides where to start from the stored checkpoint. Without `resume` the file is read from the
/// top (the stream's dedup drops what was already sent). With it, a file that is no longer the one
/// checkpointed is refused unless `force`.
pub fn start_point(
    identity: &FileIdentity,
    stored: Option<&Checkpoint>,
    resume: bool,
    force: bool,
) -> Result<StartPoint, ReaderError> {
    let (true, Some(stored)) = (resume, stored) else {
        return Ok(StartPoint::default());
    };
    let changed = stored.size != identity.size || stored.head_hash != identity.head_hash;
    if changed && !force {
        return Err(ReaderError::FileChanged {
            path: identity.path.clone(),
            detail: if stored.size != identity.size {
                format!("size was {} bytes, is {} bytes", stored.size, identity.size)
            } else {
                "its first bytes differ".to_owned()
            },
            line: stored.line,
        });
    }
    Ok(StartPoint {
        line: stored.line,
        complete: stored.complete && !changed,
        counters: Counters {
            rows_read: stored.rows_read,
            published: stored.published,
            deduplicated: stored.deduplicated,
            rejected: stored.rejected,
        },
    })
}

pub fn checkpoint(
    identity: &FileIdentity,
    line: u64,
    counters: Counters,
    complete: bool,
) -> Checkpoint {
    Checkpoint {
        path: identity.path.clone(),
        size: identity.size,
        head_hash: identity.head_hash.clone(),
        line,
        rows_read: counters.rows_read,
        published: counters.published,
        deduplicated: counters.deduplicated,
        rejected: counters.rejected,
        complete,
        updated_at: chrono::Utc::now(),
    }
}

/// The checkpoints bucket of a namespace.
pub struct CheckpointStore {
    bucket: String,
    store: kv::Store,
}

impl CheckpointStore {
    pub async fn open(js: &jetstream::Context, bucket: &str) -> Result<Self, ReaderError> {
        let store = js.get_key_value(bucket).await.map_err(|err| {
            if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket {
                ReaderError::TopologyMissing {
                    what: format!("checkpoints bucket {bucket}"),
                }
            } else {
                ReaderError::Checkpoint {
                    action: "open",
                    key: bucket.to_owned(),
                    message: err.to_string(),
                }
            }
        })?;
        Ok(CheckpointStore {
            bucket: bucket.to_owned(),
            store,
        })
    }

    pub async fn load(&self, key: &str) -> Result<Option<Checkpoint>, ReaderError> {
        let failed = |message: String| ReaderError::Checkpoint {
            action: "read",
            key: format!("{}/{key}", self.bucket),
            message,
        };
        let Some(value) = self
            .store
            .get(key)
            .await
            .map_err(|e| failed(e.to_string()))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&value)
            .map(Some)
            .map_err(|e| failed(format!("stored value is not a checkpoint: {e}")))
    }

    pub async fn save(&self, key: &str, checkpoint: &Checkpoint) -> Result<(), ReaderError> {
        let failed = |message: String| ReaderError::Checkpoint {
            action: "write",
            key: format!("{}/{key}", self.bucket),
            message,
        };
        let value = serde_json::to_vec(checkpoint).map_err(|e| failed(e.to_string()))?;
        self.store
            .put(key, Bytes::from(value))
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(size: u64, head_hash: &str) -> FileIdentity {
        FileIdentity {
            path: "/data/a.csv".to_owned(),
            size,
            head_hash: head_hash.to_owned(),
            key: "file-1".to_owned(),
            is_stdin: false,
        }
    }

    fn stored() -> Checkpoint {
        let counters = Counters {
            rows_read: 10,
            published: 7,
            deduplicated: 1,
            rejected: 2,
        };
        checkpoint(&identity(100, "h"), 12, counters, false)
    }

    #[test]
    fn resume_continues_after_the_checkpoint_with_its_counters() {
        let start = start_point(&identity(100, "h"), Some(&stored()), true, false).expect("start");
        assert_eq!(start.line, 12);
        assert_eq!(start.counters.published, 7);
        assert!(!start.complete);
        let done = Checkpoint {
            complete: true,
            ..stored()
        };
        let start = start_point(&identity(100, "h"), Some(&done), true, false).expect("start");
        assert!(start.complete);
    }

    #[test]
    fn without_resume_or_checkpoint_start_from_the_top() {
        assert_eq!(
            start_point(&identity(100, "h"), Some(&stored()), false, false).expect("start"),
            StartPoint::default()
        );
        assert_eq!(
            start_point(&identity(100, "h"), None, true, false).expect("start"),
            StartPoint::default()
        );
    }

    #[test]
    fn changed_file_is_refused_unless_forced() {
        for changed in [identity(101, "h"), identity(100, "other")] {
            let err = start_point(&changed, Some(&stored()), true, false).expect_err("refused");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("--force"), "{err}");
            let forced = start_point(&changed, Some(&stored()), true, true).expect("forced");
            assert_eq!(forced.line, 12);
        }
    }
}
