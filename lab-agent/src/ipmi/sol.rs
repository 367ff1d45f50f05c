//! Serial-over-LAN (IPMI 2.0 payload type 1) over our RMCP+ session.
//!
//! - Pure, tested with bytes: the SOL packet ([`SolPacket::encode`] /
//!   [`SolPacket::decode`]), the payload commands (Activate Payload App
//!   0x48, Deactivate Payload App 0x49, Get Payload Instance Info App 0x4B
//!   as the keepalive) and [`SolState`], the sans-IO protocol machine: sequence
//!   numbers 1..=15, acks, retransmission of unacknowledged data, partial
//!   accepts and NACKs (the unaccepted tail is resent), break.
//! - [`SolStream`]: the console as a tokio `AsyncRead + AsyncWrite`. The
//!   session's socket task (in [`super::client`]) routes inbound SOL packets
//!   into it and sends what [`SolState`] produces.
//!
//! Get Channel Payload Support (App 0x4E) is never sent: it crashes
//! OpenIPMI's `ipmi_sim`.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::client::{ConnectOptions, IpmiClient, IpmiError, Secret};
use super::commands::{Command, CommandError, netfn};

/// The payload instance we activate (the host's first serial port).
pub const SOL_INSTANCE: u8 = 1;
/// Completion code of Activate Payload: the payload is already active (in
/// another session, or a stale one of ours).
pub const CC_PAYLOAD_ALREADY_ACTIVE: u8 = 0x80;
/// Completion code of Deactivate Payload: the payload is not active.
pub const CC_PAYLOAD_ALREADY_INACTIVE: u8 = 0x80;

/// Operation bits of a console-to-BMC SOL packet (byte 3).
pub mod op {
    /// NACK: the packet from the BMC was not accepted.
    pub const NACK: u8 = 0x40;
    /// Assert the ring / wake-on-ring indicator.
    pub const RING: u8 = 0x20;
    /// Generate a serial break.
    pub const BREAK: u8 = 0x10;
    /// Deassert CTS (pause the host's output).
    pub const CTS_PAUSE: u8 = 0x08;
    /// Drop DCD/DSR.
    pub const DROP_DCD_DSR: u8 = 0x04;
    /// Flush the BMC's inbound (to the host) buffer.
    pub const FLUSH_INBOUND: u8 = 0x02;
    /// Flush the BMC's outbound (from the host) buffer.
    pub const FLUSH_OUTBOUND: u8 = 0x01;
}

/// Status bits of a BMC-to-console SOL packet (byte 3).
pub mod status {
    /// NACK: the BMC did not accept (all of) the packet; it cannot take
    /// more characters right now.
    pub const NACK: u8 = 0x40;
    /// The host's serial port is not available (e.g. powered off).
    pub const CHAR_UNAVAILABLE: u8 = 0x20;
    /// The BMC is deactivating SOL: the stream ends.
    pub const DEACTIVATING: u8 = 0x10;
    /// Characters from the host were dropped (BMC buffer overrun).
    pub const TX_OVERRUN: u8 = 0x08;
    /// The BMC saw a break from the host.
    pub const BREAK: u8 = 0x04;
}

/// Errors decoding a SOL packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SolPacketError {
    /// Fewer than the 4 header bytes.
    #[error("SOL packet: need 4 header bytes, have {have}")]
    Truncated { have: usize },
}

/// One SOL payload: the 4-byte header and the characters.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SolPacket {
    /// Packet sequence number 1..=15; 0 = ack-only packet.
    pub seq: u8,
    /// Sequence number of the packet being acknowledged; 0 = none.
    pub ack_seq: u8,
    /// How many characters of the acknowledged packet were accepted.
    pub accepted: u8,
    /// Operation ([`op`], console to BMC) or status ([`status`], BMC to
    /// console) bits.
    pub flags: u8,
    /// The characters.
    pub data: Vec<u8>,
}

impl SolPacket {
    /// An ack-only packet.
    pub fn ack(ack_seq: u8, accepted: u8) -> Self {
        SolPacket {
            ack_seq,
            accepted,
            ..SolPacket::default()
        }
    }

    /// Wire bytes (sequence numbers masked to 4 bits).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + self.data.len());
        v.extend_from_slice(&[
            self.seq & 0x0F,
            self.ack_seq & 0x0F,
            self.accepted,
            self.flags,
        ]);
        v.extend_from_slice(&self.data);
        v
    }

    /// Decode untrusted bytes; reserved bits are ignored.
    pub fn decode(b: &[u8]) -> Result<Self, SolPacketError> {
        if b.len() < 4 {
            return Err(SolPacketError::Truncated { have: b.len() });
        }
        Ok(SolPacket {
            seq: b[0] & 0x0F,
            ack_seq: b[1] & 0x0F,
            accepted: b[2],
            flags: b[3],
            data: b[4..].to_vec(),
        })
    }
}

/// What the BMC answered to Activate Payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SolActivation {
    /// Auxiliary data (test mode etc.).
    pub aux: [u8; 4],
    /// Largest payload the BMC accepts from us.
    pub inbound_size: u16,
    /// Largest payload the BMC sends.
    pub outbound_size: u16,
    /// UDP port for the payload (we stay on the session's port).
    pub port: u16,
    /// VLAN, 0xFFFF if none.
    pub vlan: u16,
}

impl SolActivation {
    /// Characters per packet we send: the inbound size less the 4-byte
    /// header, within 1..=255 (32 if the BMC gives a size too small to use).
    pub fn max_chunk(&self) -> usize {
        let n = usize::from(self.inbound_size);
        if n <= 4 { 32 } else { (n - 4).min(255) }
    }
}

/// Activate Payload (App 0x48) for SOL instance 1.
#[derive(Clone, Copy, Debug)]
pub struct ActivatePayload {
    /// Ask for encrypted SOL packets.
    pub encrypt: bool,
    /// Ask for authenticated SOL packets.
    pub authenticate: bool,
}

impl Command for ActivatePayload {
    type Output = SolActivation;
    const NAME: &'static str = "Activate Payload";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x48;
    fn request_data(&self) -> Vec<u8> {
        let mut aux = 0x04; // serial alerts deferred while SOL is active
        if self.encrypt {
            aux |= 0x80;
        }
        if self.authenticate {
            aux |= 0x40;
        }
        // Payload type, instance, auxiliary data (CTS/DCD/DSR asserted).
        vec![0x01, SOL_INSTANCE, aux, 0, 0, 0]
    }
    fn parse_response(&self, d: &[u8]) -> Result<SolActivation, CommandError> {
        if d.len() < 12 {
            return Err(CommandError::Truncated {
                command: Self::NAME,
                need: 12,
                have: d.len(),
            });
        }
        let u16le = |i: usize| u16::from_le_bytes([d[i], d[i + 1]]);
        Ok(SolActivation {
            aux: [d[0], d[1], d[2], d[3]],
            inbound_size: u16le(4),
            outbound_size: u16le(6),
            port: u16le(8),
            vlan: u16le(10),
        })
    }
}

/// Deactivate Payload (App 0x49) for SOL instance 1, whichever session
/// holds it.
#[derive(Clone, Copy, Debug)]
pub struct DeactivatePayload;

impl Command for DeactivatePayload {
    type Output = ();
    const NAME: &'static str = "Deactivate Payload";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x49;
    fn request_data(&self) -> Vec<u8> {
        vec![0x01, SOL_INSTANCE, 0, 0, 0, 0]
    }
    fn parse_response(&self, _d: &[u8]) -> Result<(), CommandError> {
        Ok(())
    }
}

/// Get Payload Instance Info (App 0x4B) for SOL instance 1: the session
/// keepalive, which also tells whether SOL is still ours. Returns the id of
/// the session holding the payload (0: not active).
#[derive(Clone, Copy, Debug)]
pub struct GetPayloadInstanceInfo;

impl Command for GetPayloadInstanceInfo {
    type Output = u32;
    const NAME: &'static str = "Get Payload Instance Info";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x4B;
    fn request_data(&self) -> Vec<u8> {
        vec![0x01, SOL_INSTANCE]
    }
    fn parse_response(&self, d: &[u8]) -> Result<u32, CommandError> {
        if d.len() < 4 {
            return Err(CommandError::Truncated {
                command: Self::NAME,
                need: 4,
                have: d.len(),
            });
        }
        Ok(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
    }
}

/// SOL tuning. Defaults follow ipmitool: 1 s retransmit timeout, a few
/// retries, a keepalive every 30 s.
#[derive(Clone, Debug)]
pub struct SolOptions {
    /// How long to wait for the ack of a data packet before resending it.
    pub retry_timeout: Duration,
    /// Resends of one data packet before the stream fails.
    pub retries: u32,
    /// Pause before resending after the BMC accepted nothing (NACK).
    pub nack_backoff: Duration,
    /// A Get Payload Instance Info is sent when no IPMI request went out
    /// for this long (SOL traffic does not keep a session alive on every
    /// BMC; ipmi_sim drops a session after ~30 s without a request).
    pub keepalive: Duration,
    /// Bytes from the host buffered for the reader; beyond that, BMC
    /// packets are left unacknowledged (the BMC resends them).
    pub read_buffer: usize,
    /// Bytes written by us and not yet sent, before writes wait.
    pub write_buffer: usize,
}

impl Default for SolOptions {
    fn default() -> Self {
        SolOptions {
            retry_timeout: Duration::from_secs(1),
            retries: 4,
            nack_backoff: Duration::from_millis(10),
            keepalive: Duration::from_secs(10),
            read_buffer: 1 << 20,
            write_buffer: 64 * 1024,
        }
    }
}

/// Why the SOL machine gave up.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SolFailure {
    /// A data packet was never acknowledged.
    #[error("SOL packet {seq} not acknowledged after {attempts} attempt(s)")]
    NoAck { seq: u8, attempts: u32 },
    /// The session keepalive got no answer.
    #[error("session keepalive failed")]
    Keepalive,
    /// The BMC is deactivating the payload.
    #[error("the BMC deactivated SOL")]
    Deactivated,
    /// The keepalive found the payload inactive or held by another session
    /// (someone deactivated ours).
    #[error("SOL is no longer active on this session (holder: {holder:#010x})")]
    TakenOver { holder: u32 },
}

#[derive(Clone, Debug)]
struct InFlight {
    seq: u8,
    data: Vec<u8>,
    sent_at: Instant,
    attempts: u32,
}

/// What one inbound packet means for the console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// New characters from the host, in order (duplicates removed).
    pub data: Vec<u8>,
    /// The BMC is deactivating SOL.
    pub deactivating: bool,
    /// The BMC reported a break from the host.
    pub break_detected: bool,
    /// The BMC reported dropped characters or an unavailable port.
    pub trouble: bool,
}

/// The sans-IO SOL protocol machine; `now` is always passed in.
///
/// Outbound: one data packet in flight at a time (sequence 1..=15,
/// wrapping), resent after `retry_timeout` up to `retries` times. An ack
/// that accepts only part of the packet puts the unaccepted tail first in
/// line under a new sequence number; an ack that accepts nothing (NACK)
/// also waits `nack_backoff` (doubling, at most 1 s). A break is a
/// sequenced packet without data; it is sent once and never resent (a
/// second break would be a second break). Inbound: every data packet is
/// acknowledged with an ack-only packet; a repeat of the last sequence
/// number is acknowledged again but not delivered twice.
#[derive(Debug)]
pub struct SolState {
    options: SolOptions,
    next_seq: u8,
    in_flight: Option<InFlight>,
    tail: Vec<u8>,
    hold_until: Option<Instant>,
    backoff: Duration,
    last_rx: Option<(u8, u8)>,
    acks: VecDeque<SolPacket>,
}

impl SolState {
    /// A fresh machine.
    pub fn new(options: SolOptions) -> Self {
        let backoff = options.nack_backoff;
        SolState {
            options,
            next_seq: 1,
            in_flight: None,
            tail: Vec::new(),
            hold_until: None,
            backoff,
            last_rx: None,
            acks: VecDeque::new(),
        }
    }

    fn take_seq(&mut self) -> u8 {
        let s = self.next_seq;
        self.next_seq = if s >= 15 { 1 } else { s + 1 };
        s
    }

    /// Whether sent data is waiting for its ack or a tail for its resend.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some() || !self.tail.is_empty()
    }

    /// Handle a packet from the BMC. `room` is how many characters the
    /// reader can take: a packet is accepted up to that (the BMC resends
    /// the rest), and left unacknowledged if there is no room at all.
    pub fn receive(&mut self, pkt: &SolPacket, room: usize, now: Instant) -> Received {
        let mut out = Received {
            deactivating: pkt.flags & status::DEACTIVATING != 0,
            break_detected: pkt.flags & status::BREAK != 0,
            trouble: pkt.flags & (status::TX_OVERRUN | status::CHAR_UNAVAILABLE) != 0,
            ..Received::default()
        };
        // The ack of our data packet.
        if pkt.ack_seq != 0
            && let Some(f) = self.in_flight.take_if(|f| f.seq == pkt.ack_seq)
        {
            let accepted = usize::from(pkt.accepted).min(f.data.len());
            if accepted < f.data.len() {
                let mut rest = f.data[accepted..].to_vec();
                rest.extend_from_slice(&self.tail);
                self.tail = rest;
            }
            if accepted == 0 && !f.data.is_empty() {
                self.hold_until = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
            } else {
                self.backoff = self.options.nack_backoff;
            }
        }
        // Characters from the host.
        if pkt.seq != 0 {
            match self.last_rx {
                Some((seq, accepted)) if seq == pkt.seq => {
                    self.acks.push_back(SolPacket::ack(seq, accepted));
                }
                _ if room == 0 && !pkt.data.is_empty() => {}
                _ => {
                    let n = pkt.data.len().min(room).min(255);
                    out.data.extend_from_slice(&pkt.data[..n]);
                    self.last_rx = Some((pkt.seq, n as u8));
                    self.acks.push_back(SolPacket::ack(pkt.seq, n as u8));
                }
            }
        }
        out
    }

    /// The next packet to send, if any: acks first, then a due resend, then
    /// the unaccepted tail, a break (once `pending` is empty), new data
    /// from `pending` (at most `max_chunk` characters).
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        pending: &mut VecDeque<u8>,
        brk: &mut bool,
        max_chunk: usize,
    ) -> Result<Option<SolPacket>, SolFailure> {
        if let Some(ack) = self.acks.pop_front() {
            return Ok(Some(ack));
        }
        if let Some(f) = &mut self.in_flight {
            if now < f.sent_at + self.options.retry_timeout {
                return Ok(None);
            }
            if f.attempts > self.options.retries {
                return Err(SolFailure::NoAck {
                    seq: f.seq,
                    attempts: f.attempts,
                });
            }
            f.attempts += 1;
            f.sent_at = now;
            return Ok(Some(SolPacket {
                seq: f.seq,
                data: f.data.clone(),
                ..SolPacket::default()
            }));
        }
        if self.hold_until.is_some_and(|t| now < t) {
            return Ok(None);
        }
        self.hold_until = None;
        let max_chunk = max_chunk.clamp(1, 255);
        let data: Vec<u8> = if !self.tail.is_empty() {
            let n = self.tail.len().min(max_chunk);
            self.tail.drain(..n).collect()
        } else if *brk && pending.is_empty() {
            *brk = false;
            return Ok(Some(SolPacket {
                seq: self.take_seq(),
                flags: op::BREAK,
                ..SolPacket::default()
            }));
        } else if !pending.is_empty() {
            let n = pending.len().min(max_chunk);
            pending.drain(..n).collect()
        } else {
            return Ok(None);
        };
        let seq = self.take_seq();
        self.in_flight = Some(InFlight {
            seq,
            data: data.clone(),
            sent_at: now,
            attempts: 1,
        });
        Ok(Some(SolPacket {
            seq,
            data,
            ..SolPacket::default()
        }))
    }

    /// When [`SolState::poll_transmit`] should be called again without new
    /// input.
    pub fn next_deadline(&self) -> Option<Instant> {
        if let Some(f) = &self.in_flight {
            return Some(f.sent_at + self.options.retry_timeout);
        }
        self.hold_until
    }
}

/// Buffers shared by a [`SolStream`] and the session's socket task.
#[derive(Debug)]
pub(crate) struct SolShared {
    pub(crate) buf: Mutex<SolBuffers>,
    /// Wakes the socket task: data to send, a break, the stream dropped.
    pub(crate) notify: Notify,
}

#[derive(Debug)]
pub(crate) struct SolBuffers {
    pub(crate) rx: VecDeque<u8>,
    pub(crate) rx_cap: usize,
    pub(crate) rx_waker: Option<Waker>,
    pub(crate) tx: VecDeque<u8>,
    pub(crate) tx_cap: usize,
    pub(crate) tx_waker: Option<Waker>,
    pub(crate) brk: bool,
    /// Sent data not yet acknowledged (for `flush`).
    pub(crate) busy: bool,
    pub(crate) max_chunk: usize,
    /// Set once: `None` inside means a clean end (EOF).
    pub(crate) end: Option<Option<SolFailure>>,
    pub(crate) endpoint: SocketAddr,
}

impl SolBuffers {
    pub(crate) fn wake_all(&mut self) {
        if let Some(w) = self.rx_waker.take() {
            w.wake();
        }
        if let Some(w) = self.tx_waker.take() {
            w.wake();
        }
    }

    pub(crate) fn finish(&mut self, failure: Option<SolFailure>) {
        if self.end.is_none() {
            self.end = Some(failure);
        }
        self.wake_all();
    }

    fn end_error(&self) -> Option<io::Error> {
        match &self.end {
            Some(Some(f)) => Some(io::Error::new(
                match f {
                    SolFailure::NoAck { .. } | SolFailure::Keepalive => io::ErrorKind::TimedOut,
                    SolFailure::Deactivated | SolFailure::TakenOver { .. } => {
                        io::ErrorKind::ConnectionAborted
                    }
                },
                SolStreamError {
                    endpoint: self.endpoint,
                    source: f.clone(),
                },
            )),
            Some(None) => Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                SolStreamError {
                    endpoint: self.endpoint,
                    source: SolFailure::Deactivated,
                },
            )),
            None => None,
        }
    }
}

/// The error inside the `io::Error`s of a failed [`SolStream`].
#[derive(Debug, thiserror::Error)]
#[error("SOL with {endpoint}")]
pub struct SolStreamError {
    endpoint: SocketAddr,
    #[source]
    source: SolFailure,
}

/// An active SOL payload on its own RMCP+ session: read what the host's
/// serial port prints, write what it should receive.
///
/// Reads end (`Ok(0)`) when the BMC deactivates SOL, and fail when sent
/// data is never acknowledged or the keepalive fails. `flush` waits until
/// the BMC has accepted everything written. Dropping the stream deactivates
/// the payload and closes the session (one attempt each, from the socket
/// task); [`SolStream::close`] does it and reports the outcome.
pub struct SolStream {
    client: Option<IpmiClient>,
    shared: Arc<SolShared>,
    activation: SolActivation,
    endpoint: SocketAddr,
}

impl std::fmt::Debug for SolStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SolStream")
            .field("endpoint", &self.endpoint)
            .field("activation", &self.activation)
            .finish_non_exhaustive()
    }
}

impl SolStream {
    /// Open a session and activate SOL on it, with default [`SolOptions`].
    pub async fn connect(
        endpoint: SocketAddr,
        user: &str,
        password: Secret,
        options: ConnectOptions,
    ) -> Result<SolStream, IpmiError> {
        let client = IpmiClient::connect(endpoint, user, password, options).await?;
        SolStream::activate(client, SolOptions::default()).await
    }

    /// Activate SOL on an open session. If the BMC says the payload is
    /// already active (a stale session of ours or someone else's), it is
    /// deactivated and the activation retried. On failure the session is
    /// closed.
    pub async fn activate(client: IpmiClient, options: SolOptions) -> Result<SolStream, IpmiError> {
        let endpoint = client.endpoint();
        let shared = Arc::new(SolShared {
            buf: Mutex::new(SolBuffers {
                rx: VecDeque::new(),
                rx_cap: options.read_buffer.max(1),
                rx_waker: None,
                tx: VecDeque::new(),
                tx_cap: options.write_buffer.max(1),
                tx_waker: None,
                brk: false,
                busy: false,
                max_chunk: 32,
                end: None,
                endpoint,
            }),
            notify: Notify::new(),
        });
        // Attach first: the BMC may send as soon as it has answered.
        client.attach_sol(shared.clone(), options).await?;
        let mut stale = 0;
        let activation = loop {
            match client
                .call(&ActivatePayload {
                    encrypt: true,
                    authenticate: true,
                })
                .await
            {
                Ok(a) => break a,
                Err(IpmiError::Completion {
                    code: CC_PAYLOAD_ALREADY_ACTIVE,
                    ..
                }) if stale < 2 => {
                    stale += 1;
                    tracing::info!(%endpoint, "SOL already active in another session; deactivating it");
                    match client.call(&DeactivatePayload).await {
                        Ok(())
                        | Err(IpmiError::Completion {
                            code: CC_PAYLOAD_ALREADY_INACTIVE,
                            ..
                        }) => {}
                        Err(e) => {
                            let _ = client.detach_sol().await;
                            let _ = client.close().await;
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    let _ = client.detach_sol().await;
                    let _ = client.close().await;
                    return Err(e);
                }
            }
        };
        if activation.port != endpoint.port() {
            tracing::debug!(%endpoint, port = activation.port, "BMC names another SOL port; staying on the session's");
        }
        shared.buf.lock().expect("SOL buffers").max_chunk = activation.max_chunk();
        tracing::debug!(%endpoint, ?activation, "SOL active");
        Ok(SolStream {
            client: Some(client),
            shared,
            activation,
            endpoint,
        })
    }

    /// What the BMC answered to Activate Payload.
    pub fn activation(&self) -> SolActivation {
        self.activation
    }

    /// The BMC.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// Send a serial break to the host, after everything written so far
    /// has been accepted; returns once the break packet is sent.
    pub async fn send_break(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::flush(self).await?;
        {
            let mut b = self.shared.buf.lock().expect("SOL buffers");
            if let Some(e) = b.end_error() {
                return Err(e);
            }
            b.brk = true;
        }
        self.shared.notify.notify_one();
        // Wait until it has gone out, so that later writes follow it.
        std::future::poll_fn(|cx| {
            let mut b = self.shared.buf.lock().expect("SOL buffers");
            if let Some(e) = b.end_error() {
                return Poll::Ready(Err(e));
            }
            if !b.brk {
                return Poll::Ready(Ok(()));
            }
            b.tx_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Deactivate SOL (unless another session has taken it over) and close
    /// the session.
    pub async fn close(mut self) -> Result<(), IpmiError> {
        let Some(client) = self.client.take() else {
            return Ok(());
        };
        client.detach_sol().await?;
        self.shared
            .buf
            .lock()
            .expect("SOL buffers")
            .finish(Some(SolFailure::Deactivated));
        // Never deactivate a SOL that another session has taken over.
        match client.call(&GetPayloadInstanceInfo).await {
            Ok(holder) if !client.is_this_session(holder) => {
                tracing::debug!(endpoint = %self.endpoint, holder, "SOL held elsewhere; not deactivating");
                return client.close().await;
            }
            Ok(_) | Err(IpmiError::Completion { .. }) => {}
            Err(e) => {
                let _ = client.close().await;
                return Err(e);
            }
        }
        let r = match client.call(&DeactivatePayload).await {
            Ok(())
            | Err(IpmiError::Completion {
                code: CC_PAYLOAD_ALREADY_INACTIVE,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        };
        let closed = client.close().await;
        r.and(closed)
    }
}

impl AsyncRead for SolStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut b = self.shared.buf.lock().expect("SOL buffers");
        if !b.rx.is_empty() {
            let n = b.rx.len().min(buf.remaining());
            let (front, back) = b.rx.as_slices();
            let k = front.len().min(n);
            buf.put_slice(&front[..k]);
            buf.put_slice(&back[..n - k]);
            b.rx.drain(..n);
            drop(b);
            // Room again: the socket task may take held-back packets.
            self.shared.notify.notify_one();
            return Poll::Ready(Ok(()));
        }
        match &b.end {
            Some(None) => Poll::Ready(Ok(())),
            Some(Some(_)) => Poll::Ready(Err(b.end_error().expect("ended"))),
            None => {
                b.rx_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for SolStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut b = self.shared.buf.lock().expect("SOL buffers");
        if let Some(e) = b.end_error() {
            return Poll::Ready(Err(e));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = b.tx_cap.saturating_sub(b.tx.len());
        if room == 0 {
            b.tx_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        b.tx.extend(&data[..n]);
        drop(b);
        self.shared.notify.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut b = self.shared.buf.lock().expect("SOL buffers");
        if let Some(e) = b.end_error() {
            return Poll::Ready(Err(e));
        }
        if b.tx.is_empty() && !b.busy {
            return Poll::Ready(Ok(()));
        }
        b.tx_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn packet_bytes() {
        let p = SolPacket {
            seq: 3,
            ack_seq: 9,
            accepted: 200,
            flags: op::BREAK,
            data: b"hi".to_vec(),
        };
        assert_eq!(p.encode(), [0x03, 0x09, 200, 0x10, b'h', b'i']);
        assert_eq!(SolPacket::decode(&p.encode()).unwrap(), p);
        // Reserved upper bits of the sequence numbers are ignored.
        let q = SolPacket::decode(&[0xF5, 0xA2, 7, 0x44]).unwrap();
        assert_eq!((q.seq, q.ack_seq, q.accepted), (5, 2, 7));
        assert_eq!(q.flags & status::NACK, status::NACK);
        assert_eq!(q.flags & status::BREAK, status::BREAK);
        assert!(q.data.is_empty());
        assert_eq!(
            SolPacket::decode(&[1, 2, 3]),
            Err(SolPacketError::Truncated { have: 3 })
        );
        assert_eq!(SolPacket::ack(4, 10).encode(), [0, 4, 10, 0]);
    }

    #[test]
    fn activate_and_deactivate_bytes() {
        let a = ActivatePayload {
            encrypt: true,
            authenticate: true,
        };
        assert_eq!(a.request_data(), [0x01, 0x01, 0xC4, 0, 0, 0]);
        // ipmi_sim's answer: aux 0, inbound 32, outbound 16384, port 623, no VLAN.
        let r = a
            .parse_response(&[0, 0, 0, 0, 32, 0, 0x00, 0x40, 0x6F, 0x02, 0xFF, 0xFF])
            .unwrap();
        assert_eq!(
            r,
            SolActivation {
                aux: [0; 4],
                inbound_size: 32,
                outbound_size: 16384,
                port: 623,
                vlan: 0xFFFF
            }
        );
        assert_eq!(r.max_chunk(), 28);
        assert!(a.parse_response(&[0; 11]).is_err());
        assert_eq!(DeactivatePayload.request_data(), [0x01, 0x01, 0, 0, 0, 0]);
        assert_eq!(ActivatePayload::CMD, 0x48);
        assert_eq!(DeactivatePayload::CMD, 0x49);
        // ipmi_sim's answer while session 0x182 holds SOL.
        let info = GetPayloadInstanceInfo;
        assert_eq!(info.request_data(), [0x01, 0x01]);
        assert_eq!(
            info.parse_response(&[0x82, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
            Ok(0x182)
        );
    }

    fn send_all(s: &mut SolState, now: Instant, q: &mut VecDeque<u8>) -> Vec<SolPacket> {
        let mut brk = false;
        let mut v = Vec::new();
        while let Some(p) = s.poll_transmit(now, q, &mut brk, 4).unwrap() {
            v.push(p);
        }
        v
    }

    #[test]
    fn sequence_numbers_wrap_1_to_15() {
        let mut s = SolState::new(SolOptions::default());
        let now = t0();
        let mut q: VecDeque<u8> = (0..200u8).collect();
        let mut seqs = Vec::new();
        for _ in 0..20 {
            let p = send_all(&mut s, now, &mut q);
            assert_eq!(p.len(), 1, "one packet in flight");
            seqs.push(p[0].seq);
            assert_eq!(p[0].data.len(), 4);
            s.receive(&SolPacket::ack(p[0].seq, 4), 0, now);
        }
        let want: Vec<u8> = (1..=15).chain(1..=5).collect();
        assert_eq!(seqs, want);
    }

    #[test]
    fn unacked_data_is_resent_then_fails() {
        let opts = SolOptions::default();
        let mut s = SolState::new(opts.clone());
        let now = t0();
        let mut q: VecDeque<u8> = b"abc".iter().copied().collect();
        let first = send_all(&mut s, now, &mut q);
        assert_eq!(first[0].data, b"abc");
        assert!(send_all(&mut s, now, &mut q).is_empty());
        assert_eq!(s.next_deadline(), Some(now + opts.retry_timeout));
        let mut brk = false;
        for i in 1..=opts.retries {
            let at = now + opts.retry_timeout * (i + 1);
            let p = s.poll_transmit(at, &mut q, &mut brk, 4).unwrap().unwrap();
            assert_eq!((p.seq, p.data.as_slice()), (first[0].seq, &b"abc"[..]));
        }
        let at = now + opts.retry_timeout * (opts.retries + 3);
        assert_eq!(
            s.poll_transmit(at, &mut q, &mut brk, 4),
            Err(SolFailure::NoAck {
                seq: 1,
                attempts: opts.retries + 1
            })
        );
    }

    #[test]
    fn partial_accept_resends_the_tail_under_a_new_seq() {
        let mut s = SolState::new(SolOptions::default());
        let now = t0();
        let mut q: VecDeque<u8> = b"abcdefgh".iter().copied().collect();
        let p = send_all(&mut s, now, &mut q);
        assert_eq!(p[0].data, b"abcd");
        s.receive(&SolPacket::ack(1, 1), 0, now);
        let p = send_all(&mut s, now, &mut q);
        assert_eq!((p[0].seq, p[0].data.as_slice()), (2, &b"bcd"[..]));
        s.receive(&SolPacket::ack(2, 3), 0, now);
        let p = send_all(&mut s, now, &mut q);
        assert_eq!((p[0].seq, p[0].data.as_slice()), (3, &b"efgh"[..]));
    }

    #[test]
    fn nack_with_nothing_accepted_backs_off() {
        let opts = SolOptions::default();
        let mut s = SolState::new(opts.clone());
        let now = t0();
        let mut q: VecDeque<u8> = b"xy".iter().copied().collect();
        send_all(&mut s, now, &mut q);
        let nack = SolPacket {
            ack_seq: 1,
            flags: status::NACK,
            ..SolPacket::default()
        };
        s.receive(&nack, 0, now);
        assert!(s.busy());
        assert!(send_all(&mut s, now, &mut q).is_empty(), "holds off");
        assert_eq!(s.next_deadline(), Some(now + opts.nack_backoff));
        let p = send_all(&mut s, now + opts.nack_backoff, &mut q);
        assert_eq!((p[0].seq, p[0].data.as_slice()), (2, &b"xy"[..]));
        // A stale or foreign ack changes nothing.
        s.receive(&SolPacket::ack(9, 2), 0, now);
        assert!(s.busy());
    }

    #[test]
    fn inbound_is_acked_deduplicated_and_limited_by_room() {
        let mut s = SolState::new(SolOptions::default());
        let now = t0();
        let pkt = SolPacket {
            seq: 5,
            data: b"hello".to_vec(),
            ..SolPacket::default()
        };
        let r = s.receive(&pkt, 100, now);
        assert_eq!(r.data, b"hello");
        let mut q = VecDeque::new();
        assert_eq!(send_all(&mut s, now, &mut q), vec![SolPacket::ack(5, 5)]);
        // The BMC lost our ack and resends: ack again, deliver nothing.
        let r = s.receive(&pkt, 100, now);
        assert!(r.data.is_empty());
        assert_eq!(send_all(&mut s, now, &mut q), vec![SolPacket::ack(5, 5)]);
        // Little room: partial accept.
        let pkt6 = SolPacket {
            seq: 6,
            data: b"world".to_vec(),
            ..SolPacket::default()
        };
        assert_eq!(s.receive(&pkt6, 2, now).data, b"wo");
        assert_eq!(send_all(&mut s, now, &mut q), vec![SolPacket::ack(6, 2)]);
        // No room: no ack, the BMC resends later.
        let pkt7 = SolPacket {
            seq: 7,
            data: b"x".to_vec(),
            ..SolPacket::default()
        };
        assert!(s.receive(&pkt7, 0, now).data.is_empty());
        assert!(send_all(&mut s, now, &mut q).is_empty());
        assert_eq!(s.receive(&pkt7, 1, now).data, b"x");
        // Status bits.
        let bye = SolPacket {
            flags: status::DEACTIVATING | status::BREAK,
            ..SolPacket::default()
        };
        let r = s.receive(&bye, 1, now);
        assert!(r.deactivating && r.break_detected && !r.trouble);
    }

    #[test]
    fn break_waits_for_pending_data_and_is_sent_once() {
        let mut s = SolState::new(SolOptions::default());
        let now = t0();
        let mut q: VecDeque<u8> = b"ab".iter().copied().collect();
        let mut brk = true;
        let p = s.poll_transmit(now, &mut q, &mut brk, 4).unwrap().unwrap();
        assert_eq!((p.data.as_slice(), p.flags), (&b"ab"[..], 0));
        assert!(brk, "break waits for the data");
        s.receive(&SolPacket::ack(1, 2), 0, now);
        let p = s.poll_transmit(now, &mut q, &mut brk, 4).unwrap().unwrap();
        assert_eq!((p.seq, p.flags, p.data.len()), (2, op::BREAK, 0));
        assert!(!brk);
        assert!(!s.busy(), "a break is not resent");
        assert_eq!(s.poll_transmit(now, &mut q, &mut brk, 4), Ok(None));
    }
}
