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

/// Where a run starts: after `line`, with the counters of the rows before it, under which load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartPoint {
    pub line: u64,
    pub counters: Counters,
    /// An earlier run acknowledged the whole (unchanged) file: there is nothing left to read.
    pub complete: bool,
    /// The load this content of the file already has; None: allocate a new one.
    pub load: Option<u64>,
}

/// How the operator asked to read the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadMode {
    /// Continue after the checkpointed line.
    pub resume: bool,
    /// With `resume`: continue even though the file changed.
    pub force: bool,
    /// Read the whole file again as a new load, making its rows the newest versions.
    pub reload: bool,
}

/// Decides where to start and under which load, from the stored checkpoint.
///
/// The load belongs to the file's content: every run of the same, unchanged file keeps it, so its
/// rows keep their versions (the stream's dedup and the ledger then make a re-run harmless), and a
/// file read completely is not read again. A changed file, a file never seen and `--reload` get a
/// new load, whose rows are newer than every row read before. Without `resume` the file is read
/// from the top; with it, a changed file is refused unless `force` (then reading continues after
/// the checkpointed line, under a new load).
pub fn start_point(
    identity: &FileIdentity,
    stored: Option<&Checkpoint>,
    mode: ReadMode,
) -> Result<StartPoint, ReaderError> {
    let stored = stored.filter(|s| s.load > 0 && !mode.reload);
    let Some(stored) = stored else {
        return Ok(StartPoint::default());
    };
    let change = if stored.size != identity.size {
        Some(format!(
            "size was {} bytes, is {} bytes",
            stored.size, identity.size
        ))
    } else if stored.head_hash != identity.head_hash {
        Some("its first bytes differ".to_owned())
    } else if stored.modified_ns != identity.modified_ns {
        Some("it was modified since".to_owned())
    } else {
        None
    };
    let changed = change.is_some();
    if let Some(detail) = change
        && mode.resume
        && !mode.force
    {
        return Err(ReaderError::FileChanged {
            path: identity.path.clone(),
            detail,
            line: stored.line,
        });
    }
    if changed && !mode.resume {
        return Ok(StartPoint::default());
    }
    let load = (!changed).then_some(stored.load);
    if stored.complete && !changed {
        return Ok(StartPoint {
            line: stored.line,
            counters: counters_of(stored),
            complete: true,
            load,
        });
    }
    if !mode.resume {
        return Ok(StartPoint {
            load,
            ..StartPoint::default()
        });
    }
    Ok(StartPoint {
        line: stored.line,
        counters: counters_of(stored),
        complete: false,
        load,
    })
}

fn counters_of(stored: &Checkpoint) -> Counters {
    Counters {
        rows_read: stored.rows_read,
        published: stored.published,
        deduplicated: stored.deduplicated,
        rejected: stored.rejected,
    }
}

pub fn checkpoint(
    identity: &FileIdentity,
    load: u64,
    line: u64,
    counters: Counters,
    complete: bool,
) -> Checkpoint {
    Checkpoint {
        path: identity.path.clone(),
        size: identity.size,
        head_hash: identity.head_hash.clone(),
        modified_ns: identity.modified_ns,
        load,
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

    /// The load this run publishes under: the file's own when it has one, otherwise a new one,
    /// saved at once with the start line so that a run killed before its first checkpoint keeps
    /// it when it runs again.
    pub async fn load_for(
        &self,
        identity: &FileIdentity,
        start: &StartPoint,
    ) -> Result<u64, ReaderError> {
        if let Some(load) = start.load {
            return Ok(load);
        }
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let load = sync_topology::loads::allocate_load(&self.store, now_ms).await?;
        tracing::info!(file = %identity.path, load, "new load");
        let first = checkpoint(identity, load, start.line, start.counters, false);
        self.save(&identity.key, &first).await?;
        Ok(load)
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
            modified_ns: Some(42),
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
        checkpoint(&identity(100, "h"), 55, 12, counters, false)
    }

    fn mode(resume: bool, force: bool, reload: bool) -> ReadMode {
        ReadMode {
            resume,
            force,
            reload,
        }
    }

    #[test]
    fn resume_continues_after_the_checkpoint_with_its_counters_and_load() {
        let start = start_point(
            &identity(100, "h"),
            Some(&stored()),
            mode(true, false, false),
        )
        .expect("start");
        assert_eq!(start.line, 12);
        assert_eq!(start.counters.published, 7);
        assert_eq!(start.load, Some(55));
        assert!(!start.complete);
    }

    #[test]
    fn a_file_read_completely_is_not_read_again_unless_reloaded() {
        let done = Checkpoint {
            complete: true,
            ..stored()
        };
        for resume in [false, true] {
            let start = start_point(&identity(100, "h"), Some(&done), mode(resume, false, false))
                .expect("start");
            assert!(start.complete);
        }
        let reload =
            start_point(&identity(100, "h"), Some(&done), mode(false, false, true)).expect("start");
        assert_eq!(reload, StartPoint::default(), "a new load, from the top");
    }

    #[test]
    fn a_rerun_of_an_unfinished_file_keeps_its_load_from_the_top() {
        let start = start_point(
            &identity(100, "h"),
            Some(&stored()),
            mode(false, false, false),
        )
        .expect("start");
        assert_eq!(start.line, 0);
        assert_eq!(start.load, Some(55));
        assert_eq!(
            start_point(&identity(100, "h"), None, mode(true, false, false)).expect("start"),
            StartPoint::default()
        );
    }

    #[test]
    fn a_changed_file_is_a_new_load_and_refused_on_resume_unless_forced() {
        let rewritten_in_place = FileIdentity {
            modified_ns: Some(43),
            ..identity(100, "h")
        };
        for changed in [
            identity(101, "h"),
            identity(100, "other"),
            rewritten_in_place,
        ] {
            let fresh = start_point(&changed, Some(&stored()), mode(false, false, false))
                .expect("read from the top");
            assert_eq!(fresh, StartPoint::default());
            let err = start_point(&changed, Some(&stored()), mode(true, false, false))
                .expect_err("refused");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("--force"), "{err}");
            let forced =
                start_point(&changed, Some(&stored()), mode(true, true, false)).expect("forced");
            assert_eq!(forced.line, 12);
            assert_eq!(forced.load, None, "the changed rest is a new load");
        }
    }

    #[test]
    fn checkpoints_of_builds_before_loads_start_over() {
        let old = Checkpoint {
            load: 0,
            ..stored()
        };
        assert_eq!(
            start_point(&identity(100, "h"), Some(&old), mode(true, false, false)).expect("start"),
            StartPoint::default()
        );
    }
}
