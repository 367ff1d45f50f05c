//! The agent link as the registry sees it: what an agent sends
//! ([`FromAgent`]) and what the server sends it ([`ToAgent`]), as typed
//! values. The gRPC edge (`grpc/agent.rs`) converts them from and to the
//! `lab.v1` messages of `AgentService.Attach`; nothing here knows the wire,
//! so tests drive the registry with a fake agent made of two channels.

use super::RackError;
use super::commands::{Command, CommandId, CommandReply};
use super::desired::{DesiredHost, RackState};
use super::provisioning::ProvisionReport;
use super::reachability::HostReachability;
use crate::types::{HostName, InvalidName, RackName};
use futures::Stream;
use std::pin::Pin;

/// A message from an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromAgent {
    /// The first message of every link.
    Hello(Hello),
    Report(HostReport),
    Reply(CommandReply),
    /// Output of a console session or log read the server opened.
    Data(SessionData),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub rack: RackName,
    pub version: String,
}

/// What the agent knows of one host; sent on every change and after the
/// hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub host: HostName,
    pub reachability: HostReachability,
    /// How far the host's current lease got, if it has one.
    pub provisioning: Option<ProvisionReport>,
}

/// Session output (a live console, a log read, a forward) for command
/// `id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionData {
    pub id: CommandId,
    pub output: Vec<u8>,
    /// A notice from the agent or server: a gap, a takeover, a source drop.
    pub notice: String,
    /// The session ended (console closed, log read complete, forwarded
    /// connection closed).
    pub end: bool,
    /// Forwards: the agent wrote this many more input messages to the host
    /// (see [`FORWARD_WINDOW`](super::FORWARD_WINDOW)).
    pub credit: u32,
    /// Set by the server, never by an agent: the session ended because the
    /// host's lease did.
    pub lease_ended: bool,
}

/// A message to an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToAgent {
    /// Every host of the rack (replaces what the agent had).
    Rack(RackState),
    /// One host's desired state changed.
    Host(DesiredHost),
    Command(Command),
    /// Input (and flow credit) for a console session or a forward.
    Input(SessionInput),
}

/// Keystrokes or a break for console session `id`, or bytes, flow credit
/// and the end of input for forward `id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionInput {
    pub id: CommandId,
    pub input: Vec<u8>,
    pub send_break: bool,
    /// Forwards: the server passed on this many more output messages.
    pub credit: u32,
    /// Forwards: no more input (the agent half-closes the connection).
    pub eof: bool,
}

/// Something wrong with what came up an agent's stream.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A message with nothing in it.
    #[error("an empty message")]
    Empty,
    /// A hello whose rack name is not a valid name.
    #[error("hello.rack")]
    BadHello {
        #[source]
        source: InvalidName,
    },
    /// A report about a host whose name is not a valid name.
    #[error("report.host")]
    BadReport {
        #[source]
        source: InvalidName,
    },
    /// The stream itself failed (the transport's error as the source).
    #[error("the agent's stream broke")]
    Broken(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// An agent's messages, in order; ends when the agent closes its side.
pub type Inbound = Pin<Box<dyn Stream<Item = Result<FromAgent, LinkError>> + Send>>;

/// One item down an agent's stream; an error ends the stream with it.
pub type Outbound = Result<ToAgent, RackError>;
