//! The core's book of projects: the [`Policy`] in force, each project's
//! decayed host-seconds ([`Usage`]) and the hosts each principal holds, kept
//! up to date as leases start and end, and turned into what a scheduling
//! pass needs ([`Projects`], [`Standing`]).
//!
//! Usage is never stored: it is recomputed from the leases (active and
//! ended, within the retention period) at start, after a reload of state,
//! and when a new policy moves principals between projects. The server's
//! own health checks count for nobody.

use crate::lease::fair::Usage;
use crate::lease::queue::{ProjectLoad, Projects, Standing};
use crate::lease::{Lease, Waiter};
use crate::projects::Policy;
use crate::types::{Principal, Role, Timestamp};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
pub(super) struct ShareBook {
    policy: Arc<Policy>,
    /// Per project of `policy`, in its order.
    usage: Vec<Usage>,
    /// Hosts each principal holds (active leases, checks excluded).
    held: HashMap<Principal, u32>,
    /// The role each principal last called with (for role limits; a
    /// waiter loaded after a restart gets its role when its client comes
    /// back).
    roles: HashMap<Principal, Role>,
}

fn counted(l: &Lease) -> bool {
    l.holder != Principal::health()
}

fn hosts(l: &Lease) -> u32 {
    u32::try_from(l.hosts.len()).unwrap_or(u32::MAX)
}

impl ShareBook {
    pub(super) fn new(policy: Arc<Policy>) -> Self {
        let usage = vec![Usage::new(policy.half_life, Timestamp(0)); policy.projects().len()];
        ShareBook {
            policy,
            usage,
            held: HashMap::new(),
            roles: HashMap::new(),
        }
    }

    pub(super) fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Puts `policy` in force and recounts usage from `leases`.
    pub(super) fn set_policy<'a>(
        &mut self,
        policy: Arc<Policy>,
        leases: impl Iterator<Item = &'a Lease>,
        now: Timestamp,
    ) {
        self.policy = policy;
        self.recount(leases, now);
    }

    /// Recomputes every project's usage and every principal's hosts.
    pub(super) fn recount<'a>(&mut self, leases: impl Iterator<Item = &'a Lease>, now: Timestamp) {
        let n = self.policy.projects().len();
        let mut per: Vec<Vec<(Timestamp, Option<Timestamp>, u32)>> = vec![Vec::new(); n];
        self.held.clear();
        for l in leases.filter(|l| counted(l)) {
            let end = if l.is_active() {
                *self.held.entry(l.holder.clone()).or_default() += hosts(l);
                None
            } else {
                Some(l.ended_at.unwrap_or(l.expires_at))
            };
            per[self.policy.project_of(&l.holder)].push((l.granted_at, end, hosts(l)));
        }
        let half_life = self.policy.half_life;
        self.usage = per
            .into_iter()
            .map(|ls| Usage::replay(half_life, now, ls))
            .collect();
    }

    /// A lease was written: count its start or its end.
    pub(super) fn lease_changed(&mut self, old: Option<&Lease>, new: &Lease) {
        if !counted(new) {
            return;
        }
        let was = old.is_some_and(Lease::is_active);
        let p = self.policy.project_of(&new.holder);
        if !was && new.is_active() && old.is_none() {
            self.usage[p].grant(new.granted_at, hosts(new));
            *self.held.entry(new.holder.clone()).or_default() += hosts(new);
        } else if was && !new.is_active() {
            let end = new.ended_at.unwrap_or(new.expires_at);
            self.usage[p].end(end, new.granted_at, hosts(new));
            if let Some(h) = self.held.get_mut(&new.holder) {
                *h = h.saturating_sub(hosts(new));
                if *h == 0 {
                    self.held.remove(&new.holder);
                }
            }
        }
    }

    pub(super) fn saw_role(&mut self, principal: &Principal, role: Role) {
        if self.roles.get(principal) != Some(&role) {
            self.roles.insert(principal.clone(), role);
        }
    }

    /// Projects as a scheduling pass at `now` sees them.
    pub(super) fn projects(&self, now: Timestamp) -> Projects {
        Projects {
            loads: self
                .policy
                .projects()
                .iter()
                .zip(&self.usage)
                .map(|(p, u)| ProjectLoad {
                    name: p.name.clone(),
                    share: p.share,
                    usage: u.value(now),
                    held: u.held(),
                    max_hosts: p.limits.max_hosts,
                })
                .collect(),
        }
    }

    /// Where `w` stands: its project and its principal's role limit.
    pub(super) fn standing(&self, w: &Waiter) -> Standing {
        if w.check.is_some() {
            return Standing::default();
        }
        let principal_max = self
            .roles
            .get(&w.principal)
            .and_then(|r| self.policy.role_limits(*r))
            .and_then(|l| l.max_hosts);
        Standing {
            project: Some(self.policy.project_of(&w.principal)),
            principal_max,
            principal_held: self.held.get(&w.principal).copied().unwrap_or(0),
        }
    }

    /// The name of `principal`'s project.
    pub(super) fn project_name(&self, principal: &Principal) -> &str {
        &self.policy.project(self.policy.project_of(principal)).name
    }
}
