//! Driving a host through its rack's agent on a user's behalf: power,
//! live consoles, and the console captured during a lease. Each checks
//! `core::policy` first, then sends one command and waits for its reply
//! (see `commands.rs` for how long).

use super::commands::{
    Answer, CONSOLE_OPEN_TIMEOUT, CommandKind, ConsoleOpen, ConsoleSession, LOG_READ_TIMEOUT,
    LogRead, POWER_TIMEOUT, PowerAction,
};
use super::link::SessionData;
use super::{RackError, Racks};
use crate::core::{HostView, policy};
use crate::inventory::{ConsoleSource, HostSpec};
use crate::lease::{HostState, Lease};
use crate::types::{Caller, HostName, LeaseId, Role};
use tokio::sync::mpsc;
use tracing::info;

/// One host's part of a console log: its data, or why there is none.
pub type LogPart = (HostName, Result<mpsc::Receiver<SessionData>, RackError>);

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
    /// a way to send input. A session opened by the lease's holder (not an
    /// operator) ends when the lease does.
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
        info!(host = %spec.name, principal = %caller.principal, write = open.write, "console opened");
        let answer = if caller.role == Role::Operator {
            Answer::Session
        } else {
            Answer::HolderSession
        };
        let mut issued = self
            .registry
            .command(&spec.rack, &spec.name, CommandKind::Console(open), answer)
            .await?;
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
    /// still reclaiming). One part per host, in the lease's order.
    pub async fn console_log(
        &self,
        caller: &Caller,
        lease: &Lease,
    ) -> Result<Vec<LogPart>, RackError> {
        policy::may_read_console_log(caller, lease)?;
        let mut parts = Vec::new();
        for h in &lease.hosts {
            let part = async {
                let (spec, _) = self.host(h).await?;
                let to = match (lease.ended_at, self.registry.reclaimed_at(lease.id, h)) {
                    (None, _) => None,
                    (Some(_), Some(r)) => Some(r),
                    // Still reclaiming: up to now.
                    (Some(_), None) if self.reclaiming(h, lease.id).await => None,
                    (Some(end), None) => Some(end),
                };
                let read = LogRead {
                    from: lease.granted_at,
                    to,
                };
                let mut issued = self
                    .registry
                    .command(&spec.rack, h, CommandKind::Log(read), Answer::Session)
                    .await?;
                issued.reply(LOG_READ_TIMEOUT).await?;
                Ok(issued.data.take().expect("a session was asked for"))
            }
            .await;
            parts.push((h.clone(), part));
        }
        Ok(parts)
    }

    /// Is `host` still being reclaimed from `lease`?
    async fn reclaiming(&self, host: &HostName, lease: LeaseId) -> bool {
        self.core
            .get_host(host.clone())
            .await
            .is_ok_and(|v| v.record.state == HostState::Reclaiming(lease))
    }
}
