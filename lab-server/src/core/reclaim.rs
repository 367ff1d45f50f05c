//! The reclaim step: what happens to a host between the end of its lease and
//! its return to the pool. The server's implementation asks the rack agent
//! to capture end-of-lease debug output, power the host off and reset its
//! boot device (`crate::racks::AgentReclaimer`); [`Immediate`] finishes at
//! once (tests, and racks without an agent).
//!
//! The core runs the step in a task of its own and retries a failure with
//! backoff (1 s doubling to 60 s). Before every attempt it asks
//! [`Reclaimer::is_immediate`] again with the inventory then in force, so a
//! host whose rack lost its agent in a reload is not retried for ever.

use crate::inventory::{HostSpec, Inventory};
use crate::types::{HostName, LeaseId, ProfileName};
use std::future::Future;
use std::pin::Pin;

/// One host to reclaim after one lease.
#[derive(Debug, Clone)]
pub struct ReclaimJob {
    /// The host's description (from the inventory, or kept from before a
    /// reload that removed it).
    pub host: HostSpec,
    /// The lease that ended.
    pub lease: LeaseId,
    /// That lease's profile (which end-of-lease debug keys to send).
    pub profile: Option<ProfileName>,
}

/// A failed reclaim; the core retries it with backoff.
#[derive(Debug, thiserror::Error)]
#[error("reclaim of {host} failed")]
pub struct ReclaimError {
    pub host: HostName,
    /// The reclaim ran and the host (its BMC) failed it, as opposed to the
    /// lab failing to run it (agent away, no answer): a reason to check
    /// the host.
    pub host_fault: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

pub type ReclaimFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ReclaimError>> + Send + 'a>>;

/// Makes a host clean after a lease. Must be idempotent: after a crash the
/// core runs it again for every host still in `reclaiming`.
pub trait Reclaimer: Send + Sync + 'static {
    fn reclaim<'a>(&'a self, job: &'a ReclaimJob) -> ReclaimFuture<'a>;

    /// True when there is nothing to do for this host: the core then
    /// finishes the reclaim in the same commit as the lease's end (still
    /// recording both steps), or stops retrying one in progress.
    fn is_immediate(&self, host: &HostSpec, inventory: &Inventory) -> bool {
        let _ = (host, inventory);
        false
    }
}

/// Nothing to do: the host is clean at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Immediate;

impl Reclaimer for Immediate {
    fn reclaim<'a>(&'a self, _job: &'a ReclaimJob) -> ReclaimFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    fn is_immediate(&self, _host: &HostSpec, _inventory: &Inventory) -> bool {
        true
    }
}
