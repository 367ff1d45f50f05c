//! The DHCP sockets and their tokio loop: the only I/O in [`super`].
//!
//! One UDP socket on `0.0.0.0:67` (`SO_BROADCAST`, `SO_REUSEADDR`,
//! `SO_BINDTODEVICE` to the configured interface) and, in proxy mode, one
//! on `0.0.0.0:4011`. Each datagram is decoded ([`Request::decode`], which
//! never panics), decided ([`decide`]) and the reply sent from the socket it
//! came in on. Counters live in [`DhcpStats`].
//!
//! A datagram that does not decode (too short, no magic cookie, refused by
//! dhcproto, a dhcproto panic) is dropped and counted. The first one is
//! logged with its reason, then at most one line per
//! [`DhcpConfig::log_interval`] with the count since the previous line
//! (a [`LogLimiter`]): a flood of malformed packets costs two log lines, not
//! one per packet.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::config::{DhcpConfig, Mode};
use super::decide::{Decision, IgnoreReason, decide};
use super::packet::{self, Arrival, DHCP_SERVER_PORT, DecodeError, PXE_PORT, Request};
use crate::hosts::HostTable;
use crate::ratelimit::LogLimiter;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open a UDP socket on port {port} (interface {interface:?})")]
    Bind {
        port: u16,
        interface: Option<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("receiving on port {port} failed")]
    Recv {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Counters, readable while the server runs.
#[derive(Debug, Default)]
pub struct DhcpStats {
    /// Datagrams received (on any socket).
    pub received: AtomicU64,
    /// Replies sent.
    pub replied: AtomicU64,
    /// Requests from MACs not in the inventory.
    pub ignored_unknown: AtomicU64,
    /// Requests ignored for any other reason.
    pub ignored_other: AtomicU64,
    /// Datagrams that did not decode (including decoder panics).
    pub malformed: AtomicU64,
    /// Of `malformed`: those that made dhcproto panic (debug builds).
    pub decoder_panics: AtomicU64,
    /// Replies that could not be encoded or sent.
    pub send_errors: AtomicU64,
}

/// A copy of the counters at one moment (fields as in [`DhcpStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DhcpStatsSnapshot {
    pub received: u64,
    pub replied: u64,
    pub ignored_unknown: u64,
    pub ignored_other: u64,
    pub malformed: u64,
    pub decoder_panics: u64,
    pub send_errors: u64,
}

impl DhcpStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DhcpStatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DhcpStatsSnapshot {
            received: g(&self.received),
            replied: g(&self.replied),
            ignored_unknown: g(&self.ignored_unknown),
            ignored_other: g(&self.ignored_other),
            malformed: g(&self.malformed),
            decoder_panics: g(&self.decoder_panics),
            send_errors: g(&self.send_errors),
        }
    }
}

/// A bound DHCP server; [`DhcpServer::run`] serves until the future is
/// dropped or a socket fails.
#[derive(Debug)]
pub struct DhcpServer {
    cfg: Arc<DhcpConfig>,
    hosts: HostTable,
    stats: Arc<DhcpStats>,
    malformed_log: LogLimiter,
    dhcp: UdpSocket,
    pxe: Option<UdpSocket>,
}

impl DhcpServer {
    /// Bind the sockets (port 67, and 4011 in proxy mode). Must be called
    /// inside a tokio runtime. Needs `CAP_NET_BIND_SERVICE` and, with an
    /// interface, `CAP_NET_RAW`.
    pub fn bind(cfg: DhcpConfig, hosts: HostTable) -> Result<Self, ServerError> {
        let dhcp = bind_udp(DHCP_SERVER_PORT, cfg.interface.as_deref())?;
        let pxe = match cfg.mode {
            Mode::Proxy => Some(bind_udp(PXE_PORT, cfg.interface.as_deref())?),
            Mode::Authoritative => None,
        };
        Ok(Self {
            malformed_log: LogLimiter::new(cfg.log_interval),
            cfg: Arc::new(cfg),
            hosts,
            stats: Arc::default(),
            dhcp,
            pxe,
        })
    }

    pub fn stats(&self) -> Arc<DhcpStats> {
        Arc::clone(&self.stats)
    }

    /// Serve forever (cancel by dropping the future).
    pub async fn run(self) -> Result<(), ServerError> {
        info!(
            mode = ?self.cfg.mode,
            interface = ?self.cfg.interface,
            server_ip = %self.cfg.server_ip,
            "DHCP server running"
        );
        let mut buf67 = vec![0u8; 1500];
        let mut buf4011 = vec![0u8; 1500];
        let mut tick = tokio::time::interval(self.cfg.log_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (sock, arrival, len, src) = tokio::select! {
                _ = tick.tick() => {
                    if let Some(count) = self.malformed_log.flush() {
                        warn!(count, "malformed DHCP datagrams dropped");
                    }
                    continue;
                }
                r = self.dhcp.recv_from(&mut buf67) => {
                    let (len, src) = r.map_err(|source| ServerError::Recv { port: DHCP_SERVER_PORT, source })?;
                    (&self.dhcp, Arrival::Dhcp, len, src)
                }
                r = recv_opt(self.pxe.as_ref(), &mut buf4011) => {
                    let (len, src) = r.map_err(|source| ServerError::Recv { port: PXE_PORT, source })?;
                    (self.pxe.as_ref().unwrap_or(&self.dhcp), Arrival::Pxe, len, src)
                }
            };
            let bytes = match arrival {
                Arrival::Dhcp => &buf67[..len],
                Arrival::Pxe => &buf4011[..len],
            };
            self.handle(sock, bytes, src, arrival).await;
        }
    }

    async fn handle(&self, sock: &UdpSocket, bytes: &[u8], src: SocketAddr, arrival: Arrival) {
        let stats = &self.stats;
        DhcpStats::bump(&stats.received);
        let src = match src {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => return,
        };
        let req = match Request::decode(bytes, src, arrival) {
            Ok(r) => r,
            Err(e) => {
                DhcpStats::bump(&stats.malformed);
                if matches!(e, DecodeError::Panicked { .. }) {
                    DhcpStats::bump(&stats.decoder_panics);
                }
                if let Some(count) = self.malformed_log.check() {
                    warn!(%src, error = %e, count, "malformed DHCP datagram dropped");
                }
                return;
            }
        };
        let msg_type = req.msg.opts().msg_type();
        match decide(&req, &self.hosts, &self.cfg) {
            Decision::Ignore(reason) => {
                let counter = if reason == IgnoreReason::UnknownMac {
                    &stats.ignored_unknown
                } else {
                    &stats.ignored_other
                };
                DhcpStats::bump(counter);
                debug!(mac = %req.mac, ?msg_type, ?reason, "DHCP request ignored");
            }
            Decision::Reply(reply, to) => {
                let sent = match packet::encode(&reply) {
                    Ok(out) => sock
                        .send_to(&out, to)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match sent {
                    Ok(()) => {
                        DhcpStats::bump(&stats.replied);
                        info!(
                            mac = %req.mac,
                            ?msg_type,
                            reply = ?reply.opts().msg_type(),
                            yiaddr = %reply.yiaddr(),
                            file = ?reply.fname_str().and_then(Result::ok),
                            %to,
                            "DHCP reply sent"
                        );
                    }
                    Err(error) => {
                        DhcpStats::bump(&stats.send_errors);
                        warn!(mac = %req.mac, %to, error, "DHCP reply not sent");
                    }
                }
            }
        }
    }
}

async fn recv_opt(
    sock: Option<&UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

fn bind_udp(port: u16, interface: Option<&str>) -> Result<UdpSocket, ServerError> {
    let err = |source| ServerError::Bind {
        port,
        interface: interface.map(str::to_owned),
        source,
    };
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_broadcast(true).map_err(err)?;
    // Bursts of DISCOVERs (a rack powering on) overflow the default receive
    // buffer long before the CPU is busy; the kernel caps this at rmem_max.
    if let Err(e) = sock.set_recv_buffer_size(4 << 20) {
        tracing::debug!(error = %e, "could not enlarge the DHCP receive buffer");
    }
    if let Some(ifname) = interface {
        sock.bind_device(Some(ifname.as_bytes())).map_err(err)?;
    }
    sock.set_nonblocking(true).map_err(err)?;
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    sock.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(sock.into()).map_err(err)
}
