//! [`AgentReclaimer`]: the core's reclaim step through the rack's agent. It
//! sends `Reclaim{lease, profile}` and waits up to [`RECLAIM_TIMEOUT`]; the
//! agent sends the profile's debug keys (so the end-of-lease output lands
//! in the lease's console log), powers the host off and resets its boot
//! device. If the agent is away, goes away, does not answer in time or
//! fails, the reclaim fails and the core retries it with backoff; the host
//! stays `reclaiming` meanwhile (never handed out dirty). Hosts of racks
//! without an agent are reclaimed at once ([`Reclaimer::is_immediate`]).

use super::RackError;
use super::commands::{Answer, CommandKind, RECLAIM_TIMEOUT};
use super::registry::RackRegistry;
use crate::core::reclaim::{ReclaimError, ReclaimFuture, ReclaimJob, Reclaimer};
use crate::inventory::{HostSpec, Inventory};
use tracing::info;

/// The core's reclaim step through the rack agents of a [`RackRegistry`].
#[derive(Debug, Clone)]
pub struct AgentReclaimer(RackRegistry);

impl AgentReclaimer {
    pub fn new(registry: RackRegistry) -> Self {
        Self(registry)
    }
}

impl Reclaimer for AgentReclaimer {
    fn reclaim<'a>(&'a self, job: &'a ReclaimJob) -> ReclaimFuture<'a> {
        Box::pin(async move {
            let host = &job.host;
            let fail = |e: RackError| ReclaimError {
                host: host.name.clone(),
                host_fault: matches!(e, RackError::AgentFailed { .. }),
                source: Box::new(e),
            };
            let cmd = CommandKind::Reclaim {
                lease: job.lease,
                profile: job.profile.clone(),
            };
            let mut issued = self
                .0
                .command(&host.rack, &host.name, cmd, Answer::Reply)
                .await
                .map_err(fail)?;
            issued.reply(RECLAIM_TIMEOUT).await.map_err(fail)?;
            self.0.reclaimed(job.lease, &host.name);
            info!(host = %host.name, lease = %job.lease, "reclaimed by the agent");
            Ok(())
        })
    }

    fn is_immediate(&self, host: &HostSpec, inventory: &Inventory) -> bool {
        inventory.rack(&host.rack).is_none_or(|r| r.agent.is_none())
    }
}
