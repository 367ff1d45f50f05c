//! The history checker: replays the server's event log and proves what the
//! lease core promises about it, or panics naming the offending event.
//!
//! - the log is gap-free from its first event;
//! - no host ever has two holders (a host is granted only when free, ends
//!   only the lease that holds it, and is available again only after a
//!   reclaim);
//! - every grant respects the queue order (health checks, then priority,
//!   preemptible requests last, then waiter id) and the reservation rule:
//!   replaying the scheduling pass over the hosts free at the grant, each
//!   earlier request still waiting takes what it could use (all it can use
//!   when that is not enough for it), and the grant gets only hosts none of
//!   them took. An earlier request that could have been granted from the
//!   free hosts, and was not, is a violation — unless it was waiting when
//!   the server (re)started (an `INVENTORY_LOADED` by `server`): its client
//!   may not have resumed it yet, and a detached request keeps the hosts it
//!   would get but is not granted (see `docs/leases.md`);
//! - every waiter is granted at most once, with as many hosts as it asked
//!   for, each one it can use;
//! - at the end no request is left waiting (every `LEASE_REQUESTED` ended
//!   in `LEASE_GRANTED` or `REQUEST_WITHDRAWN`).
//!
//! **With a policy** ([`check_history_with`] and [`Quotas`], built from the
//! same `policy.toml` text the server loaded; the log must then start at
//! its first event) it also proves the projects' rules:
//!
//! - **quotas hold**: no grant takes a project past its `max_hosts`, nor a
//!   principal past its role's `max_hosts` (hosts of active leases: counted
//!   from the grant to the `LEASE_RELEASED`/`LEASE_EXPIRED`; the server's
//!   own health checks count for nobody);
//! - **the order stays sound under fair share.** Two waiters' order is
//!   known when their levels differ (health check, preemptible, priority:
//!   priority first always holds) or they are of the same project (then
//!   arrival). Between projects of equal priority it is fair share, which
//!   the checker does not model, so it reports nothing that depends on it.
//!   A waiter that a quota holds back at its turn reserves nothing and is
//!   skipped, as the server does (`Queue::schedule_fair`): its turn counts
//!   the hosts its project (and principal) held when the pass began plus
//!   the grants of the pass before it, which the log bounds — at least
//!   those held at the last event that was not a grant plus that run's
//!   grants of its own earlier waiters, at most those held now. A waiter
//!   whose state the bounds leave open is treated as either.
//!   At a grant, when every waiter that may come before it has a known
//!   order and quota state, the pass is replayed exactly as above (so a
//!   single project, or no policy, loses nothing). Otherwise each waiter
//!   certainly before the grant, attached and certainly not held back, is
//!   checked on what holds whatever the order among projects: it could use
//!   none of the granted hosts (it would have taken them), and the free
//!   hosts it could use that no waiter possibly before it could have
//!   reserved are fewer than it asks for (or it would have been granted).
//!
//! And whatever the policy, **preemption** (`LEASE_PREEMPTED`): only an
//! active lease granted to a preemptible request is noticed, once, for a
//! waiting request that is not preemptible and could use one of its hosts;
//! a noticed lease is never renewed. A request is preemptible when its
//! `LEASE_REQUESTED` says so in its detail (the request recorded in it does
//! not carry the flag); the event a granted `no_wait` request gets just
//! before its grant does not say, so its lease may be either. (That it then ends within its grace
//! is a matter of time, tested on paused time in `core/preempt_tests.rs`.)
//!
//! And **bookings** (`BOOKING_*`): while a booking's window runs (from its
//! `BOOKING_STARTED` to its `BOOKING_ENDED` or `BOOKING_CANCELLED`) its
//! hosts are granted to nobody but the booking's own request (the
//! `LEASE_REQUESTED` with its `booking_id`), which is granted exactly the
//! booked hosts; at its start no other lease holds any of them (so no lease
//! was granted across the start: a lease that ran into it would still hold
//! its host). A booking's request goes with the health checks, first; it
//! is held to no quota (bookings are checked against quotas when they are
//! made) but its lease counts for its project. Whether a request's TTL
//! fits before a booking ahead is a matter of time the log does not carry:
//! for the order replay, a host with a booking made and not yet over is
//! one an earlier waiter may have been unable to use.
//!
//! [`History`] counts what was checked, and how often a project's quota was
//! reached, so that a test can show its checks were not vacuous.
//!
//! Used by the concurrency tests (64 clients on one server, with and without
//! a policy), the crash tests and the `crash-loop` benchmark (the log across
//! many SIGKILLs).

use lab_proto::v1 as pb;
use lab_server::projects::{DEFAULT_PROJECT, Policy};
use lab_server::types::{Principal, Role};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// The hosts of [`crate::inventory_toml`]`(n)` with their flags.
pub fn inventory_hosts(n: usize) -> Vec<(String, Vec<String>)> {
    (0..n)
        .map(|i| {
            let flags = if i % 4 == 0 {
                vec!["iommu".to_owned()]
            } else {
                vec![]
            };
            (format!("h{i:02}"), flags)
        })
        .collect()
}

/// What the replay counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    pub events: usize,
    pub requests: usize,
    pub grants: usize,
    pub withdrawals: usize,
    /// Earlier waiters checked against grants.
    pub order_checks: usize,
    /// Earlier waiters a quota held back at a grant (they reserve nothing).
    pub held_back: usize,
    /// Grants whose earlier waiters were checked only on what holds in any
    /// fair-share order (waiters of another project at the same priority
    /// could have come first).
    pub fair_share_grants: usize,
    /// Grants after which their project held exactly its `max_hosts`.
    pub quota_reached: usize,
    /// `LEASE_PREEMPTED` notices checked.
    pub preemptions: usize,
    /// Bookings whose window began, and grants to a booking's request.
    pub bookings_started: usize,
    pub booking_grants: usize,
}

/// The projects and quotas a server ran with, for [`check_history_with`].
#[derive(Debug, Clone)]
pub struct Quotas {
    policy: Policy,
    /// The role each principal called with (for a role's `max_hosts`).
    roles: HashMap<String, Role>,
    default_role: Option<Role>,
    default_project: usize,
}

impl Quotas {
    /// From the text of the policy file the server loaded. Principals call
    /// with `role` (an in-process server without tokens makes everyone an
    /// operator) unless [`Self::with_role`] says otherwise.
    pub fn parse(policy_toml: &str, role: Option<Role>) -> anyhow::Result<Quotas> {
        let policy = Policy::parse(policy_toml, Path::new("policy.toml"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let default_project = policy
            .projects()
            .iter()
            .position(|p| p.name == DEFAULT_PROJECT)
            .expect("a policy always has the default project");
        Ok(Quotas {
            policy,
            roles: HashMap::new(),
            default_role: role,
            default_project,
        })
    }

    /// `principal` calls with `role`.
    pub fn with_role(mut self, principal: &str, role: Role) -> Self {
        self.roles.insert(principal.to_owned(), role);
        self
    }

    /// The project of `principal` (`None`: the server's health checks).
    fn project(&self, principal: &str) -> Option<usize> {
        if principal == Principal::health().as_str() {
            return None;
        }
        Some(Principal::new(principal).map_or(self.default_project, |p| self.policy.project_of(&p)))
    }

    fn project_name(&self, p: usize) -> &str {
        &self.policy.project(p).name
    }

    fn project_max(&self, p: usize) -> Option<u32> {
        self.policy.project(p).limits.max_hosts
    }

    fn principal_max(&self, principal: &str) -> Option<u32> {
        let role = self.roles.get(principal).copied().or(self.default_role)?;
        self.policy.role_limits(role)?.max_hosts
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Free,
    Held,
    Reclaiming,
}

/// A level of the service order: not a health check, preemptible, minus
/// the priority (health checks first, preemptible requests last, higher
/// priorities first).
type Level = (bool, bool, i32);

/// A waiter's place: its level, then its waiter id.
type Key = (Level, u64);

struct Waiting {
    priority: i32,
    req: pb::LeaseRequest,
    /// Preemptible (said in the event's detail: the request in it does
    /// not carry the flag).
    preemptible: bool,
    /// Maybe preemptible all the same: a `no_wait` request's event (just
    /// before its grant) does not say.
    unsure: bool,
    /// Waiting when the server started: maybe detached since.
    detached: bool,
    principal: String,
    /// Its project (without a policy, everyone's is 0); `None`: a health
    /// check.
    project: Option<usize>,
    /// The booking whose request it is.
    booking: Option<u64>,
}

/// Whether the waiter at `a` certainly comes before the one at `b` in every
/// scheduling pass: a higher level, or the same level and project and an
/// earlier arrival. Otherwise their order is fair share's (or `b` first).
fn before(a: Key, pa: Option<usize>, b: Key, pb_: Option<usize>) -> bool {
    a.0 < b.0 || (a.0 == b.0 && pa == pb_ && a.1 < b.1)
}

/// A waiter's quota state at its turn in the pass of a grant.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Quota {
    /// Not held back: it reserved what it could use.
    Free,
    /// Held back: it reserved nothing.
    HeldBack,
    /// The log does not tell.
    Unknown,
}

/// A grant of the current run: key, principal, project, hosts.
type RunGrant = (Key, String, Option<usize>, u32);

/// Hosts held by projects and principals as the log goes, with the run of
/// grants since the last event that was not a grant (a scheduling pass's
/// grants are such a run, perhaps with earlier passes').
#[derive(Default)]
struct Book {
    projects: Vec<u32>,
    principals: HashMap<String, u32>,
    /// Active leases: holder, project, hosts.
    leases: HashMap<String, (String, Option<usize>, u32)>,
    /// Held when the current run of grants began.
    start: (Vec<u32>, HashMap<String, u32>),
    /// The run's grants.
    run: Vec<RunGrant>,
    in_run: bool,
}

impl Book {
    fn end_run(&mut self) {
        self.in_run = false;
    }

    fn start_run(&mut self) {
        if !self.in_run {
            self.in_run = true;
            self.start = (self.projects.clone(), self.principals.clone());
            self.run.clear();
        }
    }

    fn grant(&mut self, lease: &str, key: Key, principal: &str, project: Option<usize>, n: u32) {
        if let Some(p) = project {
            self.projects[p] += n;
            *self.principals.entry(principal.to_owned()).or_default() += n;
        }
        self.leases
            .insert(lease.to_owned(), (principal.to_owned(), project, n));
        self.run.push((key, principal.to_owned(), project, n));
    }

    fn end(&mut self, lease: &str) {
        if let Some((principal, Some(p), n)) = self.leases.remove(lease) {
            self.projects[p] -= n;
            if let Some(h) = self.principals.get_mut(&principal) {
                *h -= n;
            }
        }
    }

    /// The quota state of `w` (at `key`) at its turn, had it come before the
    /// grant being checked.
    fn quota(&self, q: Option<&Quotas>, key: Key, w: &Waiting) -> Quota {
        let (Some(q), Some(p), None) = (q, w.project, w.booking) else {
            return Quota::Free;
        };
        let need = w.req.count.max(1);
        // Grants of this run to the same project (or principal) before it.
        let earlier = |same: &dyn Fn(&RunGrant) -> bool| -> u32 {
            self.run
                .iter()
                .filter(|g| same(g) && g.0 < key)
                .map(|g| g.3)
                .sum()
        };
        let mut lower_over = false;
        let mut upper_over = false;
        if let Some(max) = q.project_max(p) {
            let lower = self.start.0[p] + earlier(&|g| g.2 == Some(p));
            lower_over |= lower + need > max;
            upper_over |= self.projects[p] + need > max;
        }
        if let Some(max) = q.principal_max(&w.principal) {
            let at = |m: &HashMap<String, u32>| m.get(&w.principal).copied().unwrap_or(0);
            let lower = at(&self.start.1) + earlier(&|g| g.1 == w.principal);
            lower_over |= lower + need > max;
            upper_over |= at(&self.principals) + need > max;
        }
        if lower_over {
            Quota::HeldBack
        } else if !upper_over {
            Quota::Free
        } else {
            Quota::Unknown
        }
    }
}

/// Replays `events` over the hosts `hosts` (name, flags); panics on any
/// violation. `events` must start at the first event of the log, or after
/// pruned events.
pub fn check_history(events: &[pb::Event], hosts: &[(String, Vec<String>)]) -> History {
    check_history_with(events, hosts, None)
}

/// [`check_history`], and with `quotas` the rules of projects and quotas
/// (see the module docs); `events` must then start at the log's first
/// event (`seq` 1), so that every active lease is counted.
pub fn check_history_with(
    events: &[pb::Event],
    hosts: &[(String, Vec<String>)],
    quotas: Option<&Quotas>,
) -> History {
    use pb::EventKind as K;
    if quotas.is_some()
        && let Some(first) = events.first()
    {
        assert_eq!(
            first.seq, 1,
            "with a policy the log must be whole (from seq 1): {first:?}"
        );
    }
    let flags: HashMap<&str, &[String]> = hosts
        .iter()
        .map(|(h, f)| (h.as_str(), f.as_slice()))
        .collect();
    let could_use = |req: &pb::LeaseRequest, host: &str| {
        let have = flags.get(host).copied().unwrap_or_default();
        req.flags.iter().all(|f| have.contains(f))
            && (req.hosts.is_empty() || req.hosts.iter().any(|h| h == host))
    };
    let project_of = |principal: &str| match quotas {
        Some(q) => q.project(principal),
        None if principal == Principal::health().as_str() => None,
        None => Some(0),
    };
    let project_name = |p: Option<usize>| match (quotas, p) {
        (Some(q), Some(p)) => q.project_name(p).to_owned(),
        (_, None) => "(none)".to_owned(),
        (None, Some(_)) => DEFAULT_PROJECT.to_owned(),
    };
    let mut slots: BTreeMap<String, (Slot, String)> = hosts
        .iter()
        .map(|(h, _)| (h.clone(), (Slot::Free, String::new())))
        .collect();
    // Hosts in maintenance or unreachable: not granted.
    let mut out_of_service: HashSet<String> = HashSet::new();
    // In service order, as far as it is known (see `before`).
    let mut waiting: BTreeMap<Key, Waiting> = BTreeMap::new();
    let mut keys: HashMap<u64, Key> = HashMap::new();
    let mut granted: HashSet<u64> = HashSet::new();
    // Active leases: (granted to a preemptible request, if known; noticed).
    let mut preemptible: HashMap<String, (Option<bool>, bool)> = HashMap::new();
    let whole = events.first().is_some_and(|e| e.seq == 1);
    // Bookings made and not over: hosts, and whether the window began.
    let mut bookings: HashMap<u64, (Vec<String>, bool)> = HashMap::new();
    // Hosts with such a booking: usable by an earlier waiter or not,
    // depending on its TTL.
    let pending = |bookings: &HashMap<u64, (Vec<String>, bool)>, host: &str| {
        bookings
            .values()
            .any(|(hs, _)| hs.iter().any(|h| h == host))
    };
    let mut book = Book {
        projects: vec![0; quotas.map_or(1, |q| q.policy.projects().len())],
        ..Book::default()
    };
    let mut h = History::default();
    let mut last_seq = events.first().map_or(0, |e| e.seq.saturating_sub(1));
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, last_seq + 1, "event log has a gap before {e:?}");
        last_seq = e.seq;
        h.events += 1;
        let kind = K::try_from(e.kind).unwrap();
        // A pass writes grants, health checks started, and the request of
        // a `no_wait` waiter just before its grant; anything else comes
        // between passes.
        let in_pass = match kind {
            K::LeaseGranted | K::HealthCheckStarted => true,
            K::LeaseRequested => events
                .get(i + 1)
                .is_some_and(|n| n.kind == K::LeaseGranted as i32 && n.waiter_id == e.waiter_id),
            _ => false,
        };
        if !in_pass {
            book.end_run();
        }
        match kind {
            K::LeaseRequested => {
                h.requests += 1;
                let req = e.request.clone().expect("request recorded");
                let project = project_of(&e.actor);
                let preemptible = req.preemptible || e.detail == "preemptible";
                let booking = (e.booking_id != 0).then_some(e.booking_id);
                let level = if booking.is_some() {
                    (false, false, 0)
                } else {
                    (project.is_some(), preemptible, -req.priority)
                };
                if let Some(b) = booking {
                    let (hs, started) = bookings
                        .get(&b)
                        .unwrap_or_else(|| panic!("a request of a booking not started: {e:?}"));
                    assert!(*started, "a request of a booking not started: {e:?}");
                    let mut asked = req.hosts.clone();
                    asked.sort();
                    assert_eq!(&asked, hs, "a booking's request for other hosts: {e:?}");
                }
                let key = (level, e.waiter_id);
                assert!(
                    keys.insert(e.waiter_id, key).is_none() && !granted.contains(&e.waiter_id),
                    "waiter {} requested twice: {e:?}",
                    e.waiter_id
                );
                waiting.insert(
                    key,
                    Waiting {
                        priority: req.priority,
                        req,
                        preemptible,
                        unsure: in_pass && !preemptible,
                        detached: false,
                        principal: e.actor.clone(),
                        project,
                        booking,
                    },
                );
            }
            K::RequestWithdrawn => {
                h.withdrawals += 1;
                let key = keys
                    .remove(&e.waiter_id)
                    .unwrap_or_else(|| panic!("withdrawn waiter was not waiting: {e:?}"));
                waiting.remove(&key);
            }
            K::LeaseGranted => {
                h.grants += 1;
                assert!(
                    granted.insert(e.waiter_id),
                    "waiter {} granted twice: {e:?}",
                    e.waiter_id
                );
                let key = keys
                    .remove(&e.waiter_id)
                    .unwrap_or_else(|| panic!("grant to a waiter that was not waiting: {e:?}"));
                let me = waiting.remove(&key).unwrap();
                let need_me = me.req.count.max(1) as usize;
                assert_eq!(e.hosts.len(), need_me, "wrong host count: {e:?}");
                book.start_run();
                let free = |host: &str| {
                    slots.get(host).is_some_and(|s| s.0 == Slot::Free)
                        && !out_of_service.contains(host)
                };
                // Whether `w` could have used `host` now: a booking ahead of
                // it may have kept it from `w` (TTL), a running one does.
                let may_use = |w: &Waiting, host: &str| {
                    could_use(&w.req, host) && (w.booking.is_some() || !pending(&bookings, host))
                };
                // Running bookings: their hosts go to their own request only.
                for host in &e.hosts {
                    if let Some((b, _)) = bookings
                        .iter()
                        .find(|(_, (hs, started))| *started && hs.contains(host))
                    {
                        assert_eq!(
                            me.booking,
                            Some(*b),
                            "{host} granted during booking {b} to a request that is not the booking's: {e:?}"
                        );
                    }
                }
                if me.booking.is_some() {
                    h.booking_grants += 1;
                }
                // The waiters that may come before this grant in its pass,
                // with their quota state at their turn.
                let ahead: Vec<(Key, &Waiting, Quota)> = waiting
                    .iter()
                    .filter(|(k, w)| !before(key, me.project, **k, w.project))
                    .map(|(k, w)| (*k, w, book.quota(quotas, *k, w)))
                    .collect();
                // Is their order known, and their quota state?
                let mut level_project: HashMap<Level, Option<usize>> = HashMap::new();
                let known = ahead.iter().all(|(k, w, q)| {
                    *q != Quota::Unknown
                        && before(*k, w.project, key, me.project)
                        && *level_project.entry(k.0).or_insert(w.project) == w.project
                });
                let mut taken: HashMap<&str, u64> = HashMap::new();
                if known {
                    // The scheduling pass, replayed: earlier waiters in
                    // order over the hosts free now (in inventory order).
                    for (k, other, q) in &ahead {
                        if *q == Quota::HeldBack {
                            h.held_back += 1;
                            continue;
                        }
                        h.order_checks += 1;
                        let usable: Vec<&str> = hosts
                            .iter()
                            .map(|(host, _)| host.as_str())
                            .filter(|host| {
                                free(host) && !taken.contains_key(host) && may_use(other, host)
                            })
                            .collect();
                        let need = other.req.count.max(1) as usize;
                        if usable.len() >= need {
                            assert!(
                                other.detached,
                                "earlier waiter {} (priority {}) could have been granted {:?} when waiter {} (priority {}) was: {e:?}",
                                k.1,
                                other.priority,
                                &usable[..need],
                                e.waiter_id,
                                me.priority
                            );
                            taken.extend(usable[..need].iter().map(|host| (*host, k.1)));
                        } else {
                            taken.extend(usable.iter().map(|host| (*host, k.1)));
                        }
                    }
                } else {
                    // Fair share may have put waiters of other projects
                    // first: check what holds in any order.
                    h.fair_share_grants += 1;
                    for (k, other, q) in &ahead {
                        if *q == Quota::HeldBack {
                            h.held_back += 1;
                        }
                        if *q != Quota::Free
                            || other.detached
                            || !before(*k, other.project, key, me.project)
                        {
                            continue;
                        }
                        h.order_checks += 1;
                        // It took every host it could use that was left at
                        // its turn, and this grant's were left at its turn.
                        for host in &e.hosts {
                            assert!(
                                !may_use(other, host),
                                "waiter {} (priority {}, project {}) was granted {host}, which earlier waiter {} (priority {}, same project or lower priority) could use and waits for: {e:?}",
                                e.waiter_id,
                                me.priority,
                                project_name(me.project),
                                k.1,
                                other.priority
                            );
                        }
                        // It was not granted: fewer than it needs were left
                        // at its turn. Only waiters possibly before it can
                        // have reserved free hosts (held back: none).
                        let need = other.req.count.max(1) as usize;
                        let usable = |host: &&str| free(host) && may_use(other, host);
                        if hosts.iter().map(|(n, _)| n.as_str()).filter(usable).count() < need {
                            continue;
                        }
                        let reservable = |host: &str| {
                            ahead.iter().any(|(k2, w2, q2)| {
                                *k2 != *k
                                    && *q2 != Quota::HeldBack
                                    && !before(*k, other.project, *k2, w2.project)
                                    && may_use(w2, host)
                            })
                        };
                        let left: Vec<&str> = hosts
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .filter(|n| usable(n) && !reservable(n))
                            .collect();
                        assert!(
                            left.len() < need,
                            "earlier waiter {} (priority {}, project {}) could have been granted {:?} (hosts no waiter before it could use) when waiter {} (priority {}) was: {e:?}",
                            k.1,
                            other.priority,
                            project_name(other.project),
                            &left[..need],
                            e.waiter_id,
                            me.priority
                        );
                    }
                }
                for host in &e.hosts {
                    assert!(
                        could_use(&me.req, host),
                        "granted a host the request cannot use: {e:?}"
                    );
                    if let Some(w) = taken.get(host.as_str()) {
                        panic!(
                            "waiter {} (priority {}) was granted {host}, which is held for earlier waiter {w}: {e:?}",
                            e.waiter_id, me.priority
                        );
                    }
                    let slot = slots
                        .get_mut(host)
                        .unwrap_or_else(|| panic!("unknown host {host}: {e:?}"));
                    assert_eq!(
                        slot.0,
                        Slot::Free,
                        "host {host} granted while {:?} by {}: {e:?}",
                        slot.0,
                        slot.1
                    );
                    assert!(
                        !out_of_service.contains(host),
                        "host {host} granted while in maintenance or unreachable: {e:?}"
                    );
                    *slot = (Slot::Held, e.lease_id.clone());
                }
                // The quotas, with this grant (a booking's was checked when
                // the booking was made).
                let n = need_me as u32;
                if let (Some(q), Some(p), None) = (quotas, me.project, me.booking) {
                    let held = book.projects[p] + n;
                    if let Some(max) = q.project_max(p) {
                        assert!(
                            held <= max,
                            "project {} holds {held} hosts with this grant, more than its max_hosts {max}: {e:?}",
                            q.project_name(p)
                        );
                        if held == max {
                            h.quota_reached += 1;
                        }
                    }
                    if let Some(max) = q.principal_max(&me.principal) {
                        let held = book.principals.get(&me.principal).copied().unwrap_or(0) + n;
                        assert!(
                            held <= max,
                            "{} holds {held} hosts with this grant, more than its role's max_hosts {max}: {e:?}",
                            me.principal
                        );
                    }
                }
                book.grant(&e.lease_id, key, &me.principal, me.project, n);
                let spot = (me.preemptible || !me.unsure).then_some(me.preemptible);
                preemptible.insert(e.lease_id.clone(), (spot, false));
            }
            K::InventoryLoaded if e.actor == "server" => {
                for w in waiting.values_mut() {
                    w.detached = true;
                }
            }
            K::HostMaintenanceOn | K::HostUnreachable => {
                out_of_service.extend(e.hosts.iter().cloned());
            }
            K::HostMaintenanceOff | K::HostReachable => {
                for host in &e.hosts {
                    out_of_service.remove(host);
                }
            }
            K::LeaseReleased | K::LeaseExpired => {
                for host in &e.hosts {
                    let slot = slots.get_mut(host).unwrap();
                    assert_eq!(
                        *slot,
                        (Slot::Held, e.lease_id.clone()),
                        "host {host} ended a lease it did not hold: {e:?}"
                    );
                    slot.0 = Slot::Reclaiming;
                }
                book.end(&e.lease_id);
                preemptible.remove(&e.lease_id);
            }
            K::LeasePreempted => {
                h.preemptions += 1;
                match preemptible.get_mut(&e.lease_id) {
                    Some((Some(false), _)) => {
                        panic!("a lease that is not preemptible preempted: {e:?}")
                    }
                    Some((_, noticed)) => {
                        assert!(!*noticed, "lease preempted twice: {e:?}");
                        *noticed = true;
                    }
                    None => assert!(!whole, "a lease that is not active preempted: {e:?}"),
                }
                // For a waiting request that is not preemptible and could
                // use one of its hosts.
                let w = keys
                    .get(&e.waiter_id)
                    .and_then(|k| waiting.get(k))
                    .unwrap_or_else(|| panic!("preempted for a waiter that is not waiting: {e:?}"));
                assert!(
                    !w.preemptible && e.hosts.iter().any(|host| could_use(&w.req, host)),
                    "preempted for a waiter that is preemptible or can use none of its hosts: {e:?}"
                );
            }
            K::BookingCreated => {
                let mut hs = e.hosts.clone();
                hs.sort();
                assert!(
                    bookings.insert(e.booking_id, (hs, false)).is_none(),
                    "booking made twice: {e:?}"
                );
            }
            K::BookingStarted => {
                let (hs, started) = bookings
                    .get_mut(&e.booking_id)
                    .unwrap_or_else(|| panic!("a booking started that was not made: {e:?}"));
                assert!(!*started, "booking started twice: {e:?}");
                *started = true;
                h.bookings_started += 1;
                for host in hs.iter() {
                    let slot = &slots[host];
                    assert!(
                        slot.0 != Slot::Held,
                        "booking {} started while {} held {host} (a lease across its start): {e:?}",
                        e.booking_id,
                        slot.1
                    );
                }
            }
            K::BookingEnded | K::BookingCancelled => {
                bookings.remove(&e.booking_id);
            }
            K::LeaseRenewed => {
                assert!(
                    !preemptible.get(&e.lease_id).is_some_and(|p| p.1),
                    "lease renewed after its preemption notice: {e:?}"
                );
            }
            K::HostAvailable => {
                for host in &e.hosts {
                    let slot = slots.get_mut(host).unwrap();
                    assert_eq!(
                        slot.0,
                        Slot::Reclaiming,
                        "host {host} available without reclaim: {e:?}"
                    );
                    *slot = (Slot::Free, String::new());
                }
            }
            _ => {}
        }
    }
    assert!(
        waiting.is_empty(),
        "requests neither granted nor withdrawn: {:?}",
        waiting.keys().map(|k| k.1).collect::<Vec<_>>()
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(
        seq: u64,
        kind: pb::EventKind,
        hosts: &[&str],
        lease: &str,
        waiter: u64,
        req: Option<pb::LeaseRequest>,
    ) -> pb::Event {
        pb::Event {
            seq,
            kind: kind as i32,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            lease_id: lease.into(),
            waiter_id: waiter,
            request: req,
            ..Default::default()
        }
    }

    fn one() -> Option<pb::LeaseRequest> {
        Some(pb::LeaseRequest {
            count: 1,
            ..Default::default()
        })
    }

    /// Bookings: a host is granted during a running booking only to the
    /// booking's request, and no lease holds a booked host at its start.
    #[test]
    fn bookings_are_kept() {
        use pb::EventKind as K;
        let hosts = inventory_hosts(2);
        let booked = |mut e: pb::Event, b: u64| {
            e.booking_id = b;
            e
        };
        let pinned = || {
            Some(pb::LeaseRequest {
                count: 1,
                hosts: vec!["h00".into()],
                ..Default::default()
            })
        };
        let run = |events: Vec<pb::Event>| {
            std::panic::catch_unwind(|| check_history(&events, &hosts))
                .map_err(|p| p.downcast_ref::<String>().cloned().unwrap_or_default())
        };
        let fine = vec![
            booked(ev(1, K::BookingCreated, &["h00"], "", 0, None), 1),
            ev(2, K::LeaseRequested, &[], "", 2, one()),
            ev(3, K::LeaseGranted, &["h01"], "a", 2, None),
            booked(ev(4, K::BookingStarted, &["h00"], "", 0, None), 1),
            booked(ev(5, K::LeaseRequested, &[], "", 5, pinned()), 1),
            ev(6, K::LeaseGranted, &["h00"], "b", 5, None),
            booked(ev(7, K::BookingEnded, &["h00"], "", 0, None), 1),
        ];
        let h = run(fine.clone()).expect("a kept booking passes");
        assert_eq!((h.bookings_started, h.booking_grants), (1, 1));
        // Someone else granted h00 during the window.
        let mut other = fine.clone();
        other[5] = ev(6, K::LeaseRequested, &[], "", 6, pinned());
        other.insert(6, ev(7, K::LeaseGranted, &["h00"], "c", 6, None));
        other.insert(7, ev(8, K::RequestWithdrawn, &[], "", 5, None));
        other[8] = booked(ev(9, K::BookingEnded, &["h00"], "", 0, None), 1);
        let msg = run(other).unwrap_err();
        assert!(msg.contains("during booking 1"), "{msg}");
        // A lease held h00 across the booking's start.
        let mut across = fine.clone();
        across[2] = ev(3, K::LeaseGranted, &["h00"], "a", 2, None);
        let msg = run(across).unwrap_err();
        assert!(msg.contains("started while a held h00"), "{msg}");
        // A booking's request for other hosts.
        let mut wrong = fine;
        wrong[4].request = one().map(|r| pb::LeaseRequest {
            hosts: vec!["h01".into()],
            ..r
        });
        let msg = run(wrong).unwrap_err();
        assert!(msg.contains("for other hosts"), "{msg}");
    }

    /// The checker itself must catch violations (a checker that cannot
    /// fail proves nothing).
    #[test]
    fn catches_double_grants_queue_jumping_and_regrants() {
        use pb::EventKind as K;
        let hosts = inventory_hosts(2);
        let fails = |events: Vec<pb::Event>| {
            let hosts = hosts.clone();
            std::panic::catch_unwind(move || check_history(&events, &hosts)).is_err()
        };
        // Two holders of h01.
        assert!(fails(vec![
            ev(1, K::LeaseRequested, &[], "", 1, one()),
            ev(2, K::LeaseGranted, &["h01"], "a", 1, None),
            ev(3, K::LeaseRequested, &[], "", 3, one()),
            ev(4, K::LeaseGranted, &["h01"], "b", 3, None),
        ]));
        // A later waiter granted a host while an earlier one waits for two.
        assert!(fails(vec![
            ev(
                1,
                K::LeaseRequested,
                &[],
                "",
                1,
                Some(pb::LeaseRequest {
                    count: 2,
                    ..Default::default()
                }),
            ),
            ev(2, K::LeaseRequested, &[], "", 2, one()),
            ev(3, K::LeaseGranted, &["h01"], "b", 2, None),
            ev(4, K::RequestWithdrawn, &[], "", 1, None),
        ]));
        // One waiter granted twice.
        assert!(fails(vec![
            ev(1, K::LeaseRequested, &[], "", 1, one()),
            ev(2, K::LeaseGranted, &["h01"], "a", 1, None),
            ev(3, K::LeaseGranted, &["h00"], "b", 1, None),
        ]));
        // A request left waiting, and a gap.
        assert!(fails(vec![ev(1, K::LeaseRequested, &[], "", 1, one())]));
        assert!(fails(vec![
            ev(1, K::HostAdded, &["h00"], "", 0, None),
            ev(3, K::HostAdded, &["h01"], "", 0, None),
        ]));
        // A later waiter granted a host held for an earlier one that waits
        // for both: refused even for a request that lived through a restart.
        let pair = || {
            Some(pb::LeaseRequest {
                count: 2,
                ..Default::default()
            })
        };
        let held_for_pair = |restart: bool| {
            let mut v = vec![
                ev(1, K::LeaseRequested, &[], "", 1, one()),
                ev(2, K::LeaseGranted, &["h00"], "z", 1, None),
                ev(3, K::LeaseRequested, &[], "", 3, pair()),
                ev(4, K::LeaseRequested, &[], "", 4, one()),
            ];
            if restart {
                v.push(ev(5, K::InventoryLoaded, &[], "", 0, None));
            } else {
                v.push(ev(5, K::HostAdded, &[], "", 0, None));
            }
            v.extend([
                ev(6, K::LeaseGranted, &["h01"], "y", 4, None),
                ev(7, K::RequestWithdrawn, &[], "", 3, None),
            ]);
            for e in &mut v {
                e.actor = "server".into();
            }
            v
        };
        assert!(fails(held_for_pair(false)));
        assert!(fails(held_for_pair(true)));
        // An earlier request that could be granted and is not: a violation,
        // unless it was waiting at a restart (its client may be away: it
        // keeps the hosts it would get, the others go to later requests).
        let detached = |restart: bool| {
            let three = inventory_hosts(3);
            let mut v = vec![
                ev(1, K::LeaseRequested, &[], "", 1, one()),
                ev(2, K::LeaseRequested, &[], "", 2, one()),
            ];
            v.push(ev(
                3,
                if restart {
                    K::InventoryLoaded
                } else {
                    K::HostAdded
                },
                &[],
                "",
                0,
                None,
            ));
            v.extend([
                ev(4, K::LeaseGranted, &["h01"], "b", 2, None),
                // h00 was held for waiter 1; h01 was free for 2.
                ev(5, K::LeaseGranted, &["h00"], "a", 1, None),
            ]);
            for e in &mut v {
                e.actor = "server".into();
            }
            std::panic::catch_unwind(move || check_history(&v, &three)).is_err()
        };
        assert!(detached(false));
        assert!(!detached(true));
        // Backfill with a host the earlier waiter cannot use is fine, and a
        // log may start after pruned events.
        let fine = vec![
            ev(3, K::LeaseRequested, &[], "", 3, one()),
            ev(4, K::LeaseGranted, &["h00"], "z", 3, None),
            ev(
                5,
                K::LeaseRequested,
                &[],
                "",
                5,
                Some(pb::LeaseRequest {
                    count: 1,
                    flags: vec!["iommu".into()],
                    ..Default::default()
                }),
            ),
            ev(6, K::LeaseRequested, &[], "", 6, one()),
            ev(7, K::LeaseGranted, &["h01"], "b", 6, None),
            ev(8, K::LeaseReleased, &["h00"], "z", 0, None),
            ev(9, K::HostAvailable, &["h00"], "z", 0, None),
            ev(10, K::LeaseGranted, &["h00"], "a", 5, None),
        ];
        let h = check_history(&fine, &hosts);
        assert_eq!((h.requests, h.grants, h.order_checks), (3, 3, 1));
    }

    const POLICY: &str = r#"
[role.developer]
max_hosts = 1

[[project]]
name = "ci"
share = 3
members = ["ci-a", "ci-b"]
max_hosts = 1

[[project]]
name = "people"
members = ["alice", "bob"]
"#;

    fn quotas() -> Quotas {
        Quotas::parse(POLICY, Some(Role::Operator))
            .unwrap()
            .with_role("bob", Role::Developer)
    }

    /// `events` numbered from 1, each by its principal.
    fn log(v: Vec<(&str, pb::Event)>) -> Vec<pb::Event> {
        v.into_iter()
            .enumerate()
            .map(|(i, (actor, mut e))| {
                e.seq = i as u64 + 1;
                e.actor = actor.into();
                e
            })
            .collect()
    }

    /// `events` numbered again from 1.
    fn renumber(v: Vec<pb::Event>) -> Vec<pb::Event> {
        v.into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e.seq = i as u64 + 1;
                e
            })
            .collect()
    }

    fn req(count: u32, priority: i32, hosts: &[&str], flags: &[&str]) -> Option<pb::LeaseRequest> {
        Some(pb::LeaseRequest {
            count,
            priority,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })
    }

    /// The panic message of a check, if it failed.
    fn failure(events: &[pb::Event], quotas: Option<&Quotas>) -> Option<String> {
        let hosts = inventory_hosts(3);
        let events = events.to_vec();
        let quotas = quotas.cloned();
        std::panic::catch_unwind(move || check_history_with(&events, &hosts, quotas.as_ref()))
            .err()
            .map(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            })
    }

    /// With a policy: quotas (a project's, a role's) are checked, a waiter
    /// held back by its quota reserves nothing, the order between projects
    /// of equal priority is left to fair share, and within a project, or
    /// across priorities, the order and the reservation rule still hold.
    #[test]
    fn checks_quotas_and_the_order_under_fair_share() {
        use pb::EventKind as K;
        let q = quotas();
        let q = Some(&q);
        let any = || req(1, 0, &[], &[]);
        // Project ci (max_hosts 1) granted a second host: the message
        // names the event.
        let over = log(vec![
            ("ci-a", ev(0, K::LeaseRequested, &[], "", 1, any())),
            ("ci-a", ev(0, K::LeaseGranted, &["h00"], "a", 1, None)),
            ("ci-b", ev(0, K::LeaseRequested, &[], "", 3, any())),
            ("ci-b", ev(0, K::LeaseGranted, &["h01"], "b", 3, None)),
        ]);
        let msg = failure(&over, q).expect("a quota broken");
        assert!(
            msg.contains("project ci holds 2 hosts with this grant, more than its max_hosts 1")
                && msg.contains("seq: 4"),
            "{msg}"
        );
        // Without the policy the same log is fine.
        assert_eq!(failure(&over, None), None);
        // Released first: fine, and the quota was reached twice.
        let mut fine = over.clone();
        fine.insert(2, ev(0, K::LeaseReleased, &["h00"], "a", 0, None));
        fine.insert(3, ev(0, K::HostAvailable, &["h00"], "a", 0, None));
        let h = check_history_with(&renumber(fine), &inventory_hosts(3), q);
        assert_eq!((h.grants, h.quota_reached), (2, 2));

        // A role's limit: bob (developer, 1 host) granted a second one.
        let role = log(vec![
            ("bob", ev(0, K::LeaseRequested, &[], "", 1, any())),
            ("bob", ev(0, K::LeaseGranted, &["h00"], "a", 1, None)),
            ("bob", ev(0, K::LeaseRequested, &[], "", 3, any())),
            ("bob", ev(0, K::LeaseGranted, &["h01"], "b", 3, None)),
        ]);
        let msg = failure(&role, q).expect("a role limit broken");
        assert!(
            msg.contains("bob holds 2 hosts") && msg.contains("seq: 4"),
            "{msg}"
        );

        // ci-b, at a higher priority, is held back by its project's quota:
        // it reserves nothing and alice gets h01. Without the policy that
        // is queue-jumping.
        let held_back = log(vec![
            ("ci-a", ev(0, K::LeaseRequested, &[], "", 1, any())),
            ("ci-a", ev(0, K::LeaseGranted, &["h00"], "a", 1, None)),
            (
                "ci-b",
                ev(0, K::LeaseRequested, &[], "", 3, req(1, 5, &[], &[])),
            ),
            ("alice", ev(0, K::LeaseRequested, &[], "", 4, any())),
            ("alice", ev(0, K::LeaseGranted, &["h01"], "b", 4, None)),
            ("ci-a", ev(0, K::LeaseReleased, &["h00"], "a", 0, None)),
            ("ci-a", ev(0, K::HostAvailable, &["h00"], "a", 0, None)),
            ("ci-b", ev(0, K::LeaseGranted, &["h00"], "c", 3, None)),
        ]);
        let h = check_history_with(&held_back, &inventory_hosts(3), q);
        assert_eq!((h.grants, h.held_back, h.fair_share_grants), (3, 1, 0));
        let msg = failure(&held_back, None).expect("queue-jumping without quotas");
        assert!(msg.contains("earlier waiter 3 (priority 5)"), "{msg}");
        // Not held back (ci holds nothing): then it is queue-jumping with
        // the policy too, priority first across projects.
        let jump = renumber(held_back[2..5].to_vec());
        let msg = failure(&jump, q).expect("priority first");
        assert!(
            msg.contains("earlier waiter 3 (priority 5)") && msg.contains("seq: 3"),
            "{msg}"
        );

        // Fair share: ci-a (share 3) granted the only free host before
        // alice, who asked first at the same priority: not a violation
        // with the policy; first come first served says it is.
        let fair = log(vec![
            (
                "bob",
                ev(0, K::LeaseRequested, &[], "", 1, req(1, 0, &["h00"], &[])),
            ),
            ("bob", ev(0, K::LeaseGranted, &["h00"], "z", 1, None)),
            (
                "ci-b",
                ev(0, K::LeaseRequested, &[], "", 3, req(1, 0, &["h02"], &[])),
            ),
            ("ci-b", ev(0, K::LeaseGranted, &["h02"], "y", 3, None)),
            // (ci may hold one host: ci-b's lease ends.)
            ("ci-b", ev(0, K::LeaseReleased, &["h02"], "y", 0, None)),
            ("alice", ev(0, K::LeaseRequested, &[], "", 6, any())),
            ("ci-a", ev(0, K::LeaseRequested, &[], "", 7, any())),
            ("ci-a", ev(0, K::LeaseGranted, &["h01"], "x", 7, None)),
            ("alice", ev(0, K::RequestWithdrawn, &[], "", 6, None)),
        ]);
        let h = check_history_with(&fair, &inventory_hosts(3), q);
        assert_eq!(h.fair_share_grants, 1);
        let msg = failure(&fair, None).expect("first come first served");
        assert!(msg.contains("earlier waiter 6 (priority 0)"), "{msg}");

        // Within one project the order still holds, another project's
        // waiter notwithstanding: bob granted h01 while alice, before him,
        // waits for any host.
        let within = log(vec![
            ("alice", ev(0, K::LeaseRequested, &[], "", 1, any())),
            (
                "ci-a",
                ev(0, K::LeaseRequested, &[], "", 2, req(1, 0, &["h02"], &[])),
            ),
            ("bob", ev(0, K::LeaseRequested, &[], "", 3, any())),
            ("bob", ev(0, K::LeaseGranted, &["h01"], "b", 3, None)),
        ]);
        let msg = failure(&within, q).expect("order within a project");
        assert!(
            msg.contains("earlier waiter 1 (priority 0") && msg.contains("seq: 4"),
            "{msg}"
        );
        // And the reservation rule: alice waits for h00 (iommu), free and
        // usable by no waiter that may come before her; bob's grant of a
        // host she cannot use shows she was passed over.
        let passed_over = |other: &str, r: Option<pb::LeaseRequest>| {
            log(vec![
                (
                    "alice",
                    ev(0, K::LeaseRequested, &[], "", 1, req(1, 0, &[], &["iommu"])),
                ),
                (other, ev(0, K::LeaseRequested, &[], "", 2, r)),
                (
                    "bob",
                    ev(0, K::LeaseRequested, &[], "", 3, req(1, 0, &["h01"], &[])),
                ),
                ("bob", ev(0, K::LeaseGranted, &["h01"], "b", 3, None)),
                ("alice", ev(0, K::RequestWithdrawn, &[], "", 1, None)),
                (other, ev(0, K::RequestWithdrawn, &[], "", 2, None)),
            ])
        };
        let msg = failure(&passed_over("ci-a", req(1, 0, &["h02"], &[])), q)
            .expect("reservation within a project");
        assert!(
            msg.contains("could have been granted [\"h00\"]") && msg.contains("seq: 4"),
            "{msg}"
        );
        // Had a waiter of another project been able to use h00 (dave, of
        // `default`, waiting for two iommu hosts), it might have come first
        // and reserved it: no violation can be shown. Not so for one that
        // its quota holds back (ci-a asking for 2 of ci's 1): it reserves
        // nothing.
        let two_iommu = || req(2, 0, &[], &["iommu"]);
        assert_eq!(failure(&passed_over("dave", two_iommu()), q), None);
        let msg = failure(&passed_over("ci-a", two_iommu()), q).expect("held back");
        assert!(msg.contains("could have been granted [\"h00\"]"), "{msg}");

        // Preemption: a preemptible lease noticed for a waiting request that
        // can use its host, and not renewed since, is fine; a lease that is
        // not preemptible, a notice for nobody who could use the host, or a
        // renewal after the notice is not.
        // (The server says a request is preemptible in its event's detail;
        // dave's request waits a moment, so that it is known not to be a
        // `no_wait` one, whose event would not say.)
        let preempted = |spot: bool, for_: &[&str], renew: bool| {
            let mut first = ev(0, K::LeaseRequested, &[], "", 1, req(1, 0, &["h00"], &[]));
            if spot {
                first.detail = "preemptible".into();
            }
            let mut v = vec![
                ("dave", first),
                ("server", ev(0, K::HostAdded, &[], "", 0, None)),
                ("dave", ev(0, K::LeaseGranted, &["h00"], "p", 1, None)),
                (
                    "alice",
                    ev(0, K::LeaseRequested, &[], "", 4, req(1, 0, for_, &[])),
                ),
                ("server", ev(0, K::LeasePreempted, &["h00"], "p", 4, None)),
            ];
            if renew {
                v.push(("dave", ev(0, K::LeaseRenewed, &[], "p", 0, None)));
            }
            v.extend([
                ("server", ev(0, K::LeaseExpired, &["h00"], "p", 0, None)),
                ("server", ev(0, K::HostAvailable, &["h00"], "p", 0, None)),
                ("alice", ev(0, K::LeaseGranted, &["h00"], "a", 4, None)),
            ]);
            log(v)
        };
        // A preemptible request comes after every other, whatever its
        // priority.
        let last = |spot: bool| {
            let mut first = ev(0, K::LeaseRequested, &[], "", 1, req(1, 5, &[], &[]));
            if spot {
                first.detail = "preemptible".into();
            }
            log(vec![
                ("dave", first),
                ("alice", ev(0, K::LeaseRequested, &[], "", 2, any())),
                ("alice", ev(0, K::LeaseGranted, &["h00"], "a", 2, None)),
                ("dave", ev(0, K::RequestWithdrawn, &[], "", 1, None)),
            ])
        };
        assert_eq!(failure(&last(true), None), None);
        let msg = failure(&last(false), None).expect("priority 5 first");
        assert!(msg.contains("earlier waiter 1 (priority 5)"), "{msg}");
        let h = check_history_with(&preempted(true, &["h00"], false), &inventory_hosts(3), q);
        assert_eq!((h.grants, h.preemptions), (2, 1));
        for (spot, for_, renew, says) in [
            (false, &["h00"][..], false, "not preemptible"),
            (true, &["h01"][..], false, "can use none of its hosts"),
            (
                true,
                &["h00"][..],
                true,
                "renewed after its preemption notice",
            ),
        ] {
            let msg = failure(&preempted(spot, for_, renew), None).expect(says);
            assert!(msg.contains(says) && msg.contains("seq: "), "{msg}");
        }
    }
}
