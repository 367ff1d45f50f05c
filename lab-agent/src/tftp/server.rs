//! The TFTP sockets: one main socket that takes requests, and one task with
//! its own ephemeral socket (the server's TID, RFC 1350) per transfer. All
//! decisions come from [`super::packet`] and [`super::session`]; files come
//! from a [`FileSource`], which does the path confinement.
//!
//! Behaviour worth knowing:
//! - Read-only: a WRQ gets ERROR 4. A refused path gets ERROR 2, a missing
//!   one ERROR 1 at once (no retries, no delay).
//! - At most `max_transfers` transfers run at once, and at most
//!   `max_transfers_per_client` for one client IP address; a request beyond
//!   either is answered from the main socket with ERROR 0 "server busy" so
//!   the client fails fast instead of retrying into a full server. Refusals
//!   are counted and logged once per `log_interval` with their count.
//! - A request identical to one whose transfer is running, from the same
//!   client address and port (a retransmitted RRQ), is ignored and counted:
//!   it never starts a second transfer; the running one answers it by its
//!   own retransmissions. A different request from that port is a new
//!   transfer (a client that gave up on the first, or a tsize probe
//!   followed by the real request).
//! - A transfer ends when the client is silent for (`retries` + 1) × its
//!   timeout (client timeouts above `max_timeout` are not granted), and in
//!   any case at its overall deadline ([`Limits::deadline`]).
//! - Malformed datagrams are dropped and counted in [`TftpStats`] (and
//!   logged once per `log_interval` on the main socket); so are stray
//!   non-request packets on the main socket.
//! - The transfer socket is bound to the listen IP and connected to the
//!   client, so the kernel drops datagrams from other TIDs (no ERROR 5 is
//!   sent for them). With an unspecified listen IP the kernel chooses the
//!   source address by route.
//! - Each transfer runs on tokio's blocking pool with a std socket (blocking
//!   `recv` with a timeout): a transfer is a sequential, latency-bound
//!   exchange, and that wakes faster than a reactor round trip. The
//!   `max_transfers` cap bounds the threads. Files are read in 1 MiB chunks
//!   with positioned reads; DATA packets are built in one reused buffer.
//! - A window's DATA packets go out in one `sendmsg` with UDP GSO
//!   (`UDP_SEGMENT`, Linux), which the kernel splits into the datagrams;
//!   where GSO is refused the transfer sends packet by packet. Lockstep
//!   sends one packet, so it is unchanged.

use super::packet::{DATA_HEADER_LEN, ErrorCode, Packet, Request, error_bytes, write_data_header};
use super::session::{Limits, Sender, Step, negotiate};
use crate::assets::{Content, FileSource, OpenError};
use crate::ratelimit::{DEFAULT_LOG_INTERVAL, LogLimiter};
use crate::slots::{Refused, SlotLimits, Slots};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use std::time::Instant;
use tokio::net::UdpSocket;
use tracing::{debug, info_span, warn};

/// How much of a file one positioned read fetches.
const READ_CHUNK: usize = 1 << 20;
/// Receive buffer for requests and ACKs (options can make a request long).
const RECV_BUF: usize = 65536;

/// Server settings. [`TftpConfig::default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpConfig {
    pub listen: SocketAddr,
    /// Largest `blksize` granted; keep DATA within one Ethernet frame for
    /// firmware that cannot reassemble fragments (1468 = 1500 - IP - UDP -
    /// TFTP headers... with room for VLAN tags).
    pub blksize_cap: u16,
    pub windowsize_cap: u16,
    /// Transfers at once, from all clients (also the bound on threads).
    pub max_transfers: usize,
    /// Transfers at once from one IP address.
    pub max_transfers_per_client: usize,
    /// Retransmit timeout when the client does not negotiate one.
    pub timeout: Duration,
    /// The largest `timeout` option granted; a larger one is not
    /// acknowledged and `timeout` is used.
    pub max_timeout: Duration,
    /// Resends of the same window before the transfer is abandoned.
    pub retries: u32,
    /// Every transfer may take `deadline_floor` plus its length at
    /// `min_rate` bytes per second, then it is abandoned.
    pub deadline_floor: Duration,
    pub min_rate: u64,
    /// One log line per this interval for each kind of flood.
    pub log_interval: Duration,
}

impl Default for TftpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 69),
            blksize_cap: 1468,
            windowsize_cap: 64,
            max_transfers: 64,
            max_transfers_per_client: 8,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(5),
            retries: 5,
            deadline_floor: Duration::from_secs(60),
            min_rate: 16 * 1024,
            log_interval: DEFAULT_LOG_INTERVAL,
        }
    }
}

impl TftpConfig {
    fn validate(&self) -> Result<(), TftpError> {
        let bad = |reason| Err(TftpError::InvalidConfig { reason });
        if !(8..=super::packet::MAX_BLKSIZE).contains(&self.blksize_cap) {
            return bad("blksize_cap must be within 8..=65464");
        }
        if self.windowsize_cap == 0 {
            return bad("windowsize_cap must be at least 1");
        }
        if self.max_transfers == 0 || self.max_transfers_per_client == 0 {
            return bad("max_transfers and max_transfers_per_client must be at least 1");
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive");
        }
        if self.max_timeout < Duration::from_secs(1) || self.max_timeout > Duration::from_secs(255)
        {
            return bad("max_timeout must be within 1..=255 s");
        }
        if self.min_rate == 0 || self.deadline_floor.is_zero() || self.log_interval.is_zero() {
            return bad("min_rate, deadline_floor and log_interval must be positive");
        }
        Ok(())
    }
}

/// Errors of the server itself (a transfer's failures are only logged and
/// counted).
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error("invalid TFTP config: {reason}")]
    InvalidConfig { reason: &'static str },
    #[error("cannot bind TFTP socket on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TFTP main socket failed")]
    Socket(#[source] std::io::Error),
}

/// Counters, updated with relaxed atomics; read them with [`TftpStats::snapshot`].
#[derive(Debug, Default)]
pub struct TftpStats {
    requests: AtomicU64,
    malformed: AtomicU64,
    stray: AtomicU64,
    busy: AtomicU64,
    client_busy: AtomicU64,
    duplicates: AtomicU64,
    active: AtomicU64,
    write_refused: AtomicU64,
    not_found: AtomicU64,
    forbidden: AtomicU64,
    refused: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    deadline_exceeded: AtomicU64,
    retransmits: AtomicU64,
    bytes_sent: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TftpStatsSnapshot {
    /// Read requests received (accepted or not).
    pub requests: u64,
    /// Datagrams that did not decode, on any socket.
    pub malformed: u64,
    /// Valid packets that made no sense where they arrived.
    pub stray: u64,
    /// Requests refused because `max_transfers` were running.
    pub busy: u64,
    /// Requests refused because their client IP address had
    /// `max_transfers_per_client` running.
    pub client_busy: u64,
    /// Requests ignored because a transfer of the same request from the
    /// same client address and port is running (retransmitted RRQs).
    pub duplicates: u64,
    /// Transfers running now.
    pub active: u64,
    pub write_refused: u64,
    pub not_found: u64,
    /// Paths refused by the file source (ERROR 2).
    pub forbidden: u64,
    /// Requests refused for their mode or options.
    pub refused: u64,
    pub completed: u64,
    /// Transfers abandoned (timeouts, client errors, I/O errors, deadline).
    pub failed: u64,
    /// Transfers abandoned at their overall deadline (also in `failed`).
    pub deadline_exceeded: u64,
    /// DATA/OACK packets sent again after a timeout.
    pub retransmits: u64,
    /// Payload bytes sent, retransmits included.
    pub bytes_sent: u64,
}

impl TftpStats {
    pub fn snapshot(&self) -> TftpStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TftpStatsSnapshot {
            requests: g(&self.requests),
            malformed: g(&self.malformed),
            stray: g(&self.stray),
            busy: g(&self.busy),
            client_busy: g(&self.client_busy),
            duplicates: g(&self.duplicates),
            active: g(&self.active),
            write_refused: g(&self.write_refused),
            not_found: g(&self.not_found),
            forbidden: g(&self.forbidden),
            refused: g(&self.refused),
            completed: g(&self.completed),
            failed: g(&self.failed),
            deadline_exceeded: g(&self.deadline_exceeded),
            retransmits: g(&self.retransmits),
            bytes_sent: g(&self.bytes_sent),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// A bound TFTP server. `bind`, then `run` (or `run_until`) in a task.
pub struct TftpServer {
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
}

struct Shared {
    config: TftpConfig,
    limits: Limits,
    source: Arc<dyn FileSource>,
    stats: Arc<TftpStats>,
    /// Keyed by client address and port and the request's bytes: a
    /// retransmitted request is a duplicate, another request is not.
    slots: Arc<Slots<(SocketAddr, Box<[u8]>)>>,
    floods: Floods,
}

/// The flood log limiters of one server.
struct Floods {
    busy: LogLimiter,
    malformed: LogLimiter,
}

impl Floods {
    fn flush(&self) {
        if let Some(count) = self.busy.flush() {
            warn!(count, "TFTP requests refused: server busy");
        }
        if let Some(count) = self.malformed.flush() {
            warn!(count, "malformed TFTP requests dropped");
        }
    }
}

impl TftpServer {
    /// Validate `config` and bind the main socket (port 0 picks a free one).
    pub async fn bind(config: TftpConfig, source: Arc<dyn FileSource>) -> Result<Self, TftpError> {
        config.validate()?;
        let socket = UdpSocket::bind(config.listen)
            .await
            .map_err(|source| TftpError::Bind {
                addr: config.listen,
                source,
            })?;
        let limits = Limits {
            blksize_cap: config.blksize_cap,
            windowsize_cap: config.windowsize_cap,
            default_timeout: config.timeout,
            max_timeout: config.max_timeout,
            deadline_floor: config.deadline_floor,
            min_rate: config.min_rate,
        };
        let slots = Slots::new(SlotLimits {
            total: config.max_transfers,
            per_client: config.max_transfers_per_client,
        });
        let floods = Floods {
            busy: LogLimiter::new(config.log_interval),
            malformed: LogLimiter::new(config.log_interval),
        };
        Ok(Self {
            socket: Arc::new(socket),
            shared: Arc::new(Shared {
                config,
                limits,
                source,
                stats: Arc::new(TftpStats::default()),
                slots,
                floods,
            }),
        })
    }

    /// The bound address of the main socket.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn stats(&self) -> Arc<TftpStats> {
        self.shared.stats.clone()
    }

    /// Serve forever (until the main socket fails).
    pub async fn run(self) -> Result<(), TftpError> {
        self.run_until(std::future::pending()).await
    }

    /// Serve until `shutdown` completes. Transfers already running go on in
    /// their own tasks until they end.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), TftpError> {
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; RECV_BUF];
        let local_ip = self.socket.local_addr().map_err(TftpError::Socket)?.ip();
        let mut tick = tokio::time::interval(self.shared.config.log_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (n, peer) = tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    // ICMP errors from earlier replies surface here on some
                    // systems; they say nothing about this socket.
                    Err(e) if is_transient(&e) => continue,
                    Err(e) => return Err(TftpError::Socket(e)),
                },
                _ = tick.tick() => {
                    self.shared.floods.flush();
                    continue;
                }
                () = &mut shutdown => {
                    self.shared.floods.flush();
                    return Ok(());
                }
            };
            self.on_datagram(&buf[..n], peer, local_ip).await;
        }
    }

    async fn on_datagram(&self, bytes: &[u8], peer: SocketAddr, local_ip: IpAddr) {
        let stats = &self.shared.stats;
        match Packet::decode(bytes) {
            Ok(Packet::Rrq(req)) => {
                bump(&stats.requests);
                match self
                    .shared
                    .slots
                    .try_acquire(peer.ip(), (peer, bytes.into()))
                {
                    Ok(slot) => {
                        let shared = self.shared.clone();
                        let span = info_span!("tftp", client = %peer, file = %req.filename);
                        stats.active.fetch_add(1, Ordering::Relaxed);
                        tokio::task::spawn_blocking(move || {
                            span.in_scope(|| transfer(&shared, req, peer, local_ip));
                            drop(slot);
                            shared.stats.active.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Err(Refused::Duplicate) => {
                        bump(&stats.duplicates);
                        debug!(client = %peer, "repeated TFTP request ignored: its transfer is running");
                    }
                    Err(why) => {
                        bump(match why {
                            Refused::ClientFull(_) => &stats.client_busy,
                            _ => &stats.busy,
                        });
                        if let Some(count) = self.shared.floods.busy.check() {
                            warn!(client = %peer.ip(), reason = %why, count, "TFTP request refused: server busy");
                        }
                        self.reply(peer, ErrorCode::NotDefined, "server busy").await;
                    }
                }
            }
            Ok(Packet::Wrq(_)) => {
                bump(&stats.write_refused);
                self.reply(peer, ErrorCode::IllegalOperation, "read-only server")
                    .await;
            }
            Ok(_) => bump(&stats.stray),
            Err(e) => {
                bump(&stats.malformed);
                if let Some(count) = self.shared.floods.malformed.check() {
                    warn!(client = %peer, error = %e, count, "malformed TFTP request dropped");
                }
            }
        }
    }

    async fn reply(&self, peer: SocketAddr, code: ErrorCode, msg: &str) {
        if let Err(e) = self.socket.send_to(&error_bytes(code, msg), peer).await {
            debug!(client = %peer, error = %e, "cannot send TFTP error");
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | Interrupted | WouldBlock
    )
}

/// The bytes of one transfer.
enum Body {
    Bytes(Vec<u8>),
    File {
        file: File,
        len: u64,
        /// `cache` holds the file from `cache_off`.
        cache: Vec<u8>,
        cache_off: u64,
    },
}

impl Body {
    /// `len` bytes at `off`, reading the file when they are not cached.
    fn slice(&mut self, off: u64, len: usize) -> std::io::Result<&[u8]> {
        match self {
            Body::Bytes(b) => {
                let start = (off as usize).min(b.len());
                let end = (start + len).min(b.len());
                Ok(&b[start..end])
            }
            Body::File {
                file,
                len: file_len,
                cache,
                cache_off,
            } => {
                let cached_end = *cache_off + cache.len() as u64;
                if off < *cache_off || off + len as u64 > cached_end {
                    let want = (*file_len - off.min(*file_len)).min(READ_CHUNK.max(len) as u64);
                    cache.resize(want as usize, 0);
                    let mut done = 0;
                    while done < cache.len() {
                        match file.read_at(&mut cache[done..], off + done as u64) {
                            Ok(0) => break,
                            Ok(n) => done += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    cache.truncate(done);
                    *cache_off = off;
                }
                let start = (off - *cache_off) as usize;
                let end = (start + len).min(cache.len());
                if end - start < len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank during the transfer",
                    ));
                }
                Ok(&cache[start..end])
            }
        }
    }
}

/// How a transfer ended, for the counters and the log.
enum Outcome {
    Completed,
    Failed(&'static str),
    /// The overall deadline passed (also a failure).
    TooSlow,
    Refused,
}

/// One whole transfer, on a blocking-pool thread: a transfer is a strictly
/// sequential, latency-bound exchange, and a blocking `recv` with a socket
/// timeout wakes faster than a reactor round trip (this is what makes
/// lockstep throughput match tftpd-hpa's).
fn transfer(shared: &Shared, req: Request, peer: SocketAddr, local_ip: IpAddr) {
    let stats = &shared.stats;
    let bind_ip = match (local_ip, peer) {
        (ip, _) if !ip.is_unspecified() => ip,
        (_, SocketAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (_, SocketAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = match std::net::UdpSocket::bind((bind_ip, 0)).and_then(|s| {
        s.connect(peer)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot open a TFTP transfer socket");
            bump(&stats.failed);
            return;
        }
    };
    match run_transfer(shared, &socket, req, peer) {
        Outcome::Completed => bump(&stats.completed),
        Outcome::Failed(why) => {
            bump(&stats.failed);
            debug!(reason = why, "TFTP transfer failed");
        }
        Outcome::TooSlow => {
            bump(&stats.failed);
            bump(&stats.deadline_exceeded);
            debug!("TFTP transfer abandoned at its deadline");
        }
        Outcome::Refused => {}
    }
}

fn send_error(socket: &std::net::UdpSocket, code: ErrorCode, msg: &str) {
    let _ = socket.send(&error_bytes(code, msg));
}

fn run_transfer(
    shared: &Shared,
    socket: &std::net::UdpSocket,
    req: Request,
    peer: SocketAddr,
) -> Outcome {
    let stats = &shared.stats;
    let started = Instant::now();
    let negotiated = match negotiate(&req, &shared.limits) {
        Ok(n) => n,
        Err(r) => {
            bump(&stats.refused);
            send_error(socket, r.code(), &r.to_string());
            return Outcome::Refused;
        }
    };
    let content = match shared.source.open(&req.filename, Some(peer.ip())) {
        Ok(c) => c,
        Err(e) => {
            let code = match &e {
                OpenError::NotFound => {
                    bump(&stats.not_found);
                    ErrorCode::FileNotFound
                }
                OpenError::Forbidden(_) => {
                    bump(&stats.forbidden);
                    ErrorCode::AccessViolation
                }
                OpenError::Io(_) => ErrorCode::NotDefined,
            };
            debug!(
                error = &e as &dyn std::error::Error,
                "TFTP request not served"
            );
            send_error(socket, code, &e.to_string());
            return match e {
                OpenError::Io(_) => Outcome::Failed("cannot open file"),
                _ => Outcome::Refused,
            };
        }
    };
    let len = content.len();
    let give_up_at = started + shared.limits.deadline(len);
    let mut body = match content {
        Content::Bytes(b) => Body::Bytes(b),
        Content::File { file, len } => Body::File {
            file,
            len,
            cache: Vec::new(),
            cache_off: 0,
        },
    };
    let oack = negotiated
        .oack(len)
        .map(|options| Packet::Oack { options }.encode());
    let mut sender = Sender::new(
        len,
        negotiated.blksize,
        negotiated.windowsize,
        oack.is_some(),
        shared.config.retries,
    );
    let mut batch = Batch::new(usize::from(negotiated.blksize));
    let mut buf = vec![0u8; RECV_BUF];
    let mut rcv_timeout = None;
    let mut step = sender.start();
    let mut deadline = Instant::now();
    loop {
        match step {
            Step::SendOack => {
                if sender.is_retry() {
                    bump(&stats.retransmits);
                }
                if let Some(o) = &oack
                    && let Err(e) = socket.send(o)
                {
                    debug!(error = %e, "send failed");
                    return Outcome::Failed("send failed");
                }
                deadline = Instant::now() + negotiated.timeout;
            }
            Step::SendBlocks { first, last } => {
                if sender.is_retry() {
                    stats
                        .retransmits
                        .fetch_add(last - first + 1, Ordering::Relaxed);
                }
                let mut n = first;
                while n <= last {
                    let upto = last.min(n + batch.max_blocks as u64 - 1);
                    let payload = match batch.fill(&sender, &mut body, n, upto) {
                        Ok(p) => p,
                        Err(e) => {
                            warn!(error = %e, "cannot read file");
                            send_error(socket, ErrorCode::NotDefined, "cannot read file");
                            return Outcome::Failed("read failed");
                        }
                    };
                    if let Err(e) = batch.send(socket) {
                        debug!(error = %e, "send failed");
                        return Outcome::Failed("send failed");
                    }
                    stats.bytes_sent.fetch_add(payload, Ordering::Relaxed);
                    n = upto + 1;
                }
                deadline = Instant::now() + negotiated.timeout;
            }
            Step::Wait => {}
            Step::Done => return Outcome::Completed,
            Step::GiveUp => {
                send_error(socket, ErrorCode::NotDefined, "timed out");
                return Outcome::Failed("timed out");
            }
        }
        if Instant::now() >= give_up_at {
            send_error(socket, ErrorCode::NotDefined, "transfer too slow");
            return Outcome::TooSlow;
        }
        step = match recv_until(socket, &mut buf, deadline.min(give_up_at), &mut rcv_timeout) {
            // The loop head sees whether it was the overall deadline.
            Recv::Timeout if Instant::now() >= give_up_at => Step::Wait,
            Recv::Timeout => sender.on_timeout(),
            Recv::Failed(e) => {
                debug!(error = %e, "receive failed");
                return Outcome::Failed("client went away");
            }
            Recv::Got(n) => match Packet::decode(&buf[..n]) {
                Ok(Packet::Ack { block }) => sender.on_ack(block),
                Ok(Packet::Error { code, message }) => {
                    debug!(code = code.code(), %message, "client aborted");
                    return Outcome::Failed("client sent an error");
                }
                Ok(_) => {
                    bump(&stats.stray);
                    Step::Wait
                }
                Err(_) => {
                    bump(&stats.malformed);
                    Step::Wait
                }
            },
        };
    }
}

enum Recv {
    Got(usize),
    Timeout,
    Failed(std::io::Error),
}

/// How far the socket's receive timeout may be off the time left before it
/// is set again: a retransmit a few milliseconds late does not matter, and
/// skipping the `setsockopt` saves a syscall per ACK in lockstep.
const RCV_TIMEOUT_SLACK: Duration = Duration::from_millis(10);

/// One datagram, or `Timeout` once `deadline` has passed. `current` is the
/// receive timeout last set on `socket`.
fn recv_until(
    socket: &std::net::UdpSocket,
    buf: &mut [u8],
    deadline: Instant,
    current: &mut Option<Duration>,
) -> Recv {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Recv::Timeout;
        }
        // A timeout that fires early only makes this loop go round again.
        if !current.is_some_and(|c| c.abs_diff(left) <= RCV_TIMEOUT_SLACK) {
            if let Err(e) = socket.set_read_timeout(Some(left)) {
                return Recv::Failed(e);
            }
            *current = Some(left);
        }
        match socket.recv(buf) {
            Ok(n) => return Recv::Got(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Recv::Failed(e),
        }
    }
}

/// Most DATA packets one GSO send carries (older kernels allow 64 segments).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes one GSO send carries: below the 64 KiB limit of one UDP
/// datagram, with room for IP and UDP headers.
const GSO_MAX_BYTES: usize = 65000;

/// Consecutive DATA packets laid out back to back, header and payload each,
/// in one buffer reused across windows. Every packet but the last of the
/// file is `DATA_HEADER_LEN + blksize` long, so the buffer is exactly what
/// UDP GSO (`UDP_SEGMENT`) splits into the datagrams: a window goes out with
/// one `sendmsg`. Where GSO is refused (old kernel, no checksum offload on
/// the route, a segment above the path MTU), the transfer falls back to one
/// `send` per packet for good.
struct Batch {
    /// Length of a full DATA packet.
    seg: usize,
    /// Most packets one send carries.
    max_blocks: usize,
    buf: Vec<u8>,
    gso: bool,
}

impl Batch {
    fn new(blksize: usize) -> Self {
        let seg = DATA_HEADER_LEN + blksize;
        let max_blocks = (GSO_MAX_BYTES / seg).clamp(1, GSO_MAX_SEGMENTS);
        Self {
            seg,
            max_blocks,
            buf: Vec::with_capacity(seg * max_blocks),
            gso: cfg!(target_os = "linux") && max_blocks > 1,
        }
    }

    /// Lay out blocks `first..=last` (at most `max_blocks`); returns their
    /// payload bytes.
    fn fill(
        &mut self,
        sender: &Sender,
        body: &mut Body,
        first: u64,
        last: u64,
    ) -> std::io::Result<u64> {
        self.buf.clear();
        let mut payload = 0;
        for n in first..=last {
            let (off, blen) = sender.block_range(n);
            let data = body.slice(off, blen)?;
            let mut header = [0u8; DATA_HEADER_LEN];
            write_data_header(&mut header, Sender::wire_block(n));
            self.buf.extend_from_slice(&header);
            self.buf.extend_from_slice(data);
            payload += blen as u64;
        }
        Ok(payload)
    }

    /// Send the packets laid out by [`Batch::fill`].
    fn send(&mut self, socket: &std::net::UdpSocket) -> std::io::Result<()> {
        if self.buf.len() <= self.seg {
            return socket.send(&self.buf).map(drop);
        }
        if self.gso {
            if send_gso(socket, &self.buf, self.seg)? {
                return Ok(());
            }
            self.gso = false;
        }
        for packet in self.buf.chunks(self.seg) {
            socket.send(packet)?;
        }
        Ok(())
    }
}

/// `buf` as datagrams of `seg` bytes (the last may be shorter), in one
/// `sendmsg` with a `UDP_SEGMENT` control message. `Ok(false)`: GSO was
/// refused for GSO's own reasons and nothing was sent.
#[cfg(target_os = "linux")]
fn send_gso(socket: &std::net::UdpSocket, buf: &[u8], seg: usize) -> std::io::Result<bool> {
    use nix::errno::Errno;
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    use std::os::fd::AsRawFd;
    let Ok(gso_size) = u16::try_from(seg) else {
        return Ok(false);
    };
    let iov = [std::io::IoSlice::new(buf)];
    let cmsg = [ControlMessage::UdpGsoSegments(&gso_size)];
    loop {
        let sent =
            sendmsg::<SockaddrStorage>(socket.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None);
        match sent {
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => {}
            // Old kernels, routes without checksum offload, segments above
            // the path MTU, too many segments.
            Err(
                e @ (Errno::EINVAL
                | Errno::EIO
                | Errno::EMSGSIZE
                | Errno::ENOPROTOOPT
                | Errno::EOPNOTSUPP),
            ) => {
                debug!(error = %e, "UDP GSO refused, sending packet by packet");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn send_gso(_: &std::net::UdpSocket, _: &[u8], _: usize) -> std::io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (std::net::UdpSocket, std::net::UdpSocket) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (a, b)
    }

    /// The datagrams `batch` puts on the wire, as received.
    fn sent(batch: &mut Batch, count: usize) -> Vec<Vec<u8>> {
        let (tx, rx) = pair();
        batch.send(&tx).unwrap();
        let mut buf = vec![0u8; 65536];
        (0..count)
            .map(|_| {
                let n = rx.recv(&mut buf).unwrap();
                buf[..n].to_vec()
            })
            .collect()
    }

    fn packets(sizes: &[usize]) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect()
    }

    #[test]
    fn a_window_goes_out_as_separate_datagrams() {
        // Full packets and a short last one, down to a bare header.
        for sizes in [&[516, 516, 516][..], &[516, 516, 100], &[516, 4], &[200]] {
            let mut batch = Batch::new(512);
            let want = packets(sizes);
            batch.buf = want.concat();
            assert_eq!(sent(&mut batch, want.len()), want, "{sizes:?}");
            assert_eq!(batch.gso, cfg!(target_os = "linux"));
        }
    }

    #[test]
    fn refused_gso_falls_back_to_one_send_per_packet() {
        // More segments than the kernel takes in one send (64 or 128).
        let mut batch = Batch::new(8 - DATA_HEADER_LEN);
        batch.max_blocks = 140;
        let mut sizes = vec![8; 139];
        sizes.push(5);
        let want = packets(&sizes);
        batch.buf = want.concat();
        assert_eq!(sent(&mut batch, 140), want);
        assert!(!batch.gso, "GSO stays off for the rest of the transfer");
        assert_eq!(sent(&mut batch, 140), want);
    }
}
