//! The registry proper: one connection per rack (a newer attach replaces
//! the older one), the commands under way on each, the agents' reports
//! (reachability, provisioning) and reclaim times. It needs no core — only
//! the core's [`Clock`] — so the core's reclaim step can be built from it
//! before the core starts ([`RackRegistry::reclaimer`]); what needs the core
//! is in [`Racks`](super::Racks).
//!
//! State sits behind one `std::sync::Mutex`, held for short sections with
//! no `.await`.

use super::commands::{Answer, Commands, Done, Ended};
use super::forward::{ForwardLimits, ForwardScope, ForwardSlot};
use super::link::{HostReport, Outbound, SessionData, ToAgent};
use super::provisioning::{Provisioning, Records};
use super::reachability::Reachability;
use super::reclaim::AgentReclaimer;
use super::{Command, CommandId, CommandKind, CommandReply, RackError};
use crate::core::clock::Clock;
use crate::core::reclaim::Reclaimer;
use crate::health::{HostVerdict, Rules};
use crate::inventory::Inventory;
use crate::lease::Lease;
use crate::types::{HostName, LeaseId, RackName, Timestamp};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

/// Messages buffered for an agent's stream.
const TO_AGENT_BUFFER: usize = 256;

/// What one host report changed.
#[derive(Debug)]
pub(super) struct Reported {
    pub reachability_changed: bool,
    /// A provisioning that just failed or became ready, for the host's health.
    pub verdict: Option<(HostName, LeaseId, HostVerdict)>,
}

/// The attached agents and what they told; cheap to clone.
#[derive(Clone)]
pub struct RackRegistry(Arc<Shared>);

struct Shared {
    clock: Arc<dyn Clock>,
    /// Attribute provisioning failures (host, job, infra).
    failure_rules: Rules,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    conns: HashMap<RackName, Conn>,
    last_conn: u64,
    reachability: Reachability,
    records: Records,
    /// Open forwards per lease (or per host, for an operator's forward to
    /// a host without a lease).
    forwards: HashMap<ForwardScope, usize>,
    forward_limits: ForwardLimits,
}

/// Identifies one attach of a rack's agent (a newer one replaces it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConnId(u64);

struct Conn {
    id: ConnId,
    agent: String,
    tx: mpsc::Sender<Outbound>,
    commands: Commands,
    /// Reports about hosts outside the rack, ignored.
    foreign_reports: u64,
}

/// A new connection: its id, and both ends of its stream to the agent.
pub(super) struct Connected {
    pub id: ConnId,
    pub tx: mpsc::Sender<Outbound>,
    pub rx: mpsc::Receiver<Outbound>,
}

impl std::fmt::Debug for RackRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let racks: Vec<String> = self.lock().conns.keys().map(|r| r.to_string()).collect();
        f.debug_struct("RackRegistry")
            .field("attached", &racks)
            .finish()
    }
}

impl RackRegistry {
    /// An empty registry reading time from `clock` (the core's), with the
    /// shipped failure attribution rules.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self::with_failure_rules(clock, Rules::default())
    }

    /// An empty registry attributing provisioning failures by `rules`.
    pub fn with_failure_rules(clock: Arc<dyn Clock>, rules: Rules) -> Self {
        Self(Arc::new(Shared {
            clock,
            failure_rules: rules,
            state: Mutex::default(),
        }))
    }

    /// The core's reclaim step through this registry's agents.
    pub fn reclaimer(&self) -> Arc<dyn Reclaimer> {
        Arc::new(AgentReclaimer::new(self.clone()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn now(&self) -> Timestamp {
        self.0.clock.now()
    }

    // ------------------------------------------------------------ connections

    /// Registers the agent `agent` for `rack`, replacing (and ending) an
    /// older connection of the rack.
    pub(super) fn connect(&self, rack: &RackName, agent: &str) -> Connected {
        let (tx, rx) = mpsc::channel(TO_AGENT_BUFFER);
        let mut st = self.lock();
        st.last_conn += 1;
        let id = ConnId(st.last_conn);
        let conn = Conn {
            id,
            agent: agent.to_owned(),
            tx: tx.clone(),
            commands: Commands::default(),
            foreign_reports: 0,
        };
        if let Some(old) = st.conns.insert(rack.clone(), conn) {
            let _ = old
                .tx
                .try_send(Err(RackError::Replaced { rack: rack.clone() }));
        }
        Connected { id, tx, rx }
    }

    /// Removes connection `conn` of `rack` unless a newer one replaced it;
    /// true if it was removed. Its pending commands fail (the agent went
    /// away) and its sessions end.
    pub(super) fn disconnect(&self, rack: &RackName, conn: ConnId) -> bool {
        let removed = {
            let mut st = self.lock();
            if st.conns.get(rack).is_some_and(|c| c.id == conn) {
                st.conns.remove(rack)
            } else {
                None
            }
        };
        match removed {
            Some(c) => {
                info!(agent = %c.agent, "agent detached");
                true
            }
            None => false,
        }
    }

    /// How many racks have an agent attached now.
    pub fn attached_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Is an agent attached for `rack`?
    pub fn is_attached(&self, rack: &RackName) -> bool {
        self.lock().conns.contains_key(rack)
    }

    // ------------------------------------------------------------ from the agent

    /// Takes a host report from connection `conn` of `rack`'s agent: true
    /// when the host's reachability changed. A report about a host that is
    /// not in `rack` (as of the last inventory seen) is ignored and
    /// counted: `Err` with the count so far on this connection. An agent
    /// speaks for its own rack only.
    pub(super) fn report(
        &self,
        rack: &RackName,
        conn: ConnId,
        r: HostReport,
    ) -> Result<Reported, u64> {
        let now = self.now();
        let mut st = self.lock();
        if st.reachability.rack_of(&r.host) != Some(rack) {
            let c = st.conns.get_mut(rack).filter(|c| c.id == conn);
            return Err(c.map_or(1, |c| {
                c.foreign_reports += 1;
                c.foreign_reports
            }));
        }
        let mut verdict = None;
        if let Some(p) = r.provisioning {
            debug!(rack = %rack, host = %r.host, lease = %p.lease, phase = ?p.phase, stage = %p.stage, "provisioning");
            let lease = p.lease;
            verdict = st
                .records
                .update(&r.host, p, now, &self.0.failure_rules)
                .map(|v| (r.host.clone(), lease, v));
        }
        Ok(Reported {
            reachability_changed: st.reachability.report(rack, r.host, r.reachability),
            verdict,
        })
    }

    /// Reports about hosts outside `rack` its current connection sent.
    #[cfg(test)]
    pub(super) fn foreign_reports(&self, rack: &RackName) -> u64 {
        self.lock().conns.get(rack).map_or(0, |c| c.foreign_reports)
    }

    /// Hands a reply to the command waiting for it on connection `conn`.
    pub(super) fn reply(&self, rack: &RackName, conn: ConnId, r: CommandReply) {
        let mut st = self.lock();
        if let Some(c) = st.conns.get_mut(rack).filter(|c| c.id == conn) {
            c.commands.reply(r);
        }
    }

    /// Hands session data to its viewer. A viewer that cannot keep up loses
    /// its session rather than stalling every other host's traffic.
    pub(super) fn data(&self, rack: &RackName, conn: ConnId, d: SessionData) {
        let sink = {
            let mut st = self.lock();
            st.conns
                .get_mut(rack)
                .filter(|c| c.id == conn)
                .and_then(|c| c.commands.session(d.id, d.end))
        };
        if let Some(s) = sink
            && s.try_send(d).is_err()
        {
            debug!("console viewer too slow; dropping its session");
            if let Some(c) = self.lock().conns.get_mut(rack) {
                c.commands.drop_session(&s);
            }
        }
    }

    // ------------------------------------------------------------ commands

    /// Sends a command about `host` to the agent of `rack`.
    pub(super) async fn command(
        &self,
        rack: &RackName,
        host: &HostName,
        kind: CommandKind,
        answer: Answer,
    ) -> Result<Issued, RackError> {
        let (conn, id, reply, data, tx) = {
            let mut st = self.lock();
            let Some(c) = st.conns.get_mut(rack) else {
                return Err(RackError::AgentAway { rack: rack.clone() });
            };
            let (id, reply, data) = c.commands.issue(host, answer);
            (c.id, id, reply, data, c.tx.clone())
        };
        let msg = ToAgent::Command(Command {
            id,
            host: host.clone(),
            kind,
        });
        let issued = Issued {
            registry: self.clone(),
            rack: rack.clone(),
            conn,
            host: host.clone(),
            id,
            reply,
            data,
            to_agent: tx.clone(),
        };
        if tx.send(Ok(msg)).await.is_err() {
            issued.forget();
            return Err(RackError::AgentGone { rack: rack.clone() });
        }
        Ok(issued)
    }

    fn forget(&self, rack: &RackName, conn: ConnId, id: CommandId) {
        if let Some(c) = self.lock().conns.get_mut(rack).filter(|c| c.id == conn) {
            c.commands.forget(id);
        }
    }

    /// Ends the console sessions that holders opened on `hosts`, whose
    /// lease just ended: a former holder keeps no access to the host.
    pub(super) async fn end_holder_sessions(&self, rack: &RackName, hosts: &[HostName]) {
        let (ended, tx) = {
            let mut st = self.lock();
            let Some(c) = st.conns.get_mut(rack) else {
                return;
            };
            (c.commands.end_holder_sessions(hosts), c.tx.clone())
        };
        for Ended {
            id,
            host,
            forward,
            sink,
        } in ended
        {
            let what = if forward { "forward" } else { "console" };
            info!(host = %host, session = %id, "lease ended: closing its {what}");
            if let Some(s) = sink {
                let _ = s.try_send(SessionData {
                    id,
                    notice: format!("the lease on {host} ended; {what} closed"),
                    end: true,
                    lease_ended: true,
                    ..Default::default()
                });
            }
            let close = Command {
                id,
                host,
                kind: CommandKind::CloseSession,
            };
            let _ = tx.send(Ok(ToAgent::Command(close))).await;
        }
    }

    /// Closes session `id` of connection `conn` whose reader went away:
    /// nothing more is expected of it here, and the agent closes it.
    pub(super) fn close_session(
        &self,
        rack: &RackName,
        conn: ConnId,
        id: CommandId,
        host: &HostName,
    ) {
        let tx = {
            let mut st = self.lock();
            match st.conns.get_mut(rack).filter(|c| c.id == conn) {
                Some(c) => {
                    c.commands.forget(id);
                    c.tx.clone()
                }
                None => return,
            }
        };
        let _ = tx.try_send(Ok(ToAgent::Command(Command {
            id,
            host: host.clone(),
            kind: CommandKind::CloseSession,
        })));
    }

    // ------------------------------------------------------------ forwards

    /// Sets the limits on forwards (the server's flags).
    pub fn set_forward_limits(&self, limits: ForwardLimits) {
        self.lock().forward_limits = limits;
    }

    pub(super) fn forward_limits(&self) -> ForwardLimits {
        self.lock().forward_limits
    }

    /// One more open forward in `scope`, unless it has as many as the
    /// limit allows; the slot is given back when dropped.
    pub(super) fn take_forward_slot(&self, scope: ForwardScope) -> Result<ForwardSlot, RackError> {
        let mut st = self.lock();
        let limit = st.forward_limits.per_lease;
        let open = st.forwards.entry(scope.clone()).or_default();
        if *open >= limit {
            return Err(RackError::TooManyForwards { scope, limit });
        }
        *open += 1;
        Ok(ForwardSlot::new(self.clone(), scope))
    }

    pub(super) fn give_back_forward_slot(&self, scope: &ForwardScope) {
        let mut st = self.lock();
        if let Some(n) = st.forwards.get_mut(scope) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.forwards.remove(scope);
            }
        }
    }

    /// Open forwards in `scope`.
    #[cfg(test)]
    pub(super) fn open_forwards(&self, scope: &ForwardScope) -> usize {
        self.lock().forwards.get(scope).copied().unwrap_or(0)
    }

    // ------------------------------------------------------------ records

    /// The hosts of `inventory` that cannot be driven now, with why; also
    /// notes which hosts have an agent.
    pub(super) fn unreachable(
        &self,
        inventory: &std::sync::Arc<Inventory>,
    ) -> BTreeMap<HostName, String> {
        let mut st = self.lock();
        let State {
            conns,
            reachability,
            ..
        } = &mut *st;
        reachability.refresh(inventory, |rack| conns.contains_key(rack))
    }

    /// The rack of `host` when that rack has an agent (as of the last
    /// inventory seen).
    pub(super) fn rack_of(&self, host: &HostName) -> Option<RackName> {
        self.lock().reachability.rack_of(host).cloned()
    }

    /// Does `host`'s rack have an agent (as of the last inventory seen)?
    pub(super) fn has_agent(&self, host: &HostName) -> bool {
        self.lock().reachability.is_managed(host)
    }

    /// Records that `host`'s reclaim after `lease` finished now.
    pub(super) fn reclaimed(&self, lease: LeaseId, host: &HostName) {
        let now = self.now();
        self.lock().records.reclaimed(lease, host, now);
    }

    /// When `host`'s reclaim after `lease` finished, if this server saw it.
    pub(super) fn reclaimed_at(&self, lease: LeaseId, host: &HostName) -> Option<Timestamp> {
        self.lock().records.reclaimed_at(lease, host)
    }

    /// The provisioning state of each of `lease`'s hosts (none for hosts of
    /// racks without an agent).
    pub fn provisioning(&self, lease: &Lease) -> Vec<Provisioning> {
        let st = self.lock();
        st.records
            .for_lease(lease, |h| st.reachability.is_managed(h))
    }

    /// Commands of `rack`'s agent whose reply is still expected, and its
    /// open session streams.
    #[cfg(test)]
    pub(super) fn under_way(&self, rack: &RackName) -> (usize, usize) {
        self.lock()
            .conns
            .get(rack)
            .map_or((0, 0), |c| (c.commands.pending(), c.commands.sessions()))
    }
}

/// A command sent to an agent, whose reply is awaited with
/// [`Issued::reply`].
pub(super) struct Issued {
    registry: RackRegistry,
    pub rack: RackName,
    pub conn: ConnId,
    pub host: HostName,
    pub id: CommandId,
    reply: oneshot::Receiver<CommandReply>,
    /// Session data, for commands that stream.
    pub data: Option<mpsc::Receiver<SessionData>>,
    pub to_agent: mpsc::Sender<Outbound>,
}

impl Issued {
    /// Waits up to `after` for the agent's reply. A command that times out
    /// or fails is forgotten (no reply or session data expected any more).
    pub(super) async fn reply(&mut self, after: Duration) -> Result<Done, RackError> {
        let result = match tokio::time::timeout(after, &mut self.reply).await {
            Err(_) => Err(RackError::Timeout {
                rack: self.rack.clone(),
                after,
            }),
            Ok(Err(_)) => Err(RackError::AgentGone {
                rack: self.rack.clone(),
            }),
            Ok(Ok(r)) => r.outcome.map_err(|f| RackError::AgentFailed {
                host: self.host.clone(),
                kind: f.kind,
                message: f.message,
            }),
        };
        if result.is_err() {
            self.registry.forget(&self.rack, self.conn, self.id);
        }
        result
    }

    fn forget(&self) {
        self.registry.forget(&self.rack, self.conn, self.id);
    }
}
