//! Opening the input (a file, plain or gzip, or standard input), its identity for checkpoints, and
//! the checks that refuse what is not a CSV before anything is published.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_compression::tokio::bufread::GzipDecoder;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt, BufReader};
use tokio_util::io::InspectReader;

use crate::ReaderError;

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
    /// The checkpoint's KV key: KV keys allow few characters, paths any, so the path is hashed.
    pub key: String,
    pub is_stdin: bool,
}

impl FileIdentity {
    fn for_file(canonical_path: &str, size: u64, head: &[u8]) -> Self {
        FileIdentity {
            path: canonical_path.to_owned(),
            size,
            head_hash: blake3::hash(head).to_hex().to_string(),
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
        let identity = FileIdentity::for_file(&canonical, metadata.len(), &head);
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
/// It also bounds one row's size: the CSV parser keeps a whole row in memory, so an unterminated
/// quote in a 50 GB file would otherwise swallow the rest of the file into one row. Once more than
/// `max_row_bytes` have been handed out past the end of the last row the parser returned (which
/// the reader reports through [`RowEnd`]), reading fails with an error that says why.
pub struct LfLineEndings<R> {
    inner: R,
    scratch: Box<[u8]>,
    ready: Vec<u8>,
    ready_from: usize,
    held_cr: bool,
    last_byte: Option<u8>,
    finished: bool,
    delivered: u64,
    row_end: RowEnd,
    max_row_bytes: u64,
}

/// Where, in the bytes [`LfLineEndings`] handed out, the last complete row ended.
#[derive(Debug, Clone, Default)]
pub struct RowEnd(Arc<AtomicU64>);

impl RowEnd {
    pub fn set(&self, byte: u64) {
        self.0.store(byte, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl<R> LfLineEndings<R> {
    pub fn new(inner: R, row_end: RowEnd, max_row_bytes: u64) -> Self {
        LfLineEndings {
            inner,
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
            ready: Vec::with_capacity(64 * 1024 + 2),
            ready_from: 0,
            held_cr: false,
            last_byte: None,
            finished: false,
            delivered: 0,
            row_end,
            max_row_bytes,
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

impl<R: AsyncRead + Unpin> AsyncRead for LfLineEndings<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                let available = &this.ready[this.ready_from..];
                let n = available.len().min(out.remaining());
                out.put_slice(&available[..n]);
                this.ready_from += n;
                this.delivered += n as u64;
                return std::task::Poll::Ready(Ok(()));
            }
            if this.finished {
                return std::task::Poll::Ready(Ok(()));
            }
            let open_row = this.delivered.saturating_sub(this.row_end.get());
            if open_row > this.max_row_bytes {
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "a row runs on for over {} bytes without ending (an unterminated quote?)",
                        this.max_row_bytes
                    ),
                )));
            }
            let mut scratch = tokio::io::ReadBuf::new(&mut this.scratch);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut scratch))?;
            let filled = scratch.filled().len();
            if filled == 0 {
                this.finish();
            } else {
                this.convert(filled);
            }
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
        let a = FileIdentity::for_file("/data/a b/ü.csv", 10, b"id,x");
        let b = FileIdentity::for_file("/data/a b/ü.csv", 20, b"id,y");
        assert_eq!(a.key, b.key);
        assert_ne!(a.head_hash, b.head_hash);
        assert!(
            a.key
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        );
        assert_ne!(
            a.key,
            FileIdentity::for_file("/data/other.csv", 10, b"").key
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
        LfLineEndings::new(input, RowEnd::default(), u64::MAX)
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
        LfLineEndings::new(reader, RowEnd::default(), u64::MAX)
            .read_to_end(&mut out)
            .await
            .expect("read");
        feeding.await.expect("feeder");
        assert_eq!(out, b"a\nb\r\n");
    }

    #[tokio::test]
    async fn a_row_that_never_ends_is_an_error_not_unbounded_memory() {
        let endless = vec![b'x'; 1024 * 1024];
        let row_end = RowEnd::default();
        let mut out = Vec::new();
        let err = LfLineEndings::new(endless.as_slice(), row_end.clone(), 200_000)
            .read_to_end(&mut out)
            .await
            .expect_err("must stop");
        assert!(err.to_string().contains("unterminated quote"), "{err}");
        assert!(out.len() < 200_000 + 70_000, "{}", out.len());

        row_end.set(1024 * 1024);
        let mut out = Vec::new();
        LfLineEndings::new(endless.as_slice(), row_end, 2 * 1024 * 1024)
            .read_to_end(&mut out)
            .await
            .expect("within the limit");
    }

    #[test]
    fn line_breaks_in_paths_cannot_break_headers() {
        assert_eq!(header_safe("/tmp/a\nb.csv"), "/tmp/a?b.csv");
    }
}
