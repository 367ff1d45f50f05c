//! The reclaim step: what happens to a host between the end of its lease and
//! its return to the pool. The rack agent will power the host off and reset
//! its boot device here; until agents exist, [`Immediate`] finishes at once.

use crate::inventory::HostSpec;
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

    /// True when there is nothing to do: the core then finishes the reclaim
    /// in the same commit as the lease's end (still recording both steps).
    fn is_immediate(&self) -> bool {
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

    fn is_immediate(&self) -> bool {
        true
    }
}
