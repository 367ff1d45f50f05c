//! Forwards: a user's TCP connection to a port of a leased host, carried
//! over the rack's Attach stream. The agent dials the host's inventory
//! IPv4 on the boot network (never an address the user gives), so a host
//! behind a NAT'ed rack is reachable wherever lab-server is.
//!
//! - **Who.** The holder of the host's active lease, or an operator
//!   (`core::policy::may_forward`). Every forward on a host ends when the
//!   host's lease ends (like a holder's console session), whoever opened
//!   it; a forward that was being opened as the lease ended is closed as
//!   soon as it is open.
//! - **Limits.** At most [`ForwardLimits::per_lease`] forwards open at once
//!   per lease (per host for an operator's forward to a host without a
//!   lease): RESOURCE_EXHAUSTED past it. A forward with no bytes either way
//!   for [`ForwardLimits::idle_timeout`] is closed. The agent gives up
//!   connecting after its connect timeout (UNAVAILABLE).
//! - **Flow control.** The Attach stream is one HTTP/2 stream shared by
//!   every host of the rack, so its own flow control cannot hold back one
//!   forward without stalling the others. Each forward therefore has a
//!   credit window in each direction: a side may have at most
//!   [`FORWARD_WINDOW`] data messages of at most [`FORWARD_CHUNK`] bytes
//!   that the other has not credited back (the agent credits input it
//!   wrote to the host, the server credits output it passed on to the
//!   user). A slow user thus stops the agent reading from the host (TCP
//!   backpressure on the host), and a slow host stops the server reading
//!   from the user (gRPC backpressure on the user); nothing queues without
//!   bound and the registry never has to drop a forward for being slow.
//! - **Half-close.** The user ending its side half-closes the connection
//!   to the host; the host closing its side ends the forward once its last
//!   bytes reached the user.
//! - **Events.** `FORWARD_OPENED` (detail: the port) when the agent has
//!   connected, `FORWARD_CLOSED` (port, bytes each way, why) when it ends.

use super::commands::{Answer, CommandKind, ForwardOpen};
use super::link::{SessionData, SessionInput, ToAgent};
use super::registry::{ConnId, RackRegistry};
use super::{RackError, Racks};
use crate::core::{HostView, Note, policy};
use crate::events::EventKind;
use crate::lease::HostState;
use crate::types::{Caller, HostName, LeaseId, RackName};
use futures::{Stream, StreamExt};
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::CommandId;
use super::link::Outbound;

/// How long the agent has to connect and answer (its own connect timeout
/// is 10 s; this leaves room for the link).
pub const FORWARD_OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Data messages a side of a forward may have outstanding (not credited
/// back by the other side).
pub const FORWARD_WINDOW: u32 = 16;
/// The largest data message of a forward; a user's bigger message is sent
/// to the agent in pieces of this size.
pub const FORWARD_CHUNK: usize = 32 * 1024;

/// Limits on forwards (lab-server's `--forward-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardLimits {
    /// Forwards open at once per lease.
    pub per_lease: usize,
    /// A forward with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            per_lease: 16,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// What the per-lease limit counts forwards by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ForwardScope {
    Lease(LeaseId),
    /// An operator's forward to a host without an active lease.
    Host(HostName),
}

impl fmt::Display for ForwardScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardScope::Lease(l) => write!(f, "lease {l}"),
            ForwardScope::Host(h) => write!(f, "host {h}"),
        }
    }
}

/// One open forward counted against its scope's limit; given back on drop.
pub struct ForwardSlot {
    registry: RackRegistry,
    scope: ForwardScope,
}

impl ForwardSlot {
    pub(super) fn new(registry: RackRegistry, scope: ForwardScope) -> Self {
        ForwardSlot { registry, scope }
    }
}

impl Drop for ForwardSlot {
    fn drop(&mut self) {
        self.registry.give_back_forward_slot(&self.scope);
    }
}

/// What comes from the user's side of a forward (the end of the stream is
/// the user's end of input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromUser {
    Data(Vec<u8>),
    /// The user's stream broke.
    Broken,
}

/// What goes to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToUser {
    Data(Vec<u8>),
    /// A notice from the agent.
    Notice(String),
}

/// Why a forward ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardEnd {
    /// The host closed the connection and its last bytes reached the user.
    HostClosed,
    /// The user went away.
    UserGone,
    /// The host's lease ended.
    LeaseEnded,
    /// No bytes either way for the idle timeout.
    Idle(Duration),
    /// The connection to the host broke (the agent's words).
    Broken(String),
    /// The rack's agent went away.
    AgentGone,
}

impl fmt::Display for ForwardEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardEnd::HostClosed => f.write_str("the host closed the connection"),
            ForwardEnd::UserGone => f.write_str("the user closed the forward"),
            ForwardEnd::LeaseEnded => f.write_str("the lease ended"),
            ForwardEnd::Idle(after) => write!(f, "idle for {}", humantime::format_duration(*after)),
            ForwardEnd::Broken(why) => write!(f, "the connection broke: {why}"),
            ForwardEnd::AgentGone => f.write_str("the agent went away"),
        }
    }
}

/// An open forward. Dropping it closes the connection on the agent and
/// gives back its slot.
pub struct Forward {
    pub id: CommandId,
    pub host: HostName,
    pub rack: RackName,
    pub port: u16,
    /// The lease it lives in (`None`: an operator's, on a host without one).
    pub lease: Option<LeaseId>,
    caller: Caller,
    conn: ConnId,
    registry: RackRegistry,
    output: mpsc::Receiver<SessionData>,
    to_agent: mpsc::Sender<Outbound>,
    _slot: ForwardSlot,
    /// Bytes the user sent to the host, and the host to the user.
    pub to_host: u64,
    pub from_host: u64,
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("id", &self.id)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.registry
            .close_session(&self.rack, self.conn, self.id, &self.host);
    }
}

/// The active lease holding the host, if any.
fn active_lease(view: &HostView) -> Option<LeaseId> {
    match (&view.record.state, &view.lease) {
        (HostState::Leased(_), Some(l)) if l.is_active() => Some(l.id),
        _ => None,
    }
}

impl Racks {
    /// Opens a forward to `open.port` of `open.host`: checks who may, takes
    /// a slot of the lease's limit, has the agent connect, and records
    /// `FORWARD_OPENED`.
    pub async fn forward(&self, caller: &Caller, open: ForwardOpen) -> Result<Forward, RackError> {
        let (spec, view) = self.host(&open.host).await?;
        policy::may_forward(caller, &view)?;
        if spec.ipv4.is_none() {
            return Err(RackError::NoIpv4 { host: spec.name });
        }
        if !self.registry.has_agent(&spec.name) {
            return Err(RackError::NoAgent { rack: spec.rack });
        }
        let lease = active_lease(&view);
        let scope = lease.map_or_else(
            || ForwardScope::Host(spec.name.clone()),
            ForwardScope::Lease,
        );
        let slot = self.registry.take_forward_slot(scope)?;
        let port = open.port;
        let mut issued = self
            .registry
            .command(
                &spec.rack,
                &spec.name,
                CommandKind::Forward(open),
                Answer::Forward,
            )
            .await?;
        issued.reply(FORWARD_OPEN_TIMEOUT).await?;
        let forward = Forward {
            id: issued.id,
            host: spec.name.clone(),
            rack: spec.rack.clone(),
            port,
            lease,
            caller: caller.clone(),
            conn: issued.conn,
            registry: self.registry.clone(),
            output: issued.data.take().expect("a session was asked for"),
            to_agent: issued.to_agent.clone(),
            _slot: slot,
            to_host: 0,
            from_host: 0,
        };
        // The lease may have ended while the agent connected (after its
        // end closed the forwards it knew of).
        let now = self.core.get_host(spec.name.clone()).await?;
        if active_lease(&now) != lease {
            return Err(RackError::ForwardLeaseEnded { host: spec.name });
        }
        info!(host = %forward.host, port, principal = %caller.principal, lease = ?lease, "forward opened");
        self.core
            .record(Note {
                actor: caller.principal.clone(),
                kind: EventKind::ForwardOpened,
                hosts: vec![forward.host.clone()],
                lease,
                detail: format!("port {port}"),
            })
            .await?;
        Ok(forward)
    }

    /// Carries bytes between the user and the host until the forward ends,
    /// then records `FORWARD_CLOSED`. `Ok` when the host closed the
    /// connection (or the user went); otherwise why it was cut.
    pub async fn run_forward<S>(
        &self,
        mut forward: Forward,
        from_user: S,
        to_user: mpsc::Sender<ToUser>,
    ) -> Result<(), RackError>
    where
        S: Stream<Item = FromUser> + Unpin,
    {
        let idle = self.registry.forward_limits().idle_timeout;
        let end = forward.pump(from_user, &to_user, idle).await;
        let (host, port, lease) = (forward.host.clone(), forward.port, forward.lease);
        let (to_host, from_host) = (forward.to_host, forward.from_host);
        let (actor, rack) = (forward.caller.principal.clone(), forward.rack.clone());
        // Closed on the agent and its slot given back before the event
        // says it is closed.
        drop(forward);
        info!(host = %host, port, to_host, from_host, why = %end, "forward closed");
        let note = Note {
            actor,
            kind: EventKind::ForwardClosed,
            hosts: vec![host.clone()],
            lease,
            detail: format!(
                "port {port}: {to_host} bytes to the host, {from_host} bytes from it; {end}"
            ),
        };
        if let Err(e) = self.core.record(note).await {
            debug!(error = %e, "cannot record the forward's end");
        }
        match end {
            ForwardEnd::HostClosed | ForwardEnd::UserGone => Ok(()),
            ForwardEnd::LeaseEnded => Err(RackError::ForwardLeaseEnded { host }),
            ForwardEnd::Idle(after) => Err(RackError::ForwardIdle { host, after }),
            ForwardEnd::Broken(message) => Err(RackError::ForwardBroken { host, message }),
            ForwardEnd::AgentGone => Err(RackError::AgentGone { rack }),
        }
    }
}

impl Forward {
    async fn send(&self, input: SessionInput) -> Result<(), ForwardEnd> {
        self.to_agent
            .send(Ok(ToAgent::Input(input)))
            .await
            .map_err(|_| ForwardEnd::AgentGone)
    }

    /// The two directions with their credit windows (see the module docs).
    async fn pump<S>(
        &mut self,
        mut from_user: S,
        to_user: &mpsc::Sender<ToUser>,
        idle: Duration,
    ) -> ForwardEnd
    where
        S: Stream<Item = FromUser> + Unpin,
    {
        match self.pump_inner(&mut from_user, to_user, idle).await {
            Ok(end) | Err(end) => end,
        }
    }

    async fn pump_inner<S>(
        &mut self,
        from_user: &mut S,
        to_user: &mpsc::Sender<ToUser>,
        idle: Duration,
    ) -> Result<ForwardEnd, ForwardEnd>
    where
        S: Stream<Item = FromUser> + Unpin,
    {
        let id = self.id;
        // Input messages the agent still takes before crediting some back.
        let mut credit = FORWARD_WINDOW;
        // Output messages passed on to the user, not yet credited back.
        let mut owed = 0;
        let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
        let mut user_open = true;
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        loop {
            while credit > 0 {
                let Some(chunk) = pending.pop_front() else {
                    break;
                };
                self.send(SessionInput {
                    id,
                    input: chunk,
                    ..Default::default()
                })
                .await?;
                credit -= 1;
            }
            tokio::select! {
                d = self.output.recv() => {
                    let Some(d) = d else { return Err(ForwardEnd::AgentGone) };
                    credit = credit.saturating_add(d.credit).min(FORWARD_WINDOW);
                    if !d.output.is_empty() {
                        idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                        self.from_host += d.output.len() as u64;
                        if to_user.send(ToUser::Data(d.output)).await.is_err() {
                            return Ok(ForwardEnd::UserGone);
                        }
                        owed += 1;
                        if owed >= FORWARD_WINDOW / 2 {
                            self.send(SessionInput { id, credit: owed, ..Default::default() }).await?;
                            owed = 0;
                        }
                    }
                    if d.end {
                        return Ok(if d.lease_ended {
                            ForwardEnd::LeaseEnded
                        } else if d.notice.is_empty() {
                            ForwardEnd::HostClosed
                        } else {
                            ForwardEnd::Broken(d.notice)
                        });
                    }
                    if !d.notice.is_empty() && to_user.send(ToUser::Notice(d.notice)).await.is_err() {
                        return Ok(ForwardEnd::UserGone);
                    }
                }
                m = from_user.next(), if user_open && pending.is_empty() && credit > 0 => match m {
                    Some(FromUser::Data(bytes)) => {
                        if !bytes.is_empty() {
                            idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                            self.to_host += bytes.len() as u64;
                            pending.extend(bytes.chunks(FORWARD_CHUNK).map(<[u8]>::to_vec));
                        }
                    }
                    Some(FromUser::Broken) => return Ok(ForwardEnd::UserGone),
                    None => {
                        user_open = false;
                        self.send(SessionInput { id, eof: true, ..Default::default() }).await?;
                    }
                },
                () = &mut idle_timer => return Ok(ForwardEnd::Idle(idle)),
                () = to_user.closed() => return Ok(ForwardEnd::UserGone),
            }
        }
    }
}
