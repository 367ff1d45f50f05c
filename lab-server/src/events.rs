//! The event log's record type: one entry for every state change (who, what,
//! when), committed in the same transaction as the change itself.

use crate::lease::LeaseSpec;
use crate::types::{HostName, LeaseId, Principal, Timestamp, WaiterId};
use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
    /// An active lease expires within the warning period (`--expiry-warning`;
    /// detail: its expiry). Once per expiry: a renewal re-arms it.
    LeaseExpiring,
    /// Webhook deliveries were given up (tried for 24 h) or dropped (the
    /// outbox was full); detail: the hook, the events and why. Never itself
    /// delivered by webhooks.
    WebhookUndelivered,
    /// A preemptible lease must give its hosts to a request that is not:
    /// it now ends after `--preempt-grace` (detail: for whom, and when).
    LeasePreempted,
    /// A booking or maintenance window was made (detail: kind, window).
    BookingCreated,
    /// A booking's window began.
    BookingStarted,
    /// A booking's window is over.
    BookingEnded,
    BookingCancelled,
}

impl EventKind {
    /// Every kind, in the order of the API's enum.
    pub const ALL: [EventKind; 31] = [
        EventKind::LeaseRequested,
        EventKind::LeaseGranted,
        EventKind::LeaseRenewed,
        EventKind::LeaseReleased,
        EventKind::LeaseExpired,
        EventKind::RequestWithdrawn,
        EventKind::HostReclaiming,
        EventKind::HostAvailable,
        EventKind::HostMaintenanceOn,
        EventKind::HostMaintenanceOff,
        EventKind::InventoryLoaded,
        EventKind::HostAdded,
        EventKind::HostRetired,
        EventKind::HostRemoved,
        EventKind::HostUnreachable,
        EventKind::HostReachable,
        EventKind::ForwardOpened,
        EventKind::ForwardClosed,
        EventKind::AgentAttached,
        EventKind::AgentDetached,
        EventKind::HostHealth,
        EventKind::HealthCheckStarted,
        EventKind::HealthCheckPassed,
        EventKind::HealthCheckFailed,
        EventKind::LeaseExpiring,
        EventKind::WebhookUndelivered,
        EventKind::LeasePreempted,
        EventKind::BookingCreated,
        EventKind::BookingStarted,
        EventKind::BookingEnded,
        EventKind::BookingCancelled,
    ];

    /// The name of the kind in the API's `EventKind` without its
    /// `EVENT_KIND_` prefix (`LEASE_GRANTED`): what webhook configurations
    /// name and deliveries carry.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::LeaseRequested => "LEASE_REQUESTED",
            EventKind::LeaseGranted => "LEASE_GRANTED",
            EventKind::LeaseRenewed => "LEASE_RENEWED",
            EventKind::LeaseReleased => "LEASE_RELEASED",
            EventKind::LeaseExpired => "LEASE_EXPIRED",
            EventKind::RequestWithdrawn => "REQUEST_WITHDRAWN",
            EventKind::HostReclaiming => "HOST_RECLAIMING",
            EventKind::HostAvailable => "HOST_AVAILABLE",
            EventKind::HostMaintenanceOn => "HOST_MAINTENANCE_ON",
            EventKind::HostMaintenanceOff => "HOST_MAINTENANCE_OFF",
            EventKind::InventoryLoaded => "INVENTORY_LOADED",
            EventKind::HostAdded => "HOST_ADDED",
            EventKind::HostRetired => "HOST_RETIRED",
            EventKind::HostRemoved => "HOST_REMOVED",
            EventKind::HostUnreachable => "HOST_UNREACHABLE",
            EventKind::HostReachable => "HOST_REACHABLE",
            EventKind::ForwardOpened => "FORWARD_OPENED",
            EventKind::ForwardClosed => "FORWARD_CLOSED",
            EventKind::AgentAttached => "AGENT_ATTACHED",
            EventKind::AgentDetached => "AGENT_DETACHED",
            EventKind::HostHealth => "HOST_HEALTH",
            EventKind::HealthCheckStarted => "HEALTH_CHECK_STARTED",
            EventKind::HealthCheckPassed => "HEALTH_CHECK_PASSED",
            EventKind::HealthCheckFailed => "HEALTH_CHECK_FAILED",
            EventKind::LeaseExpiring => "LEASE_EXPIRING",
            EventKind::WebhookUndelivered => "WEBHOOK_UNDELIVERED",
            EventKind::LeasePreempted => "LEASE_PREEMPTED",
            EventKind::BookingCreated => "BOOKING_CREATED",
            EventKind::BookingStarted => "BOOKING_STARTED",
            EventKind::BookingEnded => "BOOKING_ENDED",
            EventKind::BookingCancelled => "BOOKING_CANCELLED",
        }
    }

    /// The kind named `name` (as [`EventKind::name`] spells it).
    pub fn from_name(name: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
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
    /// The booking it concerns (`lease::booking`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booking: Option<u64>,
}
