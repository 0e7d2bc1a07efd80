//! `--max-reject-rate`: a file whose share of bad rows is above the limit is stopped before more of
//! it is published. The share means something only over enough rows, so the first
//! [`MIN_ROWS`] rows of a run (or the whole file, if it is shorter) are read and held back before
//! anything is published; past them, the share so far is checked at every row.

/// Rows read before the share of bad ones is judged.
pub const MIN_ROWS: u64 = 1000;

/// What to do with the row just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it back: too few rows to judge yet.
    Hold,
    /// Publish it (and anything held).
    Publish,
    /// The share of bad rows is above the limit: publish nothing more.
    TooMany,
}

/// Counts this run's rows and bad rows against the limit.
#[derive(Debug, Clone)]
pub struct RejectGuard {
    max: f64,
    min_rows: u64,
    rows: u64,
    rejected: u64,
}

impl RejectGuard {
    pub fn new(max: f64) -> Self {
        RejectGuard {
            max,
            min_rows: MIN_ROWS,
            rows: 0,
            rejected: 0,
        }
    }

    /// Counts one row read.
    pub fn observe(&mut self, rejected: bool) -> Verdict {
        self.rows += 1;
        self.rejected += u64::from(rejected);
        if self.rows < self.min_rows {
            Verdict::Hold
        } else {
            self.judge()
        }
    }

    /// The file ended (or stopped) while rows were held: the rows read are the sample.
    pub fn judge(&self) -> Verdict {
        if exceeds(self.rejected, self.rows, self.max) {
            Verdict::TooMany
        } else {
            Verdict::Publish
        }
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    pub fn max(&self) -> f64 {
        self.max
    }
}

/// `rejected` of `rows` is a larger share than `max`.
pub fn exceeds(rejected: u64, rows: u64, max: f64) -> bool {
    rows > 0 && rejected as f64 > max * rows as f64
}

/// `--max-reject-rate`: a share from 0 to 1.
pub fn parse_share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!(
            "{text:?} is not a share between 0 and 1 (0.05 stops a file with more than 5% bad rows)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_first_rows_then_judges_the_share_so_far() {
        let mut guard = RejectGuard::new(0.1);
        for n in 1..MIN_ROWS {
            assert_eq!(guard.observe(n % 5 == 0), Verdict::Hold);
        }
        // 20% bad among the first 1,000: too many.
        assert_eq!(guard.observe(true), Verdict::TooMany);

        let mut good = RejectGuard::new(0.1);
        for _ in 1..MIN_ROWS {
            good.observe(false);
        }
        assert_eq!(good.observe(false), Verdict::Publish);
        // 1,000 good rows, then bad ones: stops once they pass a tenth of all rows.
        let mut stopped_after = 0;
        for n in 1..=200 {
            if good.observe(true) == Verdict::TooMany {
                stopped_after = n;
                break;
            }
        }
        assert_eq!(
            stopped_after, 112,
            "112 of 1,112 is over 10%, 111 of 1,111 is not"
        );
    }

    #[test]
    fn a_short_file_is_judged_whole() {
        let mut guard = RejectGuard::new(0.5);
        for n in 0..10 {
            guard.observe(n < 6);
        }
        assert_eq!(guard.judge(), Verdict::TooMany);
        assert_eq!((guard.rows(), guard.rejected()), (10, 6));
    }

    #[test]
    fn shares_are_between_0_and_1() {
        assert_eq!(parse_share("0.05"), Ok(0.05));
        assert_eq!(parse_share("1"), Ok(1.0));
        assert!(parse_share("1.5").is_err());
        assert!(parse_share("-0.1").is_err());
        assert!(parse_share("ten").is_err());
    }
}
