//! Driving a host through its rack's agent on a user's behalf: power,
//! live consoles, and the console captured during a lease. Each checks
//! `core::policy` first, then sends one command and waits for its reply
//! (see `commands.rs` for how long).
//!
//! Console log reads are flow-controlled: the agent streams a host's slice
//! from disk with at most [`LOG_WINDOW`] output messages out that the
//! server has not credited back, and [`LogStream`] credits them back only
//! as its reader takes them. A slow reader thus holds back the agent's
//! disk reads instead of filling memory anywhere, and the registry never
//! has to drop a log read for being slow.

use super::commands::{
    Answer, CONSOLE_OPEN_TIMEOUT, CommandId, CommandKind, ConsoleOpen, ConsoleSession, FailureKind,
    LOG_READ_TIMEOUT, LOG_WINDOW, LogRead, POWER_TIMEOUT, PowerAction,
};
use super::link::{Outbound, SessionData, SessionInput, ToAgent};
use super::registry::{ConnId, RackRegistry};
use super::{RackError, Racks};
use crate::core::{HostView, policy};
use crate::inventory::{ConsoleSource, HostSpec};
use crate::lease::{HostState, Lease};
use crate::types::{Caller, HostName, LeaseId, RackName, Role};
use tokio::sync::mpsc;
use tracing::info;

/// One host's part of a console log: its data, or why there is none.
pub type LogPart = (HostName, Result<LogStream, RackError>);

/// The active lease on the host, if `caller` holds it.
fn held_lease<'a>(caller: &Caller, view: &'a HostView) -> Option<&'a Lease> {
    match (&view.record.state, &view.lease) {
        (HostState::Leased(_), Some(l)) if l.is_active() && l.holder == caller.principal => Some(l),
        _ => None,
    }
}

impl Racks {
    /// The host's spec and view, for commands.
    pub(super) async fn host(&self, name: &HostName) -> Result<(HostSpec, HostView), RackError> {
        let view = self.core.get_host(name.clone()).await?;
        let spec = view
            .spec
            .clone()
            .ok_or_else(|| RackError::HostRemoved { host: name.clone() })?;
        Ok((spec, view))
    }

    /// Power through the agent; the power state read back. Changing power
    /// needs the host's active lease (or operator); reading it needs only a
    /// user.
    pub async fn power(
        &self,
        caller: &Caller,
        host: &HostName,
        action: PowerAction,
    ) -> Result<bool, RackError> {
        let (spec, view) = self.host(host).await?;
        if action != PowerAction::Status {
            policy::may_drive_host(caller, &view, "switch the power of")?;
        }
        if spec.bmc.is_none() {
            return Err(RackError::NoBmc { host: host.clone() });
        }
        if !self.registry.has_agent(host) {
            return Err(RackError::NoAgent { rack: spec.rack });
        }
        info!(host = %host, principal = %caller.principal, action = ?action, "power");
        let mut issued = self
            .registry
            .command(&spec.rack, host, CommandKind::Power(action), Answer::Reply)
            .await?;
        Ok(issued.reply(POWER_TIMEOUT).await?.on)
    }

    /// Opens a live console session on the host's agent: its output and
    /// a way to send input.
    ///
    /// The holder of the host's active lease (an operator too, when it is
    /// the holder) sees nothing captured before the lease was granted: the
    /// agent is told the grant time as `not_before`. Only an operator
    /// without the lease gets the full replay. A session opened by the
    /// holder (not an operator) ends when the lease does: it is registered
    /// before the command goes out, and the lease is checked again once it
    /// is, so a lease that ends meanwhile still ends the session.
    pub async fn console(
        &self,
        caller: &Caller,
        open: ConsoleOpen,
    ) -> Result<ConsoleSession, RackError> {
        let (spec, view) = self.host(&open.host).await?;
        policy::may_drive_host(caller, &view, "open the console of")?;
        if matches!(spec.console, ConsoleSource::None) {
            return Err(RackError::NoConsole { host: spec.name });
        }
        let held = held_lease(caller, &view);
        let open = ConsoleOpen {
            not_before: held.map(|l| l.granted_at),
            ..open
        };
        info!(host = %spec.name, principal = %caller.principal, write = open.write, holder = held.is_some(), "console opened");
        let answer = if caller.role == Role::Operator {
            Answer::Session
        } else {
            Answer::HolderSession
        };
        let mut issued = self
            .registry
            .command(&spec.rack, &spec.name, CommandKind::Console(open), answer)
            .await?;
        if answer == Answer::HolderSession {
            // The session is registered: from now on the lease's end ends
            // it. Had the lease ended before, refuse.
            let now = self.core.get_host(spec.name.clone()).await;
            let still = now
                .map_err(RackError::from)
                .and_then(|v| Ok(policy::may_drive_host(caller, &v, "open the console of")?));
            if let Err(e) = still {
                self.registry
                    .close_session(&issued.rack, issued.conn, issued.id, &issued.host);
                return Err(e);
            }
        }
        issued.reply(CONSOLE_OPEN_TIMEOUT).await?;
        Ok(ConsoleSession {
            id: issued.id,
            host: issued.host.clone(),
            rack: issued.rack.clone(),
            output: issued.data.take().expect("a session was asked for"),
            to_agent: issued.to_agent.clone(),
        })
    }

    /// Reads the console captured on `lease`'s hosts during the lease: from
    /// its grant to the end of each host's reclaim (up to now while it is
    /// still reclaiming), one host after the other. The first host's read
    /// starts here, so that an agent refusing it for being busy (too many
    /// log reads at once) is the call's answer; the others start as the
    /// reader gets to them.
    pub async fn console_log(
        &self,
        caller: &Caller,
        lease: &Lease,
    ) -> Result<ConsoleLogReader, RackError> {
        policy::may_read_console_log(caller, lease)?;
        let mut reader = ConsoleLogReader {
            racks: self.clone(),
            lease: lease.clone(),
            next: 0,
            first: None,
        };
        if let Some(first) = reader.open_next().await {
            if let Err(
                e @ RackError::AgentFailed {
                    kind: FailureKind::ResourceExhausted,
                    ..
                },
            ) = first.1
            {
                return Err(e);
            }
            reader.first = Some(first);
        }
        Ok(reader)
    }

    /// Starts the read of `host`'s part of `lease`'s console log.
    async fn read_log(&self, lease: &Lease, host: &HostName) -> Result<LogStream, RackError> {
        let (spec, _) = self.host(host).await?;
        let to = match (lease.ended_at, self.registry.reclaimed_at(lease.id, host)) {
            (None, _) => None,
            (Some(_), Some(r)) => Some(r),
            // Still reclaiming: up to now.
            (Some(_), None) if self.reclaiming(host, lease.id).await => None,
            (Some(end), None) => Some(end),
        };
        let read = LogRead {
            from: lease.granted_at,
            to,
            window: LOG_WINDOW,
        };
        let mut issued = self
            .registry
            .command(&spec.rack, host, CommandKind::Log(read), Answer::Session)
            .await?;
        issued.reply(LOG_READ_TIMEOUT).await?;
        Ok(LogStream {
            registry: self.registry.clone(),
            id: issued.id,
            rack: issued.rack.clone(),
            conn: issued.conn,
            host: host.clone(),
            data: issued.data.take().expect("a session was asked for"),
            to_agent: issued.to_agent.clone(),
            owed: 0,
            ended: false,
        })
    }

    /// Is `host` still being reclaimed from `lease`?
    async fn reclaiming(&self, host: &HostName, lease: LeaseId) -> bool {
        self.core
            .get_host(host.clone())
            .await
            .is_ok_and(|v| v.record.state == HostState::Reclaiming(lease))
    }
}

/// A lease's console log, one host after the other.
pub struct ConsoleLogReader {
    racks: Racks,
    lease: Lease,
    /// The next host (index into the lease's hosts) to start.
    next: usize,
    /// The first host's part, started by [`Racks::console_log`].
    first: Option<LogPart>,
}

impl ConsoleLogReader {
    /// The next host's part: its output, or why there is none; `None`
    /// after the last host. Each host's read starts only when asked for.
    pub async fn next_part(&mut self) -> Option<LogPart> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        self.open_next().await
    }

    async fn open_next(&mut self) -> Option<LogPart> {
        let host = self.lease.hosts.get(self.next)?.clone();
        self.next += 1;
        let part = self.racks.read_log(&self.lease, &host).await;
        Some((host, part))
    }
}

impl std::fmt::Debug for ConsoleLogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleLogReader")
            .field("lease", &self.lease.id)
            .field("next", &self.next)
            .finish()
    }
}

/// One host's captured console as the agent streams it. Each output
/// message taken is credited back to the agent (in batches of half the
/// window); dropping the stream before its end closes the read on the
/// agent.
pub struct LogStream {
    registry: RackRegistry,
    id: CommandId,
    rack: RackName,
    conn: ConnId,
    host: HostName,
    data: mpsc::Receiver<SessionData>,
    to_agent: mpsc::Sender<Outbound>,
    /// Output messages taken and not yet credited back.
    owed: u32,
    ended: bool,
}

impl LogStream {
    /// The next message (output, a notice, or the end); `None` once the
    /// agent is gone.
    pub async fn next(&mut self) -> Option<SessionData> {
        let d = self.data.recv().await?;
        if d.end {
            self.ended = true;
        } else if !d.output.is_empty() {
            self.owed += 1;
            if self.owed >= LOG_WINDOW / 2 {
                let credit = SessionInput {
                    id: self.id,
                    credit: std::mem::take(&mut self.owed),
                    ..Default::default()
                };
                // An agent that went away ends the stream at the next recv.
                let _ = self.to_agent.send(Ok(ToAgent::Input(credit))).await;
            }
        }
        Some(d)
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        if !self.ended {
            self.registry
                .close_session(&self.rack, self.conn, self.id, &self.host);
        }
    }
}

impl std::fmt::Debug for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStream")
            .field("id", &self.id)
            .field("host", &self.host)
            .finish()
    }
}
