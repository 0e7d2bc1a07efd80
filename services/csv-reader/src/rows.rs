//! Rows out of the CSV text: the parser over [`LfLineEndings`], the exact line each row starts on,
//! and the stretches that cannot be rows. A stray quote makes the parser read every line up to the
//! next quote as one row; such a row (over several lines and not valid) has its first line
//! rejected as `unterminated_quote` and the lines after it read again as rows of their own. A line
//! longer than `--max-row-bytes` is rejected as `row_too_long` and reading goes on at the next one.

use csv_async::{AsyncReader, AsyncReaderBuilder, ByteRecord};
use customer_record::{MAX_FIELD_BYTES, RowRejection};
use tokio::io::AsyncRead;

use crate::input::{LfLineEndings, RowLimits, RowOverrun, TakenRow};
use crate::message::raw_line_excerpt;

/// What [`RowReader::next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// A row starting on `line`; its fields are in the record passed to [`RowReader::next`].
    Fields { line: u64 },
    /// A line that is not a row, with why and its text as read.
    Rejected {
        line: u64,
        rejection: RowRejection,
        raw: String,
    },
}

impl Row {
    pub fn line(&self) -> u64 {
        match self {
            Row::Fields { line } | Row::Rejected { line, .. } => *line,
        }
    }
}

/// Reading stopped at `line`: the input itself failed (a truncated `.gz`, an I/O error).
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {source}")]
pub struct ReadFailure {
    pub line: u64,
    pub source: csv_async::Error,
}

/// Reads the header, then rows with their start lines (see the module comment).
pub struct RowReader<R> {
    /// `None` only while a stretch is being handed back to a new parser.
    csv: Option<AsyncReader<LfLineEndings<R>>>,
    /// File line = `line_offset` + the parser's line: a new parser starts on the line after a
    /// rejected one.
    line_offset: u64,
    /// The parser's line on which the last row returned ended.
    previous_end: u64,
    /// The header's width, once read.
    width: Option<usize>,
    max_row_bytes: u64,
}

impl<R: AsyncRead + Unpin + Send> RowReader<R> {
    pub fn new(input: R, max_row_bytes: u64) -> Self {
        RowReader {
            csv: Some(parser(LfLineEndings::new(input, max_row_bytes))),
            line_offset: 0,
            previous_end: 1,
            width: None,
            max_row_bytes,
        }
    }

    /// Reads the first row as it is; `false` if the input has no row at all.
    pub async fn read_header(&mut self, record: &mut ByteRecord) -> Result<bool, ReadFailure> {
        let read = self.parser()?.read_byte_record(record).await;
        let csv = self.parser()?;
        match read {
            Ok(found) => {
                let (line, end) = (csv.position().line(), csv.position().byte());
                csv.get_mut().row_ended_at(end);
                self.previous_end = line;
                Ok(found)
            }
            Err(source) => Err(ReadFailure { line: 1, source }),
        }
    }

    /// From now on, a row over several lines that does not have `width` fields (or has a field
    /// over the limit) is a swallowed stretch, and so is one bigger than any valid row can be.
    pub fn expect_width(&mut self, width: usize) -> Result<(), ReadFailure> {
        self.width = Some(width);
        let limits = RowLimits::for_width(self.max_row_bytes, width);
        self.parser()?.get_mut().set_limits(limits);
        Ok(())
    }

    /// The next row, `None` at the end of the input. Not cancel safe while it hands a stretch back
    /// (it then fails on the next call): the caller stops reading when it cancels it.
    pub async fn next(&mut self, record: &mut ByteRecord) -> Result<Option<Row>, ReadFailure> {
        let read = self.parser()?.read_byte_record(record).await;
        let csv = self.parser()?;
        let line_now = csv.position().line();
        let overrun = csv.get_ref().overrun();
        match read {
            Ok(false) => Ok(None),
            Ok(true) => {
                let inner_breaks = record.as_slice().iter().filter(|&&b| b == b'\n').count() as u64;
                let end = csv.position().byte();
                if inner_breaks > 0 && self.is_swallowed(record, end)? {
                    // The row's last line: the parser is now on the line after it.
                    let ended = self.line_offset + line_now.saturating_sub(1);
                    if let Some(rejected) = self.hand_back_after_first_line(Some(ended))? {
                        return Ok(Some(rejected));
                    }
                }
                self.parser()?.get_mut().row_ended_at(end);
                let line = record_start_line(inner_breaks, line_now, self.previous_end);
                self.previous_end = line_now;
                Ok(Some(Row::Fields {
                    line: self.line_offset + line,
                }))
            }
            Err(source) => {
                let failure = ReadFailure {
                    line: self.line_offset + line_now,
                    source,
                };
                let rejected = match overrun {
                    Some(RowOverrun::MultiLine { .. }) => self.hand_back_after_first_line(None)?,
                    Some(RowOverrun::Line { .. }) => self.skip_long_line().await?,
                    None => None,
                };
                // The parser grew the record to the limit without finishing it: let that go.
                *record = ByteRecord::new();
                rejected.map(Some).ok_or(failure)
            }
        }
    }

    fn parser(&mut self) -> Result<&mut AsyncReader<LfLineEndings<R>>, ReadFailure> {
        let line = self.line_offset + self.previous_end;
        self.csv.as_mut().ok_or_else(|| ReadFailure {
            line,
            source: std::io::Error::other("reading was cancelled while a row was handed back")
                .into(),
        })
    }

    /// The hallmarks of a stray quote on a row the parser read over several lines, ending at
    /// `end`: not a valid row's field count or field sizes, or a quote closed astray.
    fn is_swallowed(&mut self, record: &ByteRecord, end: u64) -> Result<bool, ReadFailure> {
        let Some(width) = self.width else {
            return Ok(false);
        };
        if record.len() != width || record.iter().any(|field| field.len() > MAX_FIELD_BYTES) {
            return Ok(true);
        }
        let lines = self.parser()?.get_mut();
        Ok(lines.open_row_closes_astray(end) == Some(true))
    }

    /// Rejects the first line of the open row as an unterminated quote and reads the lines after
    /// it again. `ended` is the row's last line when the parser finished it, `None` when it ran on
    /// too long (it then ends where reading stopped). `None` if the row cannot be handed back.
    fn hand_back_after_first_line(
        &mut self,
        ended: Option<u64>,
    ) -> Result<Option<Row>, ReadFailure> {
        let Some((taken, lines)) = self.take_open_row()? else {
            return Ok(None);
        };
        let line = self.first_line_of(&taken);
        self.read_on_after(lines, line);
        Ok(Some(Row::Rejected {
            line,
            rejection: RowRejection::UnterminatedQuote {
                opened: line,
                ended: ended.unwrap_or(line + taken.later_breaks),
            },
            raw: raw_line_excerpt(&taken.head, taken.line_len),
        }))
    }

    /// Rejects a line that ran over `--max-row-bytes` without a line break and skips the rest of it.
    async fn skip_long_line(&mut self) -> Result<Option<Row>, ReadFailure> {
        let Some((taken, mut lines)) = self.take_open_row()? else {
            return Ok(None);
        };
        let line = self.first_line_of(&taken);
        let skipped = lines.skip_line().await.map_err(|source| ReadFailure {
            line,
            source: source.into(),
        })?;
        self.read_on_after(lines, line);
        let bytes = taken.line_len + skipped;
        Ok(Some(Row::Rejected {
            line,
            rejection: RowRejection::RowTooLong {
                bytes,
                limit: self.max_row_bytes,
            },
            raw: raw_line_excerpt(&taken.head, bytes),
        }))
    }

    /// Takes the open row back from the parser, which is done with.
    fn take_open_row(&mut self) -> Result<Option<(TakenRow, LfLineEndings<R>)>, ReadFailure> {
        let Some(taken) = self.parser()?.get_mut().take_open_row() else {
            return Ok(None);
        };
        Ok(self.csv.take().map(|csv| (taken, csv.into_inner())))
    }

    fn first_line_of(&self, taken: &TakenRow) -> u64 {
        self.line_offset + self.previous_end + taken.leading_breaks
    }

    /// Reads on with a new parser, on the line after `line`.
    fn read_on_after(&mut self, lines: LfLineEndings<R>, line: u64) {
        self.csv = Some(parser(lines));
        self.line_offset = line;
        self.previous_end = 1;
    }
}

/// How the reader parses CSV: line endings normalised to LF first (see [`LfLineEndings`]), rows
/// of any width (the layout judges the count, so a short row is a rejection, not an error), the
/// header read as an ordinary row.
fn parser<R: AsyncRead + Unpin + Send>(lines: LfLineEndings<R>) -> AsyncReader<LfLineEndings<R>> {
    AsyncReaderBuilder::new()
        .flexible(true)
        .has_headers(false)
        .terminator(csv_async::Terminator::Any(b'\n'))
        .buffer_capacity(64 * 1024)
        .create_reader(lines)
}

/// The line a record just read starts on. Every record ends with exactly one `\n` (see
/// [`LfLineEndings`]), so it starts `1 + (line breaks inside its quoted fields)` lines before the
/// line the reader is now on; blank lines skipped before it are accounted for that way too. An
/// unterminated quote at the end of the file swallows the final line break: the start is then
/// never before the end of the previous record.
fn record_start_line(inner_breaks: u64, line_now: u64, previous_end: u64) -> u64 {
    line_now.saturating_sub(inner_breaks + 1).max(previous_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the reader makes of `input`: per row its line and first field, or its rejection.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Row(u64, String),
        Rejected(u64, RowRejection),
    }

    async fn read_all(input: &[u8], max_row_bytes: u64) -> (Vec<Seen>, Vec<String>) {
        read_from(input, max_row_bytes).await
    }

    async fn read_from(
        input: impl AsyncRead + Unpin + Send,
        max_row_bytes: u64,
    ) -> (Vec<Seen>, Vec<String>) {
        let mut rows = RowReader::new(input, max_row_bytes);
        let mut record = ByteRecord::new();
        assert!(rows.read_header(&mut record).await.expect("header"));
        rows.expect_width(record.len()).expect("width");
        let (mut seen, mut raws) = (Vec::new(), Vec::new());
        while let Some(row) = rows.next(&mut record).await.expect("row") {
            seen.push(match row {
                Row::Fields { line } => {
                    let first = record.get(0).unwrap_or_default();
                    Seen::Row(line, String::from_utf8_lossy(first).into_owned())
                }
                Row::Rejected {
                    line,
                    rejection,
                    raw,
                } => {
                    raws.push(raw);
                    Seen::Rejected(line, rejection)
                }
            });
        }
        (seen, raws)
    }

    fn valid_rows(first_id: u64, count: u64) -> Vec<u8> {
        let mut rows = Vec::new();
        for id in first_id..first_id + count {
            rows.extend_from_slice(
                format!("{id},First{id},Last{id},person{id}@example.com,555-{id}\n").as_bytes(),
            );
        }
        rows
    }

    /// Rows `first_id..` as the reader must see them, starting on `first_line`.
    fn expected_rows(first_line: u64, first_id: u64, count: u64) -> Vec<Seen> {
        (0..count)
            .map(|i| Seen::Row(first_line + i, (first_id + i).to_string()))
            .collect()
    }

    const HEADER: &[u8] = b"id,first_name,last_name,email,phone\n";

    #[tokio::test]
    async fn start_lines_are_exact_after_crlf_blank_lines_and_quoted_line_breaks() {
        let input: &[u8] = b"h1,h2\r\na,1\r\n\r\n\nb,2\n\"x\r\ny\",3\r\nlast,4";
        let (seen, _) = read_all(input, u64::MAX).await;
        let expected = vec![
            Seen::Row(2, "a".into()),
            Seen::Row(5, "b".into()),
            Seen::Row(6, "x\ny".into()),
            Seen::Row(8, "last".into()),
        ];
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn a_quote_that_never_closes_costs_its_own_line_only() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(&valid_rows(1, 3));
        input.extend_from_slice(b"4,\"Unterminated,Poe,u@example.com,6\n"); // line 5
        input.extend_from_slice(&valid_rows(5, 10_000));
        let (seen, raws) = read_all(&input, u64::MAX).await;
        assert_eq!(seen.len(), 3 + 1 + 10_000);
        assert_eq!(seen[..3], expected_rows(2, 1, 3));
        let Seen::Rejected(5, RowRejection::UnterminatedQuote { opened, ended }) = &seen[3] else {
            panic!("line 5 is not an unterminated quote: {:?}", seen[3]);
        };
        // Reading stopped soon after the row passed the size no valid row of five fields reaches
        // (checked per 64 KiB read), long before the end of the file.
        assert_eq!(*opened, 5);
        assert!((6..2000).contains(ended), "{ended}");
        assert_eq!(raws, ["4,\"Unterminated,Poe,u@example.com,6"]);
        assert_eq!(seen[4..], expected_rows(6, 5, 10_000));
    }

    #[tokio::test]
    async fn a_stray_quote_closed_by_another_one_lines_later() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(&valid_rows(1, 2));
        input.extend_from_slice(b"3,\"Stray,Poe,s@example.com,1\n"); // line 4
        input.extend_from_slice(&valid_rows(4, 29)); // lines 5-33
        input.extend_from_slice(b"33,Ann \"Annie,Lee,ann@example.com,2\n"); // line 34 closes it
        input.extend_from_slice(&valid_rows(34, 5)); // lines 35-39
        let (seen, _) = read_all(&input, u64::MAX).await;
        let mut expected = expected_rows(2, 1, 2);
        expected.push(Seen::Rejected(
            4,
            RowRejection::UnterminatedQuote {
                opened: 4,
                ended: 34,
            },
        ));
        expected.extend(expected_rows(5, 4, 35));
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn every_stray_quote_is_caught_where_it_opens() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"1,\"One,Poe,a@example.com,1\n"); // line 2
        input.extend_from_slice(&valid_rows(2, 10)); // lines 3-12
        input.extend_from_slice(b"12,\"Two,Poe,b@example.com,1\n"); // line 13
        input.extend_from_slice(&valid_rows(13, 2000)); // lines 14-2013
        input.extend_from_slice(b"2013,Three,\"Poe,c@example.com,1"); // line 2014, no line break
        let (seen, raws) = read_all(&input, u64::MAX).await;
        let rejected: Vec<(u64, &'static str)> = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Rejected(line, rejection) => Some((*line, rejection.kind())),
                Seen::Row(..) => None,
            })
            .collect();
        assert_eq!(
            rejected,
            [
                (2, "unterminated_quote"),
                (13, "unterminated_quote"),
                (2014, "unterminated_quote")
            ]
        );
        assert_eq!(raws[2], "2013,Three,\"Poe,c@example.com,1");
        let rows: Vec<&Seen> = seen.iter().filter(|s| matches!(s, Seen::Row(..))).collect();
        let expected: Vec<Seen> = expected_rows(3, 2, 10)
            .into_iter()
            .chain(expected_rows(14, 13, 2000))
            .collect();
        assert_eq!(rows, expected.iter().collect::<Vec<_>>());
        let last = RowRejection::UnterminatedQuote {
            opened: 2014,
            ended: 2014,
        };
        assert!(last.to_string().contains("end of the file"), "{last}");
    }

    #[tokio::test]
    async fn a_valid_row_over_several_lines_stays_one_row() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"1,Ann,Lee,ann@example.com,\"line one\r\nline two\nthree\"\n");
        input.extend_from_slice(&valid_rows(2, 2));
        // Not valid (four fields), but on one line: an ordinary rejection, not a stray quote.
        input.extend_from_slice(b"4,\"Bo\",Ek,bo@example.com\n");
        let (seen, _) = read_all(&input, u64::MAX).await;
        let mut expected = vec![Seen::Row(2, "1".into())];
        expected.extend(expected_rows(5, 2, 2));
        expected.push(Seen::Row(7, "4".into()));
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn blank_lines_and_crlf_before_a_stray_quote_keep_lines_exact() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"1,Ann,Lee,ann@example.com,1\r\n\r\n\r\n"); // line 2, blanks 3-4
        input.extend_from_slice(b"2,\"Stray,Poe,s@example.com,1\r\n"); // line 5
        input.extend_from_slice(b"3,Bo,Ek,bo@example.com,2\r\n\r\n"); // line 6, blank 7
        input.extend_from_slice(b"4,Cy,Oh,cy@example.com,3\r\n"); // line 8
        let (seen, _) = read_all(&input, u64::MAX).await;
        assert_eq!(
            seen,
            [
                Seen::Row(2, "1".into()),
                Seen::Rejected(
                    5,
                    RowRejection::UnterminatedQuote {
                        opened: 5,
                        ended: 8
                    }
                ),
                Seen::Row(6, "3".into()),
                Seen::Row(8, "4".into()),
            ]
        );
    }

    #[tokio::test]
    async fn a_line_over_the_row_limit_is_rejected_and_reading_goes_on() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(&valid_rows(1, 2));
        input.extend_from_slice(b"3,");
        input.extend(std::iter::repeat_n(b'x', 500_000)); // line 4
        input.extend_from_slice(b",Lee,a@b.io,1\n");
        input.extend_from_slice(&valid_rows(4, 3));
        let (seen, raws) = read_all(&input, 100_000).await;
        let mut expected = expected_rows(2, 1, 2);
        expected.push(Seen::Rejected(
            4,
            RowRejection::RowTooLong {
                bytes: 500_015,
                limit: 100_000,
            },
        ));
        expected.extend(expected_rows(5, 4, 3));
        assert_eq!(seen, expected);
        assert!(raws[0].starts_with("3,xxx"), "{}", raws[0]);
        assert!(raws[0].ends_with("of 500015 bytes shown]"), "{}", raws[0]);

        // The same line as the file's last, without a line break.
        let mut input = HEADER.to_vec();
        input.extend_from_slice(&valid_rows(1, 1));
        input.extend(std::iter::repeat_n(b'y', 300_000));
        let (seen, _) = read_all(&input, 100_000).await;
        assert_eq!(seen.len(), 2);
        assert!(
            matches!(
                seen[1],
                Seen::Rejected(3, RowRejection::RowTooLong { bytes: 300_000, .. })
            ),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_quote_opening_on_a_long_line_is_bounded_by_the_row_limit() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"1,\"");
        input.extend(std::iter::repeat_n(b'z', 200_000)); // line 2, over the limit
        input.extend_from_slice(b"\n");
        input.extend_from_slice(&valid_rows(2, 3));
        let (seen, _) = read_all(&input, 100_000).await;
        assert!(
            matches!(seen[0], Seen::Rejected(2, RowRejection::RowTooLong { .. })),
            "{seen:?}"
        );
        assert_eq!(seen[1..], expected_rows(3, 2, 3));
    }

    #[tokio::test]
    async fn a_stray_quote_on_a_line_too_long_to_keep_whole_is_still_split() {
        let mut input = HEADER.to_vec();
        let long = "a".repeat(5000);
        input.extend_from_slice(format!("1,\"{long},Poe,p@example.com,1\n").as_bytes()); // line 2
        input.extend_from_slice(&valid_rows(2, 10)); // lines 3-12
        let (seen, raws) = read_all(&input, u64::MAX).await;
        assert!(
            matches!(
                seen[0],
                Seen::Rejected(2, RowRejection::UnterminatedQuote { opened: 2, .. })
            ),
            "{seen:?}"
        );
        assert_eq!(seen[1..], expected_rows(3, 2, 10));
        assert!(raws[0].starts_with("1,\"aaa"), "{}", raws[0]);
        assert!(raws[0].ends_with("of 5023 bytes shown]"), "{}", raws[0]);
    }

    /// Hands out `step` bytes per read, so rows and stretches straddle every kind of boundary.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len()).min(out.remaining());
            out.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// However the input arrives, every line with a stray quote is rejected where it opens and
        /// every other line is a row on its exact line.
        #[test]
        fn each_stray_quote_costs_its_line_only_however_the_input_arrives(
            lines in proptest::collection::vec((0u8..20, proptest::bool::ANY), 1..400),
            step in proptest::sample::select(vec![1usize, 5, 64, 1000, 100_000]),
        ) {
            let mut input = HEADER.to_vec();
            let mut expected = Vec::new();
            for (line, (kind, crlf)) in (2u64..).zip(&lines) {
                let id = line * 10;
                let text = match kind {
                    0 => String::new(),
                    1 | 2 => format!("{id},\"Stray,Poe,p{id}@example.com,1"),
                    _ => format!("{id},First,Last,p{id}@example.com,1"),
                };
                input.extend_from_slice(text.as_bytes());
                input.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
                match kind {
                    0 => {}
                    1 | 2 => expected.push((line, "unterminated_quote".to_owned())),
                    _ => expected.push((line, id.to_string())),
                }
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let (seen, _) = runtime.block_on(read_from(Trickle { data: &input, step }, u64::MAX));
            let seen: Vec<(u64, String)> = seen
                .into_iter()
                .map(|s| match s {
                    Seen::Row(line, id) => (line, id),
                    Seen::Rejected(line, rejection) => (line, rejection.kind().to_owned()),
                })
                .collect();
            proptest::prop_assert_eq!(seen, expected);
        }
    }
}
