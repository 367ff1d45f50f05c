//! The rack registry: the rack agents as the server sees them. One
//! `AgentService.Attach` link per rack, the desired state the server pushes
//! down it, the reports that come back, and the user operations that go
//! through it (power, live consoles, captured console logs, forwards to a
//! host's TCP ports, the reclaim step). Domain code: no gRPC library and no `lab.v1` types; the gRPC edge
//! (`grpc/agent.rs`, the `HostService` handlers) converts, and
//! `grpc/status.rs` turns a [`RackError`] into a status.
//!
//! | File | What lives there |
//! |------|------------------|
//! | `registry.rs` | [`RackRegistry`]: connections per rack, commands under way, reports, records |
//! | `attach.rs` | [`Racks::attach`]: the hello, the full state, changes as events commit, the agent's messages |
//! | `feed.rs` | committed events routed once to the racks they touch (`Feeds`) |
//! | `drive.rs` | [`Racks::power`], [`Racks::console`], [`Racks::console_log`] ([`ConsoleLogReader`], [`LogStream`]) |
//! | `forward.rs` | [`Racks::forward`], [`Racks::run_forward`]: TCP to a host's port, with credit windows |
//! | `link.rs` | the link's messages as typed values ([`FromAgent`], [`ToAgent`]) |
//! | `desired.rs` | a host's desired state ([`DesiredHost`]), BMC password included |
//! | `commands.rs` | commands, their ids, replies, sessions and timeouts |
//! | `reachability.rs` | which hosts cannot be driven now, and why |
//! | `provisioning.rs` | provisioning records and reclaim times, per lease and host |
//! | `reclaim.rs` | [`AgentReclaimer`], the core's reclaim step |
//! | `error.rs` | [`RackError`] |
//!
//! - **Desired state.** After an agent's hello the server sends the full
//!   [`RackState`]; afterwards every committed event that touches one of
//!   the rack's hosts sends that host's [`DesiredHost`] again (an inventory
//!   change, or a lagging event subscription, sends the whole rack again).
//!   The agent reconciles: a new lease with a profile is provisioned (boot
//!   device, power on, watch for the profile's ready marker).
//! - **Reachability.** A host of a rack that has an agent is unreachable
//!   while that agent is not attached, or while the agent reports its BMC
//!   silent. The core does not grant unreachable hosts (see
//!   [`Core::set_unreachable`]); every change is an event.
//! - **Commands** carry an id and are answered by a reply with that id;
//!   console sessions, log reads and forwards stream session data with the
//!   command's id until `end`. A command that times out is forgotten.
//! - **Forwards** carry a user's TCP connection to a host's port over the
//!   link, each with its own credit window so that one slow forward never
//!   stalls the rack's other traffic; they end with the host's lease.
//! - **Reclaim.** [`AgentReclaimer`] is the core's reclaim step: it asks the
//!   agent to capture end-of-lease debug output, power the host off and
//!   reset its boot device; if the agent is away, the core retries with
//!   backoff and the host stays `reclaiming` (never handed out dirty).
//! - **Who may do what** is decided by `core::policy`, next to the core's
//!   own rules: the holder of a host's active lease (or an operator) drives
//!   it, forwards to its ports and reads its lease's console log; an agent attaches only for the
//!   rack whose `agent` it is.
//!
//! # No cycle with the core
//!
//! The core needs its reclaim step when it starts (it re-runs the reclaims
//! it finds in the store), and the registry needs the core to read hosts and
//! report reachability. The registry is therefore two things: a
//! [`RackRegistry`], which holds connections and records and needs only the
//! core's [`Clock`](crate::core::clock::Clock), so [`RackRegistry::reclaimer`]
//! can be handed to [`Core::start`]; and [`Racks`], the registry together
//! with the started [`Core`] handle, built after it. The reclaim step needs
//! nothing from the core beyond its [`ReclaimJob`](crate::core::reclaim::ReclaimJob)
//! (host, lease, profile); the core itself asks the reclaimer, with the
//! inventory then in force, whether a retried reclaim still has anything to
//! do. Time comes from the core's clock, so tests run on paused time.
//!
//! ```text
//! let registry = RackRegistry::new(clock.clone());
//! let (core, _) = Core::start(config, store, inventory, registry.reclaimer(), clock).await?;
//! let racks = Racks::start(core, registry);
//! ```
//!
//! BMC passwords are resolved when a host's desired state is built and only
//! ever go down the Attach stream of the agent that serves the host; they
//! are never logged.

mod attach;
mod commands;
mod desired;
mod drive;
mod error;
mod feed;
mod forward;
mod link;
mod provisioning;
mod reachability;
mod reclaim;
mod registry;

pub use commands::{
    AgentFailure, CONSOLE_OPEN_TIMEOUT, Command, CommandId, CommandKind, CommandReply, ConsoleOpen,
    ConsoleSession, Done, FailureKind, ForwardOpen, LOG_READ_TIMEOUT, LOG_WINDOW, LogRead,
    POWER_TIMEOUT, PowerAction, RECLAIM_TIMEOUT,
};
pub use desired::{ActiveLease, BmcAccess, DesiredHost, Hardware, RackState};
pub use drive::{ConsoleLogReader, LogStream};
pub use error::RackError;
pub use forward::{
    FORWARD_CHUNK, FORWARD_OPEN_TIMEOUT, FORWARD_WINDOW, Forward, ForwardEnd, ForwardLimits,
    ForwardScope, FromUser, ToUser,
};
pub use link::{
    FromAgent, Hello, HostReport, Inbound, LinkError, Outbound, SessionData, SessionInput, ToAgent,
};
pub use provisioning::{PROVISIONING_KEPT, ProvisionPhase, ProvisionReport, Provisioning};
pub use reachability::HostReachability;
pub use reclaim::AgentReclaimer;
pub use registry::RackRegistry;

use crate::core::Core;
use crate::events::{EventKind, EventRecord};
use crate::inventory::Inventory;
use crate::lease::Lease;
use crate::types::{HostName, RackName};
use feed::{Change, Feeds};
use std::sync::Arc;
use tokio::sync::broadcast;
use tracing::debug;

/// The rack registry wired to the started core: what the gRPC layer calls.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Racks {
    core: Core,
    registry: RackRegistry,
    feeds: Arc<Feeds>,
}

impl Racks {
    /// Connects `registry` to the started `core`: marks the hosts of every
    /// rack with an agent unreachable until it attaches, follows inventory
    /// reloads, and routes committed events to the attached racks they
    /// touch (`feed.rs`).
    pub fn start(core: Core, registry: RackRegistry) -> Racks {
        let racks = Racks {
            core,
            registry,
            feeds: Arc::default(),
        };
        let me = racks.clone();
        let mut events = racks.core.subscribe();
        tokio::spawn(async move {
            me.refresh_reachability().await;
            let mut inventory = me.core.inventory().await.ok();
            loop {
                match events.recv().await {
                    Ok(e) => me.route(&e, &mut inventory).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        inventory = me.core.inventory().await.ok();
                        me.refresh_reachability().await;
                        me.feeds.send_all_racks();
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
            me.feeds.close_all();
        });
        racks
    }

    /// Hands `e` to the feeds of the racks it touches; after an inventory
    /// change, the whole rack to every feed once the registry knows the
    /// new racks (an agent's reports about new hosts must count).
    async fn route(&self, e: &EventRecord, inventory: &mut Option<Arc<Inventory>>) {
        match e.kind {
            EventKind::InventoryLoaded
            | EventKind::HostAdded
            | EventKind::HostRetired
            | EventKind::HostRemoved => {
                *inventory = self.core.inventory().await.ok();
                self.refresh_reachability().await;
                self.feeds.send_all_racks();
            }
            // Forwards and agent links change nothing an agent is told.
            EventKind::ForwardOpened
            | EventKind::ForwardClosed
            | EventKind::AgentAttached
            | EventKind::AgentDetached => {}
            _ => {
                if e.hosts.is_empty() || self.feeds.is_empty() {
                    return;
                }
                let mut by_rack: Vec<(RackName, Vec<HostName>)> = Vec::new();
                for h in &e.hosts {
                    let known = self.registry.rack_of(h).or_else(|| {
                        inventory
                            .as_ref()
                            .and_then(|i| i.host(h))
                            .map(|s| s.rack.clone())
                    });
                    let rack = match known {
                        Some(r) => r,
                        // Retired and gone from the inventory: the core
                        // still knows its rack.
                        None => match self.core.get_host(h.clone()).await {
                            Ok(v) => match v.spec {
                                Some(s) => s.rack,
                                None => continue,
                            },
                            Err(_) => continue,
                        },
                    };
                    match by_rack.iter_mut().find(|(r, _)| *r == rack) {
                        Some((_, hosts)) => hosts.push(h.clone()),
                        None => by_rack.push((rack, vec![h.clone()])),
                    }
                }
                for (rack, hosts) in by_rack {
                    self.feeds.send(
                        &rack,
                        Change::Hosts {
                            hosts,
                            reclaiming: e.kind == EventKind::HostReclaiming,
                        },
                    );
                }
            }
        }
    }

    /// The registry (connections and records).
    pub fn registry(&self) -> &RackRegistry {
        &self.registry
    }

    /// The provisioning state of each of `lease`'s hosts (none for hosts of
    /// racks without an agent).
    pub fn provisioning(&self, lease: &Lease) -> Vec<Provisioning> {
        self.registry.provisioning(lease)
    }

    /// Recomputes which hosts cannot be driven and tells the core.
    async fn refresh_reachability(&self) {
        let Ok(inventory) = self.core.inventory().await else {
            return;
        };
        let unreachable = self.registry.unreachable(&inventory);
        if let Err(e) = self.core.set_unreachable(unreachable).await {
            debug!(error = %e, "cannot update reachability");
        }
    }
}

#[cfg(test)]
mod tests;
