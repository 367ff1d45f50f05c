//! Consoles over the link, on the agent's side: live sessions on a host's
//! hub, and reads of the captured log.
//!
//! - **Live sessions** replay at most the asked-for bytes of recent output
//!   and, when the server says so (`ConsoleOpen.not_before`, the grant time
//!   of the lease its caller holds), nothing captured before that time;
//!   then they follow live output.
//! - **Log reads** stream the slice from disk a chunk ([`LOG_CHUNK`]) at a
//!   time, never the whole slice in memory. With a window from the server
//!   (`LogRead.window`) the agent has at most that many chunks out that
//!   the server has not credited back, so a slow reader holds back the
//!   disk reads rather than filling memory; a read that gets no credit for
//!   [`LOG_IDLE_TIMEOUT`] is closed. At most [`LogReadLimits::per_host`]
//!   reads stream at once per host and [`LogReadLimits::total`] on the
//!   agent; past that a read is refused (`RESOURCE_EXHAUSTED`).

use super::data;
use crate::console::log::SliceReader;
use crate::console::{ConsoleHost, ViewerEvent, Writer};
use crate::rack::{CommandError, ErrorKind, Rack};
use lab_proto::convert::millis_from_timestamp;
use lab_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span, warn};

/// The largest output message of a log read.
pub const LOG_CHUNK: usize = 64 * 1024;
/// A log read that gets no credit from the server for this long is closed
/// (its reader stopped reading), giving back its place.
pub const LOG_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The most a server may ask for as a log read's window.
const MAX_LOG_WINDOW: u32 = 64;
/// Replay of a live session whose open names none.
const DEFAULT_REPLAY: u64 = 16 * 1024;
/// Most bytes of live output (or replay) sent in one session message: what
/// is already buffered goes out joined, not one message per serial chunk
/// (a replay is a few messages; the server buffers at most 256 per viewer).
const LIVE_BATCH: usize = 4 * 1024;

/// How many console log reads may stream at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogReadLimits {
    /// Per host.
    pub per_host: usize,
    /// On the whole agent.
    pub total: usize,
}

impl Default for LogReadLimits {
    fn default() -> Self {
        LogReadLimits {
            per_host: 2,
            total: 8,
        }
    }
}

/// The log reads under way; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct LogReads(Arc<LogReadsInner>);

#[derive(Debug, Default)]
struct LogReadsInner {
    limits: LogReadLimits,
    open: Mutex<HashMap<String, usize>>,
}

/// One read's place; given back when dropped.
#[derive(Debug)]
pub struct LogReadSlot {
    reads: LogReads,
    host: String,
}

impl Drop for LogReadSlot {
    fn drop(&mut self) {
        let mut open = self.reads.0.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.host);
            }
        }
    }
}

impl LogReads {
    pub fn new(limits: LogReadLimits) -> Self {
        LogReads(Arc::new(LogReadsInner {
            limits,
            open: Mutex::default(),
        }))
    }

    /// A place for one more read of `host`'s log, unless a limit is reached.
    pub fn take(&self, host: &str) -> Result<LogReadSlot, CommandError> {
        let limits = self.0.limits;
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = open.values().sum();
        let on_host = open.get(host).copied().unwrap_or(0);
        let refused = if on_host >= limits.per_host {
            Some(format!(
                "{on_host} console log reads of {host} are already streaming (at most {} per host); try again when one has finished",
                limits.per_host
            ))
        } else if total >= limits.total {
            Some(format!(
                "{total} console log reads are already streaming on this rack's agent (at most {}); try again when one has finished",
                limits.total
            ))
        } else {
            None
        };
        if let Some(message) = refused {
            return Err(CommandError::new(ErrorKind::ResourceExhausted, message));
        }
        *open.entry(host.to_owned()).or_default() += 1;
        Ok(LogReadSlot {
            reads: self.clone(),
            host: host.to_owned(),
        })
    }

    /// Reads streaming now (all hosts).
    pub fn open(&self) -> usize {
        self.0
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }
}

/// What the link keeps of an open console session or log read.
pub struct Opened {
    /// A live session's input (when opened for writing).
    pub writer: Option<Arc<Writer>>,
    /// A log read's credit: output messages it may still send.
    pub credit: Option<Arc<Semaphore>>,
    pub task: JoinHandle<()>,
}

/// Opens a live session on `host`'s hub; output goes to `tx` as session
/// data with `id`.
pub async fn open_console(
    rack: &Rack,
    id: u64,
    host: &str,
    open: pb::ConsoleOpen,
    tx: mpsc::Sender<pb::AgentMessage>,
) -> Result<Opened, CommandError> {
    let hub = rack.hub(host).await.ok_or_else(|| {
        CommandError::new(
            ErrorKind::FailedPrecondition,
            format!("the console of {host} is not captured"),
        )
    })?;
    let replay = if open.replay_bytes == 0 {
        DEFAULT_REPLAY
    } else {
        u64::from(open.replay_bytes)
    };
    let not_before = open
        .not_before
        .as_ref()
        .map(|t| u64::try_from(millis_from_timestamp(t)).unwrap_or(0));
    let writer = open.write.then(|| Arc::new(hub.take_writer()));
    let mut viewer = hub.subscribe_since(replay, not_before);
    let mut watch_writer = writer.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = viewer.next_batch(LIVE_BATCH) => match ev {
                    None => {
                        let _ = tx.send(data(id, Vec::new(), "console capture stopped", true)).await;
                        return;
                    }
                    Some(ViewerEvent::Lagged { missed, .. }) => {
                        let note = format!("{missed} bytes skipped (viewer too slow)");
                        if tx.send(data(id, Vec::new(), &note, false)).await.is_err() {
                            return;
                        }
                    }
                    Some(ViewerEvent::Data(chunk)) => {
                        if tx.send(data(id, chunk.data.to_vec(), "", false)).await.is_err() {
                            return;
                        }
                    }
                },
                _ = tick.tick(), if watch_writer.as_ref().is_some_and(|w| !w.is_current()) => {
                    watch_writer = None;
                    let note = "another writer took over this console; you are read-only now";
                    if tx.send(data(id, Vec::new(), note, false)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(Opened {
        writer,
        credit: None,
        task,
    })
}

/// Starts streaming `host`'s log between `l.from` and `l.to` as session
/// data with `id`, in a place taken from `reads`.
pub async fn read_log(
    rack: &Rack,
    reads: &LogReads,
    id: u64,
    host: &str,
    l: pb::LogRead,
    tx: mpsc::Sender<pb::AgentMessage>,
) -> Result<Opened, CommandError> {
    let bad = |m: String| CommandError::new(ErrorKind::InvalidArgument, m);
    let console = ConsoleHost::new(host).map_err(|e| bad(e.to_string()))?;
    let from = l
        .from
        .as_ref()
        .map_or(0, |t| u64::try_from(millis_from_timestamp(t)).unwrap_or(0));
    let to = l.to.as_ref().map_or(u64::MAX, |t| {
        u64::try_from(millis_from_timestamp(t)).unwrap_or(0)
    });
    let slot = reads.take(host)?;
    // Everything published so far must be in the file before it is read.
    rack.flush_console(host).await;
    let root = rack.console_root();
    let reader = tokio::task::spawn_blocking(move || SliceReader::open(&root, &console, from, to))
        .await
        .map_err(|e| CommandError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(|e| CommandError::new(ErrorKind::Unavailable, crate::error_chain(&e)))?;
    let credit =
        (l.window > 0).then(|| Arc::new(Semaphore::new(l.window.min(MAX_LOG_WINDOW) as usize)));
    let span = info_span!("log read", host = %host, session = id);
    let task = tokio::spawn(stream_log(id, reader, tx, credit.clone(), slot).instrument(span));
    Ok(Opened {
        writer: None,
        credit,
        task,
    })
}

/// Adds `n` credits to a log read's window (never past the most a window
/// may hold).
pub fn add_credit(credit: &Semaphore, n: u32) {
    let room = (MAX_LOG_WINDOW as usize).saturating_sub(credit.available_permits());
    credit.add_permits((n as usize).min(room));
}

/// Sends the slice a chunk at a time, each read from disk only once there
/// is credit for it (without a window: as fast as the link takes them).
async fn stream_log(
    id: u64,
    mut reader: SliceReader,
    tx: mpsc::Sender<pb::AgentMessage>,
    credit: Option<Arc<Semaphore>>,
    _slot: LogReadSlot,
) {
    let mut sent: u64 = 0;
    loop {
        if let Some(c) = &credit {
            match tokio::time::timeout(LOG_IDLE_TIMEOUT, c.acquire()).await {
                Ok(Ok(permit)) => permit.forget(),
                Ok(Err(_)) => return,
                Err(_) => {
                    debug!(sent, "log read stalled; closing it");
                    let note = format!(
                        "console log read closed: nothing was read for {}s",
                        LOG_IDLE_TIMEOUT.as_secs()
                    );
                    let _ = tx.send(data(id, Vec::new(), &note, true)).await;
                    return;
                }
            }
        }
        let step = tokio::task::spawn_blocking(move || {
            let chunk = reader.read_chunk(LOG_CHUNK);
            (reader, chunk)
        })
        .await;
        let chunk;
        (reader, chunk) = match step {
            Ok(r) => r,
            Err(e) => {
                let _ = tx
                    .send(data(
                        id,
                        Vec::new(),
                        &format!("console log read failed: {e}"),
                        true,
                    ))
                    .await;
                return;
            }
        };
        match chunk {
            Ok(Some(bytes)) => {
                sent += bytes.len() as u64;
                if tx.send(data(id, bytes, "", false)).await.is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let note = format!("console log read failed: {}", crate::error_chain(&e));
                let _ = tx.send(data(id, Vec::new(), &note, true)).await;
                return;
            }
        }
    }
    if reader.skipped() > 0 {
        warn!(
            bytes = reader.skipped(),
            "damaged console log records skipped"
        );
    }
    debug!(sent, "log read done");
    let _ = tx.send(data(id, Vec::new(), "", true)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_reads_are_limited_per_host_and_in_all() {
        let reads = LogReads::new(LogReadLimits {
            per_host: 2,
            total: 3,
        });
        let a1 = reads.take("a").unwrap();
        let _a2 = reads.take("a").unwrap();
        let e = reads.take("a").unwrap_err();
        assert_eq!(e.kind, ErrorKind::ResourceExhausted);
        assert!(e.message.contains("at most 2 per host"), "{}", e.message);
        let _b1 = reads.take("b").unwrap();
        let e = reads.take("c").unwrap_err();
        assert!(e.message.contains("at most 3"), "{}", e.message);
        assert_eq!(reads.open(), 3);
        drop(a1);
        assert_eq!(reads.open(), 2);
        let _c1 = reads.take("c").unwrap();
        assert!(reads.take("a").is_err(), "a total of 3 again");
    }

    #[test]
    fn credit_never_exceeds_the_largest_window() {
        let s = Semaphore::new(10);
        add_credit(&s, 5);
        assert_eq!(s.available_permits(), 15);
        add_credit(&s, u32::MAX);
        assert_eq!(s.available_permits(), MAX_LOG_WINDOW as usize);
    }
}
