//! The on-disk console log: one append-only, size-rotated, retention-limited
//! series of framed files per host, and the reader that slices it by time.
//!
//! The format is described in the [module docs](super); this file is the
//! only code that knows it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// First byte of every record header; a reader that finds anything else
/// stops (the rest of the file is not trusted).
pub const RECORD_MAGIC: u8 = 0xC5;
/// Size of a record header: magic, kind, timestamp (u64 LE), length (u32 LE).
pub const HEADER_LEN: usize = 1 + 1 + 8 + 4;
/// Largest payload of one record; longer appends are split.
pub const MAX_RECORD_DATA: usize = 64 * 1024;

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

/// Encodes one record header (pure).
pub fn encode_header(kind: RecordKind, ts_ms: u64, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = RECORD_MAGIC;
    h[1] = kind.to_byte();
    h[2..10].copy_from_slice(&ts_ms.to_le_bytes());
    h[10..14].copy_from_slice(&len.to_le_bytes());
    h
}

/// Decodes one record header (pure); `None` if it is not a valid header.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Option<(RecordKind, u64, u32)> {
    if h[0] != RECORD_MAGIC {
        return None;
    }
    let kind = RecordKind::from_byte(h[1])?;
    let ts = u64::from_le_bytes(h[2..10].try_into().ok()?);
    let len = u32::from_le_bytes(h[10..14].try_into().ok()?);
    if len as usize > MAX_RECORD_DATA {
        return None;
    }
    Some((kind, ts, len))
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
/// it. Writes go through a buffer; [`ConsoleLog::flush`] hands them to the
/// kernel and [`ConsoleLog::sync_handle`] gives a handle to `fsync` off the
/// async runtime.
#[derive(Debug)]
pub struct ConsoleLog {
    dir: PathBuf,
    limits: LogLimits,
    current_n: u64,
    current_path: PathBuf,
    current: BufWriter<File>,
    current_len: u64,
    last_ts: u64,
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
        let (current, _) = create_file(&dir, next)?;
        let mut log = ConsoleLog {
            dir: dir.clone(),
            limits,
            current_n: next,
            current_path: dir.join(file_name(next)),
            current,
            current_len: 0,
            last_ts,
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
    pub fn append(&mut self, kind: RecordKind, ts_ms: u64, data: &[u8]) -> Result<(), LogError> {
        let ts = ts_ms.max(self.last_ts);
        self.last_ts = ts;
        let max_data = (self.limits.max_file_bytes as usize - HEADER_LEN).min(MAX_RECORD_DATA);
        for piece in data.chunks(max_data) {
            let rec_len = (HEADER_LEN + piece.len()) as u64;
            if self.current_len > 0 && self.current_len + rec_len > self.limits.max_file_bytes {
                self.rotate()?;
            }
            let header = encode_header(kind, ts, piece.len() as u32);
            self.current
                .write_all(&header)
                .and_then(|()| self.current.write_all(piece))
                .map_err(io_err("write", &self.current_path))?;
            self.current_len += rec_len;
        }
        Ok(())
    }

    /// Hands buffered records to the kernel (visible to readers, survives a
    /// crash of the agent but not of the machine).
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.current
            .flush()
            .map_err(io_err("flush", &self.current_path))
    }

    /// A second handle on the current file for `sync_data` from a blocking
    /// thread; call after [`ConsoleLog::flush`].
    pub fn sync_handle(&self) -> Result<File, LogError> {
        self.current
            .get_ref()
            .try_clone()
            .map_err(io_err("dup", &self.current_path))
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        self.flush()?;
        let path = &self.current_path;
        // The closed file is made durable before the new one is started.
        self.current
            .get_ref()
            .sync_data()
            .map_err(io_err("sync", path))?;
        let (file, n) = create_file(&self.dir, self.current_n + 1)?;
        self.current = file;
        self.current_n = n;
        self.current_path = self.dir.join(file_name(n));
        self.current_len = 0;
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

fn create_file(dir: &Path, n: u64) -> Result<(BufWriter<File>, u64), LogError> {
    let path = dir.join(file_name(n));
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    Ok((BufWriter::with_capacity(64 * 1024, file), n))
}

fn last_timestamp(path: &Path) -> Result<u64, LogError> {
    let mut last = 0;
    for rec in FileRecords::open(path)? {
        last = rec?.ts_ms;
    }
    Ok(last)
}

/// The records of one file, in order; stops quietly at a torn or corrupt
/// tail (a crash mid-write).
pub struct FileRecords {
    path: PathBuf,
    reader: BufReader<File>,
}

impl FileRecords {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        Ok(FileRecords {
            path: path.to_owned(),
            reader: BufReader::with_capacity(128 * 1024, file),
        })
    }
}

impl Iterator for FileRecords {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut h = [0u8; HEADER_LEN];
        match read_full(&mut self.reader, &mut h) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => return Some(Err(io_err("read", &self.path)(e))),
        }
        let (kind, ts_ms, len) = decode_header(&h)?;
        let mut data = vec![0u8; len as usize];
        match read_full(&mut self.reader, &mut data) {
            Ok(true) => Some(Ok(Record { ts_ms, kind, data })),
            Ok(false) => None,
            Err(e) => Some(Err(io_err("read", &self.path)(e))),
        }
    }
}

/// Fills `buf`; `Ok(false)` on end of file before it is full.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The records of `host` with `from_ms <= ts_ms < to_ms`, oldest first,
/// across rotated files. Files whose successor starts before `from_ms` are
/// skipped without being read past their first record.
pub fn records_between(
    root: &Path,
    host: &ConsoleHost,
    from_ms: u64,
    to_ms: u64,
) -> Result<impl Iterator<Item = Result<Record, LogError>>, LogError> {
    let files = list_files(&host_dir(root, host))?;
    let mut firsts = Vec::with_capacity(files.len());
    for (_, path, _) in &files {
        // A file deleted by retention between listing and opening is skipped.
        let first = match FileRecords::open(path) {
            Ok(mut r) => r.next().transpose()?.map(|rec| rec.ts_ms),
            Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        firsts.push(first);
    }
    let mut selected = Vec::new();
    for (i, (_, path, _)) in files.into_iter().enumerate() {
        let Some(first) = firsts[i] else { continue };
        if first >= to_ms {
            break;
        }
        let next_first = firsts[i + 1..].iter().flatten().next();
        // Timestamps never decrease, so every record of this file is at or
        // before its successor's first; equal timestamps may span files.
        if next_first.is_some_and(|&n| n < from_ms) {
            continue;
        }
        selected.push(path);
    }
    let iter = selected
        .into_iter()
        .flat_map(|path| match FileRecords::open(&path) {
            Ok(r) => Box::new(r) as Box<dyn Iterator<Item = Result<Record, LogError>>>,
            Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Box::new(std::iter::empty())
            }
            Err(e) => Box::new(std::iter::once(Err(e))),
        })
        .filter(move |r| match r {
            Ok(rec) => rec.ts_ms >= from_ms && rec.ts_ms < to_ms,
            Err(_) => true,
        });
    Ok(iter)
}

/// The bytes (data and gap markers) of `host` received in
/// `from_ms <= ts < to_ms`: a lease's console slice.
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

    #[test]
    fn header_round_trips() {
        let h = encode_header(RecordKind::Gap, 1_700_000_000_123, 42);
        assert_eq!(
            decode_header(&h),
            Some((RecordKind::Gap, 1_700_000_000_123, 42))
        );
        let mut bad = h;
        bad[0] = 0;
        assert_eq!(decode_header(&bad), None);
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
        f.write_all(&encode_header(RecordKind::Data, 11, 100)[..])
            .unwrap();
        f.write_all(b"torn").unwrap();
        let mut log = ConsoleLog::open(tmp.path(), &host, LogLimits::default()).unwrap();
        // The clock went back: the timestamp is clamped to the last one.
        log.append(RecordKind::Data, 5, b" world").unwrap();
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
}
