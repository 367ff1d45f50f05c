//! The on-disk console log: one append-only, size-rotated, retention-limited
//! series of framed files per host, and the reader that slices it by time.
//!
//! The format is described in the [module docs](super); this file is the
//! only code that knows it. Records are written in format 2 (a CRC-32C over
//! header and payload); files of format 1 (no checksum, written by older
//! agents) are still read.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// First byte of every record this agent writes (format 2, with a CRC-32C).
pub const RECORD_MAGIC: u8 = 0xC6;
/// First byte of a format 1 record (no checksum), as older agents wrote
/// them; still read.
pub const LEGACY_MAGIC: u8 = 0xC5;
/// Size of a record header: magic, kind, timestamp (u64 LE), length (u32
/// LE), CRC-32C (u32 LE) of the first 14 header bytes and the payload.
pub const HEADER_LEN: usize = 1 + 1 + 8 + 4 + 4;
/// Size of a format 1 header (no CRC).
pub const LEGACY_HEADER_LEN: usize = 1 + 1 + 8 + 4;
/// Largest payload of one record; longer appends are split.
pub const MAX_RECORD_DATA: usize = 64 * 1024;
/// Whole records kept in memory until [`ConsoleLog::flush`] writes them;
/// an append that fills it writes at once.
const WRITE_BUFFER: usize = 64 * 1024;
/// Records kept in memory while the disk refuses writes; past this, new
/// output is dropped (and counted) until a write succeeds again.
const MAX_PENDING: usize = 1024 * 1024;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Bytes read from the console source, unchanged.
    Data,
    /// A marker written by the agent (source lost / reconnected); its bytes
    /// are human-readable text framed by `\r\n`.
    Gap,
}

impl RecordKind {
    fn to_byte(self) -> u8 {
        match self {
            RecordKind::Data => 0,
            RecordKind::Gap => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(RecordKind::Data),
            1 => Some(RecordKind::Gap),
            _ => None,
        }
    }
}

/// One record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Milliseconds since the Unix epoch when the bytes were received
    /// (non-decreasing within a host's log).
    pub ts_ms: u64,
    /// Data or gap marker.
    pub kind: RecordKind,
    /// The bytes.
    pub data: Vec<u8>,
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: RecordKind,
    pub ts_ms: u64,
    /// Payload length.
    pub len: u32,
    /// The CRC-32C the record claims (format 2); `None` for format 1.
    pub crc: Option<u32>,
}

impl Header {
    /// Bytes of this header on disk.
    pub fn size(&self) -> usize {
        if self.crc.is_some() {
            HEADER_LEN
        } else {
            LEGACY_HEADER_LEN
        }
    }
}

/// CRC-32C (Castagnoli) tables for slicing by 8, built at compile time.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let p = t[s - 1][i];
            t[s][i] = (p >> 8) ^ t[0][(p & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
};

/// Continues a CRC-32C over `data` (start with 0; pure).
pub fn crc32c(crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !crc;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let lo = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ c;
        let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in words.remainder() {
        c = t[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Encodes one record (header and payload) onto `out` (pure). `data` must
/// be at most [`MAX_RECORD_DATA`] bytes.
pub fn encode_record(kind: RecordKind, ts_ms: u64, data: &[u8], out: &mut Vec<u8>) {
    debug_assert!(data.len() <= MAX_RECORD_DATA);
    let mut h = [0u8; HEADER_LEN];
    h[0] = RECORD_MAGIC;
    h[1] = kind.to_byte();
    h[2..10].copy_from_slice(&ts_ms.to_le_bytes());
    h[10..14].copy_from_slice(&(data.len() as u32).to_le_bytes());
    let crc = crc32c(crc32c(0, &h[..14]), data);
    h[14..18].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
}

/// Decodes the record header at the start of `h` (pure): `None` if it is
/// not one, or if `h` is too short to tell. The CRC of a format 2 record is
/// checked by [`record_crc_ok`] once its payload is at hand.
pub fn decode_header(h: &[u8]) -> Option<Header> {
    let legacy = match *h.first()? {
        RECORD_MAGIC => false,
        LEGACY_MAGIC => true,
        _ => return None,
    };
    if h.len()
        < if legacy {
            LEGACY_HEADER_LEN
        } else {
            HEADER_LEN
        }
    {
        return None;
    }
    let kind = RecordKind::from_byte(h[1])?;
    let ts_ms = u64::from_le_bytes(h[2..10].try_into().ok()?);
    let len = u32::from_le_bytes(h[10..14].try_into().ok()?);
    if len as usize > MAX_RECORD_DATA {
        return None;
    }
    let crc = (!legacy).then(|| u32::from_le_bytes([h[14], h[15], h[16], h[17]]));
    Some(Header {
        kind,
        ts_ms,
        len,
        crc,
    })
}

/// Whether a format 2 record (`record` = header and payload) carries the
/// right CRC; format 1 records have none and pass.
pub fn record_crc_ok(header: &Header, record: &[u8]) -> bool {
    match header.crc {
        None => true,
        Some(want) => crc32c(crc32c(0, &record[..14]), &record[HEADER_LEN..]) == want,
    }
}

/// A host name usable as a directory name: 1–64 of `[A-Za-z0-9._-]`, not
/// starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsoleHost(String);

impl ConsoleHost {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, LogError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(ConsoleHost(name.to_owned()))
        } else {
            Err(LogError::BadHost {
                name: name.to_owned(),
            })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ConsoleHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Limits of one host's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// A file is closed and a new one started before it would exceed this.
    pub max_file_bytes: u64,
    /// The host's files together never exceed this; the oldest are deleted.
    /// Must be at least `2 * max_file_bytes`.
    pub max_total_bytes: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_file_bytes: 16 * 1024 * 1024,
            max_total_bytes: 256 * 1024 * 1024,
        }
    }
}

impl LogLimits {
    /// Checks the invariants the writer relies on.
    pub fn validate(self) -> Result<Self, LogError> {
        let min_file = (HEADER_LEN + 1) as u64;
        if self.max_file_bytes < min_file || self.max_total_bytes < 2 * self.max_file_bytes {
            return Err(LogError::BadLimits {
                max_file_bytes: self.max_file_bytes,
                max_total_bytes: self.max_total_bytes,
            });
        }
        Ok(self)
    }
}

/// Errors of the console log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The host name is not a safe directory name.
    #[error("console host name {name:?} is not 1-64 of [A-Za-z0-9._-] (not starting with '.')")]
    BadHost { name: String },
    /// The limits break `max_total_bytes >= 2 * max_file_bytes > 0`.
    #[error(
        "console log limits max_file_bytes={max_file_bytes} max_total_bytes={max_total_bytes} \
         need max_total_bytes >= 2 * max_file_bytes and max_file_bytes > {HEADER_LEN}"
    )]
    BadLimits {
        max_file_bytes: u64,
        max_total_bytes: u64,
    },
    /// A file operation failed.
    #[error("console log {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The directory of `host` under `root`.
pub fn host_dir(root: &Path, host: &ConsoleHost) -> PathBuf {
    root.join(host.as_str())
}

/// The file name of log file number `n`.
pub fn file_name(n: u64) -> String {
    format!("console-{n}.log")
}

fn parse_file_name(name: &str) -> Option<u64> {
    let n = name.strip_prefix("console-")?.strip_suffix(".log")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The host's log files, oldest first, with their numbers and sizes.
pub fn list_files(dir: &Path) -> Result<Vec<(u64, PathBuf, u64)>, LogError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(parse_file_name) else {
            continue;
        };
        let path = entry.path();
        let len = entry.metadata().map_err(io_err("stat", &path))?.len();
        files.push((n, path, len));
    }
    files.sort_by_key(|f| f.0);
    Ok(files)
}

/// The appending side of one host's log. Not shared: one capture task owns
/// it. Whole records wait in a buffer; [`ConsoleLog::flush`] hands them to
/// the kernel and [`ConsoleLog::sync_handle`] gives a handle to `fsync` off
/// the async runtime.
///
/// A write that fails (a full disk, an I/O error) may have left part of a
/// record in the file. The writer then truncates the file back to the end
/// of the last record it wrote whole, or, if it cannot, starts a new file,
/// and keeps the records that were not written (up to 1 MiB; output beyond
/// that is dropped and counted, see [`ConsoleLog::take_dropped`]) to write
/// them once the disk takes writes again. Readers skip a torn record
/// anyway (see [`FileRecords`]).
#[derive(Debug)]
pub struct ConsoleLog {
    dir: PathBuf,
    limits: LogLimits,
    current_n: u64,
    current_path: PathBuf,
    file: File,
    /// Length of the current file up to the end of the last record written
    /// whole.
    file_len: u64,
    /// Whole records not yet written.
    pending: Vec<u8>,
    last_ts: u64,
    /// Payload bytes dropped because the disk refused writes, not yet told.
    dropped: u64,
    #[cfg(test)]
    fault: Option<Fault>,
}

/// A write failure to simulate (unit tests).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
struct Fault {
    /// Bytes of the buffer that reach the file before the write fails.
    partial: usize,
    /// Truncating back fails too (so a new file is started).
    truncate_fails: bool,
}

impl ConsoleLog {
    /// Opens the log of `host` under `root`, creating the directory. It
    /// always starts a new file (number = highest existing + 1), so a record
    /// torn by a crash is never followed by new data in the same file.
    pub fn open(root: &Path, host: &ConsoleHost, limits: LogLimits) -> Result<Self, LogError> {
        let limits = limits.validate()?;
        let dir = host_dir(root, host);
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let files = list_files(&dir)?;
        let next = files.last().map_or(0, |f| f.0 + 1);
        let last_ts = match files.last() {
            Some((_, path, _)) => last_timestamp(path)?,
            None => 0,
        };
        let file = create_file(&dir, next)?;
        let mut log = ConsoleLog {
            dir: dir.clone(),
            limits,
            current_n: next,
            current_path: dir.join(file_name(next)),
            file,
            file_len: 0,
            pending: Vec::with_capacity(WRITE_BUFFER + HEADER_LEN + MAX_RECORD_DATA),
            last_ts,
            dropped: 0,
            #[cfg(test)]
            fault: None,
        };
        log.enforce_retention()?;
        Ok(log)
    }

    /// The host's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `data` as records of `kind` stamped `ts_ms` (clamped so that
    /// timestamps never decrease), rotating and deleting old files as needed.
    /// Returns the timestamp the records carry. An error means a write
    /// failed: the records are kept for the next flush (within 1 MiB).
    pub fn append(&mut self, kind: RecordKind, ts_ms: u64, data: &[u8]) -> Result<u64, LogError> {
        let ts = ts_ms.max(self.last_ts);
        self.last_ts = ts;
        let max_data = (self.limits.max_file_bytes as usize - HEADER_LEN).min(MAX_RECORD_DATA);
        for piece in data.chunks(max_data) {
            let rec_len = HEADER_LEN + piece.len();
            let held = self.file_len + self.pending.len() as u64;
            if held > 0
                && held + rec_len as u64 > self.limits.max_file_bytes
                && let Err(e) = self.rotate()
            {
                self.dropped += piece.len() as u64;
                return Err(e);
            }
            if self.pending.len() + rec_len > MAX_PENDING {
                // The disk has refused writes for a while: keep what is
                // queued, drop what comes.
                self.dropped += piece.len() as u64;
                continue;
            }
            encode_record(kind, ts, piece, &mut self.pending);
            if self.pending.len() >= WRITE_BUFFER {
                self.flush()?;
            }
        }
        Ok(ts)
    }

    /// The timestamp of the latest record (what the next one carries at
    /// least).
    pub fn last_ts(&self) -> u64 {
        self.last_ts
    }

    /// Payload bytes dropped because the disk refused writes since the
    /// last call (the capture reports them with a gap marker).
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Hands buffered records to the kernel (visible to readers, survives a
    /// crash of the agent but not of the machine). On failure the file is
    /// cut back to its last whole record (or a new file started) and the
    /// records are kept for the next try.
    pub fn flush(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        match self.write_pending() {
            Ok(()) => {
                self.file_len += self.pending.len() as u64;
                self.pending.clear();
                Ok(())
            }
            Err(e) => {
                let failed = self.current_path.clone();
                self.recover();
                Err(io_err("write", &failed)(e))
            }
        }
    }

    fn write_pending(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if let Some(f) = self.fault {
            let n = f.partial.min(self.pending.len());
            self.file.write_all(&self.pending[..n])?;
            return Err(io::Error::other("simulated write failure"));
        }
        self.file.write_all(&self.pending)
    }

    /// After a failed write: no torn record may stay in front of the next
    /// ones. Cuts the file back to its last whole record, else starts a new
    /// file; if neither works the next write goes after the torn bytes
    /// (readers resynchronise past them).
    fn recover(&mut self) {
        #[cfg(test)]
        let truncate_fails = self.fault.take().is_some_and(|f| f.truncate_fails);
        #[cfg(not(test))]
        let truncate_fails = false;
        let cut = if truncate_fails {
            Err(io::Error::other("simulated truncate failure"))
        } else {
            self.file.set_len(self.file_len)
        };
        match cut {
            Ok(()) => {
                tracing::warn!(path = %self.current_path.display(), len = self.file_len, "console log write failed; file cut back to its last whole record");
            }
            Err(e) => {
                tracing::warn!(path = %self.current_path.display(), error = %e, "console log cannot be cut back; starting a new file");
                if let Err(e) = self.start_file(self.current_n + 1) {
                    tracing::warn!(error = %crate::error_chain(&e), "console log cannot start a new file");
                }
            }
        }
    }

    /// A second handle on the current file for `sync_data` from a blocking
    /// thread; call after [`ConsoleLog::flush`].
    pub fn sync_handle(&self) -> Result<File, LogError> {
        self.file
            .try_clone()
            .map_err(io_err("dup", &self.current_path))
    }

    fn start_file(&mut self, n: u64) -> Result<(), LogError> {
        self.file = create_file(&self.dir, n)?;
        self.current_n = n;
        self.current_path = self.dir.join(file_name(n));
        self.file_len = 0;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        self.flush()?;
        let path = &self.current_path;
        // The closed file is made durable before the new one is started.
        self.file.sync_data().map_err(io_err("sync", path))?;
        self.start_file(self.current_n + 1)?;
        self.enforce_retention()
    }

    /// Deletes the oldest closed files until the closed files take at most
    /// `max_total_bytes - max_file_bytes`, which leaves room for the
    /// current file to grow to its limit.
    fn enforce_retention(&mut self) -> Result<(), LogError> {
        let budget = self.limits.max_total_bytes - self.limits.max_file_bytes;
        let files = list_files(&self.dir)?;
        let closed: Vec<_> = files
            .into_iter()
            .filter(|f| f.0 != self.current_n)
            .collect();
        let mut total: u64 = closed.iter().map(|f| f.2).sum();
        for (_, path, len) in closed {
            if total <= budget {
                break;
            }
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            total -= len;
        }
        Ok(())
    }
}

fn create_file(dir: &Path, n: u64) -> Result<File, LogError> {
    let path = dir.join(file_name(n));
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io_err("create", &path))
}

fn last_timestamp(path: &Path) -> Result<u64, LogError> {
    let mut last = 0;
    for rec in FileRecords::open(path)? {
        last = rec?.ts_ms;
    }
    Ok(last)
}

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 128 * 1024;

/// The records of one file, in order. A record that does not check out (a
/// bad header, a format 2 record whose CRC does not match, a payload cut
/// short) is skipped: the reader resynchronises on the next format 2
/// record whose CRC matches, so a record torn in the middle of a file (a
/// write that failed half-way) costs only itself. A torn tail ends the
/// file quietly. Format 1 records (no CRC) are read where the previous
/// record ends; after damage only format 2 records are trusted again.
pub struct FileRecords {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Start of the unread bytes in `buf`.
    pos: usize,
    eof: bool,
    /// Searching for the next good record after damage.
    resync: bool,
    skipped: u64,
}

impl FileRecords {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        Ok(FileRecords {
            path: path.to_owned(),
            file,
            buf: Vec::new(),
            pos: 0,
            eof: false,
            resync: false,
            skipped: 0,
        })
    }

    /// Bytes skipped as damaged so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Makes at least `n` unread bytes available; false if the file ends
    /// first.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.buf.len() - self.pos < n {
            if self.eof {
                return Ok(false);
            }
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let old = self.buf.len();
            self.buf.resize(old + READ_CHUNK.max(n - old), 0);
            let got = loop {
                match self.file.read(&mut self.buf[old..]) {
                    Ok(got) => break got,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.buf.truncate(old);
                        return Err(e);
                    }
                }
            };
            self.buf.truncate(old + got);
            if got == 0 {
                self.eof = true;
            }
        }
        Ok(true)
    }

    /// Skips `n` damaged bytes and looks for the next good record.
    fn skip(&mut self, n: usize) {
        self.pos += n;
        self.skipped += n as u64;
        self.resync = true;
    }
}

impl Iterator for FileRecords {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.fill(1) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(io_err("read", &self.path)(e))),
            }
            let first = self.buf[self.pos];
            if first != RECORD_MAGIC && (self.resync || first != LEGACY_MAGIC) {
                // Not a record start: on to the next magic byte.
                let rest = &self.buf[self.pos..];
                let n = rest
                    .iter()
                    .position(|&b| b == RECORD_MAGIC)
                    .unwrap_or(rest.len());
                self.skip(n);
                continue;
            }
            let header_len = if first == RECORD_MAGIC {
                HEADER_LEN
            } else {
                LEGACY_HEADER_LEN
            };
            match self.fill(header_len) {
                Ok(true) => {}
                // A torn header at the end.
                Ok(false) => {
                    let n = self.buf.len() - self.pos;
                    self.skipped += n as u64;
                    self.pos += n;
                    return None;
                }
                Err(e) => return Some(Err(io_err("read", &self.path)(e))),
            }
            let Some(h) = decode_header(&self.buf[self.pos..]) else {
                self.skip(1);
                continue;
            };
            let total = h.size() + h.len as usize;
            match self.fill(total) {
                Ok(true) => {}
                // The payload runs past the end: a torn tail, or a false
                // header in damaged bytes with good records after it.
                Ok(false) => {
                    self.skip(1);
                    continue;
                }
                Err(e) => return Some(Err(io_err("read", &self.path)(e))),
            }
            let bytes = &self.buf[self.pos..self.pos + total];
            if !record_crc_ok(&h, bytes) {
                self.skip(1);
                continue;
            }
            let data = bytes[h.size()..].to_vec();
            self.pos += total;
            self.resync = false;
            return Some(Ok(Record {
                ts_ms: h.ts_ms,
                kind: h.kind,
                data,
            }));
        }
    }
}

/// The records of one host's log with `from_ms <= ts_ms < to_ms`, oldest
/// first, across rotated files, read a file at a time (never the whole
/// slice in memory): an iterator of records, or chunks of their bytes with
/// [`SliceReader::read_chunk`]. Files whose successor starts before
/// `from_ms` are skipped without being read past their first record; a
/// file deleted by retention meanwhile is skipped.
pub struct SliceReader {
    files: VecDeque<PathBuf>,
    current: Option<FileRecords>,
    from_ms: u64,
    to_ms: u64,
    /// Bytes of the current record not yet returned by `read_chunk`.
    rest: Vec<u8>,
    rest_pos: usize,
    skipped: u64,
}

impl SliceReader {
    /// Selects the files of `host` that may hold records in the slice.
    pub fn open(
        root: &Path,
        host: &ConsoleHost,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Self, LogError> {
        let files = list_files(&host_dir(root, host))?;
        let mut firsts = Vec::with_capacity(files.len());
        for (_, path, _) in &files {
            // A file deleted by retention between listing and opening is skipped.
            let first = match FileRecords::open(path) {
                Ok(mut r) => r.next().transpose()?.map(|rec| rec.ts_ms),
                Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    None
                }
                Err(e) => return Err(e),
            };
            firsts.push(first);
        }
        let mut selected = VecDeque::new();
        for (i, (_, path, _)) in files.into_iter().enumerate() {
            let Some(first) = firsts[i] else { continue };
            if first >= to_ms {
                break;
            }
            let next_first = firsts[i + 1..].iter().flatten().next();
            // Timestamps never decrease, so every record of this file is at
            // or before its successor's first; equal timestamps may span
            // files.
            if next_first.is_some_and(|&n| n < from_ms) {
                continue;
            }
            selected.push_back(path);
        }
        Ok(SliceReader {
            files: selected,
            current: None,
            from_ms,
            to_ms,
            rest: Vec::new(),
            rest_pos: 0,
            skipped: 0,
        })
    }

    /// Damaged bytes skipped so far (see [`FileRecords`]).
    pub fn skipped(&self) -> u64 {
        self.skipped + self.current.as_ref().map_or(0, FileRecords::skipped)
    }

    /// The next at most `max` bytes of the slice (data and gap markers, as
    /// [`read_slice`] would return them); `None` at its end.
    pub fn read_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, LogError> {
        let mut out = Vec::with_capacity(max.min(MAX_RECORD_DATA));
        while out.len() < max {
            if self.rest_pos == self.rest.len() {
                match self.next() {
                    Some(rec) => {
                        self.rest = rec?.data;
                        self.rest_pos = 0;
                        continue;
                    }
                    None => break,
                }
            }
            let n = (max - out.len()).min(self.rest.len() - self.rest_pos);
            out.extend_from_slice(&self.rest[self.rest_pos..self.rest_pos + n]);
            self.rest_pos += n;
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

impl Iterator for SliceReader {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                let path = self.files.pop_front()?;
                match FileRecords::open(&path) {
                    Ok(r) => self.current = Some(r),
                    Err(LogError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            let file = self.current.as_mut()?;
            match file.next() {
                Some(Ok(rec)) if rec.ts_ms < self.from_ms || rec.ts_ms >= self.to_ms => {}
                Some(item) => return Some(item),
                None => {
                    self.skipped += file.skipped();
                    self.current = None;
                }
            }
        }
    }
}

/// The records of `host` with `from_ms <= ts_ms < to_ms`, oldest first,
/// across rotated files (see [`SliceReader`]).
pub fn records_between(
    root: &Path,
    host: &ConsoleHost,
    from_ms: u64,
    to_ms: u64,
) -> Result<SliceReader, LogError> {
    SliceReader::open(root, host, from_ms, to_ms)
}

/// The bytes (data and gap markers) of `host` received in
/// `from_ms <= ts < to_ms`: a lease's console slice, in memory (the agent
/// streams it with [`SliceReader::read_chunk`] instead).
pub fn read_slice(
    root: &Path,
    host: &ConsoleHost,
    from_ms: u64,
    to_ms: u64,
) -> Result<Vec<u8>, LogError> {
    let mut out = Vec::new();
    for rec in records_between(root, host, from_ms, to_ms)? {
        out.extend_from_slice(&rec?.data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: RecordKind, ts: u64, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_record(kind, ts, data, &mut v);
        v
    }

    fn legacy_record(kind: RecordKind, ts: u64, data: &[u8]) -> Vec<u8> {
        let mut v = vec![LEGACY_MAGIC, kind.to_byte()];
        v.extend_from_slice(&ts.to_le_bytes());
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    fn read_file(bytes: &[u8]) -> (Vec<(u64, Vec<u8>)>, u64) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        fs::write(tmp.path(), bytes).unwrap();
        let mut r = FileRecords::open(tmp.path()).unwrap();
        let recs = r
            .by_ref()
            .map(|x| x.map(|rec| (rec.ts_ms, rec.data)))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        (recs, r.skipped())
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(0, b""), 0);
        assert_eq!(crc32c(0, b"123456789"), 0xE306_9283);
        // Continuing over pieces is the CRC of the whole.
        assert_eq!(crc32c(crc32c(0, b"1234"), b"56789"), 0xE306_9283);
    }

    #[test]
    fn header_round_trips() {
        let rec = record(RecordKind::Gap, 1_700_000_000_123, b"hello");
        let h = decode_header(&rec).unwrap();
        assert_eq!(
            (h.kind, h.ts_ms, h.len, h.size()),
            (RecordKind::Gap, 1_700_000_000_123, 5, HEADER_LEN)
        );
        assert!(record_crc_ok(&h, &rec));
        let mut flipped = rec.clone();
        flipped[HEADER_LEN + 1] ^= 1;
        assert!(!record_crc_ok(&h, &flipped));
        let mut bad = rec.clone();
        bad[0] = 0;
        assert_eq!(decode_header(&bad), None);
        assert_eq!(decode_header(&rec[..HEADER_LEN - 1]), None);
        let legacy = legacy_record(RecordKind::Data, 7, b"x");
        let h = decode_header(&legacy).unwrap();
        assert_eq!((h.crc, h.size()), (None, LEGACY_HEADER_LEN));
    }

    #[test]
    fn file_names_parse() {
        assert_eq!(parse_file_name(&file_name(17)), Some(17));
        assert_eq!(parse_file_name("console-.log"), None);
        assert_eq!(parse_file_name("console-1.log.tmp"), None);
    }

    #[test]
    fn host_names_are_validated() {
        assert!(ConsoleHost::new("node-01.rack2").is_ok());
        assert!(ConsoleHost::new("../etc").is_err());
        assert!(ConsoleHost::new("").is_err());
        assert!(ConsoleHost::new(".hidden").is_err());
    }

    /// Damaged files as a write failure or a crash leaves them: the
    /// records after the damage are still read.
    #[test]
    fn damage_costs_only_the_damaged_record() {
        let a = record(RecordKind::Data, 10, b"before");
        let b = record(RecordKind::Data, 11, &[0xC6; 300]);
        let c = record(RecordKind::Data, 12, b"after-1");
        let d = record(RecordKind::Gap, 13, b"after-2");
        let cat = |parts: &[&[u8]]| parts.concat();
        let torn_b = &b[..HEADER_LEN + 100];
        let mut corrupt_b = b.clone();
        corrupt_b[HEADER_LEN + 7] ^= 0x40;
        let mut bad_len_b = b.clone();
        // A valid length that runs far past the end of the file.
        bad_len_b[10..14].copy_from_slice(&60_000u32.to_le_bytes());
        let ok = vec![
            (10, b"before".to_vec()),
            (12, b"after-1".to_vec()),
            (13, b"after-2".to_vec()),
        ];
        // (what, file, records, bytes skipped)
        type Records = Vec<(u64, Vec<u8>)>;
        let cases: Vec<(&str, Vec<u8>, Records, u64)> = vec![
            (
                "torn record in the middle",
                cat(&[&a, torn_b, &c, &d]),
                ok.clone(),
                torn_b.len() as u64,
            ),
            (
                "torn header in the middle",
                cat(&[&a, &b[..9], &c, &d]),
                ok.clone(),
                9,
            ),
            (
                "payload bit flip",
                cat(&[&a, &corrupt_b, &c, &d]),
                ok.clone(),
                b.len() as u64,
            ),
            (
                "length past the end of the file",
                cat(&[&a, &bad_len_b, &c, &d]),
                ok.clone(),
                b.len() as u64,
            ),
            (
                "garbage between records",
                cat(&[&a, b"\xc6\xc6\x00garbage\xc5", &c, &d]),
                ok.clone(),
                11,
            ),
            (
                "torn tail",
                cat(&[&a, &c, &d, torn_b]),
                vec![
                    (10, b"before".to_vec()),
                    (12, b"after-1".to_vec()),
                    (13, b"after-2".to_vec()),
                ],
                torn_b.len() as u64,
            ),
            (
                "format 1 file",
                cat(&[
                    &legacy_record(RecordKind::Data, 10, b"before"),
                    &legacy_record(RecordKind::Data, 12, b"after-1"),
                ]),
                ok[..2].to_vec(),
                0,
            ),
            (
                "format 1 torn tail",
                cat(&[
                    &legacy_record(RecordKind::Data, 10, b"before"),
                    &legacy_record(RecordKind::Data, 12, b"after-1")[..20],
                ]),
                ok[..1].to_vec(),
                20,
            ),
        ];
        for (what, file, want, skipped) in cases {
            let (got, got_skipped) = read_file(&file);
            assert_eq!(got, want, "{what}");
            assert_eq!(got_skipped, skipped, "{what}: bytes skipped");
        }
    }

    #[test]
    fn torn_tail_is_ignored_and_reopen_starts_new_file() {
        let tmp = tempfile::tempdir().unwrap();
        let host = ConsoleHost::new("h").unwrap();
        let mut log = ConsoleLog::open(tmp.path(), &host, LogLimits::default()).unwrap();
        log.append(RecordKind::Data, 10, b"hello").unwrap();
        log.flush().unwrap();
        drop(log);
        let p = host_dir(tmp.path(), &host).join(file_name(0));
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        let torn = record(RecordKind::Data, 11, &[b'x'; 100]);
        f.write_all(&torn[..HEADER_LEN + 4]).unwrap();
        let mut log = ConsoleLog::open(tmp.path(), &host, LogLimits::default()).unwrap();
        // The clock went back: the timestamp is clamped to the last one.
        assert_eq!(log.append(RecordKind::Data, 5, b" world").unwrap(), 10);
        log.flush().unwrap();
        let all: Vec<_> = records_between(tmp.path(), &host, 0, u64::MAX)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].ts_ms, 10);
        assert_eq!(
            read_slice(tmp.path(), &host, 0, u64::MAX).unwrap(),
            b"hello world"
        );
    }

    /// A write that fails half-way leaves no torn record in front of the
    /// next ones: the file is cut back (or a new one started) and the
    /// records that were not written go out with the next flush.
    #[test]
    fn a_failed_write_is_cut_back_and_retried() {
        for truncate_fails in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let host = ConsoleHost::new("h").unwrap();
            let mut log = ConsoleLog::open(tmp.path(), &host, LogLimits::default()).unwrap();
            log.append(RecordKind::Data, 10, b"one ").unwrap();
            log.flush().unwrap();
            log.append(RecordKind::Data, 11, b"two ").unwrap();
            log.append(RecordKind::Data, 12, b"three ").unwrap();
            log.fault = Some(Fault {
                partial: HEADER_LEN + 2,
                truncate_fails,
            });
            assert!(log.flush().is_err(), "the simulated failure is reported");
            let files = list_files(log.dir()).unwrap();
            if truncate_fails {
                // The torn record stays in file 0; file 1 takes over.
                assert_eq!(files.len(), 2, "{files:?}");
                assert_eq!(files[0].2, (HEADER_LEN + 4 + HEADER_LEN + 2) as u64);
            } else {
                assert_eq!(files.len(), 1, "{files:?}");
                assert_eq!(files[0].2, (HEADER_LEN + 4) as u64, "cut back");
            }
            log.append(RecordKind::Data, 13, b"four").unwrap();
            log.flush().unwrap();
            assert_eq!(log.take_dropped(), 0);
            assert_eq!(
                String::from_utf8(read_slice(tmp.path(), &host, 0, u64::MAX).unwrap()).unwrap(),
                "one two three four",
                "truncate_fails={truncate_fails}"
            );
        }
    }

    #[test]
    fn output_past_the_pending_limit_is_dropped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let host = ConsoleHost::new("h").unwrap();
        let mut log = ConsoleLog::open(tmp.path(), &host, LogLimits::default()).unwrap();
        log.fault = Some(Fault {
            partial: 0,
            truncate_fails: false,
        });
        let chunk = vec![b'y'; 4096];
        let mut failures = 0;
        for i in 0..400 {
            // Every flush fails until the fault is cleared.
            log.fault.get_or_insert(Fault {
                partial: 0,
                truncate_fails: false,
            });
            if log.append(RecordKind::Data, i, &chunk).is_err() {
                failures += 1;
            }
        }
        assert!(failures > 0);
        log.fault = None;
        log.flush().unwrap();
        let kept = read_slice(tmp.path(), &host, 0, u64::MAX).unwrap().len();
        let dropped = log.take_dropped() as usize;
        assert!(dropped > 0, "past 1 MiB queued, output is dropped");
        assert_eq!(kept + dropped, 400 * 4096);
        assert!(kept <= MAX_PENDING, "{kept}");
    }

    #[test]
    fn slices_stream_in_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let host = ConsoleHost::new("h").unwrap();
        let limits = LogLimits {
            max_file_bytes: 1000,
            max_total_bytes: 1 << 20,
        };
        let mut log = ConsoleLog::open(tmp.path(), &host, limits).unwrap();
        let mut want = Vec::new();
        for i in 0..200u64 {
            let data: Vec<u8> = (0..(i % 70) as u8).map(|b| b ^ i as u8).collect();
            log.append(RecordKind::Data, i, &data).unwrap();
            if (50..150).contains(&i) {
                want.extend_from_slice(&data);
            }
        }
        log.flush().unwrap();
        let mut r = SliceReader::open(tmp.path(), &host, 50, 150).unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = r.read_chunk(333).unwrap() {
            assert!(chunk.len() <= 333);
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, want);
        assert_eq!(r.skipped(), 0);
    }
}
