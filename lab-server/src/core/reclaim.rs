//! The reclaim step: what happens to a host between the end of its lease and
//! its return to the pool. The server's implementation asks the rack agent
//! to capture end-of-lease debug output, power the host off and reset its
//! boot device (`crate::agents::AgentReclaimer`); [`Immediate`] finishes at
//! once (tests, and racks without an agent).

use crate::inventory::{HostSpec, Inventory};
use crate::types::LeaseId;
use std::future::Future;
use std::pin::Pin;

/// A failed reclaim; the core retries it with backoff.
#[derive(Debug, thiserror::Error)]
#[error("reclaim of {host} failed: {reason}")]
pub struct ReclaimError {
    pub host: String,
    pub reason: String,
}

pub type ReclaimFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ReclaimError>> + Send + 'a>>;

/// Makes a host clean after a lease. Must be idempotent: after a crash the
/// core runs it again for every host still in `reclaiming`.
pub trait Reclaimer: Send + Sync + 'static {
    fn reclaim<'a>(&'a self, host: &'a HostSpec, lease: LeaseId) -> ReclaimFuture<'a>;

    /// True when there is nothing to do for this host: the core then
    /// finishes the reclaim in the same commit as the lease's end (still
    /// recording both steps).
    fn is_immediate(&self, host: &HostSpec, inventory: &Inventory) -> bool {
        let _ = (host, inventory);
        false
    }
}

/// Nothing to do: the host is clean at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Immediate;

impl Reclaimer for Immediate {
    fn reclaim<'a>(&'a self, _host: &'a HostSpec, _lease: LeaseId) -> ReclaimFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    fn is_immediate(&self, _host: &HostSpec, _inventory: &Inventory) -> bool {
        true
    }
}
