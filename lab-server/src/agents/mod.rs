//! The rack agents as the server sees them: one `AgentService.Attach`
//! stream per rack, the desired state the server pushes down it, the
//! reports that come back, and the user operations that go through it
//! (power, live consoles, captured console logs, the reclaim step).
//!
//! - **Desired state.** After an agent's hello the server sends the full
//!   [`pb::RackState`]; afterwards every committed event that touches one of
//!   the rack's hosts sends that host's [`pb::AgentHost`] again (an
//!   inventory change, or a lagging event subscription, sends the whole rack
//!   again). The agent reconciles: a new lease with a profile is provisioned
//!   (boot device, power on, watch for the profile's ready marker).
//! - **Reachability.** A host of a rack that has an agent is unreachable
//!   while that agent is not attached, or while the agent reports its BMC
//!   silent. The core does not grant unreachable hosts (see
//!   [`Core::set_unreachable`]); every change is an event.
//! - **Commands** carry an id and are answered by a [`pb::CommandReply`]
//!   with that id; console sessions and log reads stream
//!   [`pb::SessionData`] with the command's id until `end`.
//! - **Reclaim.** [`AgentReclaimer`] is the core's reclaim step: it asks the
//!   agent to capture end-of-lease debug output, power the host off and
//!   reset its boot device; if the agent is away, the core retries with
//!   backoff and the host stays `reclaiming` (never handed out dirty).
//!
//! BMC passwords are resolved here and only ever written into the Attach
//! stream of the agent that serves the host; they are never logged.

use crate::core::reclaim::{ReclaimError, ReclaimFuture, Reclaimer};
use crate::core::{Core, HostView};
use crate::events::EventKind;
use crate::inventory::{ConsoleSource, HostSpec, Inventory};
use crate::lease::{HostState, Lease};
use crate::types::{Caller, HostName, LeaseId, RackName, Role};
use lab_proto::convert::timestamp_from_millis;
use lab_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::{Code, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

/// How long a power command may take (the agent re-reads state after an
/// unclear outcome; a BMC that never answers takes the client's retries).
pub const POWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a reclaim may take before the core retries it.
pub const RECLAIM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agent has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Provisioning records kept for display (oldest dropped first).
const PROVISIONING_KEPT: usize = 4096;

type ToAgent = mpsc::Sender<Result<pb::ServerMessage, Status>>;

/// The agents registry; cheap to clone.
#[derive(Clone, Default)]
pub struct Agents(Arc<Inner>);

#[derive(Default)]
struct Inner {
    core: OnceLock<Core>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    conns: HashMap<RackName, Conn>,
    next_conn: u64,
    /// The last report of each host.
    reports: HashMap<HostName, pb::HostReport>,
    /// Hosts whose rack has an agent (they get provisioning records).
    managed: HashSet<HostName>,
    provisioning: HashMap<(LeaseId, HostName), pb::HostProvisioning>,
    provisioning_order: VecDeque<(LeaseId, HostName)>,
    /// When each host's reclaim after a lease finished: the end of the
    /// lease's console slice (end-of-lease debug output included).
    reclaimed_at: HashMap<(LeaseId, HostName), i64>,
}

struct Conn {
    id: u64,
    agent: String,
    tx: ToAgent,
    next_cmd: u64,
    pending: HashMap<u64, oneshot::Sender<pb::CommandReply>>,
    sessions: HashMap<u64, mpsc::Sender<pb::SessionData>>,
    /// Console sessions opened on the strength of a lease (not by an
    /// operator): they end when that host's lease ends.
    lease_consoles: HashMap<u64, HostName>,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let racks: Vec<String> = self.lock().conns.keys().map(|r| r.to_string()).collect();
        f.debug_struct("Agents").field("attached", &racks).finish()
    }
}

impl Agents {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn core(&self) -> Result<&Core, Status> {
        self.0
            .core
            .get()
            .ok_or_else(|| Status::unavailable("the server is starting"))
    }

    /// The reclaim step for [`Core::start`].
    pub fn reclaimer(&self) -> Arc<dyn Reclaimer> {
        Arc::new(AgentReclaimer(self.clone()))
    }

    /// Connects the registry to the started core: marks the hosts of every
    /// rack with an agent unreachable until it attaches, and follows
    /// inventory reloads.
    pub fn start(&self, core: Core) {
        if self.0.core.set(core.clone()).is_err() {
            return;
        }
        let me = self.clone();
        let mut events = core.subscribe();
        tokio::spawn(async move {
            me.refresh_reachability().await;
            loop {
                match events.recv().await {
                    Ok(e) if e.kind == EventKind::InventoryLoaded => {
                        me.refresh_reachability().await;
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        me.refresh_reachability().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    /// Recompute which hosts cannot be driven and tell the core.
    async fn refresh_reachability(&self) {
        let Ok(core) = self.core() else { return };
        let Ok(inventory) = core.inventory().await else {
            return;
        };
        let mut unreachable = BTreeMap::new();
        {
            let mut st = self.lock();
            st.managed.clear();
            for h in &inventory.hosts {
                let Some(agent) = inventory.rack(&h.rack).and_then(|r| r.agent.as_ref()) else {
                    continue;
                };
                st.managed.insert(h.name.clone());
                if !st.conns.contains_key(&h.rack) {
                    unreachable.insert(
                        h.name.clone(),
                        format!("agent {agent} of rack {} is not attached", h.rack),
                    );
                } else if let Some(r) = st.reports.get(&h.name).filter(|r| !r.reachable) {
                    unreachable.insert(h.name.clone(), r.unreachable_reason.clone());
                }
            }
        }
        if let Err(e) = core.set_unreachable(unreachable).await {
            debug!(error = %e, "cannot update reachability");
        }
    }

    // ------------------------------------------------------------ attach

    /// Serve one agent's Attach stream. The first message must be its hello
    /// naming a rack whose `agent` is the caller (operators may attach for
    /// any rack: the development mode). A newer attach for the same rack
    /// replaces the older one.
    pub async fn attach(
        &self,
        caller: Caller,
        mut inbound: Streaming<pb::AgentMessage>,
    ) -> Result<mpsc::Receiver<Result<pb::ServerMessage, Status>>, Status> {
        if !matches!(caller.role, Role::Agent | Role::Operator) {
            return Err(Status::permission_denied(format!(
                "{} ({}) is not an agent",
                caller.principal, caller.role
            )));
        }
        let core = self.core()?.clone();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let Some(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "hello: the first message must be a hello",
            ));
        };
        let rack = RackName::new(&hello.rack)
            .map_err(|e| Status::invalid_argument(format!("hello.rack: {e}")))?;
        let inventory = core.inventory().await?;
        let Some(spec) = inventory.rack(&rack) else {
            return Err(Status::not_found(format!(
                "hello.rack: no rack {rack} in the inventory"
            )));
        };
        let Some(agent) = spec.agent.clone() else {
            return Err(Status::failed_precondition(format!(
                "rack {rack} has no agent in the inventory"
            )));
        };
        if caller.role != Role::Operator && caller.principal.as_str() != agent {
            return Err(Status::permission_denied(format!(
                "{} may not attach for rack {rack} (its agent is {agent})",
                caller.principal
            )));
        }
        let (tx, rx) = mpsc::channel(256);
        let conn_id = {
            let mut st = self.lock();
            st.next_conn += 1;
            let id = st.next_conn;
            if let Some(old) = st.conns.insert(
                rack.clone(),
                Conn {
                    id,
                    agent: agent.clone(),
                    tx: tx.clone(),
                    next_cmd: 0,
                    pending: HashMap::new(),
                    sessions: HashMap::new(),
                    lease_consoles: HashMap::new(),
                },
            ) {
                let _ = old.tx.try_send(Err(Status::aborted(
                    "replaced by a newer attach of the same agent",
                )));
            }
            id
        };
        info!(rack = %rack, agent = %agent, version = %hello.version, "agent attached");
        // Subscribe before the full state, so that no change falls between.
        let events = core.subscribe();
        send(
            &tx,
            pb::server_message::Msg::Rack(rack_state(&core, &rack).await?),
        )
        .await;
        self.refresh_reachability().await;
        let me = self.clone();
        let span = info_span!("agent", rack = %rack, conn = conn_id);
        tokio::spawn(
            async move {
                let push = me.push_changes(core, rack.clone(), events, tx.clone());
                tokio::select! {
                    () = me.read_agent(&rack, conn_id, inbound) => {}
                    () = push => {}
                    () = tx.closed() => {}
                }
                me.detach(&rack, conn_id).await;
            }
            .instrument(span),
        );
        Ok(rx)
    }

    async fn detach(&self, rack: &RackName, conn_id: u64) {
        let removed = {
            let mut st = self.lock();
            if st.conns.get(rack).is_some_and(|c| c.id == conn_id) {
                st.conns.remove(rack)
            } else {
                None
            }
        };
        if let Some(conn) = removed {
            info!(agent = %conn.agent, "agent detached");
            // Dropping the conn fails its pending commands and ends its
            // sessions.
            drop(conn);
            self.refresh_reachability().await;
        }
    }

    /// Sends the desired state of hosts as events change them.
    async fn push_changes(
        &self,
        core: Core,
        rack: RackName,
        mut events: broadcast::Receiver<crate::events::EventRecord>,
        tx: ToAgent,
    ) {
        loop {
            match events.recv().await {
                Ok(e)
                    if matches!(
                        e.kind,
                        EventKind::InventoryLoaded
                            | EventKind::HostAdded
                            | EventKind::HostRetired
                            | EventKind::HostRemoved
                    ) => {}
                Ok(e) => {
                    if e.kind == EventKind::HostReclaiming {
                        self.end_lease_consoles(&rack, &e.hosts, &tx).await;
                    }
                    for h in &e.hosts {
                        let Ok(view) = core.get_host(h.clone()).await else {
                            continue;
                        };
                        if view.spec.as_ref().is_some_and(|s| s.rack == rack)
                            && !send(&tx, pb::server_message::Msg::Host(agent_host(&view))).await
                        {
                            return;
                        }
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
            // The whole rack again (inventory change, or events missed).
            let Ok(state) = rack_state(&core, &rack).await else {
                return;
            };
            if !send(&tx, pb::server_message::Msg::Rack(state)).await {
                return;
            }
        }
    }

    /// Ends the console sessions that holders opened on `hosts`, whose
    /// lease just ended: a former holder keeps no access to the host.
    async fn end_lease_consoles(&self, rack: &RackName, hosts: &[HostName], tx: &ToAgent) {
        let ended: Vec<(u64, HostName, Option<mpsc::Sender<pb::SessionData>>)> = {
            let mut st = self.lock();
            let Some(conn) = st.conns.get_mut(rack) else {
                return;
            };
            let ids: Vec<u64> = conn
                .lease_consoles
                .iter()
                .filter(|(_, h)| hosts.contains(h))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| {
                    let host = conn.lease_consoles.remove(&id)?;
                    Some((id, host, conn.sessions.remove(&id)))
                })
                .collect()
        };
        for (id, host, sink) in ended {
            info!(host = %host, session = id, "lease ended: closing its console session");
            if let Some(s) = sink {
                let _ = s.try_send(pb::SessionData {
                    id,
                    notice: format!("the lease on {host} ended; console closed"),
                    end: true,
                    ..Default::default()
                });
            }
            let close = pb::AgentCommand {
                id,
                host: host.to_string(),
                cmd: Some(pb::agent_command::Cmd::CloseSession(true)),
            };
            send(tx, pb::server_message::Msg::Command(close)).await;
        }
    }

    /// Reads the agent's reports, replies and session data.
    async fn read_agent(
        &self,
        rack: &RackName,
        conn_id: u64,
        mut inbound: Streaming<pb::AgentMessage>,
    ) {
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    info!(error = %e, "agent stream broke");
                    return;
                }
            };
            match msg.msg {
                Some(pb::agent_message::Msg::Report(r)) => self.report(rack, r).await,
                Some(pb::agent_message::Msg::Reply(r)) => {
                    let waiter = {
                        let mut st = self.lock();
                        st.conns
                            .get_mut(rack)
                            .filter(|c| c.id == conn_id)
                            .and_then(|c| c.pending.remove(&r.id))
                    };
                    if let Some(w) = waiter {
                        let _ = w.send(r);
                    }
                }
                Some(pb::agent_message::Msg::Data(d)) => {
                    let sink = {
                        let mut st = self.lock();
                        let conn = st.conns.get_mut(rack).filter(|c| c.id == conn_id);
                        match conn {
                            Some(c) if d.end => c.sessions.remove(&d.id),
                            Some(c) => c.sessions.get(&d.id).cloned(),
                            None => None,
                        }
                    };
                    if let Some(s) = sink {
                        // A viewer that cannot keep up loses its session
                        // rather than stalling every other host's traffic.
                        if s.try_send(d).is_err() {
                            debug!("console viewer too slow; dropping its session");
                            let mut st = self.lock();
                            if let Some(c) = st.conns.get_mut(rack) {
                                c.sessions.retain(|_, v| !v.same_channel(&s));
                            }
                        }
                    }
                }
                Some(pb::agent_message::Msg::Hello(_)) | None => {
                    debug!("ignoring a second hello or an empty message");
                }
            }
        }
    }

    async fn report(&self, rack: &RackName, r: pb::HostReport) {
        let Ok(host) = HostName::new(&r.host) else {
            warn!(host = %r.host, "report about a malformed host name");
            return;
        };
        let reachability_changed = {
            let mut st = self.lock();
            let before = st
                .reports
                .get(&host)
                .map(|p| (p.reachable, p.unreachable_reason.clone()));
            if !r.lease_id.is_empty()
                && let Ok(lease) = r.lease_id.parse::<LeaseId>()
            {
                let key = (lease, host.clone());
                let rec = pb::HostProvisioning {
                    host: host.to_string(),
                    phase: r.phase,
                    stage: r.stage.clone(),
                    updated_at: Some(timestamp_from_millis(now_ms())),
                    console_tail: r.console_tail.clone(),
                };
                if st.provisioning.insert(key.clone(), rec).is_none() {
                    st.provisioning_order.push_back(key);
                    while st.provisioning_order.len() > PROVISIONING_KEPT {
                        if let Some(old) = st.provisioning_order.pop_front() {
                            st.provisioning.remove(&old);
                        }
                    }
                }
                debug!(rack = %rack, host = %host, lease = %lease, phase = r.phase, stage = %r.stage, "provisioning");
            }
            let now = (r.reachable, r.unreachable_reason.clone());
            st.reports.insert(host, r);
            before != Some(now)
        };
        if reachability_changed {
            self.refresh_reachability().await;
        }
    }

    // ------------------------------------------------------------ commands

    /// Sends a command to the agent of `host`'s rack; with `session`, data
    /// with the command's id goes to the returned receiver.
    async fn command(
        &self,
        spec: &HostSpec,
        cmd: pb::agent_command::Cmd,
        session: bool,
    ) -> Result<
        (
            u64,
            oneshot::Receiver<pb::CommandReply>,
            Option<mpsc::Receiver<pb::SessionData>>,
            ToAgent,
        ),
        Status,
    > {
        let (reply_tx, reply_rx) = oneshot::channel();
        let (id, tx, data_rx) = {
            let mut st = self.lock();
            let Some(conn) = st.conns.get_mut(&spec.rack) else {
                return Err(Status::unavailable(format!(
                    "the agent of rack {} is not attached",
                    spec.rack
                )));
            };
            conn.next_cmd += 1;
            let id = conn.next_cmd;
            conn.pending.insert(id, reply_tx);
            let data_rx = session.then(|| {
                let (t, r) = mpsc::channel(256);
                conn.sessions.insert(id, t);
                r
            });
            (id, conn.tx.clone(), data_rx)
        };
        let msg = pb::ServerMessage {
            msg: Some(pb::server_message::Msg::Command(pb::AgentCommand {
                id,
                host: spec.name.to_string(),
                cmd: Some(cmd),
            })),
        };
        tx.send(Ok(msg)).await.map_err(|_| {
            Status::unavailable(format!("the agent of rack {} went away", spec.rack))
        })?;
        Ok((id, reply_rx, data_rx, tx))
    }

    async fn await_reply(
        rack: &RackName,
        reply: oneshot::Receiver<pb::CommandReply>,
        timeout: Duration,
    ) -> Result<pb::CommandReply, Status> {
        match tokio::time::timeout(timeout, reply).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the agent of rack {rack} did not answer within {timeout:?}"
            ))),
            Ok(Err(_)) => Err(Status::unavailable(format!(
                "the agent of rack {rack} went away"
            ))),
            Ok(Ok(r)) if r.error.is_empty() => Ok(r),
            Ok(Ok(r)) => Err(Status::new(code_from_kind(r.code), r.error)),
        }
    }

    /// The host's spec and view, for commands.
    async fn host(&self, name: &HostName) -> Result<(HostSpec, HostView), Status> {
        let view = self.core()?.get_host(name.clone()).await?;
        let spec = view
            .spec
            .clone()
            .ok_or_else(|| Status::failed_precondition(format!("host {name} was removed")))?;
        Ok((spec, view))
    }

    /// Power through the agent. Changing power needs the host's active
    /// lease (or operator); reading it needs only a user.
    pub async fn power(
        &self,
        caller: &Caller,
        host: &HostName,
        action: pb::PowerAction,
    ) -> Result<bool, Status> {
        let (spec, view) = self.host(host).await?;
        if action != pb::PowerAction::Status {
            may_drive(caller, &view, "switch the power of")?;
        }
        if spec.bmc.is_none() {
            return Err(Status::failed_precondition(format!(
                "host {host} has no BMC in the inventory"
            )));
        }
        if !self.lock().managed.contains(host) {
            return Err(Status::failed_precondition(format!(
                "rack {} has no agent",
                spec.rack
            )));
        }
        info!(host = %host, principal = %caller.principal, action = ?action, "power");
        let (_, reply, _, _) = self
            .command(&spec, pb::agent_command::Cmd::Power(action as i32), false)
            .await?;
        Ok(Self::await_reply(&spec.rack, reply, POWER_TIMEOUT)
            .await?
            .on)
    }

    /// Opens a live console session on the host's agent; the returned
    /// receiver yields its output, the sender takes input.
    pub async fn console(
        &self,
        caller: &Caller,
        open: pb::ConsoleOpen,
    ) -> Result<ConsoleSession, Status> {
        let host = HostName::new(&open.host)
            .map_err(|e| Status::invalid_argument(format!("open.host: {e}")))?;
        let (spec, view) = self.host(&host).await?;
        may_drive(caller, &view, "open the console of")?;
        if matches!(spec.console, ConsoleSource::None) {
            return Err(Status::failed_precondition(format!(
                "host {host} has no console in the inventory"
            )));
        }
        info!(host = %host, principal = %caller.principal, write = open.write, "console opened");
        let (id, reply, data, tx) = self
            .command(&spec, pb::agent_command::Cmd::Console(open), true)
            .await?;
        if caller.role != Role::Operator
            && let Some(conn) = self.lock().conns.get_mut(&spec.rack)
        {
            conn.lease_consoles.insert(id, spec.name.clone());
        }
        Self::await_reply(&spec.rack, reply, Duration::from_secs(15)).await?;
        Ok(ConsoleSession {
            id,
            output: data.expect("session requested"),
            to_agent: tx,
            host: spec.name.clone(),
        })
    }

    /// Reads the console captured on `lease`'s hosts during the lease.
    /// Each host's part is (host, receiver of its data).
    pub async fn console_log(
        &self,
        caller: &Caller,
        lease: &Lease,
    ) -> Result<Vec<(HostName, Result<mpsc::Receiver<pb::SessionData>, Status>)>, Status> {
        if caller.role != Role::Operator && caller.principal != lease.holder {
            return Err(Status::permission_denied(format!(
                "{} may not read the console log of lease {} (held by {})",
                caller.principal, lease.id, lease.holder
            )));
        }
        let mut parts = Vec::new();
        for h in &lease.hosts {
            let part = async {
                let (spec, _) = self.host(h).await?;
                let reclaimed = self
                    .lock()
                    .reclaimed_at
                    .get(&(lease.id, h.clone()))
                    .copied();
                let to = match (lease.ended_at, reclaimed) {
                    (None, _) => None,
                    (Some(_), Some(r)) => Some(r),
                    // Still reclaiming: up to now.
                    (Some(_), None) if view_reclaiming(self, h, lease.id).await => None,
                    (Some(end), None) => Some(end.0),
                };
                let log = pb::LogRead {
                    from: Some(timestamp_from_millis(lease.granted_at.0)),
                    to: to.map(timestamp_from_millis),
                };
                let (_, reply, data, _) = self
                    .command(&spec, pb::agent_command::Cmd::Log(log), true)
                    .await?;
                Self::await_reply(&spec.rack, reply, Duration::from_secs(30)).await?;
                Ok(data.expect("session requested"))
            }
            .await;
            parts.push((h.clone(), part));
        }
        Ok(parts)
    }

    /// The provisioning state of each of `lease`'s hosts (none for hosts of
    /// racks without an agent).
    pub fn provisioning(&self, lease: &Lease) -> Vec<pb::HostProvisioning> {
        let st = self.lock();
        lease
            .hosts
            .iter()
            .filter(|h| st.managed.contains(*h))
            .map(|h| {
                st.provisioning
                    .get(&(lease.id, h.clone()))
                    .cloned()
                    .unwrap_or_else(|| pb::HostProvisioning {
                        host: h.to_string(),
                        phase: pb::ProvisionPhase::Pending as i32,
                        stage: if lease.is_active() {
                            "waiting for the rack's agent".into()
                        } else {
                            "never started".into()
                        },
                        updated_at: None,
                        console_tail: String::new(),
                    })
            })
            .collect()
    }
}

/// A live console session through an agent.
pub struct ConsoleSession {
    pub id: u64,
    pub host: HostName,
    pub output: mpsc::Receiver<pb::SessionData>,
    to_agent: ToAgent,
}

impl ConsoleSession {
    /// Keystrokes or a break for the session.
    pub async fn input(&self, input: Vec<u8>, send_break: bool) -> Result<(), Status> {
        self.to_agent
            .send(Ok(pb::ServerMessage {
                msg: Some(pb::server_message::Msg::Input(pb::SessionInput {
                    id: self.id,
                    input,
                    send_break,
                })),
            }))
            .await
            .map_err(|_| Status::unavailable("the agent went away"))
    }
}

impl Drop for ConsoleSession {
    fn drop(&mut self) {
        let _ = self.to_agent.try_send(Ok(pb::ServerMessage {
            msg: Some(pb::server_message::Msg::Command(pb::AgentCommand {
                id: self.id,
                host: self.host.to_string(),
                cmd: Some(pb::agent_command::Cmd::CloseSession(true)),
            })),
        }));
    }
}

/// Sends one message down an agent's stream; false once the agent is gone.
async fn send(tx: &ToAgent, msg: pb::server_message::Msg) -> bool {
    tx.send(Ok(pb::ServerMessage { msg: Some(msg) }))
        .await
        .is_ok()
}

/// Driving a host (power, console) needs its active lease, or operator.
fn may_drive(caller: &Caller, view: &HostView, what: &str) -> Result<(), Status> {
    if caller.role == Role::Operator {
        return Ok(());
    }
    let holds = matches!(view.record.state, HostState::Leased(_))
        && view
            .lease
            .as_ref()
            .is_some_and(|l| l.is_active() && l.holder == caller.principal);
    if holds {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{} may not {what} host {}: it does not hold the host's active lease",
            caller.principal, view.record.name
        )))
    }
}

/// The user's status code for an agent's failed command; a kind this
/// server does not know (a newer agent) is INTERNAL.
fn code_from_kind(kind: i32) -> Code {
    use pb::CommandErrorKind as K;
    match K::try_from(kind) {
        Ok(K::InvalidArgument) => Code::InvalidArgument,
        Ok(K::NotFound) => Code::NotFound,
        Ok(K::FailedPrecondition) => Code::FailedPrecondition,
        Ok(K::PermissionDenied) => Code::PermissionDenied,
        Ok(K::DeadlineExceeded) => Code::DeadlineExceeded,
        Ok(K::Unimplemented) => Code::Unimplemented,
        Ok(K::Unavailable) => Code::Unavailable,
        Ok(K::Internal | K::Unspecified) | Err(_) => Code::Internal,
    }
}

async fn rack_state(core: &Core, rack: &RackName) -> Result<pb::RackState, Status> {
    let hosts = core
        .list_hosts()
        .await?
        .iter()
        .filter(|v| v.spec.as_ref().is_some_and(|s| &s.rack == rack))
        .map(agent_host)
        .collect();
    Ok(pb::RackState {
        rack: rack.to_string(),
        hosts,
    })
}

/// A host's desired state for its agent, with the BMC password.
fn agent_host(v: &HostView) -> pb::AgentHost {
    let mut h = pb::AgentHost {
        name: v.record.name.to_string(),
        retired: v.record.retired,
        ..Default::default()
    };
    if let (HostState::Leased(_), Some(l)) = (&v.record.state, &v.lease)
        && l.is_active()
    {
        h.lease_id = l.id.to_string();
        h.profile = l
            .profile
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default();
    }
    let Some(s) = &v.spec else { return h };
    h.arch = crate::grpc::convert::arch_to_proto(s.arch) as i32;
    h.firmware = match s.firmware {
        crate::types::Firmware::Bios => pb::Firmware::Bios,
        crate::types::Firmware::Uefi => pb::Firmware::Uefi,
    } as i32;
    h.mac = s.mac.to_string();
    h.ipv4 = s.ipv4.map(|a| a.to_string()).unwrap_or_default();
    h.flags = s.flags.iter().map(|f| f.to_string()).collect();
    h.bmc = s.bmc.as_ref().map(|b| {
        let password = match b.password.resolve() {
            Ok(p) => p.expose().to_vec(),
            Err(e) => {
                // The reference (variable or file name), never a value.
                warn!(host = %s.name, error = %e, "cannot resolve the BMC password");
                Vec::new()
            }
        };
        pb::Bmc {
            address: b.endpoint.host.clone(),
            port: u32::from(b.endpoint.port),
            user: b.user.clone(),
            password,
        }
    });
    h.console = Some(match &s.console {
        ConsoleSource::None => pb::ConsoleSpec {
            kind: pb::ConsoleKind::None as i32,
            ..Default::default()
        },
        ConsoleSource::IpmiSol => pb::ConsoleSpec {
            kind: pb::ConsoleKind::IpmiSol as i32,
            ..Default::default()
        },
        ConsoleSource::Serial { device, baud } => pb::ConsoleSpec {
            kind: pb::ConsoleKind::Serial as i32,
            target: device.display().to_string(),
            baud: *baud,
        },
        ConsoleSource::Tcp { address } => pb::ConsoleSpec {
            kind: pb::ConsoleKind::Tcp as i32,
            target: address.clone(),
            baud: 0,
        },
    });
    h
}

/// The core's reclaim step through the rack's agent.
pub struct AgentReclaimer(Agents);

impl Reclaimer for AgentReclaimer {
    fn reclaim<'a>(&'a self, host: &'a HostSpec, lease: LeaseId) -> ReclaimFuture<'a> {
        Box::pin(async move {
            let fail = |reason: String| ReclaimError {
                host: host.name.to_string(),
                reason,
            };
            let agents = &self.0;
            let core = agents.core().map_err(|s| fail(s.message().to_owned()))?;
            // A rack without an agent (e.g. removed from the inventory while
            // a host was reclaiming): nothing to do.
            if let Ok(inv) = core.inventory().await
                && self.is_immediate(host, &inv)
            {
                return Ok(());
            }
            let profile = core
                .get_lease(lease)
                .await
                .ok()
                .and_then(|l| l.profile.map(|p| p.to_string()))
                .unwrap_or_default();
            let cmd = pb::agent_command::Cmd::Reclaim(pb::Reclaim {
                lease_id: lease.to_string(),
                profile,
            });
            let (_, reply, _, _) = agents
                .command(host, cmd, false)
                .await
                .map_err(|s| fail(s.message().to_owned()))?;
            Agents::await_reply(&host.rack, reply, RECLAIM_TIMEOUT)
                .await
                .map_err(|s| fail(s.message().to_owned()))?;
            {
                let mut st = agents.lock();
                if st.reclaimed_at.len() >= PROVISIONING_KEPT {
                    st.reclaimed_at.clear();
                }
                st.reclaimed_at.insert((lease, host.name.clone()), now_ms());
            }
            info!(host = %host.name, lease = %lease, "reclaimed by the agent");
            Ok(())
        })
    }

    fn is_immediate(&self, host: &HostSpec, inventory: &Inventory) -> bool {
        inventory.rack(&host.rack).is_none_or(|r| r.agent.is_none())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Is `host` still being reclaimed from `lease`?
async fn view_reclaiming(agents: &Agents, host: &HostName, lease: LeaseId) -> bool {
    match agents.core() {
        Ok(core) => core
            .get_host(host.clone())
            .await
            .is_ok_and(|v| v.record.state == HostState::Reclaiming(lease)),
        Err(_) => false,
    }
}
