//! The wait queue and the grant rule, as pure functions.
//!
//! **Order.** The server's health checks first (each names one host, and
//! may take it even when it is quarantined), then waiters by priority
//! (higher first), then arrival (earlier first).
//!
//! **Grant rule (reservation).** A scheduling pass walks the queue in order
//! with the set of grantable hosts. A waiter that can get all `count` hosts it
//! needs from the hosts not yet reserved is granted them (in inventory order).
//! A waiter that cannot *reserves* every free host it could use, so no waiter
//! behind it can take them. Consequences:
//! - a later waiter is only ever granted hosts that no earlier, still waiting
//!   waiter could use (the property the history checker proves);
//! - a request for several hosts collects them as they free up and is not
//!   starved by a stream of single-host requests behind it;
//! - hosts that an earlier waiter cannot use (another arch, missing flags) are
//!   still granted to later waiters ("backfill"), so a blocked head does not
//!   idle the whole lab.
//!
//! **Detached waiters.** A waiter whose client is away (after a server
//! restart, until the client resumes it by its request id) keeps its place
//! and reserves the hosts it would be granted, but is not granted: a client
//! that never comes back must not get a lease; it costs the lab at most the
//! grace period the core gives it.
//!
//! Priorities are absolute: a steady stream of higher-priority requests can
//! delay lower ones indefinitely; that is what priority means here.

use crate::types::{
    Arch, Flag, HostName, Principal, ProfileName, RequestId, SshPublicKey, Timestamp, WaiterId,
};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What a lease request asks for (validated).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseSpec {
    pub arch: Option<Arch>,
    pub flags: BTreeSet<Flag>,
    /// Empty: any host.
    pub hosts: BTreeSet<HostName>,
    pub count: u32,
    pub profile: Option<ProfileName>,
    pub ttl: Duration,
    pub priority: i32,
    pub comment: String,
    /// For root on the hosts (an installing profile puts it into
    /// `authorized_keys`). Requests logged before keys existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_public_key: Option<SshPublicKey>,
}

/// What the scheduler needs to know of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a HostName,
    pub arch: Arch,
    pub flags: &'a BTreeSet<Flag>,
    /// Free to be granted now.
    pub grantable: bool,
    /// Free to be granted to a health check now (whatever its health).
    pub checkable: bool,
    /// Never grantable again under the current inventory (retired); maintenance
    /// hosts are not excluded since they come back.
    pub gone: bool,
    /// When it is expected to be free (its lease's expiry), for ETAs; `None`
    /// when unknown (maintenance, reclaiming is treated as "now").
    pub free_at: Option<Timestamp>,
}

impl LeaseSpec {
    /// Could this request ever use that host?
    pub fn matches(&self, c: &Candidate<'_>) -> bool {
        !c.gone
            && self.arch.is_none_or(|a| a == c.arch)
            && self.flags.is_subset(c.flags)
            && (self.hosts.is_empty() || self.hosts.contains(c.name))
    }

    /// Can the inventory ever satisfy this request (ignoring who holds what)?
    pub fn satisfiable(&self, candidates: &[Candidate<'_>]) -> bool {
        candidates.iter().filter(|c| self.matches(c)).count() >= self.count as usize
    }
}

/// A request waiting for hosts, as persisted (the store keeps every waiter
/// until it is granted or withdrawn).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Waiter {
    pub id: WaiterId,
    pub principal: Principal,
    pub spec: LeaseSpec,
    /// The client's id of the request, by which it can resume it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
    pub queued_at: Timestamp,
    /// Its client is away: it keeps its place and reserves hosts but is not
    /// granted. Not persisted.
    #[serde(skip)]
    pub detached: bool,
    /// A health check of the server's (what triggered it): ahead of every
    /// other request, and granted a quarantined host too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

impl Waiter {
    fn may_take(&self, c: &Candidate<'_>) -> bool {
        if self.check.is_some() {
            c.checkable
        } else {
            c.grantable
        }
    }
}

/// Health checks first, then by priority, then by arrival.
type QueueKey = (bool, Reverse<i32>, WaiterId);

fn key(w: &Waiter) -> QueueKey {
    (w.check.is_none(), Reverse(w.spec.priority), w.id)
}

/// The queue: waiters in service order.
#[derive(Debug, Default)]
pub struct Queue {
    waiters: BTreeMap<QueueKey, Waiter>,
    keys: BTreeMap<WaiterId, QueueKey>,
}

impl Queue {
    pub fn push(&mut self, w: Waiter) {
        let key = key(&w);
        self.keys.insert(w.id, key);
        self.waiters.insert(key, w);
    }

    pub fn remove(&mut self, id: WaiterId) -> Option<Waiter> {
        let key = self.keys.remove(&id)?;
        self.waiters.remove(&key)
    }

    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    pub fn get(&self, id: WaiterId) -> Option<&Waiter> {
        self.waiters.get(self.keys.get(&id)?)
    }

    pub fn contains(&self, id: WaiterId) -> bool {
        self.keys.contains_key(&id)
    }

    /// Mark a waiter's client away (`true`) or back (`false`).
    pub fn set_detached(&mut self, id: WaiterId, detached: bool) {
        if let Some(key) = self.keys.get(&id)
            && let Some(w) = self.waiters.get_mut(key)
        {
            w.detached = detached;
        }
    }

    /// Waiters in service order.
    pub fn iter(&self) -> impl Iterator<Item = &Waiter> {
        self.waiters.values()
    }

    /// One scheduling pass: which waiters get which hosts now (see the module
    /// docs for the rule). Does not modify the queue.
    pub fn schedule(&self, candidates: &[Candidate<'_>]) -> Vec<(WaiterId, Vec<HostName>)> {
        let mut taken = vec![false; candidates.len()];
        let mut free = candidates
            .iter()
            .filter(|c| c.grantable || c.checkable)
            .count();
        let mut grants = Vec::new();
        for w in self.waiters.values() {
            if free == 0 {
                break;
            }
            let usable: Vec<usize> = candidates
                .iter()
                .enumerate()
                .filter(|(i, c)| !taken[*i] && w.may_take(c) && w.spec.matches(c))
                .map(|(i, _)| i)
                .collect();
            let grant = usable.len() >= w.spec.count as usize;
            let take = if grant {
                &usable[..w.spec.count as usize]
            } else {
                &usable[..]
            };
            for &i in take {
                taken[i] = true;
            }
            free -= take.len();
            if grant && !w.detached {
                grants.push((
                    w.id,
                    take.iter().map(|&i| candidates[i].name.clone()).collect(),
                ));
            }
        }
        grants
    }

    /// Position (1-based) and estimated grant time of every waiter, assuming
    /// each current lease runs to its expiry and each granted waiter keeps its
    /// hosts for its whole TTL.
    pub fn estimate(
        &self,
        candidates: &[Candidate<'_>],
        now: Timestamp,
    ) -> Vec<(WaiterId, u32, Option<Timestamp>)> {
        let mut free_at: Vec<Option<Timestamp>> = candidates
            .iter()
            .map(|c| {
                if c.gone {
                    None
                } else {
                    c.free_at.map(|t| t.max(now))
                }
            })
            .collect();
        let mut out = Vec::with_capacity(self.waiters.len());
        for (pos, w) in self.waiters.values().enumerate() {
            let mut usable: Vec<(Timestamp, usize)> = candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| w.spec.matches(c))
                .filter_map(|(i, _)| free_at[i].map(|t| (t, i)))
                .collect();
            let eta = if usable.len() >= w.spec.count as usize && w.spec.count > 0 {
                usable.sort();
                let chosen = &usable[..w.spec.count as usize];
                let at = chosen.last().map(|(t, _)| *t).unwrap_or(now);
                for &(_, i) in chosen {
                    free_at[i] = Some(at.saturating_add(w.spec.ttl));
                }
                Some(at)
            } else {
                None
            };
            out.push((w.id, u32::try_from(pos + 1).unwrap_or(u32::MAX), eta));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lab {
        names: Vec<HostName>,
        flags: Vec<BTreeSet<Flag>>,
        arch: Vec<Arch>,
    }

    impl Lab {
        fn new(hosts: &[(&str, Arch, &[&str])]) -> Self {
            Lab {
                names: hosts.iter().map(|h| HostName::new(h.0).unwrap()).collect(),
                arch: hosts.iter().map(|h| h.1).collect(),
                flags: hosts
                    .iter()
                    .map(|h| h.2.iter().map(|f| Flag::new(*f).unwrap()).collect())
                    .collect(),
            }
        }
        fn candidates(&self, free: &[bool]) -> Vec<Candidate<'_>> {
            (0..self.names.len())
                .map(|i| Candidate {
                    name: &self.names[i],
                    arch: self.arch[i],
                    flags: &self.flags[i],
                    grantable: free[i],
                    checkable: free[i],
                    gone: false,
                    free_at: Some(Timestamp(if free[i] { 0 } else { 10_000 * (i as i64 + 1) })),
                })
                .collect()
        }
    }

    fn spec(count: u32, priority: i32) -> LeaseSpec {
        LeaseSpec {
            arch: None,
            flags: BTreeSet::new(),
            hosts: BTreeSet::new(),
            count,
            profile: None,
            ttl: Duration::from_secs(60),
            priority,
            comment: String::new(),
            ssh_public_key: None,
        }
    }

    fn waiter(id: u64, s: LeaseSpec) -> Waiter {
        Waiter {
            id,
            principal: Principal::new("p").unwrap(),
            spec: s,
            request_id: None,
            queued_at: Timestamp(0),
            detached: false,
            check: None,
        }
    }

    fn names(v: &[(WaiterId, Vec<HostName>)]) -> Vec<(u64, Vec<String>)> {
        v.iter()
            .map(|(w, h)| (*w, h.iter().map(|h| h.to_string()).collect()))
            .collect()
    }

    #[test]
    fn priority_then_arrival() {
        let lab = Lab::new(&[("a", Arch::X86_64, &[])]);
        let mut q = Queue::default();
        q.push(waiter(1, spec(1, 0)));
        q.push(waiter(2, spec(1, 5)));
        q.push(waiter(3, spec(1, 5)));
        assert_eq!(q.iter().map(|w| w.id).collect::<Vec<_>>(), vec![2, 3, 1]);
        assert_eq!(
            names(&q.schedule(&lab.candidates(&[true]))),
            vec![(2, vec!["a".into()])]
        );
    }

    #[test]
    fn a_pair_request_reserves_hosts_against_later_singles() {
        let lab = Lab::new(&[("a", Arch::X86_64, &[]), ("b", Arch::X86_64, &[])]);
        let mut q = Queue::default();
        q.push(waiter(1, spec(2, 0)));
        q.push(waiter(2, spec(1, 0)));
        // Only `a` is free: the pair reserves it, the single gets nothing.
        assert!(q.schedule(&lab.candidates(&[true, false])).is_empty());
        // Both free: the pair is granted both.
        assert_eq!(
            names(&q.schedule(&lab.candidates(&[true, true]))),
            vec![(1, vec!["a".into(), "b".into()])]
        );
    }

    #[test]
    fn backfill_with_hosts_the_head_cannot_use() {
        let lab = Lab::new(&[("x", Arch::X86_64, &[]), ("arm", Arch::Aarch64, &[])]);
        let mut q = Queue::default();
        q.push(waiter(
            1,
            LeaseSpec {
                arch: Some(Arch::X86_64),
                ..spec(1, 0)
            },
        ));
        q.push(waiter(2, spec(1, 0)));
        // x is busy; the arm host goes to waiter 2 since waiter 1 cannot use it.
        assert_eq!(
            names(&q.schedule(&lab.candidates(&[false, true]))),
            vec![(2, vec!["arm".into()])]
        );
    }

    #[test]
    fn flags_and_host_lists_restrict() {
        let lab = Lab::new(&[("a", Arch::X86_64, &[]), ("b", Arch::X86_64, &["iommu"])]);
        let mut q = Queue::default();
        q.push(waiter(
            1,
            LeaseSpec {
                flags: [Flag::new("iommu").unwrap()].into(),
                ..spec(1, 0)
            },
        ));
        q.push(waiter(
            2,
            LeaseSpec {
                hosts: [HostName::new("a").unwrap()].into(),
                ..spec(1, 0)
            },
        ));
        assert_eq!(
            names(&q.schedule(&lab.candidates(&[true, true]))),
            vec![(1, vec!["b".into()]), (2, vec!["a".into()])]
        );
        let c = lab.candidates(&[true, true]);
        assert!(!spec(3, 0).satisfiable(&c));
        assert!(spec(2, 0).satisfiable(&c));
    }

    #[test]
    fn estimates_follow_expiries_and_queue_order() {
        let lab = Lab::new(&[("a", Arch::X86_64, &[]), ("b", Arch::X86_64, &[])]);
        let mut q = Queue::default();
        q.push(waiter(1, spec(1, 0)));
        q.push(waiter(2, spec(2, 0)));
        q.push(waiter(3, spec(1, 0)));
        // a frees at 10 s, b at 20 s; each lease lasts 60 s.
        let est = q.estimate(&lab.candidates(&[false, false]), Timestamp(0));
        assert_eq!(
            est,
            vec![
                (1, 1, Some(Timestamp(10_000))),
                (2, 2, Some(Timestamp(70_000))), // needs a (free again at 70 s) and b (20 s)
                (3, 3, Some(Timestamp(130_000))),
            ]
        );
    }

    #[test]
    fn a_detached_waiter_keeps_its_place_and_hosts_but_is_not_granted() {
        let lab = Lab::new(&[
            ("a", Arch::X86_64, &[]),
            ("b", Arch::X86_64, &[]),
            ("c", Arch::X86_64, &[]),
        ]);
        let mut q = Queue::default();
        q.push(waiter(1, spec(2, 0)));
        q.push(waiter(2, spec(2, 0)));
        q.push(waiter(3, spec(1, 0)));
        q.set_detached(1, true);
        // Waiter 1 would get a and b: they stay reserved for it; waiter 2
        // cannot get two of what is left, so it reserves c.
        assert!(q.schedule(&lab.candidates(&[true, true, true])).is_empty());
        // Only a and b free: both reserved for waiter 1, nothing for 3.
        assert!(q.schedule(&lab.candidates(&[true, true, false])).is_empty());
        // Its client came back: granted as usual.
        q.set_detached(1, false);
        assert_eq!(
            names(&q.schedule(&lab.candidates(&[true, true, true]))),
            vec![(1, vec!["a".into(), "b".into()])]
        );
        // The estimate still counts it in its place.
        q.set_detached(1, true);
        let est = q.estimate(&lab.candidates(&[true, true, true]), Timestamp(0));
        assert_eq!(
            est.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
            [(1, 1), (2, 2), (3, 3)]
        );
    }

    /// A health check goes ahead of every request, whatever its priority,
    /// and takes a host only it may take (quarantined: checkable, not
    /// grantable); while it waits, the host is reserved for it.
    #[test]
    fn a_health_check_goes_first_and_may_take_a_quarantined_host() {
        let lab = Lab::new(&[("a", Arch::X86_64, &[]), ("b", Arch::X86_64, &[])]);
        let only_a = LeaseSpec {
            hosts: [HostName::new("a").unwrap()].into(),
            ..spec(1, 0)
        };
        let mut q = Queue::default();
        q.push(waiter(1, spec(1, 100)));
        q.push(waiter(2, only_a.clone()));
        q.push(Waiter {
            check: Some("operator".into()),
            ..waiter(3, only_a.clone())
        });
        assert_eq!(q.iter().map(|w| w.id).collect::<Vec<_>>(), vec![3, 1, 2]);
        // Both free: the check gets a, the priority-100 request b.
        assert_eq!(
            names(&q.schedule(&lab.candidates(&[true, true]))),
            vec![(3, vec!["a".into()]), (1, vec!["b".into()])]
        );
        // a quarantined (checkable only), b busy: only the check gets a.
        let mut c = lab.candidates(&[true, false]);
        c[0].grantable = false;
        assert_eq!(names(&q.schedule(&c)), vec![(3, vec!["a".into()])]);
        q.remove(3);
        assert!(
            q.schedule(&c).is_empty(),
            "nobody else takes a quarantined host"
        );
        // A check waiting for a busy host holds nothing else back.
        q.push(Waiter {
            check: Some("every 5 leases".into()),
            ..waiter(4, only_a)
        });
        assert_eq!(
            names(&q.schedule(&lab.candidates(&[false, true]))),
            vec![(1, vec!["b".into()])]
        );
    }

    #[test]
    fn removal_keeps_order() {
        let mut q = Queue::default();
        for id in 1..=4 {
            q.push(waiter(id, spec(1, 0)));
        }
        assert!(q.remove(2).is_some());
        assert!(q.remove(2).is_none());
        assert_eq!(q.iter().map(|w| w.id).collect::<Vec<_>>(), vec![1, 3, 4]);
        assert_eq!(q.len(), 3);
    }
}
