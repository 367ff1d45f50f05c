//! Commands to an agent and their answers: what a command is, its id (unique
//! per connection), the replies and session streams a connection waits for,
//! and how long the server waits.
//!
//! Every command is answered by one [`CommandReply`] with its id; console
//! sessions, log reads and forwards also stream [`SessionData`] with that
//! id until `end`. A command whose reply does not come in time, or fails, is
//! forgotten: its pending reply and its session stream are removed at once
//! rather than when the agent goes.

use super::RackError;
use super::link::{Outbound, SessionData, SessionInput, ToAgent};
use crate::types::{HostName, LeaseId, ProfileName, RackName, Timestamp};
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a power command may take (the agent re-reads state after an
/// unclear outcome; a BMC that never answers takes the client's retries).
pub const POWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a reclaim may take before the core retries it.
pub const RECLAIM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agent has to open a console session.
pub const CONSOLE_OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the agent has to start a console log read.
pub const LOG_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Output messages (each at most 64 KiB) a console log read may have out
/// that the server has not credited back: what a read holds in memory on
/// either side.
pub const LOG_WINDOW: u32 = 16;
/// Session output buffered for a viewer; one that falls this far behind
/// loses its session rather than stalling the rack's other traffic.
pub(super) const SESSION_BUFFER: usize = 256;

/// A command's id: unique per connection, echoed in its reply and data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(pub u64);

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A command for the agent about one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: CommandId,
    pub host: HostName,
    pub kind: CommandKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    Power(PowerAction),
    /// The host's lease ended: capture end-of-lease debug output (the
    /// profile's debug keys), power off, reset the boot device.
    Reclaim {
        lease: LeaseId,
        profile: Option<ProfileName>,
    },
    /// Open a live console session; output comes as session data.
    Console(ConsoleOpen),
    /// Read the captured console between two times as session data.
    Log(LogRead),
    /// Close a console session or a forward.
    CloseSession,
    /// Connect to a TCP port of the host's inventory IPv4; bytes flow as
    /// session input and data.
    Forward(ForwardOpen),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Read the power state only.
    Status,
    On,
    Off,
    Cycle,
    Reset,
}

/// A live console session as the user asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleOpen {
    pub host: HostName,
    /// Take the console's input (detaching any other writer).
    pub write: bool,
    /// Replay at most this many bytes of recent output first (0: the
    /// agent's default).
    pub replay_bytes: u32,
    /// Replay nothing captured before this time: set by the server (never
    /// taken from a user) to the grant time of the lease the caller holds.
    pub not_before: Option<Timestamp>,
}

/// A forward as the user asked for it: a port of a host (the agent dials
/// the host's inventory IPv4; the user never names an address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardOpen {
    pub host: HostName,
    /// 1-65535.
    pub port: u16,
}

/// A console log read: from `from` to `to` (`None`: until now), with a
/// flow-control window of `window` output messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    pub from: Timestamp,
    pub to: Option<Timestamp>,
    pub window: u32,
}

/// The agent's answer to command `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReply {
    pub id: CommandId,
    pub outcome: Result<Done, AgentFailure>,
}

/// A command that succeeded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    /// Power commands: the power state read back.
    pub on: bool,
}

/// A command that failed, in the agent's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFailure {
    pub kind: FailureKind,
    pub message: String,
}

/// What kind of failure an agent reports; becomes the user's status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request was malformed (unknown power action, bad session id).
    InvalidArgument,
    /// The agent does not know the host.
    NotFound,
    /// The hardware refused (the BMC said no, the console is not captured).
    FailedPrecondition,
    PermissionDenied,
    DeadlineExceeded,
    /// The agent cannot do that command.
    Unimplemented,
    /// The BMC (or the console source) did not answer.
    Unavailable,
    /// A bug or an unexpected failure in the agent, or a kind this server
    /// does not know.
    Internal,
    /// A limit of the agent is reached (concurrent console log reads).
    ResourceExhausted,
}

/// What a command answers besides its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// The reply only.
    Reply,
    /// A session stream too.
    Session,
    /// A session stream opened on the strength of a lease (not by an
    /// operator): it ends when that host's lease ends.
    HolderSession,
    /// A forward's stream: it ends when the host's lease ends, whoever
    /// opened it.
    Forward,
}

/// The commands under way on one connection.
#[derive(Default)]
pub(super) struct Commands {
    last: u64,
    pending: HashMap<CommandId, oneshot::Sender<CommandReply>>,
    sessions: HashMap<CommandId, mpsc::Sender<SessionData>>,
    /// Sessions that end with the host's lease, and whether each is a
    /// forward.
    holder_sessions: HashMap<CommandId, (HostName, bool)>,
}

impl Commands {
    /// A new command about `host`: its id, where its reply arrives, and
    /// where its session data arrives (if it streams).
    pub(super) fn issue(
        &mut self,
        host: &HostName,
        answer: Answer,
    ) -> (
        CommandId,
        oneshot::Receiver<CommandReply>,
        Option<mpsc::Receiver<SessionData>>,
    ) {
        self.last += 1;
        let id = CommandId(self.last);
        let (reply_tx, reply_rx) = oneshot::channel();
        self.pending.insert(id, reply_tx);
        let data = (answer != Answer::Reply).then(|| {
            let (tx, rx) = mpsc::channel(SESSION_BUFFER);
            self.sessions.insert(id, tx);
            rx
        });
        if matches!(answer, Answer::HolderSession | Answer::Forward) {
            self.holder_sessions
                .insert(id, (host.clone(), answer == Answer::Forward));
        }
        (id, reply_rx, data)
    }

    /// Hands a reply to whoever waits for it (nobody, after a timeout).
    pub(super) fn reply(&mut self, reply: CommandReply) {
        if let Some(waiter) = self.pending.remove(&reply.id) {
            let _ = waiter.send(reply);
        }
    }

    /// Where session data with `id` goes; the last data (`end`) takes the
    /// session out.
    pub(super) fn session(
        &mut self,
        id: CommandId,
        end: bool,
    ) -> Option<mpsc::Sender<SessionData>> {
        if end {
            self.sessions.remove(&id)
        } else {
            self.sessions.get(&id).cloned()
        }
    }

    /// Drops the session whose viewer is `sink` (it could not keep up).
    pub(super) fn drop_session(&mut self, sink: &mpsc::Sender<SessionData>) {
        self.sessions.retain(|_, s| !s.same_channel(sink));
    }

    /// Forgets command `id`: no reply or session data is expected any more.
    pub(super) fn forget(&mut self, id: CommandId) {
        self.pending.remove(&id);
        self.sessions.remove(&id);
        self.holder_sessions.remove(&id);
    }

    /// Takes out the holder sessions and forwards on `hosts`, whose lease
    /// just ended.
    pub(super) fn end_holder_sessions(&mut self, hosts: &[HostName]) -> Vec<Ended> {
        let ids: Vec<CommandId> = self
            .holder_sessions
            .iter()
            .filter(|(_, (h, _))| hosts.contains(h))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| {
                let (host, forward) = self.holder_sessions.remove(&id)?;
                Some(Ended {
                    id,
                    host,
                    forward,
                    sink: self.sessions.remove(&id),
                })
            })
            .collect()
    }

    /// Commands whose reply is still expected.
    #[cfg(test)]
    pub(super) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Open session streams.
    #[cfg(test)]
    pub(super) fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

/// A session ended by its host's lease ending.
pub(super) struct Ended {
    pub id: CommandId,
    pub host: HostName,
    /// A forward (else a console session).
    pub forward: bool,
    /// Its reader, if still there.
    pub sink: Option<mpsc::Sender<SessionData>>,
}

/// A live console session through an agent. Dropping it closes the session
/// on the agent.
pub struct ConsoleSession {
    pub id: CommandId,
    pub host: HostName,
    pub rack: RackName,
    /// The console's output and notices, until `end` (or the agent goes).
    pub output: mpsc::Receiver<SessionData>,
    pub(super) to_agent: mpsc::Sender<Outbound>,
}

impl ConsoleSession {
    /// Keystrokes or a break for the session.
    pub async fn input(&self, input: Vec<u8>, send_break: bool) -> Result<(), RackError> {
        let msg = ToAgent::Input(SessionInput {
            id: self.id,
            input,
            send_break,
            ..Default::default()
        });
        self.to_agent
            .send(Ok(msg))
            .await
            .map_err(|_| RackError::AgentGone {
                rack: self.rack.clone(),
            })
    }
}

impl Drop for ConsoleSession {
    fn drop(&mut self) {
        let _ = self.to_agent.try_send(Ok(ToAgent::Command(Command {
            id: self.id,
            host: self.host.clone(),
            kind: CommandKind::CloseSession,
        })));
    }
}

impl fmt::Debug for ConsoleSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleSession")
            .field("id", &self.id)
            .field("host", &self.host)
            .finish()
    }
}
