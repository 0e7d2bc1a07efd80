//! Opening the input (a file, plain or gzip, or standard input), its identity for checkpoints, and
//! the checks that refuse what is not a CSV before anything is published.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use async_compression::tokio::bufread::GzipDecoder;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt, BufReader};
use tokio_util::io::InspectReader;

use customer_record::MAX_FIELD_BYTES;

use crate::ReaderError;
use crate::message::MAX_RAW_BYTES;

/// How much of the file's start its identity hashes: enough to tell a replaced file from the one a
/// checkpoint was taken of, cheap enough to read on every start.
pub const HEAD_BYTES: u64 = 64 * 1024;

const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Which file a checkpoint belongs to, and what it looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentity {
    /// As shown in headers and checkpoints: canonical where possible, `-` for standard input.
    pub path: String,
    /// Bytes on disk (compressed for `.gz`); 0 for standard input.
    pub size: u64,
    /// BLAKE3 (hex) of the first [`HEAD_BYTES`]; empty for standard input.
    pub head_hash: String,
    /// Last modification, nanoseconds since the Unix epoch: a file rewritten in place with the
    /// same size and first bytes (one phone number changed deep inside a nightly export) is a new
    /// content all the same. None for standard input or where the file system has no times.
    pub modified_ns: Option<u64>,
    /// The checkpoint's KV key: KV keys allow few characters, paths any, so the path is hashed.
    pub key: String,
    pub is_stdin: bool,
}

impl FileIdentity {
    fn for_file(canonical_path: &str, size: u64, modified_ns: Option<u64>, head: &[u8]) -> Self {
        FileIdentity {
            path: canonical_path.to_owned(),
            size,
            head_hash: blake3::hash(head).to_hex().to_string(),
            modified_ns,
            key: file_key(canonical_path),
            is_stdin: false,
        }
    }

    /// Standard input cannot be resumed, so each run gets a key of its own: the counters of every
    /// run still add up in the checkpoints bucket.
    fn for_stdin() -> Self {
        let started = chrono::Utc::now().timestamp_micros();
        FileIdentity {
            path: "-".to_owned(),
            size: 0,
            head_hash: String::new(),
            modified_ns: None,
            key: format!("stdin-{started}"),
            is_stdin: true,
        }
    }
}

/// The checkpoint key of a file, from its canonical path.
pub fn file_key(canonical_path: &str) -> String {
    format!(
        "file-{}",
        &blake3::hash(canonical_path.as_bytes()).to_hex()[..40]
    )
}

pub type InputReader = BufReader<Pin<Box<dyn AsyncRead + Send>>>;

/// An opened input, checked to look like text, positioned at its first byte.
pub struct OpenedInput {
    pub identity: FileIdentity,
    pub reader: InputReader,
    /// Bytes taken from the file so far (compressed bytes for `.gz`), for progress.
    pub bytes_read: Arc<AtomicU64>,
}

/// Opens `path` (`-` for standard input). Refuses, as input errors, a missing or unreadable path,
/// a directory, an empty file and a binary one.
pub async fn open(path: &Path) -> Result<OpenedInput, ReaderError> {
    let bytes_read = Arc::new(AtomicU64::new(0));
    let counter = bytes_read.clone();
    let count = move |chunk: &[u8]| {
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    };
    let shown = path.display().to_string();
    let (identity, raw): (FileIdentity, Pin<Box<dyn AsyncRead + Send>>) = if shown == "-" {
        let stdin = InspectReader::new(tokio::io::stdin(), count);
        (FileIdentity::for_stdin(), Box::pin(stdin))
    } else {
        let metadata = tokio::fs::metadata(path)
            .await
            .map_err(|source| input_error(&shown, source))?;
        if metadata.is_dir() {
            return Err(ReaderError::IsDirectory { path: shown });
        }
        let canonical = tokio::fs::canonicalize(path)
            .await
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| shown.clone());
        let canonical = header_safe(&canonical);
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|source| input_error(&shown, source))?;
        let mut head = Vec::with_capacity(HEAD_BYTES as usize);
        (&mut file)
            .take(HEAD_BYTES)
            .read_to_end(&mut head)
            .await
            .map_err(|source| input_error(&shown, source))?;
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|source| input_error(&shown, source))?;
        let modified_ns = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        let identity = FileIdentity::for_file(&canonical, metadata.len(), modified_ns, &head);
        (identity, Box::pin(InspectReader::new(file, count)))
    };
    let gzip = shown.ends_with(".gz");
    let decoded: Pin<Box<dyn AsyncRead + Send>> = if gzip {
        let mut decoder = GzipDecoder::new(BufReader::with_capacity(READ_BUFFER_BYTES, raw));
        // A file of several gzip members (as `cat a.gz b.gz` makes) is one CSV.
        decoder.multiple_members(true);
        Box::pin(decoder)
    } else {
        raw
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, decoded);
    let head = reader.fill_buf().await.map_err(|source| {
        if gzip {
            ReaderError::NotCsv {
                path: shown.clone(),
                reason: format!("cannot decompress it as gzip: {source}"),
            }
        } else {
            input_error(&shown, source)
        }
    })?;
    if head.is_empty() {
        return Err(ReaderError::Empty { path: shown });
    }
    if looks_binary(head) {
        return Err(ReaderError::NotCsv {
            path: shown,
            reason: "NUL bytes in its first line or throughout its first bytes: it is binary \
                     (or UTF-16), not UTF-8 text"
                .to_owned(),
        });
    }
    Ok(OpenedInput {
        identity,
        reader,
        bytes_read,
    })
}

/// Normalises line endings to LF as the bytes stream past: `\r\n` becomes `\n` (inside quoted
/// fields too, so the same export saved on Windows or on Unix hashes the same), and a final line
/// break is added if the input lacks one. Every record then ends with exactly one `\n`, which is
/// what lets the reader compute the line a record starts on (csv-async reports where it started
/// looking, which is off after a CRLF or a blank line). A lone `\r` is kept as data.
///
/// It also keeps what the CSV parser would lose when a stray quote makes it read many lines as one
/// row. The parser owns the row it is reading, and whatever it buffered is lost with it; so this
/// keeps the bytes handed out since the end of the last row the reader returned (which the reader
/// reports with [`LfLineEndings::row_ended_at`]): the row's first line (its first
/// [`MAX_RAW_BYTES`], for the rejection) and everything after it. [`LfLineEndings::take_open_row`]
/// then hands everything after that first line out again, to a new parser.
///
/// And it bounds that open row, since the parser holds a whole row in memory: an unterminated quote
/// in a 50 GB file would otherwise swallow the rest of the file into one row. Reading fails with a
/// [`RowOverrun`] (see [`LfLineEndings::overrun`]) once the open row runs on past the limits.
/// The checks and the bookkeeping run once per chunk read from the input, never per row.
pub struct LfLineEndings<R> {
    inner: R,
    scratch: Box<[u8]>,
    /// The chunk being handed out: input with line endings converted, or bytes handed back.
    ready: Vec<u8>,
    ready_from: usize,
    /// Where `ready[0]` sits in the bytes handed out since the current parser started.
    ready_base: u64,
    /// `ready[..kept_upto]` is already in `open` (or belongs to rows that ended).
    kept_upto: usize,
    held_cr: bool,
    last_byte: Option<u8>,
    finished: bool,
    row_end: u64,
    open: OpenRow,
    limits: RowLimits,
    overrun: Option<RowOverrun>,
}

/// How far a row may run on before the reader stops parsing it as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLimits {
    /// A line with no line break in it (`--max-row-bytes`).
    pub line_bytes: u64,
    /// A row that spans several lines: no valid row of the file's width can be this big.
    pub multi_line_bytes: u64,
}

impl RowLimits {
    /// Until the header is read only `--max-row-bytes` applies.
    pub fn new(max_row_bytes: u64) -> Self {
        RowLimits {
            line_bytes: max_row_bytes,
            multi_line_bytes: max_row_bytes,
        }
    }

    /// For rows of `width` fields: each at most [`MAX_FIELD_BYTES`] of text, which quoting at worst
    /// doubles (every character a `""`), plus its quotes and delimiter, and some slack.
    pub fn for_width(max_row_bytes: u64, width: usize) -> Self {
        let per_field = 2 * MAX_FIELD_BYTES as u64 + 3;
        let valid_row = (width as u64).saturating_mul(per_field);
        RowLimits {
            line_bytes: max_row_bytes,
            multi_line_bytes: valid_row.saturating_add(16 * 1024).min(max_row_bytes),
        }
    }
}

/// Why [`LfLineEndings`] stopped handing out bytes: the open row ran on past a [`RowLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RowOverrun {
    #[error(
        "a line runs on for over {limit} bytes without a line break (--max-row-bytes): it is not \
         a CSV row"
    )]
    Line { limit: u64 },
    #[error(
        "a row runs on over several lines for over {limit} bytes, more than any valid row of \
         this file can be: an unterminated quote"
    )]
    MultiLine { limit: u64 },
}

/// The bytes of the row the parser is reading, from the end of the last row it returned.
#[derive(Debug, Default)]
struct OpenRow {
    start: u64,
    leading_breaks: u64,
    head: Vec<u8>,
    line_len: u64,
    line_done: bool,
    rest: Vec<u8>,
    /// The reader reported a row end this could not follow: it cannot hand the row back.
    untracked: bool,
}

impl OpenRow {
    fn restart(&mut self, start: u64) {
        self.start = start;
        self.leading_breaks = 0;
        self.head.clear();
        self.line_len = 0;
        self.line_done = false;
        self.rest.clear();
        // After a big swallowed stretch, do not carry its buffer along.
        if self.rest.capacity() > 1024 * 1024 {
            self.rest = Vec::new();
        }
        self.untracked = false;
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        if self.line_done {
            self.rest.extend_from_slice(bytes);
            return;
        }
        if self.line_len == 0 {
            // The parser skips blank lines before a row.
            let blanks = bytes.iter().take_while(|&&b| b == b'\n').count();
            self.leading_breaks += blanks as u64;
            bytes = &bytes[blanks..];
        }
        let line_end = bytes.iter().position(|&b| b == b'\n');
        let line = &bytes[..line_end.unwrap_or(bytes.len())];
        let room = MAX_RAW_BYTES.saturating_sub(self.head.len());
        self.head.extend_from_slice(&line[..line.len().min(room)]);
        self.line_len += line.len() as u64;
        if let Some(end) = line_end {
            self.line_done = true;
            self.rest.extend_from_slice(&bytes[end + 1..]);
        }
    }

    fn size(&self) -> u64 {
        if self.line_done {
            self.line_len + 1 + self.rest.len() as u64
        } else {
            self.line_len
        }
    }
}

/// A row taken back from [`LfLineEndings`]: its first line, and how many lines came after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenRow {
    /// Blank lines between the previous row and this row's first line.
    pub leading_breaks: u64,
    /// The first line's first bytes (at most [`MAX_RAW_BYTES`]), without its line break.
    pub head: Vec<u8>,
    /// The first line's length as far as it was read, without its line break.
    pub line_len: u64,
    /// Line breaks handed out after the first line's.
    pub later_breaks: u64,
}

impl<R> LfLineEndings<R> {
    pub fn new(inner: R, max_row_bytes: u64) -> Self {
        LfLineEndings {
            inner,
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
            ready: Vec::with_capacity(64 * 1024 + 2),
            ready_from: 0,
            ready_base: 0,
            kept_upto: 0,
            held_cr: false,
            last_byte: None,
            finished: false,
            row_end: 0,
            open: OpenRow::default(),
            limits: RowLimits::new(max_row_bytes),
            overrun: None,
        }
    }

    /// The parser returned a row that ended `byte` bytes into what this handed out since the
    /// parser started (`csv.position().byte()`). Every row must be reported, in order.
    pub fn row_ended_at(&mut self, byte: u64) {
        self.row_end = byte;
    }

    pub fn set_limits(&mut self, limits: RowLimits) {
        self.limits = limits;
    }

    /// Why reading failed, if it failed because the open row ran on too long.
    pub fn overrun(&self) -> Option<RowOverrun> {
        self.overrun
    }

    /// Takes the open row back: returns its first line and arranges for everything handed out
    /// after that line (and everything not handed out yet) to be handed out again, counted from 0
    /// for the new parser that must read it. The parser that read the row must not be used again.
    /// `None` (and nothing changed) if the row cannot be taken back.
    pub fn take_open_row(&mut self) -> Option<TakenRow> {
        self.keep_open_row();
        if self.open.untracked {
            return None;
        }
        let mut open = std::mem::take(&mut self.open);
        let later_breaks = open.rest.iter().filter(|&&b| b == b'\n').count() as u64;
        let mut again = std::mem::take(&mut open.rest);
        again.extend_from_slice(&self.ready[self.ready_from..]);
        self.ready = again;
        self.restart_count();
        Some(TakenRow {
            leading_breaks: open.leading_breaks,
            head: open.head,
            line_len: open.line_len,
            later_breaks,
        })
    }

    /// What is handed out next is byte 0 for a new parser.
    fn restart_count(&mut self) {
        self.ready_from = 0;
        self.ready_base = 0;
        self.kept_upto = 0;
        self.row_end = 0;
        self.open.restart(0);
        self.overrun = None;
    }

    /// Adds what was handed out of the current chunk to the open row, when the parser comes back
    /// for more or the row is looked at. Every row that ended before has been reported by then, so
    /// the open row starts at the last reported end: in this chunk if a row ended since the last
    /// call (the parser returns a row as soon as it reads its line break, before it needs more).
    fn keep_open_row(&mut self) {
        if self.row_end != self.open.start {
            if self.row_end < self.ready_base || self.row_end < self.open.start {
                debug_assert!(false, "a row end was not reported in order");
                self.open.restart(self.row_end);
                self.open.untracked = true;
                return;
            }
            self.open.restart(self.row_end);
            self.kept_upto = usize::try_from(self.row_end - self.ready_base)
                .unwrap_or(usize::MAX)
                .min(self.ready_from);
        }
        if self.open.untracked {
            return;
        }
        self.open.feed(&self.ready[self.kept_upto..self.ready_from]);
        self.kept_upto = self.ready_from;
    }

    /// Whether the open row, up to `end`, has a quoted field that spans lines and closes with
    /// its quote followed by more text (`"a⏎b"c`) instead of a delimiter or line break: what a stray
    /// quote closing another stray quote lines later looks like, even when the field count happens
    /// to match. `None` if that cannot be told (the row's first line was too long to keep).
    pub fn open_row_closes_astray(&mut self, end: u64) -> Option<bool> {
        self.keep_open_row();
        let open = &self.open;
        if open.untracked || !open.line_done || open.line_len > open.head.len() as u64 {
            return None;
        }
        let rest_start = open.start + open.leading_breaks + open.line_len + 1;
        let rest_len = usize::try_from(end.checked_sub(rest_start)?).ok()?;
        let rest = open.rest.get(..rest_len)?;
        let row = open.head.iter().chain(b"\n").chain(rest);
        Some(closes_astray(row.copied()))
    }

    fn check_limits(&self) -> Option<RowOverrun> {
        let limits = self.limits;
        if self.open.line_done {
            let limit = limits.multi_line_bytes.min(limits.line_bytes);
            (self.open.size() > limit).then_some(RowOverrun::MultiLine { limit })
        } else {
            let limit = limits.line_bytes;
            (self.open.line_len > limit).then_some(RowOverrun::Line { limit })
        }
    }

    fn convert(&mut self, filled: usize) {
        self.ready.clear();
        self.ready_from = 0;
        for &byte in &self.scratch[..filled] {
            if std::mem::take(&mut self.held_cr) && byte != b'\n' {
                self.ready.push(b'\r');
            }
            if byte == b'\r' {
                self.held_cr = true;
            } else {
                self.ready.push(byte);
            }
        }
        if let Some(&last) = self.ready.last() {
            self.last_byte = Some(last);
        }
    }

    fn finish(&mut self) {
        self.ready.clear();
        self.ready_from = 0;
        if std::mem::take(&mut self.held_cr) {
            self.ready.push(b'\r');
            self.last_byte = Some(b'\r');
        }
        if self.last_byte.is_some_and(|b| b != b'\n') {
            self.ready.push(b'\n');
        }
        self.finished = true;
    }
}

/// See [`LfLineEndings::open_row_closes_astray`]; the quoting rules are the CSV parser's.
fn closes_astray(row: impl Iterator<Item = u8>) -> bool {
    enum State {
        FieldStart,
        Unquoted,
        Quoted { spans_lines: bool },
        QuoteInQuoted { spans_lines: bool },
    }
    let mut state = State::FieldStart;
    for byte in row {
        state = match (state, byte) {
            (State::FieldStart, b'"') => State::Quoted { spans_lines: false },
            (State::FieldStart | State::Unquoted, b',' | b'\n') => State::FieldStart,
            (State::FieldStart | State::Unquoted, _) => State::Unquoted,
            (State::Quoted { spans_lines }, b'"') => State::QuoteInQuoted { spans_lines },
            (State::Quoted { spans_lines }, byte) => State::Quoted {
                spans_lines: spans_lines || byte == b'\n',
            },
            (State::QuoteInQuoted { spans_lines }, b'"') => State::Quoted { spans_lines },
            (State::QuoteInQuoted { .. }, b',' | b'\n') => State::FieldStart,
            (State::QuoteInQuoted { spans_lines }, _) => {
                if spans_lines {
                    return true;
                }
                State::Unquoted
            }
        };
    }
    false
}

impl<R: AsyncRead + Unpin> LfLineEndings<R> {
    /// Replaces the handed-out chunk with the next one from the input.
    fn poll_next_chunk(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let mut scratch = tokio::io::ReadBuf::new(&mut self.scratch);
        std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut scratch))?;
        let filled = scratch.filled().len();
        self.ready_base += self.ready.len() as u64;
        self.kept_upto = 0;
        if filled == 0 {
            self.finish();
        } else {
            self.convert(filled);
        }
        Poll::Ready(Ok(()))
    }

    /// Skips the rest of the current line (after [`Self::take_open_row`] took its start back), so
    /// that a new parser starts on the next line. Returns the bytes skipped.
    pub async fn skip_line(&mut self) -> std::io::Result<u64> {
        let mut skipped = 0u64;
        loop {
            let rest = &self.ready[self.ready_from..];
            if let Some(end) = rest.iter().position(|&b| b == b'\n') {
                skipped += end as u64;
                let next_line = self.ready_from + end + 1;
                self.ready.drain(..next_line);
                self.restart_count();
                return Ok(skipped);
            }
            skipped += rest.len() as u64;
            self.ready_from = self.ready.len();
            if self.finished {
                self.restart_count();
                return Ok(skipped);
            }
            std::future::poll_fn(|cx| self.poll_next_chunk(cx)).await?;
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for LfLineEndings<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                let available = &this.ready[this.ready_from..];
                let n = available.len().min(out.remaining());
                out.put_slice(&available[..n]);
                this.ready_from += n;
                return Poll::Ready(Ok(()));
            }
            if this.finished {
                return Poll::Ready(Ok(()));
            }
            this.keep_open_row();
            if let Some(overrun) = this.overrun.or_else(|| this.check_limits()) {
                this.overrun = Some(overrun);
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    overrun,
                )));
            }
            std::task::ready!(this.poll_next_chunk(cx))?;
        }
    }
}

/// Binary files (images, archives, executables) and UTF-16 text are full of NUL bytes from the
/// start; a CSV export may still carry a stray NUL inside one row, which is that row's problem (it
/// is rejected on its own), not the file's. So: NUL in the first line (the header), or in more than
/// 1% of the first bytes, means the file is not UTF-8 text.
fn looks_binary(head: &[u8]) -> bool {
    let first_line = head.split(|b| *b == b'\n').next().unwrap_or(head);
    let nuls = head.iter().filter(|b| **b == 0).count();
    first_line.contains(&0) || nuls * 100 > head.len()
}

/// Header values may not contain line breaks; a path that does is shown with them replaced.
fn header_safe(text: &str) -> String {
    text.replace(['\r', '\n'], "?")
}

fn input_error(path: &str, source: std::io::Error) -> ReaderError {
    if source.kind() == std::io::ErrorKind::NotFound {
        ReaderError::Missing {
            path: path.to_owned(),
        }
    } else {
        ReaderError::Unreadable {
            path: path.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_key_is_a_valid_kv_key_and_depends_on_the_path_only() {
        let a = FileIdentity::for_file("/data/a b/ü.csv", 10, Some(1), b"id,x");
        let b = FileIdentity::for_file("/data/a b/ü.csv", 20, Some(2), b"id,y");
        assert_eq!(a.key, b.key);
        assert_ne!(a.head_hash, b.head_hash);
        assert!(
            a.key
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        );
        assert_ne!(
            a.key,
            FileIdentity::for_file("/data/other.csv", 10, None, b"").key
        );
    }

    #[test]
    fn binary_is_recognised_by_nul_bytes() {
        assert!(looks_binary(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"));
        assert!(!looks_binary("id,name\n1,Zoë\n".as_bytes()));
        assert!(looks_binary("i\0d\0,\0n\0\n\0".as_bytes()), "UTF-16");
        let mut one_stray = b"id,name\n".to_vec();
        one_stray.extend(std::iter::repeat_n(b"1,Ann\n".iter().copied(), 50).flatten());
        one_stray.extend_from_slice(b"2,A\0nn\n");
        assert!(
            !looks_binary(&one_stray),
            "a stray NUL in a row is the row's problem"
        );
    }

    async fn normalised(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        LfLineEndings::new(input, u64::MAX)
            .read_to_end(&mut out)
            .await
            .expect("reading from memory");
        out
    }

    #[tokio::test]
    async fn crlf_becomes_lf_and_a_final_line_break_is_added() {
        assert_eq!(
            normalised(b"a,b\r\n\"x\r\ny\"\r\nc").await,
            b"a,b\n\"x\ny\"\nc\n"
        );
        assert_eq!(normalised(b"a\rb\n").await, b"a\rb\n");
        assert_eq!(normalised(b"a\r").await, b"a\r\n");
        assert_eq!(normalised(b"").await, b"");
    }

    #[tokio::test]
    async fn a_crlf_split_across_reads_is_still_one_line_break() {
        let (mut writer, reader) = tokio::io::duplex(4);
        let feeding = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in [&b"a\r"[..], b"\nb\r", b"\r\n"] {
                writer.write_all(chunk).await.expect("write");
                writer.flush().await.expect("flush");
            }
        });
        let mut out = Vec::new();
        LfLineEndings::new(reader, u64::MAX)
            .read_to_end(&mut out)
            .await
            .expect("read");
        feeding.await.expect("feeder");
        assert_eq!(out, b"a\nb\r\n");
    }

    #[tokio::test]
    async fn a_line_that_never_ends_is_an_overrun_not_unbounded_memory() {
        let endless = vec![b'x'; 1024 * 1024];
        let mut lines = LfLineEndings::new(endless.as_slice(), 200_000);
        let mut out = Vec::new();
        let err = lines.read_to_end(&mut out).await.expect_err("must stop");
        assert!(err.to_string().contains("without a line break"), "{err}");
        assert_eq!(lines.overrun(), Some(RowOverrun::Line { limit: 200_000 }));
        assert!(out.len() < 200_000 + 70_000, "{}", out.len());

        let mut out = Vec::new();
        LfLineEndings::new(endless.as_slice(), 2 * 1024 * 1024)
            .read_to_end(&mut out)
            .await
            .expect("within the limit");
    }

    #[tokio::test]
    async fn a_row_over_many_lines_stops_at_the_width_limit_and_is_handed_back() {
        // A 2-column file: no valid row is over 2 * 2051 + 16 KiB bytes.
        let mut input = b"1,\"open\n".to_vec();
        for i in 0..10_000 {
            input.extend_from_slice(format!("{i},row\n").as_bytes());
        }
        let mut lines = LfLineEndings::new(input.as_slice(), u64::MAX);
        lines.set_limits(RowLimits::for_width(u64::MAX, 2));
        let mut out = Vec::new();
        let err = lines.read_to_end(&mut out).await.expect_err("must stop");
        assert!(err.to_string().contains("unterminated quote"), "{err}");
        let limit = 2 * 2051 + 16 * 1024;
        assert_eq!(lines.overrun(), Some(RowOverrun::MultiLine { limit }));

        let taken = lines.take_open_row().expect("taken back");
        assert_eq!(taken.head, b"1,\"open");
        assert_eq!((taken.leading_breaks, taken.line_len), (0, 7));
        let handed_out_lines = out.iter().filter(|&&b| b == b'\n').count() as u64;
        assert_eq!(taken.later_breaks, handed_out_lines - 1);
        // Everything after the first line comes again, then the rest of the input. (No parser
        // reports row ends here, so the width limit is lifted.)
        lines.set_limits(RowLimits::new(u64::MAX));
        let mut again = Vec::new();
        lines.read_to_end(&mut again).await.expect("read on");
        assert_eq!(again, &input[8..]);
    }

    #[tokio::test]
    async fn skipping_a_line_goes_on_at_the_next_one() {
        let mut input = b"id\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 300_000));
        input.extend_from_slice(b"\nnext\n");
        let mut lines = LfLineEndings::new(input.as_slice(), 100_000);
        let mut header = [0u8; 3];
        lines.read_exact(&mut header).await.expect("header");
        lines.row_ended_at(3);
        let mut out = Vec::new();
        lines
            .read_to_end(&mut out)
            .await
            .expect_err("over the limit");
        let taken = lines.take_open_row().expect("taken back");
        assert_eq!(taken.head.len(), MAX_RAW_BYTES);
        assert!(taken.line_len > 100_000);
        let skipped = lines.skip_line().await.expect("skipped");
        assert_eq!(taken.line_len + skipped, 300_000);
        let mut rest = Vec::new();
        lines.read_to_end(&mut rest).await.expect("read on");
        assert_eq!(rest, b"next\n");
    }

    #[test]
    fn line_breaks_in_paths_cannot_break_headers() {
        assert_eq!(header_safe("/tmp/a\nb.csv"), "/tmp/a?b.csv");
    }
}
