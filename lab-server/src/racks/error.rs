//! Why the rack registry refused or failed an operation. Mapped to gRPC
//! codes in one place (`grpc::status`), like the core's errors.

use super::commands::FailureKind;
use super::forward::ForwardScope;
use super::link::LinkError;
use crate::core::CoreError;
use crate::core::policy::Denied;
use crate::types::{HostName, RackName};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RackError {
    /// The caller may not do this (see `core::policy`).
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The core refused or failed (no such host or lease, shutting down).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The agent's stream broke, or its hello could not be read.
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("hello: the first message must be a hello")]
    NoHello,
    #[error("no hello within {after:?}")]
    HelloTimeout { after: Duration },
    #[error("hello.rack: no rack {rack} in the inventory")]
    UnknownRack { rack: RackName },
    /// An agent attached for a rack the inventory gives no agent.
    #[error("rack {rack} has no agent in the inventory")]
    RackHasNoAgent { rack: RackName },
    /// A power command for a host of a rack without an agent.
    #[error("rack {rack} has no agent")]
    NoAgent { rack: RackName },
    #[error("host {host} was removed")]
    HostRemoved { host: HostName },
    #[error("host {host} has no BMC in the inventory")]
    NoBmc { host: HostName },
    #[error("host {host} has no console in the inventory")]
    NoConsole { host: HostName },
    /// A forward to a host without an address to dial.
    #[error("host {host} has no ipv4 in the inventory")]
    NoIpv4 { host: HostName },
    #[error("{scope} already has {limit} forwards open (the limit)")]
    TooManyForwards { scope: ForwardScope, limit: usize },
    #[error("the lease on {host} ended; forward closed")]
    ForwardLeaseEnded { host: HostName },
    #[error("forward to {host} closed after {} without traffic", humantime::format_duration(*after))]
    ForwardIdle { host: HostName, after: Duration },
    /// The forwarded connection broke (the agent's words).
    #[error("forward to {host}: {message}")]
    ForwardBroken { host: HostName, message: String },
    /// The rack's agent is not attached now.
    #[error("the agent of rack {rack} is not attached")]
    AgentAway { rack: RackName },
    /// The rack's agent went away while the command was under way.
    #[error("the agent of rack {rack} went away")]
    AgentGone { rack: RackName },
    #[error("the agent of rack {rack} did not answer within {after:?}")]
    Timeout { rack: RackName, after: Duration },
    /// The agent ran the command and it failed (its words).
    #[error("{message}")]
    AgentFailed {
        host: HostName,
        kind: FailureKind,
        message: String,
    },
    /// Ends an agent's stream when a newer attach for its rack took over.
    #[error("replaced by a newer attach of the same agent")]
    Replaced { rack: RackName },
}
