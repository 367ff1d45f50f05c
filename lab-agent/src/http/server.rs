//! The HTTP socket loop: accepts connections within the caps, serves each
//! with hyper's HTTP/1.1 connection driver under a progress watchdog, and
//! answers from a [`FileSource`].
//!
//! Behaviour worth knowing (the limits are [`HttpConfig`]'s):
//! - A connection beyond `max_connections`, or beyond
//!   `max_connections_per_client` from one IP address, is accepted and
//!   closed at once with a reset (no request read, no file opened), counted
//!   in [`HttpStats`] and logged through a [`LogLimiter`].
//! - A connection ends when its request headers take longer than
//!   `header_timeout` (also the wait for the next request on a kept-alive
//!   connection), when a send stays blocked for `send_timeout` (the client
//!   does not read), or when no byte moves for `idle_timeout` (see
//!   [`super::watch`]). With `TCP_NOTSENT_LOWAT` at 128 KiB a send
//!   progresses each time the client has read 64 KiB, so a client is cut
//!   only when it reads less than that in `send_timeout` (2 KiB/s with the
//!   default 30 s).
//! - A file body wakes its connection once more after its last frame:
//!   hyper can otherwise leave a pipelined request unread in its buffer
//!   until the connection's `idle_timeout` (found by the `http` fuzz
//!   target; see [`FileBody`]).
//! - Header names go out title-cased (`Content-Length: `): GRUB's HTTP
//!   client (aarch64 hosts load Xen, the kernel and the initrd with it)
//!   matches them byte for byte.
//! - Accept errors that are not about one connection (`EMFILE`, `ENFILE`,
//!   `ENOBUFS`, `ENOMEM`, …) pause accepting, 10 ms doubling to 1 s, and
//!   are logged once per burst with their count; the first accepted
//!   connection after them logs how many there were.

use super::request::{RangeDecision, decode_path, parse_range};
use super::watch::{Expired, Progress, Watched, watchdog};
use crate::assets::{Content, FileSource, OpenError};
use crate::ratelimit::{DEFAULT_LOG_INTERVAL, LogLimiter};
use crate::slots::{Refused, SlotLimits, Slots};
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io::{Seek, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

/// Bytes read from a file per body frame.
const CHUNK: usize = 64 * 1024;
/// How long open connections get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// First pause after an accept error; doubled per error up to the maximum.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// `TCP_NOTSENT_LOWAT` of every connection: the socket takes more data only
/// once fewer bytes than this wait unsent, so a send progresses as the
/// client reads (every 64 KiB it reads), not once half of a send buffer that
/// autotuning may have grown to megabytes has drained; and a client that
/// does not read pins at most this much unsent data plus its own window.
const SEND_LOWAT: u32 = 128 * 1024;

/// Server settings. [`HttpConfig::default`] gives the documented defaults,
/// sized so that HTTP and TFTP together stay within 1,024 open files: each
/// connection holds a socket and, while it sends a file, that file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Connections at once, from all clients.
    pub max_connections: usize,
    /// Connections at once from one IP address.
    pub max_connections_per_client: usize,
    /// How long a client may take to send a request's headers, and how
    /// long a kept-alive connection may wait for the next request.
    pub header_timeout: Duration,
    /// How long a connection may go with no byte moving either way.
    pub idle_timeout: Duration,
    /// How long a send may stay blocked on a client that does not read.
    pub send_timeout: Duration,
    /// One log line per this interval for each kind of flood.
    pub log_interval: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_client: 16,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            log_interval: DEFAULT_LOG_INTERVAL,
        }
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), HttpError> {
        let bad = |reason| Err(HttpError::InvalidConfig { reason });
        if self.max_connections == 0 || self.max_connections_per_client == 0 {
            return bad("max_connections and max_connections_per_client must be at least 1");
        }
        if self.header_timeout.is_zero()
            || self.idle_timeout.is_zero()
            || self.send_timeout.is_zero()
            || self.log_interval.is_zero()
        {
            return bad("timeouts and the log interval must be positive");
        }
        Ok(())
    }
}

/// Errors of the server itself (a connection's failures are only logged
/// and counted).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid HTTP config: {reason}")]
    InvalidConfig { reason: &'static str },
    #[error("cannot read the HTTP listener's address")]
    LocalAddr(#[source] std::io::Error),
}

/// Counters, updated with relaxed atomics; read them with [`HttpStats::snapshot`].
#[derive(Debug, Default)]
pub struct HttpStats {
    accepted: AtomicU64,
    active: AtomicU64,
    refused_full: AtomicU64,
    refused_client: AtomicU64,
    accept_errors: AtomicU64,
    requests: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    send_timeouts: AtomicU64,
    bytes_sent: Arc<AtomicU64>,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpStatsSnapshot {
    /// Connections accepted and served (refused ones not included).
    pub accepted: u64,
    /// Connections open now.
    pub active: u64,
    /// Connections closed at once: `max_connections` were open.
    pub refused_full: u64,
    /// Connections closed at once: their IP address held
    /// `max_connections_per_client`.
    pub refused_client: u64,
    /// Failed `accept` calls (each pause of the backoff counts one).
    pub accept_errors: u64,
    /// Requests answered, any status.
    pub requests: u64,
    /// Connections ended by `header_timeout`.
    pub header_timeouts: u64,
    /// Connections ended by `idle_timeout`.
    pub idle_timeouts: u64,
    /// Connections ended by `send_timeout`.
    pub send_timeouts: u64,
    /// Bytes written to clients (heads and bodies).
    pub bytes_sent: u64,
}

impl HttpStats {
    pub fn snapshot(&self) -> HttpStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HttpStatsSnapshot {
            accepted: g(&self.accepted),
            active: g(&self.active),
            refused_full: g(&self.refused_full),
            refused_client: g(&self.refused_client),
            accept_errors: g(&self.accept_errors),
            requests: g(&self.requests),
            header_timeouts: g(&self.header_timeouts),
            idle_timeouts: g(&self.idle_timeouts),
            send_timeouts: g(&self.send_timeouts),
            bytes_sent: g(&self.bytes_sent),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// The flood log limiters of one server.
#[derive(Debug)]
struct Floods {
    refused: LogLimiter,
    accept_errors: LogLimiter,
}

impl Floods {
    fn flush(&self) {
        if let Some(count) = self.refused.flush() {
            warn!(count, "http connections refused (connection limits)");
        }
        if let Some(count) = self.accept_errors.flush() {
            warn!(count, "http accept still failing; backing off");
        }
    }
}

/// An HTTP server on a bound listener: `new`, then `run_until` in a task.
pub struct HttpServer {
    listener: TcpListener,
    source: Arc<dyn FileSource>,
    config: HttpConfig,
    stats: Arc<HttpStats>,
    slots: Arc<Slots<SocketAddr>>,
}

impl HttpServer {
    /// Validate `config`; nothing is accepted until [`HttpServer::run_until`].
    pub fn new(
        listener: TcpListener,
        source: Arc<dyn FileSource>,
        config: HttpConfig,
    ) -> Result<Self, HttpError> {
        config.validate()?;
        let slots = Slots::new(SlotLimits {
            total: config.max_connections,
            per_client: config.max_connections_per_client,
        });
        Ok(Self {
            listener,
            source,
            config,
            stats: Arc::default(),
            slots,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, HttpError> {
        self.listener.local_addr().map_err(HttpError::LocalAddr)
    }

    pub fn stats(&self) -> Arc<HttpStats> {
        self.stats.clone()
    }

    /// Serve until `shutdown` completes, then let open connections finish
    /// for a bounded grace period.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let Self {
            listener,
            source,
            config,
            stats,
            slots,
        } = self;
        let floods = Floods {
            refused: LogLimiter::new(config.log_interval),
            accept_errors: LogLimiter::new(config.log_interval),
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        // Title-case header names (`Content-Length`, not hyper's
        // `content-length`): GRUB 2.06's HTTP client compares them
        // case-sensitively and, without a length it recognizes, cannot size
        // a file (xen_boot refuses it) nor tell where the body ends on a
        // kept-alive connection.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .title_case_headers(true);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tick = tokio::time::interval(config.log_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = AcceptFailures::default();
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {
                    floods.flush();
                    continue;
                }
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) if is_per_connection(&e) => {
                    bump(&stats.accept_errors);
                    debug!(error = &e as &dyn std::error::Error, "http accept failed");
                    continue;
                }
                Err(e) => {
                    // Out of descriptors or memory: the pending connection
                    // stays queued and accept would fail again at once.
                    bump(&stats.accept_errors);
                    let pause = failing.failed();
                    if let Some(count) = floods.accept_errors.check() {
                        warn!(
                            error = &e as &dyn std::error::Error,
                            count,
                            pause_ms = pause.as_millis() as u64,
                            "http accept failed; backing off"
                        );
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            };
            if let Some((failures, lasted)) = failing.recovered() {
                info!(
                    failures,
                    lasted_ms = lasted.as_millis() as u64,
                    "http accept works again"
                );
            }
            let slot = match slots.try_acquire(peer.ip(), peer) {
                Ok(slot) => slot,
                Err(why) => {
                    bump(match why {
                        Refused::ClientFull(_) => &stats.refused_client,
                        Refused::Full(_) | Refused::Duplicate => &stats.refused_full,
                    });
                    if let Some(count) = floods.refused.check() {
                        warn!(client = %peer.ip(), reason = %why, count, "http connection refused");
                    }
                    // A reset rather than a FIN: no TIME_WAIT left behind
                    // for a flood of refused connections.
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    continue;
                }
            };
            #[cfg(target_os = "linux")]
            if let Err(e) = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(SEND_LOWAT) {
                debug!(error = %e, "cannot set TCP_NOTSENT_LOWAT");
            }
            bump(&stats.accepted);
            stats.active.fetch_add(1, Ordering::Relaxed);
            let service = {
                let source = source.clone();
                let stats = stats.clone();
                hyper::service::service_fn(move |req| {
                    let source = source.clone();
                    bump(&stats.requests);
                    async move { Ok::<_, Infallible>(handle(req, source, peer).await) }
                })
            };
            let progress = Progress::new();
            let io = TokioIo::new(
                Watched::new(stream, progress.clone()).counting(stats.bytes_sent.clone()),
            );
            let conn = graceful.watch(builder.serve_connection(io, service));
            let stats = stats.clone();
            let (idle, send) = (config.idle_timeout, config.send_timeout);
            tokio::spawn(async move {
                let _slot = slot;
                tokio::select! {
                    r = conn => match r {
                        Ok(()) => {}
                        Err(e) if e.is_timeout() => {
                            bump(&stats.header_timeouts);
                            debug!(client = %peer, "http request headers timed out");
                        }
                        Err(e) => debug!(client = %peer, error = &e as &dyn std::error::Error, "http connection ended"),
                    },
                    why = watchdog(&progress, idle, send) => {
                        bump(match why {
                            Expired::Idle => &stats.idle_timeouts,
                            Expired::Send => &stats.send_timeouts,
                        });
                        debug!(client = %peer, ?why, "http connection timed out");
                    }
                }
                stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("http connections still open after the shutdown grace period");
        }
        floods.flush();
        Ok(())
    }
}

/// Pending connections the kernel queues for `accept`: a connection flood
/// fills a short queue while the agent is not scheduled for a few
/// milliseconds, and then honest clients' SYNs are dropped too (retried by
/// them after 1 s, then 3 s). The kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` (`SO_REUSEADDR`, a [`LISTEN_BACKLOG`] queue).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serve `source` on `listener` with the default [`HttpConfig`] until
/// `shutdown` completes, then let open connections finish for a bounded
/// grace period.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn FileSource>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    HttpServer::new(listener, source, HttpConfig::default())
        .expect("the default HTTP config is valid")
        .run_until(shutdown)
        .await
}

/// An accept error about one connection that is already gone; the next
/// accept may well succeed.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// A burst of accept errors: its length and the pause before the next try.
#[derive(Debug, Default)]
struct AcceptFailures {
    count: u64,
    since: Option<Instant>,
    pause: Duration,
}

impl AcceptFailures {
    /// One more error: how long to pause (10 ms, doubling to 1 s).
    fn failed(&mut self) -> Duration {
        self.count += 1;
        self.since.get_or_insert_with(Instant::now);
        self.pause = if self.pause.is_zero() {
            ACCEPT_BACKOFF_MIN
        } else {
            (self.pause * 2).min(ACCEPT_BACKOFF_MAX)
        };
        self.pause
    }

    /// An accept succeeded: the burst that ended, if any (count, length).
    fn recovered(&mut self) -> Option<(u64, Duration)> {
        let since = self.since.take()?;
        let count = std::mem::take(&mut self.count);
        self.pause = Duration::ZERO;
        Some((count, since.elapsed()))
    }
}

/// One request, in its span (also the fuzz target's entry into the server).
pub(crate) async fn handle(
    req: Request<Incoming>,
    source: Arc<dyn FileSource>,
    peer: SocketAddr,
) -> Response<Body> {
    let span = tracing::info_span!("http", client = %peer.ip(), path = %req.uri().path());
    async {
        let resp = respond(&req, source, peer.ip()).await;
        tracing::debug!(method = %req.method(), status = resp.status().as_u16(), "http request");
        resp
    }
    .instrument(span)
    .await
}

async fn respond(
    req: &Request<Incoming>,
    source: Arc<dyn FileSource>,
    client: IpAddr,
) -> Response<Body> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = status(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    let Some(path) = decode_path(req.uri().path()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    // Opening may canonicalize paths, read files and render templates.
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || source.open(&path, Some(client))).await
    };
    let content = match opened {
        Ok(Ok(c)) => c,
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "http open task failed"
            );
            return status(StatusCode::INTERNAL_SERVER_ERROR);
        }
        Ok(Err(e)) => return open_error(e),
    };
    let len = content.len();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (code, start, end) = match parse_range(range, len) {
        RangeDecision::Full => (StatusCode::OK, 0, len),
        RangeDecision::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end + 1),
        RangeDecision::Unsatisfiable => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE);
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            return r;
        }
    };
    let body = if head {
        Body::Empty
    } else {
        match content {
            Content::Bytes(b) => {
                Body::Bytes(Some(Bytes::from(b).slice(start as usize..end as usize)))
            }
            Content::File { mut file, .. } => {
                if let Err(e) = file.seek(SeekFrom::Start(start)) {
                    tracing::warn!(error = &e as &dyn std::error::Error, "http seek failed");
                    return status(StatusCode::INTERNAL_SERVER_ERROR);
                }
                Body::File(FileBody {
                    file: Box::new(tokio::fs::File::from_std(file)),
                    remaining: end - start,
                    buf: vec![0; CHUNK],
                })
            }
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(
            if [".ipxe", ".preseed", ".lease"]
                .iter()
                .any(|e| path.ends_with(e))
            {
                "text/plain; charset=utf-8"
            } else {
                "application/octet-stream"
            },
        ),
    );
    if code == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)).expect("ascii"),
        );
    }
    r
}

fn open_error(e: OpenError) -> Response<Body> {
    match e {
        OpenError::NotFound => status(StatusCode::NOT_FOUND),
        OpenError::Forbidden(why) => {
            tracing::info!(why, "http request refused");
            status(StatusCode::FORBIDDEN)
        }
        OpenError::Io(e) => {
            tracing::warn!(error = &e as &dyn std::error::Error, "http open failed");
            status(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// An empty response with `code` (and `Content-Length: 0`).
fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
    r
}

/// A response body: nothing, generated bytes, or a file streamed in chunks.
pub enum Body {
    Empty,
    Bytes(Option<Bytes>),
    File(FileBody),
}

/// A file region, read 64 KiB per frame (on the blocking pool for a real
/// file). Its last frame also wakes the connection's task: when that frame
/// arrives on hyper's second write poll of a pass (the read completing in
/// between), hyper 1.12 and 1.13 go idle with a pipelined request still in
/// their read buffer and wait for an I/O wake-up the client never causes.
pub struct FileBody {
    file: Box<dyn AsyncRead + Send + Unpin>,
    remaining: u64,
    buf: Vec<u8>,
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::File(f) => {
                if f.remaining == 0 {
                    return Poll::Ready(None);
                }
                let want = (f.remaining.min(CHUNK as u64)) as usize;
                let mut rb = ReadBuf::new(&mut f.buf[..want]);
                match Pin::new(&mut f.file).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            // The file shrank under us: fail rather than send short.
                            return Poll::Ready(Some(
                                Err(std::io::ErrorKind::UnexpectedEof.into()),
                            ));
                        }
                        f.remaining -= n as u64;
                        if f.remaining == 0 {
                            // hyper (1.12, 1.13) can miss a pipelined
                            // request when a body's last frame arrives on
                            // the second write poll of a pass: it goes idle
                            // with the request in its read buffer and waits
                            // for a wake-up that the client, waiting for its
                            // answer, never causes. One more poll reads it.
                            cx.waker().wake_by_ref();
                        }
                        Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Bytes(b) => b.is_none(),
            Body::File(f) => f.remaining == 0,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Empty => http_body::SizeHint::with_exact(0),
            Body::Bytes(b) => {
                http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            Body::File(f) => http_body::SizeHint::with_exact(f.remaining),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose every read is pending once and then ready when polled
    /// again, with no wake-up in between: what hyper sees when a read on
    /// the blocking pool completes between its two write polls of one pass.
    struct ReadyOnSecondPoll {
        data: std::io::Cursor<&'static [u8]>,
        pending: bool,
    }

    impl AsyncRead for ReadyOnSecondPoll {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.pending = !self.pending;
            if self.pending {
                return Poll::Pending;
            }
            Pin::new(&mut self.data).poll_read(cx, buf)
        }
    }

    /// Found by the `http` fuzz target (a hang): the client pipelines two
    /// requests; the first response's file body ends on hyper's write
    /// re-check, after which hyper goes idle with the second request in its
    /// read buffer and no wake-up to come. Both responses must arrive.
    #[tokio::test(start_paused = true)]
    async fn a_pipelined_request_after_a_file_body_is_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const FILE: &[u8] = b"inside";
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = hyper::service::service_fn(|_req| async {
            let mut r = Response::new(Body::File(FileBody {
                file: Box::new(ReadyOnSecondPoll {
                    data: std::io::Cursor::new(FILE),
                    pending: false,
                }),
                remaining: FILE.len() as u64,
                buf: vec![0; CHUNK],
            }));
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(FILE.len()));
            Ok::<_, Infallible>(r)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HttpConfig::default().header_timeout);
        tokio::spawn(builder.serve_connection(TokioIo::new(server), service));
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let bodies = |out: &[u8]| out.windows(FILE.len()).filter(|w| *w == FILE).count();
        let mut out = Vec::new();
        let mut buf = [0; 4096];
        // The clock is paused: a stalled connection times out at once.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while bodies(&out) < 2 {
                match client.read(&mut buf).await.unwrap() {
                    0 => break,
                    n => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert_eq!(bodies(&out), 2, "{}", String::from_utf8_lossy(&out));
    }

    #[tokio::test(start_paused = true)]
    async fn accept_backoff_doubles_to_a_second_and_ends_with_the_burst() {
        let mut f = AcceptFailures::default();
        assert_eq!(f.recovered(), None, "no burst yet");
        let pauses: Vec<u64> = (0..10).map(|_| f.failed().as_millis() as u64).collect();
        assert_eq!(
            pauses,
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000],
            "10 ms doubling to 1 s"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(f.recovered(), Some((10, Duration::from_secs(5))));
        assert_eq!(f.recovered(), None, "reported once");
        assert_eq!(f.failed(), ACCEPT_BACKOFF_MIN, "a new burst starts over");
    }

    #[test]
    fn per_connection_errors_do_not_back_off() {
        use std::io::{Error, ErrorKind};
        assert!(is_per_connection(&Error::from(
            ErrorKind::ConnectionAborted
        )));
        // EMFILE (24), ENFILE (23), ENOBUFS (105), ENOMEM (12) on Linux.
        for errno in [24, 23, 105, 12] {
            assert!(!is_per_connection(&Error::from_raw_os_error(errno)));
        }
    }

    #[test]
    fn config_validation() {
        assert!(HttpConfig::default().validate().is_ok());
        for bad in [
            HttpConfig {
                max_connections: 0,
                ..HttpConfig::default()
            },
            HttpConfig {
                max_connections_per_client: 0,
                ..HttpConfig::default()
            },
            HttpConfig {
                send_timeout: Duration::ZERO,
                ..HttpConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
