//! The version of a customer record, assigned where the record comes from and carried unchanged
//! by every copy of it (replays, redrives), so "newer" never depends on the order in which
//! messages happen to reach a stream.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Orders the versions of one customer: the greater version is the newer one.
///
/// For a CSV row it is `(load, load, line)`: the reader's load number (allocated once per file
/// content, later loads get greater numbers) and the 1-based line the row starts on. `stamp` comes
/// first so that a version taken from the data itself (a `--version-column` such as `updated_at`,
/// in milliseconds) can order rows across loads; for a plain load it equals the load number, which
/// is itself a millisecond clock reading (see the reader's load allocation), so both kinds compare
/// on one time axis.
///
/// Messages published before versions existed carry none; they are read as [`Version::legacy`],
/// older than every versioned record.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    pub stamp: u64,
    pub load: u64,
    pub line: u64,
}

/// The largest component a version may have: it is stored in PostgreSQL `bigint` columns.
pub const MAX_VERSION_COMPONENT: u64 = i64::MAX as u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "version {text:?} is not `stamp.load.line` with three decimal numbers up to {MAX_VERSION_COMPONENT}"
)]
pub struct InvalidVersion {
    pub text: String,
}

impl Version {
    /// The version of the row starting on `line` of a load.
    pub fn row(load: u64, line: u64) -> Self {
        Version {
            stamp: load,
            load,
            line,
        }
    }

    /// The version of a message that carries none: its ingest stream sequence, below every load.
    pub fn legacy(stream_seq: u64) -> Self {
        Version {
            stamp: 0,
            load: 0,
            line: stream_seq,
        }
    }

    pub fn is_legacy(&self) -> bool {
        self.stamp == 0 && self.load == 0
    }

    /// Parses the form [`fmt::Display`] writes (and the `Sync-Version` header carries).
    pub fn parse(text: &str) -> Result<Self, InvalidVersion> {
        let invalid = || InvalidVersion {
            text: text.chars().take(64).collect(),
        };
        let mut parts = text.trim().split('.');
        let mut next = || {
            parts
                .next()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .filter(|n| *n <= MAX_VERSION_COMPONENT)
        };
        let (Some(stamp), Some(load), Some(line)) = (next(), next(), next()) else {
            return Err(invalid());
        };
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(Version { stamp, load, line })
    }

    /// The components as PostgreSQL `bigint`s (always in range for a parsed or allocated version).
    pub fn to_i64s(&self) -> Option<[i64; 3]> {
        Some([
            i64::try_from(self.stamp).ok()?,
            i64::try_from(self.load).ok()?,
            i64::try_from(self.line).ok()?,
        ])
    }

    /// From PostgreSQL `bigint`s; negative values (never written) read as 0.
    pub fn from_i64s(stamp: i64, load: i64, line: i64) -> Self {
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        Version {
            stamp: unsigned(stamp),
            load: unsigned(load),
            line: unsigned(line),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.stamp, self.load, self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_loads_win_then_later_lines() {
        assert!(Version::row(2, 1) > Version::row(1, 900));
        assert!(Version::row(1, 3) > Version::row(1, 2));
        assert!(Version::legacy(u64::MAX >> 1) < Version::row(1, 1));
        let from_data = Version {
            stamp: 10,
            load: 1,
            line: 1,
        };
        assert!(from_data > Version::row(9, 1_000));
    }

    #[test]
    fn text_form_round_trips_and_refuses_nonsense() {
        let v = Version::row(1_764_496_800_123, 42);
        assert_eq!(v.to_string(), "1764496800123.1764496800123.42");
        assert_eq!(Version::parse(&v.to_string()), Ok(v));
        for bad in [
            "",
            "1.2",
            "1.2.3.4",
            "a.b.c",
            "-1.2.3",
            "1..3",
            "+1.2.3",
            "9223372036854775808.1.1",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Version::parse("9223372036854775807.0.0").is_ok());
    }

    #[test]
    fn bigint_columns_round_trip() {
        let v = Version::row(7, 9);
        let [s, l, n] = v.to_i64s().expect("in range");
        assert_eq!(Version::from_i64s(s, l, n), v);
    }
}
