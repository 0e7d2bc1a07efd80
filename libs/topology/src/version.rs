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

/// How far ahead of this host's clock a load may lie. A load is a clock reading of the reader's
/// host (see the reader's load allocation), and two hosts' clocks differ by a little; a load
/// further ahead was made by no reader, and a version carrying it would outrank every real one
/// until that time.
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

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

    /// Why no reader can have made this version (its load lies more than [`MAX_CLOCK_SKEW_MS`]
    /// past `now_ms`, this host's clock), or None when one may have.
    pub fn implausible(&self, now_ms: i64) -> Option<String> {
        let limit = u64::try_from(now_ms)
            .unwrap_or(0)
            .saturating_add(MAX_CLOCK_SKEW_MS);
        (self.load > limit).then(|| {
            format!(
                "version {self} has load {}, {} s past this host's clock: loads are the reader's \
                 clock readings, so no reader made it (forged or corrupted)",
                self.load,
                (self.load - limit + MAX_CLOCK_SKEW_MS) / 1000
            )
        })
    }

    /// Whether the stamp came from the data (`--version-column`) rather than from the load: any
    /// value is then possible, and only the ingest message the version came from can vouch for it.
    pub fn stamped_by_data(&self) -> bool {
        self.stamp != self.load
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

/// Reads a version column's value (`csv-reader --version-column`) as a stamp: a whole number as it
/// is, or a date-time as milliseconds since the Unix epoch (RFC 3339; `YYYY-MM-DD HH:MM:SS[.f]` and
/// `YYYY-MM-DD`, taken as UTC). Plain loads are stamped with their load number, itself a millisecond
/// clock reading, so date-times compare with them on one time axis; whole numbers do not, and a
/// customer's rows should come either always or never with a version column.
pub fn stamp_from_text(text: &str) -> Option<u64> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= MAX_VERSION_COMPONENT);
    }
    let millis = if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        time.timestamp_millis()
    } else if let Ok(time) = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f") {
        time.and_utc().timestamp_millis()
    } else {
        chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()?
            .and_hms_opt(0, 0, 0)?
            .and_utc()
            .timestamp_millis()
    };
    u64::try_from(millis).ok()
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
    fn a_load_from_the_future_is_implausible_within_the_clock_skew_it_is_not() {
        let now: i64 = 1_800_000_000_000;
        let now_u = now as u64;
        assert_eq!(Version::row(now_u, 2).implausible(now), None);
        assert_eq!(
            Version::row(now_u + MAX_CLOCK_SKEW_MS, 2).implausible(now),
            None
        );
        let far = Version::row(now_u + 3_600_000, 2);
        let why = far.implausible(now).expect("an hour ahead");
        assert!(why.contains("3600 s past"), "{why}");
        assert_eq!(Version::legacy(7).implausible(now), None);
        // A stamp from the data says nothing of the clock; only the load does.
        let data = Version {
            stamp: u64::MAX / 2,
            load: now_u,
            line: 2,
        };
        assert_eq!(data.implausible(now), None);
        assert!(data.stamped_by_data());
        assert!(!Version::row(now_u, 2).stamped_by_data());
    }

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
    fn version_columns_read_numbers_and_date_times() {
        assert_eq!(stamp_from_text(" 42 "), Some(42));
        assert_eq!(
            stamp_from_text("2026-11-30T10:00:00Z"),
            Some(1_796_032_800_000)
        );
        assert_eq!(
            stamp_from_text("2026-11-30T11:00:00+01:00"),
            Some(1_796_032_800_000)
        );
        assert_eq!(
            stamp_from_text("2026-11-30 10:00:00.5"),
            Some(1_796_032_800_500)
        );
        assert_eq!(stamp_from_text("2026-11-30"), Some(1_795_996_800_000));
        for bad in [
            "",
            "yesterday",
            "-5",
            "1969-12-31",
            "2026-13-01",
            "99999999999999999999",
        ] {
            assert_eq!(stamp_from_text(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bigint_columns_round_trip() {
        let v = Version::row(7, 9);
        let [s, l, n] = v.to_i64s().expect("in range");
        assert_eq!(Version::from_i64s(s, l, n), v);
    }
}
