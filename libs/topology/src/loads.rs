//! Load numbers: every new content of an input file (and every deliberate `--reload`) gets one,
//! and it is the `load` of its rows' [`crate::Version`]s, so a later load's rows are newer than an
//! earlier load's whatever order their messages reach the stream in.

use async_nats::jetstream::kv;
use bytes::Bytes;

/// The key in the checkpoints bucket holding the last load number handed out.
pub const LOAD_COUNTER_KEY: &str = "load-counter";

/// Compare-and-set attempts before giving up (readers starting at the same moment take turns).
const MAX_ATTEMPTS: u32 = 32;

#[derive(Debug, thiserror::Error)]
#[error("cannot allocate a load number in {bucket}/{LOAD_COUNTER_KEY}: {message}")]
pub struct LoadError {
    pub bucket: String,
    pub message: String,
}

/// Whether a key of the checkpoints bucket is a file's checkpoint (not the load counter).
pub fn is_checkpoint_key(key: &str) -> bool {
    key != LOAD_COUNTER_KEY
}

/// The next load number: greater than every one handed out before, and never below the current
/// Unix time in milliseconds, so numbers keep growing even if the counter is lost with its bucket
/// (and a version taken from the data, in milliseconds, compares on the same axis).
pub async fn allocate_load(checkpoints: &kv::Store, now_ms: u64) -> Result<u64, LoadError> {
    let failed = |message: String| LoadError {
        bucket: checkpoints.name.clone(),
        message,
    };
    for _ in 0..MAX_ATTEMPTS {
        let entry = checkpoints
            .entry(LOAD_COUNTER_KEY)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let (last, revision) = match &entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let text = std::str::from_utf8(&entry.value).unwrap_or_default();
                let last = text
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| failed(format!("the stored value {text:?} is not a number")))?;
                (last, entry.revision)
            }
            Some(entry) => (0, entry.revision),
            None => (0, 0),
        };
        let next = last.saturating_add(1).max(now_ms);
        match checkpoints
            .update(LOAD_COUNTER_KEY, Bytes::from(next.to_string()), revision)
            .await
        {
            Ok(_) => return Ok(next),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(err) => return Err(failed(err.to_string())),
        }
    }
    Err(failed(format!(
        "{MAX_ATTEMPTS} compare-and-set conflicts in a row"
    )))
}
