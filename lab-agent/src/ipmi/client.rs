//! The async RMCP+ client. [`IpmiClient::connect`] chooses the cipher
//! suite and runs the session handshake ([`super::session`]: Open Session,
//! RAKP 1–4), then Set Session Privilege Level; afterwards each method is
//! one command. A single task owns the UDP socket and the session state: it
//! numbers, seals and sends each request, retransmits with backoff, matches
//! replies and hands them back over a `oneshot`. Requests to one BMC are
//! serialized and spaced.
//!
//! A `Payload` (Serial-over-LAN: the `ipmi::sol` stream) can ride on the session:
//! the task hands it the BMC's packets of its type, sends what it produces
//! and keeps the session alive for it. The client knows nothing of SOL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep, sleep_until, timeout_at};

use super::commands::{
    self, BootDevice, BootFlags, CC_NODE_BUSY, ChassisControl, ChassisStatus, CloseSession,
    Command, DeactivatePayload, GetChannelCipherSuites, GetChassisStatus, GetPayloadInstanceInfo,
    GetSystemBootOptions, PowerAction, SetSessionPrivilege, SetSystemBootOptions,
};
use super::crypto::{CipherSuite, SessionKeys};
use super::error::IpmiError;
use super::packet::{
    IpmiRequest, IpmiResponse, Packet, PayloadType, Privilege, decode_packet, encode_packet,
};
use super::session::{Handshake, Randoms, Request, usable_suites};

pub use lab_types::Secret;

/// Connection options. Defaults follow ipmitool: 1 s timeout, 4 retries.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Cipher suites in order of preference.
    pub cipher_suites: Vec<CipherSuite>,
    /// Session privilege to request and set.
    pub privilege: Privilege,
    /// First reply timeout; later attempts wait longer (doubling, at most 4×).
    pub timeout: Duration,
    /// Retransmissions after the first attempt (not used for power actions).
    pub retries: u32,
    /// How long to wait for Get Channel Cipher Suites before falling back to
    /// `cipher_suites` (some BMCs, ipmi_sim among them, never answer it).
    pub cipher_probe_timeout: Duration,
    /// How often a "node busy" (0xC0) answer is retried.
    pub busy_retries: u32,
    /// First pause after a busy answer (doubles each time).
    pub busy_backoff: Duration,
    /// Minimum gap between two packets to the BMC.
    pub min_gap: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            cipher_suites: vec![CipherSuite::Suite17, CipherSuite::Suite3],
            privilege: Privilege::Administrator,
            timeout: Duration::from_secs(1),
            retries: 4,
            cipher_probe_timeout: Duration::from_millis(300),
            busy_retries: 3,
            busy_backoff: Duration::from_millis(100),
            min_gap: Duration::from_millis(5),
        }
    }
}

/// How a [`Payload`] keeps its session alive: when no IPMI request went out
/// for `every`, Get Payload Instance Info is sent (`attempts` transmissions,
/// the first reply awaited `timeout`); no answer ends the payload, and so
/// does an answer naming another session as the payload's holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Keepalive {
    pub every: Duration,
    pub attempts: u32,
    pub timeout: Duration,
}

/// Why the session stopped carrying a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PayloadEnd {
    /// The session is going away (a clean end).
    Closed,
    /// The session keepalive got no answer.
    Keepalive,
    /// Another session holds the payload now.
    TakenOver { holder: u32 },
}

/// What a [`Payload`] has to send.
#[derive(Debug)]
pub(crate) enum Transmit {
    /// This payload, now.
    Send(Vec<u8>),
    /// Nothing now (ask again at [`Payload::next_deadline`] or on a wake-up).
    Idle,
    /// The payload failed and has ended.
    Ended,
}

/// A payload other than IPMI messages riding on this session (the SOL
/// stream): the request task hands it the authenticated packets of its
/// type, sends what it produces, keeps the session alive for it and ends it.
/// Its methods never block.
pub(crate) trait Payload: Send {
    /// The payload type of its packets.
    fn payload_type(&self) -> PayloadType;
    /// Notified when the payload's other side has something new (data to
    /// send, room to read, a break, the stream dropped).
    fn wakeup(&self) -> Arc<Notify>;
    fn keepalive(&self) -> Keepalive;
    /// When [`Payload::transmit`] should be called again without new input.
    fn next_deadline(&self) -> Option<Instant>;
    /// A packet of the payload from the BMC; false once the payload ended
    /// (the BMC deactivated it).
    fn receive(&mut self, payload: &[u8], now: Instant) -> bool;
    /// The next packet to send.
    fn transmit(&mut self, now: Instant) -> Transmit;
    /// The session stops carrying it.
    fn end(&mut self, why: PayloadEnd);
}

/// What a job sends and how its reply is recognised.
enum Kind {
    /// A session-setup payload, answered by `expect` with the same tag.
    Setup {
        what: &'static str,
        payload_type: PayloadType,
        payload: Vec<u8>,
        expect: PayloadType,
        tag: u8,
    },
    /// An IPMI request, inside the session once one is active.
    Ipmi {
        what: &'static str,
        netfn: u8,
        cmd: u8,
        data: Vec<u8>,
    },
}

impl Kind {
    fn what(&self) -> &'static str {
        match self {
            Kind::Setup { what, .. } | Kind::Ipmi { what, .. } => what,
        }
    }
}

enum Reply {
    Setup(Vec<u8>),
    Ipmi(IpmiResponse),
}

enum Job {
    Send {
        kind: Kind,
        attempts: u32,
        first_timeout: Duration,
        reply: oneshot::Sender<Result<Reply, IpmiError>>,
    },
    Activate {
        keys: SessionKeys,
        console_session_id: u32,
        bmc_session_id: u32,
    },
    /// Route a payload's packets to it from now on.
    Attach {
        payload: Box<dyn Payload>,
        done: oneshot::Sender<()>,
    },
    /// Stop routing the payload's packets (before Deactivate Payload).
    Detach { done: oneshot::Sender<()> },
}

/// Who waits for an exchange.
enum Waiter {
    Caller(oneshot::Sender<Result<Reply, IpmiError>>),
    /// The payload's session keepalive: a failure ends the payload.
    Keepalive,
}

/// The IPMI exchange in progress (one at a time).
struct Pending {
    kind: Kind,
    rq_seq: u8,
    attempts: u32,
    sent: u32,
    first_timeout: Duration,
    /// The next transmission is due then (`None`: waiting for the reply).
    send_at: Option<Instant>,
    /// The reply to the last transmission is due by then.
    deadline: Instant,
    waiter: Waiter,
}

/// The socket-owning task's state.
struct Actor {
    socket: UdpSocket,
    endpoint: SocketAddr,
    keys: Option<SessionKeys>,
    console_session_id: u32,
    bmc_session_id: u32,
    seq: u32,
    rq_seq: u8,
    min_gap: Duration,
    /// Last IPMI request sent (for `min_gap`).
    last_send: Option<Instant>,
    /// Last IPMI request sent (for the payload keepalive). Payload packets
    /// do not count: ipmi_sim (and BMCs like it) time a session out after
    /// ~30 s without an IPMI request, however busy its SOL payload is.
    last_any: Instant,
    pending: Option<Pending>,
    payload: Option<Box<dyn Payload>>,
    /// A payload owns this session (attached and not detached by its
    /// `close`): when its handle goes, the session is closed from here.
    payload_owned: bool,
}

fn random<const N: usize>() -> Result<[u8; N], IpmiError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| IpmiError::Random)?;
    Ok(b)
}

enum Event {
    Job(Option<Job>),
    Recv(std::io::Result<usize>),
    Timer,
    PayloadWake,
}

impl Actor {
    /// The event loop: jobs (one exchange at a time), inbound packets
    /// (replies and payload), timers (retransmits, payload resends,
    /// keepalive) and the payload's wake-ups.
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut buf = vec![0u8; 2048];
        loop {
            let wake = self.next_wake();
            let wakeup = self.payload.as_ref().map(|p| p.wakeup());
            let event = tokio::select! {
                job = rx.recv(), if self.pending.is_none() => Event::Job(job),
                r = self.socket.recv(&mut buf) => Event::Recv(r),
                _ = sleep_until(wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if wake.is_some() => Event::Timer,
                _ = async { wakeup.as_ref().expect("guarded").notified().await }, if wakeup.is_some() => Event::PayloadWake,
            };
            match event {
                Event::Job(None) => break,
                Event::Job(Some(job)) => self.job(job),
                Event::Recv(Ok(n)) => self.inbound(&buf[..n]),
                // ICMP errors from earlier sends surface here; keep waiting.
                Event::Recv(Err(e)) => {
                    tracing::debug!(endpoint = %self.endpoint, error = %e, "recv");
                    sleep(Duration::from_millis(10)).await;
                }
                Event::Timer | Event::PayloadWake => {}
            }
            self.drive().await;
        }
        self.farewell().await;
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(p) = &self.pending {
            at(p.send_at.unwrap_or(p.deadline));
        }
        if let Some(p) = &self.payload {
            if let Some(d) = p.next_deadline() {
                at(d);
            }
            if self.pending.is_none() {
                at(self.last_any + p.keepalive().every);
            }
        }
        t
    }

    fn job(&mut self, job: Job) {
        match job {
            Job::Activate {
                keys,
                console_session_id,
                bmc_session_id,
            } => {
                self.keys = Some(keys);
                self.console_session_id = console_session_id;
                self.bmc_session_id = bmc_session_id;
                self.seq = 0;
            }
            Job::Send {
                kind,
                attempts,
                first_timeout,
                reply,
            } => self.start(kind, attempts, first_timeout, Waiter::Caller(reply)),
            Job::Attach { payload, done } => {
                self.payload = Some(payload);
                self.payload_owned = true;
                let _ = done.send(());
            }
            Job::Detach { done } => {
                self.payload = None;
                self.payload_owned = false;
                let _ = done.send(());
            }
        }
    }

    fn start(&mut self, kind: Kind, attempts: u32, first_timeout: Duration, waiter: Waiter) {
        self.rq_seq = (self.rq_seq + 1) & 0x3F;
        let now = Instant::now();
        self.pending = Some(Pending {
            kind,
            rq_seq: self.rq_seq,
            attempts: attempts.max(1),
            sent: 0,
            first_timeout,
            send_at: Some(self.last_send.map_or(now, |l| (l + self.min_gap).max(now))),
            deadline: now,
            waiter,
        });
    }

    fn finish(&mut self, result: Result<Reply, IpmiError>) {
        let Some(p) = self.pending.take() else {
            return;
        };
        match p.waiter {
            Waiter::Caller(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Keepalive => match result {
                Ok(Reply::Ipmi(r)) if r.completion == 0 => {
                    let holder = GetPayloadInstanceInfo.parse_response(&r.data).ok();
                    if let Some(holder) = holder
                        && holder != self.bmc_session_id
                        && holder != self.console_session_id
                    {
                        tracing::warn!(endpoint = %self.endpoint, holder, "payload taken over by another session");
                        self.end_payload(PayloadEnd::TakenOver { holder });
                    }
                }
                // Any answer means the session is alive.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %crate::error_chain(&e), "payload keepalive failed");
                    self.end_payload(PayloadEnd::Keepalive);
                }
            },
        }
    }

    fn end_payload(&mut self, why: PayloadEnd) {
        if let Some(mut p) = self.payload.take() {
            p.end(why);
        }
    }

    /// Decode once and dispatch: the payload's packets to it, IPMI to the
    /// pending exchange; anything else is dropped.
    fn inbound(&mut self, bytes: &[u8]) {
        let pkt = match decode_packet(bytes, self.keys.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(endpoint = %self.endpoint, error = %e, "dropping undecodable packet");
                return;
            }
        };
        if self
            .payload
            .as_ref()
            .is_some_and(|p| p.payload_type() == pkt.payload_type)
        {
            self.inbound_payload(&pkt);
            return;
        }
        let Some(p) = &self.pending else {
            return;
        };
        if let Some(r) = self.match_packet(&p.kind, p.rq_seq, pkt) {
            self.finish(Ok(r));
        }
    }

    fn inbound_payload(&mut self, pkt: &Packet) {
        let Some(p) = &mut self.payload else {
            return;
        };
        if self.keys.is_none() || pkt.session_id != self.console_session_id || !pkt.authenticated {
            return;
        }
        if !p.receive(&pkt.payload, Instant::now()) {
            self.payload = None;
        }
    }

    /// Send whatever is due: the pending exchange's (re)transmission or its
    /// timeout, the payload's packets (SOL acks, data, resends), the
    /// keepalive.
    async fn drive(&mut self) {
        let now = Instant::now();
        if let Some(p) = &mut self.pending
            && p.send_at.is_none()
            && now >= p.deadline
        {
            if p.sent < p.attempts {
                let gap = self.last_send.map_or(now, |l| (l + self.min_gap).max(now));
                p.send_at = Some(gap);
            } else {
                let what = p.kind.what();
                let attempts = p.attempts;
                self.finish(Err(IpmiError::Timeout {
                    endpoint: self.endpoint,
                    what,
                    attempts,
                }));
            }
        }
        if let Some(p) = &self.pending
            && p.send_at.is_some_and(|t| now >= t)
        {
            self.transmit_pending().await;
        }
        self.drive_payload().await;
        let keepalive = self.payload.as_ref().map(|p| p.keepalive());
        if self.pending.is_none()
            && let Some(keepalive) = keepalive
            && now >= self.last_any + keepalive.every
        {
            let kind = Kind::Ipmi {
                what: GetPayloadInstanceInfo::NAME,
                netfn: GetPayloadInstanceInfo::NETFN,
                cmd: GetPayloadInstanceInfo::CMD,
                data: GetPayloadInstanceInfo.request_data(),
            };
            self.start(
                kind,
                keepalive.attempts,
                keepalive.timeout,
                Waiter::Keepalive,
            );
            self.transmit_pending().await;
        }
    }

    async fn transmit_pending(&mut self) {
        let Some(p) = &self.pending else {
            return;
        };
        let rq_seq = p.rq_seq;
        let packet = match self.build_pending(rq_seq) {
            Ok(b) => b,
            Err(e) => return self.finish(Err(e)),
        };
        let now = Instant::now();
        let p = self.pending.as_mut().expect("pending");
        if p.sent > 0 {
            tracing::debug!(endpoint = %self.endpoint, what = p.kind.what(), attempt = p.sent, "retransmitting");
        }
        p.deadline = now + p.first_timeout * (1u32 << p.sent.min(2));
        p.sent += 1;
        p.send_at = None;
        self.last_send = Some(now);
        self.last_any = now;
        if let Err(source) = self.socket.send(&packet).await {
            self.finish(Err(IpmiError::Io {
                endpoint: self.endpoint,
                source,
            }));
        }
    }

    fn build_pending(&mut self, rq_seq: u8) -> Result<Vec<u8>, IpmiError> {
        let p = self.pending.take().expect("pending");
        let r = self.build(&p.kind, rq_seq);
        self.pending = Some(p);
        r
    }

    async fn drive_payload(&mut self) {
        loop {
            let Some(p) = &mut self.payload else {
                return;
            };
            match p.transmit(Instant::now()) {
                Transmit::Send(bytes) => {
                    if let Err(e) = self.send_payload(&bytes).await {
                        tracing::debug!(endpoint = %self.endpoint, error = %crate::error_chain(&e), "payload send");
                    }
                }
                Transmit::Idle => return,
                Transmit::Ended => {
                    self.payload = None;
                    return;
                }
            }
        }
    }

    async fn send_payload(&mut self, payload: &[u8]) -> Result<(), IpmiError> {
        let Some(p) = &self.payload else {
            return Ok(());
        };
        let payload_type = p.payload_type();
        let iv = random::<16>()?;
        self.seq = self.seq.wrapping_add(1).max(1);
        let bytes = encode_packet(
            payload_type,
            self.bmc_session_id,
            self.seq,
            payload,
            self.keys.as_ref(),
            iv,
        )
        .map_err(|source| IpmiError::Encode {
            what: "payload packet",
            source,
        })?;
        self.socket
            .send(&bytes)
            .await
            .map_err(|source| IpmiError::Io {
                endpoint: self.endpoint,
                source,
            })?;
        Ok(())
    }

    /// The session's handle is gone. If a payload owned it (a SOL stream
    /// dropped without `close`): deactivate the payload if it is still
    /// routed here and no other session holds it, and close the session, one
    /// attempt each.
    async fn farewell(&mut self) {
        if !self.payload_owned || self.keys.is_none() {
            return;
        }
        let routed = self.payload.is_some();
        self.end_payload(PayloadEnd::Closed);
        let timeout = Duration::from_millis(500);
        let deactivate = Kind::Ipmi {
            what: DeactivatePayload::NAME,
            netfn: DeactivatePayload::NETFN,
            cmd: DeactivatePayload::CMD,
            data: DeactivatePayload.request_data(),
        };
        let info = Kind::Ipmi {
            what: GetPayloadInstanceInfo::NAME,
            netfn: GetPayloadInstanceInfo::NETFN,
            cmd: GetPayloadInstanceInfo::CMD,
            data: GetPayloadInstanceInfo.request_data(),
        };
        // Never deactivate a payload that another session has taken over
        // (or one that has already ended here).
        let ours = routed
            && match self.exchange(&info, 1, timeout).await {
                Ok(Reply::Ipmi(r)) if r.completion == 0 => GetPayloadInstanceInfo
                    .parse_response(&r.data)
                    .map_or(true, |h| {
                        h == self.bmc_session_id || h == self.console_session_id
                    }),
                _ => true,
            };
        if ours {
            let _ = self.exchange(&deactivate, 1, timeout).await;
        }
        let close = Kind::Ipmi {
            what: CloseSession::NAME,
            netfn: CloseSession::NETFN,
            cmd: CloseSession::CMD,
            data: CloseSession {
                bmc_session_id: self.bmc_session_id,
            }
            .request_data(),
        };
        let _ = self.exchange(&close, 1, timeout).await;
        tracing::debug!(endpoint = %self.endpoint, "payload owner dropped: payload deactivated, session closed");
    }

    fn build(&mut self, kind: &Kind, rq_seq: u8) -> Result<Vec<u8>, IpmiError> {
        let iv = random::<16>()?;
        match kind {
            Kind::Setup {
                what,
                payload_type,
                payload,
                ..
            } => encode_packet(*payload_type, 0, 0, payload, None, iv)
                .map_err(|source| IpmiError::Encode { what, source }),
            Kind::Ipmi {
                what,
                netfn,
                cmd,
                data,
            } => {
                let msg = IpmiRequest {
                    netfn: *netfn,
                    cmd: *cmd,
                    rq_seq,
                    data: data.clone(),
                }
                .encode();
                let (sid, seq) = if self.keys.is_some() {
                    self.seq = self.seq.wrapping_add(1).max(1);
                    (self.bmc_session_id, self.seq)
                } else {
                    (0, 0)
                };
                encode_packet(PayloadType::Ipmi, sid, seq, &msg, self.keys.as_ref(), iv)
                    .map_err(|source| IpmiError::Encode { what, source })
            }
        }
    }

    fn matches(&self, kind: &Kind, rq_seq: u8, bytes: &[u8]) -> Option<Reply> {
        match decode_packet(bytes, self.keys.as_ref()) {
            Ok(p) => self.match_packet(kind, rq_seq, p),
            Err(e) => {
                tracing::debug!(endpoint = %self.endpoint, error = %e, "dropping undecodable packet");
                None
            }
        }
    }

    fn match_packet(&self, kind: &Kind, rq_seq: u8, pkt: Packet) -> Option<Reply> {
        match kind {
            Kind::Setup { expect, tag, .. } => (pkt.payload_type == *expect
                && pkt.payload.first() == Some(tag))
            .then_some(Reply::Setup(pkt.payload)),
            Kind::Ipmi { netfn, cmd, .. } => {
                if pkt.payload_type != PayloadType::Ipmi {
                    return None;
                }
                if self.keys.is_some()
                    && (pkt.session_id != self.console_session_id || !pkt.authenticated)
                {
                    return None;
                }
                let r = IpmiResponse::decode(&pkt.payload).ok()?;
                (r.netfn == netfn + 1 && r.cmd == *cmd && r.rq_seq == rq_seq)
                    .then_some(Reply::Ipmi(r))
            }
        }
    }

    async fn exchange(
        &mut self,
        kind: &Kind,
        attempts: u32,
        first_timeout: Duration,
    ) -> Result<Reply, IpmiError> {
        let what = match kind {
            Kind::Setup { what, .. } | Kind::Ipmi { what, .. } => *what,
        };
        self.rq_seq = (self.rq_seq + 1) & 0x3F;
        let rq_seq = self.rq_seq;
        let mut buf = vec![0u8; 1024];
        for attempt in 0..attempts.max(1) {
            if let Some(last) = self.last_send {
                sleep_until(last + self.min_gap).await;
            }
            let packet = self.build(kind, rq_seq)?;
            self.last_send = Some(Instant::now());
            if attempt > 0 {
                tracing::debug!(endpoint = %self.endpoint, what, attempt, "retransmitting");
            }
            self.socket
                .send(&packet)
                .await
                .map_err(|source| IpmiError::Io {
                    endpoint: self.endpoint,
                    source,
                })?;
            let deadline = Instant::now() + first_timeout * (1u32 << attempt.min(2));
            loop {
                match timeout_at(deadline, self.socket.recv(&mut buf)).await {
                    Err(_) => break,
                    // ICMP errors from earlier sends surface here; keep waiting.
                    Ok(Err(e)) => {
                        tracing::debug!(endpoint = %self.endpoint, error = %e, "recv");
                        sleep(Duration::from_millis(10)).await;
                    }
                    Ok(Ok(n)) => {
                        if let Some(r) = self.matches(kind, rq_seq, &buf[..n]) {
                            return Ok(r);
                        }
                    }
                }
            }
        }
        Err(IpmiError::Timeout {
            endpoint: self.endpoint,
            what,
            attempts: attempts.max(1),
        })
    }
}

/// An open RMCP+ session with one BMC.
#[derive(Debug)]
pub struct IpmiClient {
    tx: mpsc::Sender<Job>,
    endpoint: SocketAddr,
    options: ConnectOptions,
    suite: CipherSuite,
    bmc_session_id: u32,
    console_session_id: u32,
}

impl IpmiClient {
    /// Open a session: choose a cipher suite, authenticate with RAKP and set
    /// the session privilege.
    pub async fn connect(
        endpoint: SocketAddr,
        user: &str,
        password: Secret,
        options: ConnectOptions,
    ) -> Result<IpmiClient, IpmiError> {
        if user.len() > 16 {
            return Err(IpmiError::UserTooLong { len: user.len() });
        }
        let io = |source| IpmiError::Io { endpoint, source };
        let bind: SocketAddr = if endpoint.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal address")
        } else {
            "[::]:0".parse().expect("literal address")
        };
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(endpoint).await.map_err(io)?;
        let (tx, rx) = mpsc::channel(16);
        let actor = Actor {
            socket,
            endpoint,
            keys: None,
            console_session_id: 0,
            bmc_session_id: 0,
            seq: 0,
            rq_seq: 0,
            min_gap: options.min_gap,
            last_send: None,
            last_any: Instant::now(),
            pending: None,
            payload: None,
            payload_owned: false,
        };
        tokio::spawn(actor.run(rx));
        let mut client = IpmiClient {
            tx,
            endpoint,
            options,
            suite: CipherSuite::Suite3,
            bmc_session_id: 0,
            console_session_id: 0,
        };
        let candidates = client.choose_suites().await?;
        let mut last_status = 0;
        for suite in &candidates {
            match client.open_session(*suite, user, &password).await {
                Ok(set_privilege) => {
                    client.suite = *suite;
                    let granted = client.call(&set_privilege).await?;
                    tracing::debug!(%endpoint, suite = suite.id(), granted, "session open");
                    return Ok(client);
                }
                Err(IpmiError::Rejected {
                    step: "Open Session",
                    status,
                    ..
                }) => {
                    tracing::debug!(%endpoint, suite = suite.id(), status, "suite rejected");
                    last_status = status;
                }
                Err(e) => return Err(e),
            }
        }
        Err(IpmiError::NoCipherSuite {
            endpoint,
            offered: candidates.iter().map(|s| s.id()).collect(),
            status: last_status,
        })
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> CipherSuite {
        self.suite
    }

    /// The BMC.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// Whether a session id reported by the BMC (e.g. the holder of a
    /// payload) is this session's.
    pub(crate) fn is_this_session(&self, id: u32) -> bool {
        id == self.bmc_session_id || id == self.console_session_id
    }

    /// Route this session's packets of `payload`'s type to it (the SOL
    /// stream); it owns the session from now on.
    pub(crate) async fn attach_payload(&self, payload: Box<dyn Payload>) -> Result<(), IpmiError> {
        let (done, rx) = oneshot::channel();
        let closed = || IpmiError::Closed {
            endpoint: self.endpoint,
        };
        self.tx
            .send(Job::Attach { payload, done })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())
    }

    /// Stop routing the payload's packets.
    pub(crate) async fn detach_payload(&self) -> Result<(), IpmiError> {
        let (done, rx) = oneshot::channel();
        let closed = || IpmiError::Closed {
            endpoint: self.endpoint,
        };
        self.tx
            .send(Job::Detach { done })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())
    }

    /// Ask for the channel's cipher suites; on no answer, fall back to the
    /// configured list.
    async fn choose_suites(&self) -> Result<Vec<CipherSuite>, IpmiError> {
        // One configured suite: nothing to choose, no probe (a BMC that
        // never answers the probe, like ipmi_sim, costs its timeout).
        if self.options.cipher_suites.len() == 1 {
            return Ok(self.options.cipher_suites.clone());
        }
        let mut list = Vec::new();
        for index in 0..64u8 {
            let cmd = GetChannelCipherSuites { index };
            let reply = self
                .job(
                    Kind::Ipmi {
                        what: GetChannelCipherSuites::NAME,
                        netfn: GetChannelCipherSuites::NETFN,
                        cmd: GetChannelCipherSuites::CMD,
                        data: cmd.request_data(),
                    },
                    1,
                    self.options.cipher_probe_timeout,
                )
                .await;
            let block = match reply {
                Ok(Reply::Ipmi(r)) if r.completion == 0 => match cmd.parse_response(&r.data) {
                    Ok(b) => b,
                    Err(_) => break,
                },
                Ok(_) | Err(IpmiError::Timeout { .. }) => {
                    if index == 0 {
                        tracing::debug!(endpoint = %self.endpoint, "no cipher suite list; using the configured suites");
                        return Ok(self.options.cipher_suites.clone());
                    }
                    break;
                }
                Err(e) => return Err(e),
            };
            let short = block.len() < 16;
            list.extend(block);
            if short {
                break;
            }
        }
        Ok(usable_suites(&self.options.cipher_suites, &list))
    }

    /// One handshake step: a payload outside the session and its answer.
    async fn setup(&self, req: Request) -> Result<Vec<u8>, IpmiError> {
        let tag = req.payload[0];
        match self
            .job(
                Kind::Setup {
                    what: req.what,
                    payload_type: req.payload_type,
                    payload: req.payload,
                    expect: req.expect,
                    tag,
                },
                self.options.retries + 1,
                self.options.timeout,
            )
            .await?
        {
            Reply::Setup(p) => Ok(p),
            Reply::Ipmi(_) => unreachable!("setup jobs get setup replies"),
        }
    }

    /// Open Session and RAKP 1–4 with `suite` ([`Handshake`]), then switch
    /// the socket task to the session's keys. Returns the handshake's last
    /// step, Set Session Privilege Level, to send inside the session.
    async fn open_session(
        &mut self,
        suite: CipherSuite,
        user: &str,
        password: &Secret,
    ) -> Result<SetSessionPrivilege, IpmiError> {
        let endpoint = self.endpoint;
        let randoms = Randoms {
            console_session_id: u32::from_le_bytes(random::<4>()?) | 1,
            tag: random::<1>()?[0],
            console_random: random::<16>()?,
        };
        let mut handshake = Handshake::new(
            endpoint,
            suite,
            self.options.privilege,
            user,
            password,
            randoms,
        );
        let answer = self.setup(handshake.open_session()).await?;
        let rakp1 = handshake.rakp1(&answer)?;
        let rakp2 = self.setup(rakp1).await?;
        let rakp3 = handshake.rakp3(&rakp2)?;
        let rakp4 = self.setup(rakp3).await?;
        let session = handshake.finish(&rakp4)?;
        self.tx
            .send(Job::Activate {
                keys: session.keys,
                console_session_id: session.console_session_id,
                bmc_session_id: session.bmc_session_id,
            })
            .await
            .map_err(|_| IpmiError::Closed { endpoint })?;
        self.bmc_session_id = session.bmc_session_id;
        self.console_session_id = session.console_session_id;
        Ok(session.set_privilege)
    }

    async fn job(
        &self,
        kind: Kind,
        attempts: u32,
        first_timeout: Duration,
    ) -> Result<Reply, IpmiError> {
        let (reply, rx) = oneshot::channel();
        let closed = || IpmiError::Closed {
            endpoint: self.endpoint,
        };
        self.tx
            .send(Job::Send {
                kind,
                attempts,
                first_timeout,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Send one command; `attempts` transmissions at most. Busy answers are
    /// retried with backoff (the command was not executed).
    async fn call_with<C: Command>(&self, c: &C, attempts: u32) -> Result<C::Output, IpmiError> {
        let mut backoff = self.options.busy_backoff;
        let mut busy = 0;
        loop {
            let kind = Kind::Ipmi {
                what: C::NAME,
                netfn: C::NETFN,
                cmd: C::CMD,
                data: c.request_data(),
            };
            let r = match self.job(kind, attempts, self.options.timeout).await? {
                Reply::Ipmi(r) => r,
                Reply::Setup(_) => unreachable!("IPMI jobs get IPMI replies"),
            };
            match r.completion {
                0 => {
                    return c
                        .parse_response(&r.data)
                        .map_err(|source| IpmiError::Response {
                            endpoint: self.endpoint,
                            source,
                        });
                }
                CC_NODE_BUSY if busy < self.options.busy_retries => {
                    busy += 1;
                    tracing::debug!(endpoint = %self.endpoint, command = C::NAME, busy, "BMC busy; backing off");
                    sleep(backoff).await;
                    backoff *= 2;
                }
                code => {
                    return Err(IpmiError::Completion {
                        endpoint: self.endpoint,
                        command: C::NAME,
                        code,
                    });
                }
            }
        }
    }

    /// Send an idempotent command with the configured retransmissions.
    pub async fn call<C: Command>(&self, c: &C) -> Result<C::Output, IpmiError> {
        self.call_with(c, self.options.retries + 1).await
    }

    /// Get Chassis Status.
    pub async fn chassis_status(&self) -> Result<ChassisStatus, IpmiError> {
        self.call(&GetChassisStatus).await
    }

    /// Chassis Control. The request is sent once per try and never
    /// retransmitted blindly: when no reply comes, the power state is re-read.
    /// On and Off are then confirmed by that state (and sent again only if
    /// the state shows they did not happen); Cycle, HardReset and
    /// SoftShutdown cannot be confirmed and give
    /// [`IpmiError::PowerUnconfirmed`].
    pub async fn power(&self, action: PowerAction) -> Result<(), IpmiError> {
        let target = match action {
            PowerAction::On => Some(true),
            PowerAction::Off => Some(false),
            _ => None,
        };
        for _ in 0..=self.options.retries {
            match self.call_with(&ChassisControl(action), 1).await {
                Ok(()) => return Ok(()),
                Err(IpmiError::Timeout { .. }) => {
                    let status = self.chassis_status().await?;
                    tracing::warn!(endpoint = %self.endpoint, ?action, power_on = status.power_on, "no reply to Chassis Control; re-read power state");
                    match target {
                        Some(t) if status.power_on == t => return Ok(()),
                        Some(_) => continue, // not done: sending it again is safe
                        None => {
                            return Err(IpmiError::PowerUnconfirmed {
                                endpoint: self.endpoint,
                                action,
                                power_on: status.power_on,
                            });
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let status = self.chassis_status().await?;
        Err(IpmiError::PowerUnconfirmed {
            endpoint: self.endpoint,
            action,
            power_on: status.power_on,
        })
    }

    /// Set the boot device override. Also asks the BMC to keep the override
    /// past the 60-second Chassis Control timeout (parameter 3); a BMC that
    /// does not support that parameter is tolerated.
    pub async fn set_boot_device(
        &self,
        device: BootDevice,
        efi: bool,
        persistent: bool,
    ) -> Result<(), IpmiError> {
        match self
            .call(&SetSystemBootOptions::keep_valid_past_timeout())
            .await
        {
            Ok(()) => {}
            Err(IpmiError::Completion { code, .. }) => {
                tracing::debug!(endpoint = %self.endpoint, code, "BMC does not take boot parameter 3");
            }
            Err(e) => return Err(e),
        }
        self.call(&SetSystemBootOptions::boot_flags(BootFlags {
            valid: true,
            persistent,
            efi,
            device,
        }))
        .await
    }

    /// Read the boot flags (parameter 5).
    pub async fn get_boot_device(&self) -> Result<BootFlags, IpmiError> {
        let data = self
            .call(&GetSystemBootOptions {
                param: commands::boot_param::BOOT_FLAGS,
            })
            .await?;
        BootFlags::decode(&data).map_err(|source| IpmiError::Response {
            endpoint: self.endpoint,
            source,
        })
    }

    /// Close the session (one attempt per retry; a lost reply is not an
    /// error worth failing for) and stop the socket task.
    pub async fn close(self) -> Result<(), IpmiError> {
        let r = self
            .call(&CloseSession {
                bmc_session_id: self.bmc_session_id,
            })
            .await;
        drop(self.tx);
        r
    }
}
