//! The wait queue and the grant rule, as pure functions.
//!
//! **Order.** The server's health checks first (each names one host, and
//! may take it even when it is quarantined), then waiters by priority
//! (higher first), then arrival (earlier first); preemptible requests after
//! every other (they use what nobody else waits for). With projects,
//! arrival within a priority gives way to fair share (`FairOrder`).
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
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
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
    /// The shortest TTL the requester accepts when a booking ahead leaves
    /// less than `ttl` (`None`: only `ttl`; see `lease::booking`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ttl: Option<Duration>,
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
    /// What bookings leave of it now.
    pub window: Window,
}

/// What bookings (`lease::booking`) leave of a host at a scheduling pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Window {
    /// No booking ahead.
    #[default]
    Open,
    /// Free for this long, until a booking starts.
    Left(Duration),
    /// A booking's window runs: only its own request may have it.
    Booked(super::booking::BookingId),
}

impl LeaseSpec {
    /// Could this request ever use that host?
    pub fn matches(&self, c: &Candidate<'_>) -> bool {
        !c.gone && self.fits(c.name, c.arch, c.flags)
    }

    /// Could it use the host `name` of `arch` with `flags`?
    pub fn fits(&self, name: &HostName, arch: Arch, flags: &BTreeSet<Flag>) -> bool {
        self.arch.is_none_or(|a| a == arch)
            && self.flags.is_subset(flags)
            && (self.hosts.is_empty() || self.hosts.contains(name))
    }

    /// Can the inventory ever satisfy this request (ignoring who holds what)?
    pub fn satisfiable(&self, candidates: &[Candidate<'_>]) -> bool {
        candidates.iter().filter(|c| self.matches(c)).count() >= self.count as usize
    }

    /// The shortest lease the requester accepts.
    pub fn shortest(&self) -> Duration {
        self.min_ttl.map_or(self.ttl, |m| m.min(self.ttl))
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
    /// Asked for with `preemptible`: served after every request that is
    /// not, and its lease may be preempted for one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preemptible: bool,
    /// The request of a booking whose window began: served first, and the
    /// only one granted the booked hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booking: Option<super::booking::BookingId>,
}

impl Waiter {
    fn may_take(&self, c: &Candidate<'_>) -> bool {
        let free = if self.check.is_some() {
            c.checkable
        } else {
            c.grantable
        };
        free && self.allows(c.window)
    }

    /// Whether bookings let it have a host with this window now.
    pub fn allows(&self, window: Window) -> bool {
        match window {
            Window::Open => self.booking.is_none(),
            Window::Left(left) => self.booking.is_none() && left >= self.spec.shortest(),
            Window::Booked(b) => self.booking == Some(b),
        }
    }

    /// Its whole TTL fits on the host before a booking.
    fn fits_fully(&self, c: &Candidate<'_>) -> bool {
        match c.window {
            Window::Left(left) => left >= self.spec.ttl,
            Window::Open | Window::Booked(_) => true,
        }
    }
}

/// Health checks and bookings first, preemptible requests last, then by
/// priority, then by arrival.
type QueueKey = (bool, bool, Reverse<i32>, WaiterId);

fn key(w: &Waiter) -> QueueKey {
    (
        w.check.is_none() && w.booking.is_none(),
        w.preemptible,
        Reverse(w.spec.priority),
        w.id,
    )
}

fn level(k: &QueueKey) -> Level {
    (k.0, k.1, k.2)
}

/// The queue: waiters in service order.
#[derive(Debug, Default)]
pub struct Queue {
    waiters: BTreeMap<QueueKey, Waiter>,
    keys: BTreeMap<WaiterId, QueueKey>,
    /// Waiter ids by level and project (its index in [`Projects::loads`],
    /// [`NO_PROJECT`] for none), in arrival order: the fair order visits
    /// each project's head instead of the whole level.
    groups: BTreeMap<(Level, usize), BTreeSet<WaiterId>>,
    tags: std::collections::HashMap<WaiterId, usize>,
    /// Hosts asked for by every waiter together.
    asked: usize,
}

/// The project tag of waiters in no project (health checks, or a queue
/// used without projects).
pub const NO_PROJECT: usize = usize::MAX;

/// The part of the key that makes a level of the fair order: check or
/// not, preemptible or not, priority.
type Level = (bool, bool, Reverse<i32>);

impl Queue {
    /// Adds a waiter of no project.
    pub fn push(&mut self, w: Waiter) {
        self.push_in(w, None);
    }

    /// Adds a waiter of `project` (its index in the [`Projects`] the
    /// scheduling passes will get; the same as its [`Standing::project`]).
    pub fn push_in(&mut self, w: Waiter, project: Option<usize>) {
        let key = key(&w);
        let tag = project.unwrap_or(NO_PROJECT);
        self.keys.insert(w.id, key);
        self.tags.insert(w.id, tag);
        self.groups
            .entry((level(&key), tag))
            .or_default()
            .insert(w.id);
        self.asked += w.spec.count as usize;
        self.waiters.insert(key, w);
    }

    pub fn remove(&mut self, id: WaiterId) -> Option<Waiter> {
        let key = self.keys.remove(&id)?;
        if let Some(tag) = self.tags.remove(&id)
            && let std::collections::btree_map::Entry::Occupied(mut g) =
                self.groups.entry((level(&key), tag))
        {
            g.get_mut().remove(&id);
            if g.get().is_empty() {
                g.remove();
            }
        }
        let w = self.waiters.remove(&key)?;
        self.asked -= w.spec.count as usize;
        Some(w)
    }

    /// Hosts asked for by every waiter together.
    pub fn asked(&self) -> usize {
        self.asked
    }

    /// Tags every waiter with its project again (a new policy).
    pub fn retag(&mut self, project: impl Fn(&Waiter) -> Option<usize>) {
        self.groups.clear();
        self.tags.clear();
        for (key, w) in &self.waiters {
            let tag = project(w).unwrap_or(NO_PROJECT);
            self.tags.insert(w.id, tag);
            self.groups
                .entry((level(key), tag))
                .or_default()
                .insert(w.id);
        }
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

    /// One scheduling pass without projects: which waiters get which
    /// hosts now (see the module docs for the rule). Does not modify the
    /// queue.
    pub fn schedule(&self, candidates: &[Candidate<'_>]) -> Vec<(WaiterId, Vec<HostName>)> {
        self.schedule_fair(candidates, &Projects::default(), &|_| Standing::default())
    }

    /// One scheduling pass (see the module docs for the rule), in the fair
    /// order of [`Projects`], skipping waiters beyond a quota (they reserve
    /// nothing). Does not modify the queue.
    pub fn schedule_fair(
        &self,
        candidates: &[Candidate<'_>],
        projects: &Projects,
        standing: &dyn Fn(&Waiter) -> Standing,
    ) -> Vec<(WaiterId, Vec<HostName>)> {
        // Hosts still free in this pass, in inventory order.
        let mut avail: BTreeSet<usize> = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.grantable || c.checkable)
            .map(|(i, _)| i)
            .collect();
        let mut grants = Vec::new();
        if avail.is_empty() {
            return grants;
        }
        let mut held = Held::new(projects);
        let mut order = FairOrder::new(self, projects, standing);
        while let Some((w, st)) = order.next() {
            if avail.is_empty() {
                break;
            }
            let project = st.project;
            if held.beyond(projects, w, project, &st).is_some() {
                continue;
            }
            // The first `count` usable hosts, or every usable one; hosts
            // where a booking ahead would shorten the lease only when too
            // few others are free.
            let n = w.spec.count as usize;
            let mut take = Vec::with_capacity(n);
            let mut short = Vec::new();
            for &i in &avail {
                let c = &candidates[i];
                if w.may_take(c) && w.spec.matches(c) {
                    if w.fits_fully(c) {
                        take.push(i);
                        if take.len() == n {
                            break;
                        }
                    } else if short.len() < n {
                        short.push(i);
                    }
                }
            }
            if take.len() < n {
                take.extend(short.into_iter().take(n - take.len()));
            }
            let grant = take.len() >= w.spec.count as usize;
            for i in &take {
                avail.remove(i);
            }
            if grant && !w.detached {
                held.add(w, project, w.spec.count);
                order.granted(project, w.spec.count, w.spec.ttl);
                grants.push((
                    w.id,
                    take.iter().map(|&i| candidates[i].name.clone()).collect(),
                ));
            }
        }
        grants
    }

    /// Position (1-based) and estimated grant time of every waiter, without
    /// projects (see [`Queue::estimate_fair`]).
    pub fn estimate(
        &self,
        candidates: &[Candidate<'_>],
        now: Timestamp,
    ) -> Vec<(WaiterId, u32, Option<Timestamp>)> {
        self.estimate_fair(candidates, now, &Projects::default(), &|_| {
            Standing::default()
        })
        .into_iter()
        .map(|e| (e.waiter, e.position, e.eta))
        .collect()
    }

    /// Position (1-based) in the fair order, estimated grant time, and the
    /// quota that holds a waiter back, of every waiter, assuming each
    /// current lease runs to its expiry and each granted waiter keeps its
    /// hosts for its whole TTL. A waiter held back by a quota gets no
    /// estimate.
    pub fn estimate_fair(
        &self,
        candidates: &[Candidate<'_>],
        now: Timestamp,
        projects: &Projects,
        standing: &dyn Fn(&Waiter) -> Standing,
    ) -> Vec<Estimate> {
        let mut times = FreeTimes::new(candidates, now);
        let held = Held::new(projects);
        let mut order = FairOrder::new(self, projects, standing);
        let mut out = Vec::with_capacity(self.waiters.len());
        while let Some((w, st)) = order.next() {
            let project = st.project;
            let position = u32::try_from(out.len() + 1).unwrap_or(u32::MAX);
            let held_back = held.beyond(projects, w, project, &st);
            let eta = if held_back.is_some() || w.spec.count == 0 {
                None
            } else {
                times.take(candidates, &w.spec)
            };
            // Later grants of its project come after this one's.
            order.granted(project, w.spec.count, w.spec.ttl);
            out.push(Estimate {
                waiter: w.id,
                position,
                eta,
                held_back,
            });
        }
        out
    }
}

/// Hosts alike for every request: their arch, their flags, and a min-heap
/// of their (free time, position).
type Class<'c> = (
    Arch,
    &'c BTreeSet<Flag>,
    BinaryHeap<Reverse<(Timestamp, usize)>>,
);

/// When each host is expected to be free, as an estimate walks the queue:
/// hosts are grouped by what a request can ask of them (arch and flags —
/// a few classes in a real lab, however many hosts), each class a min-heap
/// of (free time, position). A waiter without a host list takes the
/// `count` earliest across the classes it matches, so estimating a queue
/// costs O(waiters × classes), not O(waiters × hosts). Heap entries whose
/// time has since changed are skipped when met (the time in `at` is the
/// truth).
struct FreeTimes<'c> {
    at: Vec<Option<Timestamp>>,
    classes: Vec<Class<'c>>,
    class_of: Vec<usize>,
    by_name: std::collections::HashMap<&'c HostName, usize>,
}

impl<'c> FreeTimes<'c> {
    fn new(candidates: &'c [Candidate<'c>], now: Timestamp) -> Self {
        let mut ft = FreeTimes {
            at: Vec::with_capacity(candidates.len()),
            classes: Vec::new(),
            class_of: Vec::with_capacity(candidates.len()),
            by_name: std::collections::HashMap::with_capacity(candidates.len()),
        };
        let mut index: std::collections::HashMap<(Arch, &BTreeSet<Flag>), usize> =
            std::collections::HashMap::new();
        for (i, c) in candidates.iter().enumerate() {
            let k = *index.entry((c.arch, c.flags)).or_insert_with(|| {
                ft.classes.push((c.arch, c.flags, BinaryHeap::new()));
                ft.classes.len() - 1
            });
            let t = if c.gone {
                None
            } else {
                c.free_at.map(|t| t.max(now))
            };
            if let Some(t) = t {
                ft.classes[k].2.push(Reverse((t, i)));
            }
            ft.at.push(t);
            ft.class_of.push(k);
            ft.by_name.insert(c.name, i);
        }
        ft
    }

    /// The earliest time `spec`'s hosts are all free (`None`: never known),
    /// and those hosts busy from then until then + its TTL.
    fn take(&mut self, candidates: &[Candidate<'_>], spec: &LeaseSpec) -> Option<Timestamp> {
        let n = spec.count as usize;
        let chosen: Vec<(Timestamp, usize)> = if spec.hosts.is_empty() {
            let matching: Vec<usize> = (0..self.classes.len())
                .filter(|&k| {
                    let (arch, flags, _) = &self.classes[k];
                    spec.arch.is_none_or(|a| a == *arch) && spec.flags.is_subset(flags)
                })
                .collect();
            let mut got = Vec::with_capacity(n);
            while got.len() < n {
                // The class whose earliest valid entry is earliest.
                let mut best: Option<(Timestamp, usize, usize)> = None;
                for &k in &matching {
                    let heap = &mut self.classes[k].2;
                    while let Some(&Reverse((t, i))) = heap.peek() {
                        if self.at[i] == Some(t) {
                            break;
                        }
                        heap.pop();
                    }
                    if let Some(&Reverse((t, i))) = heap.peek()
                        && best.is_none_or(|(bt, bi, _)| (t, i) < (bt, bi))
                    {
                        best = Some((t, i, k));
                    }
                }
                let Some((t, i, k)) = best else { break };
                self.classes[k].2.pop();
                got.push((t, i));
            }
            if got.len() < n {
                // Not enough hosts with a known free time: put them back.
                for (t, i) in got {
                    self.classes[self.class_of[i]].2.push(Reverse((t, i)));
                }
                return None;
            }
            got
        } else {
            let mut usable: Vec<(Timestamp, usize)> = spec
                .hosts
                .iter()
                .filter_map(|h| self.by_name.get(h).copied())
                .filter(|&i| spec.matches(&candidates[i]))
                .filter_map(|i| self.at[i].map(|t| (t, i)))
                .collect();
            if usable.len() < n || n == 0 {
                return None;
            }
            usable.sort_unstable();
            usable.truncate(n);
            usable
        };
        let at = chosen.iter().map(|(t, _)| *t).max()?;
        let until = at.saturating_add(spec.ttl);
        for (_, i) in chosen {
            self.at[i] = Some(until);
            self.classes[self.class_of[i]].2.push(Reverse((until, i)));
        }
        Some(at)
    }
}

/// Whether `w` waits because a quota holds it back (whatever is free).
pub fn beyond_quota(projects: &Projects, w: &Waiter, st: &Standing) -> bool {
    Held::new(projects)
        .beyond(projects, w, st.project, st)
        .is_some()
}

/// One waiter's place in line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub waiter: WaiterId,
    /// 1 = next to be served.
    pub position: u32,
    pub eta: Option<Timestamp>,
    /// Why it cannot be granted now whatever is free (a quota), if so.
    pub held_back: Option<String>,
}

/// Projects as one scheduling pass sees them (the core builds this from the
/// policy and each project's usage).
#[derive(Debug, Clone, Default)]
pub struct Projects {
    pub loads: Vec<ProjectLoad>,
}

/// One project in a scheduling pass.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectLoad {
    pub name: String,
    /// Its weight (> 0).
    pub share: f64,
    /// Its decayed host-seconds now ([`super::fair::Usage`]).
    pub usage: f64,
    /// Hosts its members hold now.
    pub held: u32,
    /// Most hosts its members may hold at once.
    pub max_hosts: Option<u32>,
}

/// Where one waiter stands with respect to projects and quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// Index in [`Projects::loads`]; `None`: no project (health checks).
    pub project: Option<usize>,
    /// Most hosts its principal may hold at once (its role's limit).
    pub principal_max: Option<u32>,
    /// Hosts its principal holds now.
    pub principal_held: u32,
}

/// Hosts held by projects and principals, with the grants of this pass.
struct Held<'a> {
    projects: Vec<u32>,
    principals: std::collections::HashMap<&'a Principal, u32>,
}

impl<'a> Held<'a> {
    fn new(projects: &Projects) -> Self {
        Held {
            projects: projects.loads.iter().map(|p| p.held).collect(),
            principals: std::collections::HashMap::new(),
        }
    }

    /// The quota `w` would exceed if granted now, said for its queue line.
    fn beyond(
        &self,
        projects: &Projects,
        w: &Waiter,
        project: Option<usize>,
        st: &Standing,
    ) -> Option<String> {
        if w.check.is_some() || w.booking.is_some() {
            // Bookings are held to the quotas when they are made.
            return None;
        }
        if let Some(i) = project
            && let Some(p) = projects.loads.get(i)
            && let Some(max) = p.max_hosts
            && self.projects[i] + w.spec.count > max
        {
            return Some(format!(
                "project {} holds {} of its {max} hosts (max_hosts)",
                p.name, self.projects[i]
            ));
        }
        if let Some(max) = st.principal_max {
            let held = st.principal_held + self.principals.get(&w.principal).copied().unwrap_or(0);
            if held + w.spec.count > max {
                return Some(format!(
                    "{} holds {held} of the {max} hosts its role may hold (max_hosts)",
                    w.principal
                ));
            }
        }
        None
    }

    fn add(&mut self, w: &'a Waiter, project: Option<usize>, count: u32) {
        if let Some(i) = project
            && let Some(h) = self.projects.get_mut(i)
        {
            *h += count;
        }
        *self.principals.entry(&w.principal).or_default() += count;
    }
}

/// Orders f64 totally (fair-share ranks are finite and not negative).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rank(f64);

impl Eq for Rank {}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The service order: health checks first (by arrival); then priority
/// levels, highest first; within a level, the waiters of the project with
/// the lowest `usage / share` first (a grant made earlier in the same pass
/// counting as `hosts × TTL` host-seconds; ties: the lowest `held / share`,
/// then the earliest head of line), each project's own waiters by arrival.
/// Without projects (one project or none) this is the queue's own order.
struct FairOrder<'q, 's> {
    queue: &'q Queue,
    /// Without projects: the queue's own order.
    iter: std::collections::btree_map::Values<'q, QueueKey, Waiter>,
    /// With projects: the groups, level by level.
    groups: std::iter::Peekable<
        std::collections::btree_map::Iter<'q, (Level, usize), BTreeSet<WaiterId>>,
    >,
    fair: bool,
    standing: &'s dyn Fn(&Waiter) -> Standing,
    /// Per project: usage / share, share, hosts held (with this pass's).
    projects: Vec<(f64, f64, u32)>,
    /// The current level's groups: project tag and the rest of its ids.
    level: Vec<(usize, std::collections::btree_set::Iter<'q, WaiterId>)>,
    /// Heads of the current level's groups by rank: (rank, tie-break,
    /// head id, slot in `level`).
    heap: std::collections::BinaryHeap<Reverse<(Rank, Rank, WaiterId, usize)>>,
    /// The slot served last, whose next head goes back on the next call.
    last: Option<usize>,
}

impl<'q, 's> FairOrder<'q, 's> {
    fn new(q: &'q Queue, projects: &Projects, standing: &'s dyn Fn(&Waiter) -> Standing) -> Self {
        FairOrder {
            queue: q,
            iter: q.waiters.values(),
            groups: q.groups.iter().peekable(),
            fair: projects.loads.len() > 1,
            standing,
            projects: projects
                .loads
                .iter()
                .map(|p| (p.usage / p.share, p.share, p.held))
                .collect(),
            level: Vec::new(),
            heap: std::collections::BinaryHeap::new(),
            last: None,
        }
    }

    /// Where a group's head goes in the heap.
    fn push_head(&mut self, slot: usize, head: WaiterId) {
        let tag = self.level[slot].0;
        // Waiters of no project (health checks) go first.
        let (a, b) = if tag < self.projects.len() {
            self.rank(tag)
        } else {
            (Rank(-1.0), Rank(-1.0))
        };
        self.heap.push(Reverse((a, b, head, slot)));
    }

    fn rank(&self, project: usize) -> (Rank, Rank) {
        let (u, share, held) = self.projects[project];
        (Rank(u), Rank(f64::from(held) / share))
    }

    /// The next waiter in service order, with where it stands.
    fn next(&mut self) -> Option<(&'q Waiter, Standing)> {
        if !self.fair {
            let w = self.iter.next()?;
            return Some((w, (self.standing)(w)));
        }
        if let Some(slot) = self.last.take()
            && let Some(&head) = self.level[slot].1.next()
        {
            self.push_head(slot, head);
        }
        if self.heap.is_empty() {
            // The next level: its groups, one per project.
            let lvl = self.groups.peek()?.0.0;
            self.level.clear();
            while let Some(((l, tag), ids)) = self.groups.next_if(|((l, _), _)| *l == lvl) {
                debug_assert_eq!(*l, lvl);
                self.level.push((*tag, ids.iter()));
            }
            for slot in 0..self.level.len() {
                if let Some(&head) = self.level[slot].1.next() {
                    self.push_head(slot, head);
                }
            }
        }
        let Reverse((_, _, id, slot)) = self.heap.pop()?;
        self.last = Some(slot);
        let w = self.queue.get(id)?;
        Some((w, (self.standing)(w)))
    }

    /// The waiter just returned was granted `count` hosts for `ttl`: its
    /// project's rank counts them ahead, as the host-seconds they will add
    /// if held to expiry, so that one pass with many free hosts does not
    /// give them all to the project that was lowest when it began.
    fn granted(&mut self, project: Option<usize>, count: u32, ttl: Duration) {
        if let Some(p) = project
            && let Some(x) = self.projects.get_mut(p)
        {
            x.0 += f64::from(count) * ttl.as_secs_f64() / x.1;
            x.2 += count;
        }
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
                    window: Window::Open,
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
            min_ttl: None,
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
            preemptible: false,
            booking: None,
        }
    }

    fn names(v: &[(WaiterId, Vec<HostName>)]) -> Vec<(u64, Vec<String>)> {
        v.iter()
            .map(|(w, h)| (*w, h.iter().map(|h| h.to_string()).collect()))
            .collect()
    }

    fn by(id: u64, who: &str, s: LeaseSpec) -> Waiter {
        Waiter {
            principal: Principal::new(who).unwrap(),
            ..waiter(id, s)
        }
    }

    fn load(name: &str, share: f64, usage: f64, held: u32, max_hosts: Option<u32>) -> ProjectLoad {
        ProjectLoad {
            name: name.into(),
            share,
            usage,
            held,
            max_hosts,
        }
    }

    /// Principals `a…` are in project 0, `b…` in project 1.
    fn standing(w: &Waiter) -> Standing {
        Standing {
            project: Some(usize::from(w.principal.as_str().starts_with('b'))),
            ..Standing::default()
        }
    }

    /// Adds `w` tagged with its project as [`standing`] says (none for a
    /// health check), as the core does.
    fn tagged(q: &mut Queue, w: Waiter) {
        let project = if w.check.is_some() {
            None
        } else {
            standing(&w).project
        };
        q.push_in(w, project);
    }

    #[test]
    fn fair_share_orders_projects_within_a_priority() {
        let lab = Lab::new(&[
            ("h1", Arch::X86_64, &[]),
            ("h2", Arch::X86_64, &[]),
            ("h3", Arch::X86_64, &[]),
            ("h4", Arch::X86_64, &[]),
        ]);
        // (usage of a, usage of b, share of a, free hosts, grants in order)
        type Row = (f64, f64, f64, [bool; 4], &'static [u64]);
        let table: &[Row] = &[
            // Both unused: the pass alternates (held / share), arrival first.
            (0.0, 0.0, 1.0, [true; 4], &[1, 11, 2, 12]),
            // b used less: its waiters first, though they came later.
            (100.0, 10.0, 1.0, [true, false, false, false], &[11]),
            // a used 3x as much but has 3x the share: equal rank, then held
            // hosts per share (both 0), then arrival.
            (30.0, 10.0, 3.0, [true, false, false, false], &[1]),
            // a's share cannot make up for 4x the use.
            (40.0, 10.0, 3.0, [true, false, false, false], &[11]),
            // a share of 3: three grants for a for each of b's in one pass.
            (0.0, 0.0, 3.0, [true; 4], &[1, 11, 2, 3]),
        ];
        for (ua, ub, share_a, free, want) in table {
            let mut q = Queue::default();
            for i in 1..=4 {
                tagged(&mut q, by(i, "alice", spec(1, 0)));
                tagged(&mut q, by(10 + i, "bob", spec(1, 0)));
            }
            let projects = Projects {
                loads: vec![
                    load("a", *share_a, *ua, 0, None),
                    load("b", 1.0, *ub, 0, None),
                ],
            };
            let got: Vec<u64> = q
                .schedule_fair(&lab.candidates(free), &projects, &standing)
                .into_iter()
                .map(|(w, _)| w)
                .collect();
            assert_eq!(&got, want, "usage {ua}/{ub}, share of a {share_a}");
        }
    }

    #[test]
    fn priority_comes_before_fair_share_and_checks_before_all() {
        let lab = Lab::new(&[("h1", Arch::X86_64, &[]), ("h2", Arch::X86_64, &[])]);
        let mut q = Queue::default();
        tagged(&mut q, by(1, "bob", spec(1, 0)));
        tagged(&mut q, by(2, "alice", spec(1, 5)));
        tagged(
            &mut q,
            Waiter {
                check: Some("operator".into()),
                ..by(3, "lab-check", spec(1, 0))
            },
        );
        let projects = Projects {
            loads: vec![load("a", 1.0, 1e9, 0, None), load("b", 1.0, 0.0, 0, None)],
        };
        let no_project = |w: &Waiter| {
            if w.check.is_some() {
                Standing::default()
            } else {
                standing(w)
            }
        };
        let got = q.schedule_fair(&lab.candidates(&[true, true]), &projects, &no_project);
        assert_eq!(
            names(&got),
            vec![(3, vec!["h1".into()]), (2, vec!["h2".into()])]
        );
        let est = q.estimate_fair(
            &lab.candidates(&[true, true]),
            Timestamp(0),
            &projects,
            &no_project,
        );
        let order: Vec<(u64, u32)> = est.iter().map(|e| (e.waiter, e.position)).collect();
        assert_eq!(order, vec![(3, 1), (2, 2), (1, 3)]);
    }

    #[test]
    fn a_waiter_beyond_a_quota_waits_and_reserves_nothing() {
        let lab = Lab::new(&[("h1", Arch::X86_64, &[]), ("h2", Arch::X86_64, &[])]);
        let mut q = Queue::default();
        tagged(&mut q, by(1, "alice", spec(2, 0)));
        tagged(&mut q, by(2, "bob", spec(1, 0)));
        // a holds 1 of its 2 hosts: its pair request must wait, and b's
        // later request gets a host it would otherwise have reserved.
        let projects = Projects {
            loads: vec![
                load("a", 1.0, 0.0, 1, Some(2)),
                load("b", 1.0, 5.0, 0, None),
            ],
        };
        let got = q.schedule_fair(&lab.candidates(&[true, true]), &projects, &standing);
        assert_eq!(names(&got), vec![(2, vec!["h1".into()])]);
        let est = q.estimate_fair(
            &lab.candidates(&[true, true]),
            Timestamp(0),
            &projects,
            &standing,
        );
        assert_eq!(
            est[0].held_back.as_deref(),
            Some("project a holds 1 of its 2 hosts (max_hosts)")
        );
        assert_eq!(est[0].eta, None);
        assert_eq!(est[1].held_back, None);
        // A role's limit per principal, grants of the same pass counted.
        let mut q = Queue::default();
        tagged(&mut q, by(1, "alice", spec(1, 0)));
        tagged(&mut q, by(2, "alice", spec(1, 0)));
        tagged(&mut q, by(3, "alex", spec(1, 0)));
        let limited = |w: &Waiter| Standing {
            principal_max: Some(1),
            ..standing(w)
        };
        let one = Projects {
            loads: vec![load("a", 1.0, 0.0, 0, None)],
        };
        let got = q.schedule_fair(&lab.candidates(&[true, true]), &one, &limited);
        assert_eq!(
            names(&got),
            vec![(1, vec!["h1".into()]), (3, vec!["h2".into()])]
        );
    }

    /// The estimate by classes gives what the plain walk gives: every
    /// waiter takes the `count` usable hosts that free up first.
    #[test]
    fn estimates_by_class_match_the_plain_walk() {
        fn reference(q: &Queue, cands: &[Candidate<'_>], now: Timestamp) -> Vec<Option<Timestamp>> {
            let mut free_at: Vec<Option<Timestamp>> = cands
                .iter()
                .map(|c| {
                    if c.gone {
                        None
                    } else {
                        c.free_at.map(|t| t.max(now))
                    }
                })
                .collect();
            q.iter()
                .map(|w| {
                    let mut usable: Vec<(Timestamp, usize)> = cands
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| w.spec.matches(c))
                        .filter_map(|(i, _)| free_at[i].map(|t| (t, i)))
                        .collect();
                    let n = w.spec.count as usize;
                    if n == 0 || usable.len() < n {
                        return None;
                    }
                    usable.sort();
                    let at = usable[n - 1].0;
                    for &(_, i) in &usable[..n] {
                        free_at[i] = Some(at.saturating_add(w.spec.ttl));
                    }
                    Some(at)
                })
                .collect()
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let flag_sets: [&[&str]; 4] = [&[], &["a"], &["b"], &["a", "b"]];
        for _round in 0..200 {
            let hosts: Vec<(String, Arch, &[&str])> = (0..1 + rand(12))
                .map(|i| {
                    let arch = if rand(2) == 0 {
                        Arch::X86_64
                    } else {
                        Arch::Aarch64
                    };
                    (format!("h{i}"), arch, flag_sets[rand(4) as usize])
                })
                .collect();
            let refs: Vec<(&str, Arch, &[&str])> =
                hosts.iter().map(|(n, a, f)| (n.as_str(), *a, *f)).collect();
            let lab = Lab::new(&refs);
            let free: Vec<bool> = (0..hosts.len()).map(|_| rand(3) == 0).collect();
            let mut cands = lab.candidates(&free);
            for c in &mut cands {
                match rand(6) {
                    0 => c.free_at = None,
                    1 => c.gone = true,
                    _ => c.free_at = c.free_at.map(|t| Timestamp(t.0 + 1000 * rand(5) as i64)),
                }
            }
            let mut q = Queue::default();
            for id in 0..rand(15) {
                let mut s = spec(1 + rand(3) as u32, 0);
                s.ttl = Duration::from_secs(1 + rand(100));
                s.priority = rand(3) as i32;
                match rand(4) {
                    0 => s.arch = Some(Arch::X86_64),
                    1 => {
                        s.flags = flag_sets[rand(4) as usize]
                            .iter()
                            .map(|f| Flag::new(*f).unwrap())
                            .collect()
                    }
                    2 => {
                        s.hosts = (0..1 + rand(3))
                            .map(|_| lab.names[rand(hosts.len() as u64) as usize].clone())
                            .collect()
                    }
                    _ => {}
                }
                q.push(waiter(id, s));
            }
            let now = Timestamp(500);
            let got: Vec<Option<Timestamp>> = q
                .estimate(&cands, now)
                .into_iter()
                .map(|(_, _, eta)| eta)
                .collect();
            assert_eq!(got, reference(&q, &cands, now), "hosts {hosts:?}");
        }
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
