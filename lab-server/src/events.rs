//! The event log's record type: one entry for every state change (who, what,
//! when), committed in the same transaction as the change itself.

use crate::lease::LeaseSpec;
use crate::types::{HostName, LeaseId, Principal, Timestamp, WaiterId};
use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    LeaseRequested,
    LeaseGranted,
    LeaseRenewed,
    LeaseReleased,
    LeaseExpired,
    RequestWithdrawn,
    HostReclaiming,
    HostAvailable,
    HostMaintenanceOn,
    HostMaintenanceOff,
    InventoryLoaded,
    HostAdded,
    HostRetired,
    HostRemoved,
    HostUnreachable,
    HostReachable,
    /// A forward to a host's TCP port opened (detail: the port).
    ForwardOpened,
    /// A forward ended (detail: port, bytes each way, why).
    ForwardClosed,
    /// A rack's agent attached (actor: the caller; detail: rack, principal,
    /// version).
    AgentAttached,
    /// A rack's agent link ended (detail: rack, principal, why).
    AgentDetached,
    /// A host's health changed (detail: the new health and why).
    HostHealth,
    /// A health check's lease was granted (actor `lab-health`; detail: what
    /// triggered it).
    HealthCheckStarted,
    /// A health check passed (detail: what it found).
    HealthCheckPassed,
    /// A health check failed (detail: why).
    HealthCheckFailed,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Gap-free, strictly increasing.
    pub seq: u64,
    pub time: Timestamp,
    pub actor: Principal,
    pub kind: EventKind,
    pub hosts: Vec<HostName>,
    pub lease: Option<LeaseId>,
    pub waiter: Option<WaiterId>,
    /// For `LeaseRequested`: what was asked.
    pub request: Option<LeaseSpec>,
    pub detail: String,
}
