//! Console sources ([`ConsoleSource`], with [`TcpSource`]), the capture task
//! that copies every byte to the log and the hub, and the Xen debug-key
//! sequence.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::hub::{Hub, InputRx, SourceInput, WriteError};
use super::log::{ConsoleLog, RecordKind};

/// Errors of a console source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Connecting failed.
    #[error("connect to console {target}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    /// Connecting took too long.
    #[error("connect to console {target} timed out after {timeout:?}")]
    ConnectTimeout { target: String, timeout: Duration },
    /// The source cannot do this (e.g. a break over raw TCP).
    #[error("console {target} does not support {what}")]
    Unsupported { target: String, what: &'static str },
    /// Writing to the source failed.
    #[error("write to console {target}")]
    Write {
        target: String,
        #[source]
        source: io::Error,
    },
}

/// Where a host's console bytes come from: SOL, a serial device, TCP. The
/// capture task calls `connect` again after every disconnect.
pub trait ConsoleSource: Send + Sync + 'static {
    /// An open connection.
    type Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// Opens a connection.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, SourceError>> + Send;

    /// For logs and gap markers, e.g. `tcp:127.0.0.1:4555`.
    fn describe(&self) -> String;

    /// Sends a serial break on `conn`. Unsupported unless overridden.
    fn send_break(
        &self,
        conn: &mut Self::Conn,
    ) -> impl Future<Output = Result<(), SourceError>> + Send {
        let _ = conn;
        let target = self.describe();
        async move {
            Err(SourceError::Unsupported {
                target,
                what: "serial break",
            })
        }
    }
}

/// A console served over raw TCP, as QEMU's
/// `-serial tcp:127.0.0.1:4555,server,nowait` or a terminal server's port.
#[derive(Debug, Clone)]
pub struct TcpSource {
    /// The address to connect to.
    pub addr: SocketAddr,
    /// How long one connect may take.
    pub connect_timeout: Duration,
}

impl TcpSource {
    /// A source at `addr` with a 5 s connect timeout.
    pub fn new(addr: SocketAddr) -> Self {
        TcpSource {
            addr,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl ConsoleSource for TcpSource {
    type Conn = TcpStream;

    async fn connect(&self) -> Result<TcpStream, SourceError> {
        let target = self.describe();
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => {
                // Console traffic is small and interactive.
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(source)) => Err(SourceError::Connect { target, source }),
            Err(_) => Err(SourceError::ConnectTimeout {
                target,
                timeout: self.connect_timeout,
            }),
        }
    }

    fn describe(&self) -> String {
        format!("tcp:{}", self.addr)
    }
}

/// Tuning of the capture task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureConfig {
    /// First reconnect delay; doubles after each failed attempt.
    pub backoff_initial: Duration,
    /// Ceiling of the reconnect delay.
    pub backoff_max: Duration,
    /// How often buffered log records are flushed to the kernel and an
    /// `fsync` is started (the durability window).
    pub flush_interval: Duration,
    /// Size of one read from the source.
    pub read_buf: usize,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            flush_interval: Duration::from_millis(500),
            read_buf: 64 * 1024,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a gap marker is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapEvent<'a> {
    /// A connected source dropped.
    Lost { reason: &'a str },
    /// The source could not be reached (no connection had been lost).
    Unavailable { reason: &'a str },
    /// The source is back after a `Lost` or `Unavailable`.
    Reconnected,
    /// The log refused writes for so long that `bytes` of output were
    /// dropped (viewers saw them; the log does not have them).
    NotLogged { bytes: u64 },
}

/// The text of a gap marker (pure): framed by `\r\n` so it stands on its
/// own line in any terminal.
pub fn gap_marker(event: GapEvent<'_>, at: SystemTime) -> String {
    let at = humantime::format_rfc3339_millis(at);
    match event {
        GapEvent::Lost { reason } => {
            format!("\r\n[lab: console source lost at {at}: {reason}; reconnecting]\r\n")
        }
        GapEvent::Unavailable { reason } => {
            format!("\r\n[lab: console source unavailable at {at}: {reason}; retrying]\r\n")
        }
        GapEvent::Reconnected => format!("\r\n[lab: console source reconnected at {at}]\r\n"),
        GapEvent::NotLogged { bytes } => format!(
            "\r\n[lab: {bytes} bytes of console output before {at} are not in the log: it could not be written]\r\n"
        ),
    }
}

/// The reconnect delay after `failures` consecutive failures (pure).
pub fn backoff(config: &CaptureConfig, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
    config
        .backoff_initial
        .saturating_mul(factor)
        .min(config.backoff_max)
}

/// The running capture of one host's console. Dropping it stops the task
/// too, but without waiting for the final flush and sync: prefer
/// [`Capture::stop`].
#[derive(Debug)]
pub struct Capture {
    hub: Hub,
    dir: PathBuf,
    stop: watch::Sender<bool>,
    flush: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<ConsoleLog>,
}

/// The capture task panicked.
#[derive(Debug, thiserror::Error)]
#[error("console capture task of {dir} failed")]
pub struct CaptureJoinError {
    dir: PathBuf,
    #[source]
    source: tokio::task::JoinError,
}

impl Capture {
    /// Starts capturing `source` into `log` and `hub`; `input` is the
    /// receiver returned by [`Hub::new`] with `hub`.
    pub fn spawn<S: ConsoleSource>(
        source: S,
        log: ConsoleLog,
        hub: Hub,
        input: InputRx,
        config: CaptureConfig,
    ) -> Capture {
        let (stop, stop_rx) = watch::channel(false);
        let (flush, flush_rx) = tokio::sync::mpsc::channel(16);
        let dir = log.dir().to_owned();
        let span =
            tracing::info_span!("console", source = %source.describe(), dir = %log.dir().display());
        let task = CaptureTask {
            source,
            log,
            hub: hub.clone(),
            input,
            config,
            stop: stop_rx,
            flush: flush_rx,
            sync: None,
            log_errors: crate::ratelimit::LogLimiter::new(crate::ratelimit::DEFAULT_LOG_INTERVAL),
        };
        let task = tokio::spawn(tracing::Instrument::instrument(task.run(), span));
        Capture {
            hub,
            dir,
            stop,
            flush,
            task,
        }
    }

    /// Asks the capture to hand what it has buffered to the kernel, so that
    /// a read of the log sees every byte published so far; waits at most
    /// `timeout` (a source that is reconnecting answers only once it is
    /// back). Returns whether the flush was confirmed.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.flush.send(tx).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// The hub viewers and writers attach to.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Stops the capture: the log is flushed and synced, the hub closed
    /// (viewers drain, then end), and the log handed back.
    pub async fn stop(self) -> Result<ConsoleLog, CaptureJoinError> {
        let _ = self.stop.send(true);
        let dir = self.dir;
        self.task
            .await
            .map_err(|source| CaptureJoinError { dir, source })
    }
}

struct CaptureTask<S> {
    source: S,
    log: ConsoleLog,
    hub: Hub,
    input: InputRx,
    config: CaptureConfig,
    stop: watch::Receiver<bool>,
    flush: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    sync: Option<JoinHandle<()>>,
    /// A full or failing disk fails every write: one line per interval.
    log_errors: crate::ratelimit::LogLimiter,
}

enum Step {
    Stop,
    Read(io::Result<usize>),
    Input(Option<SourceInput>),
    Tick,
    Flush(Option<tokio::sync::oneshot::Sender<()>>),
}

enum Ended {
    Stopped,
    Lost(String),
}

impl<S: ConsoleSource> CaptureTask<S> {
    async fn run(mut self) -> ConsoleLog {
        let mut failures = 0u32;
        let mut outage = false;
        loop {
            let connected = tokio::select! {
                r = self.source.connect() => r,
                _ = self.stop.wait_for(|s| *s) => break,
            };
            match connected {
                Ok(conn) => {
                    failures = 0;
                    tracing::info!("console source connected");
                    if outage {
                        self.marker(GapEvent::Reconnected);
                    }
                    // Every connection ends in an outage, unless stopped.
                    outage = match self.pump(conn).await {
                        Ended::Stopped => break,
                        Ended::Lost(reason) => {
                            tracing::warn!(%reason, "console source lost");
                            self.marker(GapEvent::Lost { reason: &reason });
                            true
                        }
                    };
                }
                Err(e) => {
                    let reason = crate::error_chain(&e);
                    tracing::debug!(%reason, failures, "console source connect failed");
                    if !outage {
                        self.marker(GapEvent::Unavailable { reason: &reason });
                        outage = true;
                    }
                    failures = failures.saturating_add(1);
                }
            }
            let delay = backoff(&self.config, failures.saturating_sub(1));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.wait_for(|s| *s) => break,
            }
            self.flush();
        }
        self.finish().await;
        self.log
    }

    async fn pump(&mut self, mut conn: S::Conn) -> Ended {
        let mut buf = vec![0u8; self.config.read_buf.max(1)];
        let mut tick = tokio::time::interval(self.config.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => Step::Stop,
                r = conn.read(&mut buf) => Step::Read(r),
                input = self.input.recv() => Step::Input(input),
                ack = self.flush.recv(), if !self.flush.is_closed() || !self.flush.is_empty() => Step::Flush(ack),
                _ = tick.tick() => Step::Tick,
            };
            match step {
                Step::Stop => return Ended::Stopped,
                Step::Read(Ok(0)) => return Ended::Lost("end of stream".to_owned()),
                Step::Read(Ok(n)) => self.record(RecordKind::Data, &buf[..n]),
                Step::Read(Err(e)) => return Ended::Lost(crate::error_chain(&e)),
                Step::Input(Some(SourceInput::Bytes(b))) => {
                    if let Err(e) = conn.write_all(&b).await {
                        return Ended::Lost(crate::error_chain(&e));
                    }
                }
                Step::Input(Some(SourceInput::Break)) => {
                    if let Err(e) = self.source.send_break(&mut conn).await {
                        tracing::warn!(error = %crate::error_chain(&e), "console break not sent");
                    }
                }
                // The hub holds a sender for as long as it lives, and this
                // task holds the hub: cannot happen.
                Step::Input(None) => return Ended::Stopped,
                Step::Tick => self.flush(),
                Step::Flush(Some(ack)) => {
                    self.flush();
                    let _ = ack.send(());
                }
                // The capture handle is gone (dropped without `stop`): no
                // more requests can come; the guard above stops polling.
                Step::Flush(None) => {}
            }
        }
    }

    /// Logs and publishes `data`, both stamped with the same time (the
    /// log's, which never decreases).
    fn record(&mut self, kind: RecordKind, data: &[u8]) {
        let ts = match self.log.append(kind, epoch_ms(SystemTime::now()), data) {
            Ok(ts) => ts,
            Err(e) => {
                if let Some(count) = self.log_errors.check() {
                    tracing::error!(count, error = %crate::error_chain(&e), "console log write failed");
                }
                self.log.last_ts()
            }
        };
        self.hub.publish(ts, Bytes::copy_from_slice(data));
    }

    fn marker(&mut self, event: GapEvent<'_>) {
        let text = gap_marker(event, SystemTime::now());
        self.record(RecordKind::Gap, text.as_bytes());
    }

    /// Flushes to the kernel and starts an `fsync` on a blocking thread
    /// unless the previous one is still running.
    fn flush(&mut self) {
        if let Err(e) = self.log.flush() {
            if let Some(count) = self.log_errors.check() {
                tracing::error!(count, error = %crate::error_chain(&e), "console log write failed");
            }
            return;
        }
        let dropped = self.log.take_dropped();
        if dropped > 0 {
            tracing::error!(
                bytes = dropped,
                "console output was not logged: the disk refused writes"
            );
            let text = gap_marker(GapEvent::NotLogged { bytes: dropped }, SystemTime::now());
            self.record(RecordKind::Gap, text.as_bytes());
        }
        if self.sync.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        match self.log.sync_handle() {
            Ok(file) => {
                self.sync = Some(tokio::task::spawn_blocking(move || {
                    if let Err(e) = file.sync_data() {
                        tracing::error!(error = %e, "console log fsync failed");
                    }
                }));
            }
            Err(e) => tracing::error!(error = %crate::error_chain(&e), "console log fsync failed"),
        }
    }

    async fn finish(&mut self) {
        self.flush();
        if let Some(h) = self.sync.take() {
            let _ = h.await;
        }
        // One last synchronous sync so that `stop` means durable.
        if let Ok(file) = self.log.sync_handle() {
            let _ = tokio::task::spawn_blocking(move || file.sync_data()).await;
        }
        self.hub.close();
    }
}

/// One step of a key sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStep {
    /// Bytes to send.
    Send(Bytes),
    /// A pause (lets Xen print before the next key).
    Wait(Duration),
}

/// The Xen debug-key capture of a profile, run at lease end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenDebugKeys {
    /// Debug keys to send, in order (e.g. `h` help, `q` domain info, `r`
    /// run queues).
    pub keys: Vec<u8>,
    /// Pause after switching and after each key.
    pub key_interval: Duration,
    /// Whether to switch the console input back to dom0 at the end.
    pub switch_back: bool,
}

impl Default for XenDebugKeys {
    fn default() -> Self {
        XenDebugKeys {
            keys: b"hqr".to_vec(),
            key_interval: Duration::from_secs(1),
            switch_back: true,
        }
    }
}

/// `Ctrl-A` three times: switches Xen's serial console input between dom0
/// and the hypervisor.
pub const XEN_CONSOLE_SWITCH: &[u8] = b"\x01\x01\x01";

/// The steps of a Xen debug-key capture (pure): switch to Xen, each key
/// followed by a pause, switch back.
pub fn xen_debug_sequence(cfg: &XenDebugKeys) -> Vec<KeyStep> {
    let mut steps = vec![
        KeyStep::Send(Bytes::from_static(XEN_CONSOLE_SWITCH)),
        KeyStep::Wait(cfg.key_interval),
    ];
    for &k in &cfg.keys {
        steps.push(KeyStep::Send(Bytes::copy_from_slice(&[k])));
        steps.push(KeyStep::Wait(cfg.key_interval));
    }
    if cfg.switch_back {
        steps.push(KeyStep::Send(Bytes::from_static(XEN_CONSOLE_SWITCH)));
    }
    steps
}

/// Plays `steps` into a live capture (through the hub's input queue, not
/// the writer seat); what Xen prints in response is captured like any other
/// output.
pub async fn send_keys(hub: &Hub, steps: &[KeyStep]) -> Result<(), WriteError> {
    for step in steps {
        match step {
            KeyStep::Send(b) => hub.inject(SourceInput::Bytes(b.clone())).await?,
            KeyStep::Wait(d) => tokio::time::sleep(*d).await,
        }
    }
    Ok(())
}

/// Sends a break through a live capture.
pub async fn send_break(hub: &Hub) -> Result<(), WriteError> {
    hub.inject(SourceInput::Break).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_ceiling() {
        let c = CaptureConfig::default();
        let got: Vec<_> = [0, 1, 2, 6, 7, 40].map(|f| backoff(&c, f)).into();
        assert_eq!(
            got,
            [100, 200, 400, 6400, 10_000, 10_000].map(Duration::from_millis)
        );
    }

    #[test]
    fn xen_sequence_switches_sends_keys_and_switches_back() {
        let cfg = XenDebugKeys {
            keys: b"hq".to_vec(),
            key_interval: Duration::from_millis(5),
            switch_back: true,
        };
        let w = KeyStep::Wait(Duration::from_millis(5));
        assert_eq!(
            xen_debug_sequence(&cfg),
            vec![
                KeyStep::Send(Bytes::from_static(b"\x01\x01\x01")),
                w.clone(),
                KeyStep::Send(Bytes::from_static(b"h")),
                w.clone(),
                KeyStep::Send(Bytes::from_static(b"q")),
                w,
                KeyStep::Send(Bytes::from_static(b"\x01\x01\x01")),
            ]
        );
    }

    #[test]
    fn gap_marker_is_on_its_own_line() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(
            gap_marker(
                GapEvent::Lost {
                    reason: "end of stream"
                },
                at
            ),
            "\r\n[lab: console source lost at 2023-11-14T22:13:20.123Z: end of stream; reconnecting]\r\n"
        );
    }
}
