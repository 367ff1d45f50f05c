//! Always-on console capture: every host's console, whoever holds it, is
//! read continuously, written to an append-only log on disk and fanned out
//! live to viewers.
//!
//! - [`log`]: the on-disk format, rotation, retention and the time-slice
//!   reader (a lease's console is the slice between its start and end).
//! - [`hub`]: live fan-out to many read-only viewers, replay of the recent
//!   tail, one writer at a time with explicit takeover.
//! - [`source`]: the [`ConsoleSource`] trait (SOL, serial device and TCP
//!   implement it; TCP is here), the capture task with reconnect and gap
//!   markers, and the Xen debug-key sequence.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use lab_agent::console::{Capture, CaptureConfig, ConsoleHost, ConsoleLog, Hub, HubConfig, LogLimits, TcpSource};
//! let host = ConsoleHost::new("node-01")?;
//! let log = ConsoleLog::open("/var/lib/lab/console".as_ref(), &host, LogLimits::default())?;
//! let (hub, input) = Hub::new(HubConfig::default());
//! let source = TcpSource::new("127.0.0.1:4555".parse()?);
//! let capture = Capture::spawn(source, log, hub, input, CaptureConfig::default());
//! let mut viewer = capture.hub().subscribe();
//! while let Some(event) = viewer.next().await { let _ = event; }
//! # Ok(()) }
//! ```
//!
//! # Log layout
//!
//! One directory per host under the console root, each holding numbered
//! files: `<root>/<host>/console-<n>.log`, `n` counting up from 0 without
//! padding (readers sort numerically). A file is a sequence of records, with
//! no file header:
//!
//! ```text
//! offset size field
//! 0      1    magic 0xC5
//! 1      1    kind: 0 = data (bytes from the source, untouched)
//!                   1 = gap marker (text written by the agent)
//! 2      8    timestamp, ms since the Unix epoch, u64 little-endian
//! 10     4    payload length, u32 little-endian, at most 65536
//! 14     len  payload
//! ```
//!
//! Raw bytes are kept exactly (no line splitting, no escaping): a console
//! that emits binary or half an escape sequence is stored as it came. A
//! record holds the bytes of one read from the source, stamped when the
//! read returned, so a slice by time has the resolution of one read
//! (typically a few bytes on a real serial line). Timestamps never decrease
//! within a host's log: if the wall clock steps back, records keep the
//! previous timestamp until it catches up.
//!
//! Concatenating the payloads of every record in file order gives the
//! console stream with the gap markers in place, which is what
//! [`log::read_slice`] returns for `from_ms <= ts < to_ms`. A lease's slice
//! is `read_slice(root, host, lease_start_ms, lease_end_ms)`. Files are
//! skipped by their first timestamp, so a slice reads only the files that
//! overlap it.
//!
//! # Rotation and retention
//!
//! A record is never split across files; before a record would push the
//! current file past `max_file_bytes` the file is flushed, `fsync`ed and
//! closed, and `console-<n+1>.log` is started. Appends longer than one
//! record's payload (or than a file) are split into several records with
//! the same timestamp.
//!
//! Retention is per host: after each rotation (and at open) the oldest
//! closed files are deleted until the closed files take at most
//! `max_total_bytes - max_file_bytes`, which leaves room for the current
//! file to grow to its own limit; so the host's directory never holds more
//! than `max_total_bytes` (required: `max_total_bytes >= 2 *
//! max_file_bytes`). A lease slice whose start has been deleted by
//! retention begins at the oldest surviving record.
//!
//! # Durability (fsync policy)
//!
//! Records go through a 64 KiB user-space buffer. Every `flush_interval`
//! (default 500 ms) the capture task flushes it to the kernel and starts an
//! `fdatasync` of the current file on a blocking thread (at most one in
//! flight, so a slow disk never stalls the capture). A file being closed by
//! rotation is synced before the next is created, and stopping a capture
//! flushes and syncs before it returns. So:
//!
//! - a crash of the agent loses at most the last `flush_interval` of
//!   output (what was still in the buffer);
//! - a crash of the machine loses at most about two `flush_interval`s of
//!   the current file;
//! - bytes are visible to [`log::read_slice`] within one `flush_interval`.
//!
//! A crash can leave a torn record at the end of a file. Readers stop at
//! the first record whose header is invalid or whose payload is short, and
//! [`ConsoleLog::open`] always starts a new file rather than appending after
//! such a tail.
//!
//! # Gap markers
//!
//! When a connected source drops (end of stream or error), the capture task
//! writes a gap record and publishes the same bytes to viewers:
//!
//! ```text
//! \r\n[lab: console source lost at 2024-05-01T10:00:00.123Z: end of stream; reconnecting]\r\n
//! ```
//!
//! It reconnects with a backoff of 100 ms doubling to 10 s (reset after a
//! successful connect) and, once back, writes `\r\n[lab: console source
//! reconnected at <time>]\r\n`. If the source cannot be reached at all when
//! the capture starts, one `... unavailable at <time>: <reason>; retrying]`
//! marker is written (not one per attempt). Markers are records of kind 1,
//! so tools can tell them from console output; in the byte stream they are
//! plain text on their own line.
//!
//! # Fan-out
//!
//! Each host has one [`Hub`]: the chunks read from the source are kept in a
//! shared in-memory ring of at least `buffer_bytes`, addressed by their
//! byte offset in the stream (the sequence number). Publishing never waits
//! for a viewer. A [`Viewer`] is a position in that stream:
//!
//! - on joining it starts `tail_bytes` before the head (the replay), then
//!   follows live output; since replay and live come from the same
//!   offsets there is no gap or duplicate between them;
//! - every [`ViewerEvent::Data`] carries its offset and follows the
//!   previous one exactly;
//! - a viewer that falls more than `buffer_bytes` behind gets
//!   [`ViewerEvent::Lagged`] with the number of bytes it missed and resumes
//!   at the oldest byte still held.
//!
//! Input goes the other way through one writer seat: [`Hub::try_writer`]
//! fails with [`WriteError::Busy`] if it is taken, [`Hub::take_writer`]
//! takes it over explicitly; the replaced [`Writer`]'s
//! [`Writer::replaced`] resolves and its further writes fail with
//! [`WriteError::Replaced`]. Dropping a writer frees the seat. The agent's
//! own input (the Xen debug keys at lease end, a break) uses
//! [`send_keys`]/[`send_break`] and does not need the seat.
//!
//! # Xen debug keys
//!
//! [`xen_debug_sequence`] turns a profile's [`XenDebugKeys`] into steps, as
//! OSSTest does: `Ctrl-A` three times switches Xen's console input to the
//! hypervisor, each debug key (default `h`, `q`, `r`) is followed by a
//! pause for Xen to print, and `Ctrl-A` three times switches back. The
//! output lands in the log like any other, inside the lease's slice if it
//! is sent before the lease's end timestamp.

pub mod hub;
pub mod log;
pub mod serial;
pub mod sol;
pub mod source;

pub use hub::{
    Chunk, Hub, HubConfig, InputRx, SourceInput, Viewer, ViewerEvent, WriteError, Writer,
};
pub use log::{ConsoleHost, ConsoleLog, LogError, LogLimits, Record, RecordKind};
pub use serial::SerialSource;
pub use sol::SolSource;
pub use source::{
    Capture, CaptureConfig, CaptureJoinError, ConsoleSource, GapEvent, KeyStep, SourceError,
    TcpSource, XenDebugKeys, send_break, send_keys, xen_debug_sequence,
};
