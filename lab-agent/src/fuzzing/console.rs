//! The console log reader over whatever bytes its files hold, and the
//! writer reopening such a log.

use std::path::Path;
use std::sync::Mutex;

use super::boot::scratch_dir;
use super::input::{Input, InputWriter};
use crate::console::log::{
    FileRecords, MAX_RECORD_DATA, file_name, host_dir, list_files, read_slice, records_between,
};
use crate::console::{ConsoleHost, ConsoleLog, LogLimits, RecordKind};

/// A console log input: the time range to read, then up to four files of
/// the host's log, each its number and its bytes.
pub fn console_log_input(from_ms: u64, to_ms: u64, files: &[(u8, &[u8])]) -> Vec<u8> {
    let mut w = InputWriter::new().u64(from_ms).u64(to_ms);
    for (n, bytes) in files {
        w = w.byte(*n).long_frame(bytes);
    }
    w.finish()
}

/// Console log target (format: [`console_log_input`]). The files are
/// written to a host's log directory; reading a time range gives only
/// records in it, each within the size limit, the slice being their
/// bytes; reading a log never fails on its contents. Then the writer opens
/// the log (starting a file after the highest), appends, and a full read
/// ends with what it appended.
pub fn console_log(data: &[u8]) {
    static ROOT: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);
    let mut root = ROOT.lock().unwrap_or_else(|p| p.into_inner());
    let root = root.get_or_insert_with(|| scratch_dir("console"));
    let host = ConsoleHost::new("node-01").expect("valid console host");
    let dir = host_dir(root, &host);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("console log directory");

    let mut input = Input::new(data);
    let (from_ms, to_ms) = (input.u64(), input.u64());
    for _ in 0..4 {
        let n = input.byte();
        let Some(bytes) = input.long_frame() else {
            break;
        };
        std::fs::write(dir.join(file_name(u64::from(n))), bytes).expect("write a log file");
    }

    let mut firsts = Vec::new();
    let mut max_ts = 0;
    for (_, path, _) in list_files(&dir).expect("list the log") {
        let records: Vec<_> = FileRecords::open(&path)
            .expect("open a log file")
            .collect::<Result<_, _>>()
            .expect("a log file reads");
        for r in &records {
            assert!(r.data.len() <= MAX_RECORD_DATA);
            max_ts = max_ts.max(r.ts_ms);
        }
        firsts.push(records.first().map(|r| r.ts_ms));
    }
    let records: Vec<_> = records_between(root, &host, from_ms, to_ms)
        .expect("a log reads")
        .collect::<Result<_, _>>()
        .expect("every record reads");
    let mut bytes = Vec::new();
    for r in &records {
        assert!(
            from_ms <= r.ts_ms && r.ts_ms < to_ms,
            "record outside the range"
        );
        bytes.extend_from_slice(&r.data);
    }
    assert_eq!(
        read_slice(root, &host, from_ms, to_ms).expect("a slice reads"),
        bytes
    );

    reopen_and_append(root, &host, &firsts, max_ts);
}

/// The writer over an existing log: it appends after it, and a full read
/// ends with the new bytes unless a file claims the end of time.
fn reopen_and_append(root: &Path, host: &ConsoleHost, firsts: &[Option<u64>], max_ts: u64) {
    let limits = LogLimits {
        max_file_bytes: 64,
        max_total_bytes: 256,
    };
    let mut log = match ConsoleLog::open(root, host, limits) {
        Ok(log) => log,
        // Only a file numbered u64::MAX leaves no number for the next.
        Err(e) => panic!("the log does not reopen: {}", crate::error_chain(&e)),
    };
    let appended = b"appended after reopening";
    log.append(RecordKind::Data, 1, appended).expect("append");
    log.flush().expect("flush");
    drop(log);
    let end_of_time = firsts.contains(&Some(u64::MAX)) || max_ts == u64::MAX;
    if !end_of_time {
        let all = read_slice(root, host, 0, u64::MAX).expect("the log reads");
        assert!(
            all.ends_with(appended),
            "the appended bytes are read back last"
        );
    }
}
