//! The core actor: the one task that owns hosts, leases and the queue, and
//! the only writer of the store. See the parent module for the batch cycle.
//!
//! Besides the batches of commands, the actor's loop wakes for the earliest
//! lease expiry, the earliest expiry warning, the earliest end of a
//! detached waiter's grace period, and the next retention step.

pub(super) mod bookings;

use super::clock::Clock;
use super::free::HostIndex;
use super::policy;
use super::reclaim::{ReclaimJob, Reclaimer};
use super::share::ShareBook;
use super::stats::CoreStats;
use super::{
    AcquireRequest, Command, CoreConfig, CoreError, HostView, LEASE_SCAN_LIMIT, LeaseKey,
    LeasePage, LeaseQuery, QueueEntry, ReloadSummary, Reply, WaitState,
};
use crate::events::{EventKind, EventRecord};
use crate::health::checks::{self, CHECK_PROFILE, CheckResult, LoopRules};
use crate::health::facts::{self, CheckVerdict, Facts};
use crate::health::{FailureClass, HostVerdict};
use crate::inventory::{HostSpec, Inventory};
use crate::lease::machine::Health;
use crate::lease::queue::{Estimate, Window};
use crate::lease::{
    Candidate, HostEvent, HostRecord, HostState, Lease, LeaseEvent, LeaseState, Queue, Waiter,
};
use crate::store::{Batch, EventQuery, Snapshot, Store, StoreError, Write};
use crate::types::{
    Caller, Generation, HostName, LeaseId, Principal, ProfileName, RequestId, Timestamp, WaiterId,
};
use crate::webhooks::SharedWebhooks;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tracing::{debug, error, info, warn};

type AfterCommit = Box<dyn FnOnce(Option<&CoreError>) + Send>;

/// What one batch produced: the records and events to commit, and what to do
/// once the commit succeeded or failed.
#[derive(Default)]
struct Pending {
    batch: Batch,
    after: Vec<AfterCommit>,
    reclaims: Vec<(HostName, LeaseId)>,
    /// `no_wait` requests of this batch (provisional ids).
    no_wait: Vec<WaiterId>,
    /// The inventory before a reload in this batch, restored if the commit fails.
    rollback_inventory: Option<(Arc<Inventory>, HashMap<HostName, HostSpec>)>,
    /// A client resumed a request: tell it its place even if nothing else
    /// changed.
    publish: bool,
    /// A `Stop` command: its reply, sent after the batch.
    stop: Option<Reply<()>>,
    /// Leases warned of their expiry in this batch (forgotten again if the
    /// commit fails).
    warned: Vec<LeaseId>,
}

impl Pending {
    fn reply<T: Send + 'static>(&mut self, tx: Reply<T>, value: Result<T, CoreError>) {
        self.after.push(Box::new(move |failed| {
            let _ = tx.send(match failed {
                None => value,
                Some(e) => Err(e.clone()),
            });
        }));
    }

    fn notify(&mut self, tx: watch::Sender<WaitState>, state: WaitState) {
        self.after.push(Box::new(move |failed| {
            let _ = tx.send(match failed {
                None => state,
                Some(e) => WaitState::Failed(e.clone()),
            });
        }));
    }
}

/// `no_wait` requests get no event unless they are granted, so no waiter id
/// while they are decided: they queue under provisional ids above every
/// real one (behind every waiting request of their priority), and get the
/// real id (their `LEASE_REQUESTED` event) with the grant.
const PROVISIONAL_IDS: WaiterId = 1 << 62;

/// The pause between retention steps while old records remain (each step
/// removes at most `retention_batch` of each).
const RETENTION_BACKLOG_PAUSE: Duration = Duration::from_millis(100);
/// Above this many waiters, queue positions are published at most every
/// [`PUBLISH_EVERY`].
const PUBLISH_THROTTLE_ABOVE: usize = 256;
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// Free hosts a scheduling pass looks at first beyond what the waiters ask
/// for (see `schedule_pass`).
const SCHEDULE_PREFIX: usize = 64;
/// Waiters at the head of the queue that preemption looks at in one pass.
const PREEMPT_WALK: usize = 64;
/// How often a scheduling pass looks at every waiter for a client gone away.
const GONE_SCAN_EVERY: Duration = Duration::from_millis(100);

/// How many request ids of granted requests are remembered (so that a
/// client that missed the grant gets the lease when it asks again).
pub(super) const RECENT_GRANTS: usize = 4096;

/// What the actor keeps of a waiting request besides its place in the queue.
struct Slot {
    /// The attached client: its request handle and its state channel.
    /// `None` while detached (after a restart or a failed commit, until the
    /// client resumes the request).
    client: Option<(u64, watch::Sender<WaitState>)>,
    /// A detached waiter is withdrawn at this time.
    detached_until: Option<Timestamp>,
    /// A `no_wait` request (provisional id, not stored, no event yet).
    no_wait: bool,
}

impl Slot {
    /// The slot of the server's own health check: no client, never
    /// withdrawn for being away.
    fn for_check() -> Slot {
        Slot {
            client: None,
            detached_until: None,
            no_wait: false,
        }
    }
}

/// The request ids of recent grants: (principal, request id) → lease,
/// bounded to [`RECENT_GRANTS`] (the oldest forgotten first).
#[derive(Default)]
struct RecentGrants {
    map: HashMap<(Principal, RequestId), LeaseId>,
    order: VecDeque<(Principal, RequestId)>,
}

impl RecentGrants {
    fn insert(&mut self, key: (Principal, RequestId), lease: LeaseId) {
        if self.map.insert(key.clone(), lease).is_none() {
            self.order.push_back(key);
            while self.order.len() > RECENT_GRANTS {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, key: &(Principal, RequestId)) -> Option<LeaseId> {
        self.map.get(key).copied()
    }
}

/// Why waiters loaded from the store have no client.
#[derive(Debug, Clone, Copy)]
enum Detached {
    Restart,
    FailedCommit,
}

impl Detached {
    /// REQUEST_WITHDRAWN detail for one without a request id (nobody can
    /// resume it).
    fn orphan_detail(self) -> &'static str {
        match self {
            Detached::Restart => {
                "the server restarted and the request has no request id to resume it by"
            }
            Detached::FailedCommit => {
                "the store failed to commit; the request was answered UNAVAILABLE"
            }
        }
    }
}

/// The channels the actor shares with its handle.
pub(super) struct Links {
    pub tx: mpsc::Sender<Command>,
    pub events: broadcast::Sender<EventRecord>,
    pub stats: Arc<CoreStats>,
    pub outbox_wake: Arc<Notify>,
}

pub(super) struct Actor {
    config: CoreConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    reclaimer: Arc<dyn Reclaimer>,
    /// To let reclaim tasks report back without keeping the actor alive.
    tx: mpsc::WeakSender<Command>,
    events: broadcast::Sender<EventRecord>,
    inventory: Arc<Inventory>,
    hosts: BTreeMap<HostName, HostRecord>,
    /// Every lease within the retention period.
    leases: HashMap<LeaseId, Lease>,
    /// Leases by grant time (the order of `ListLeases`).
    by_grant: BTreeSet<LeaseKey>,
    /// Active leases by expiry.
    expiries: BTreeSet<(Timestamp, LeaseId)>,
    /// Active leases by the time of their expiry warning (those not warned
    /// for their current expiry, with a TTL longer than the warning).
    warnings: BTreeSet<(Timestamp, LeaseId)>,
    /// The expiry each lease was warned of (active leases only).
    warned: HashMap<LeaseId, Timestamp>,
    /// Active preemptible leases not yet noticed, by grant time (the most
    /// recent are preempted first: they lose the least work).
    preemptible: BTreeSet<(Timestamp, LeaseId)>,
    /// Active preemptible leases that got their notice (their hosts are
    /// coming free).
    preempting: BTreeSet<LeaseId>,
    /// The webhooks in force: events they want get outbox rows.
    webhooks: SharedWebhooks,
    outbox_wake: Arc<Notify>,
    /// Ended leases by end time (retention).
    ended: BTreeSet<(Timestamp, LeaseId)>,
    queue: Queue,
    waiters: HashMap<WaiterId, Slot>,
    /// Request handle → waiter id, for withdrawals by dropped acquisitions.
    handles: HashMap<u64, WaiterId>,
    /// (principal, request id) → waiting request.
    by_request: HashMap<(Principal, RequestId), WaiterId>,
    /// Waiting requests (not `no_wait`) per principal, for the cap.
    waiting: HashMap<Principal, usize>,
    /// Detached waiters by the end of their grace period.
    detached: BTreeSet<(Timestamp, WaiterId)>,
    /// Waiters loaded without a request id: withdrawn in the next batch.
    orphans: Vec<(WaiterId, &'static str)>,
    recent_grants: RecentGrants,
    next_provisional: WaiterId,
    /// Descriptions of hosts removed from the inventory while leased, for
    /// their reclaim and for display until they are gone.
    retired_specs: HashMap<HostName, HostSpec>,
    /// Hosts with a reclaim task running.
    reclaiming: HashSet<HostName>,
    /// Hosts that cannot be driven now (agent away, BMC silent) and why.
    /// Not persisted: agents report it again after every restart.
    unreachable: BTreeMap<HostName, String>,
    /// When provisionings failed through each host's fault, within the
    /// quarantine window. Not persisted (a restart forgets suspicions in
    /// the making, not the health already recorded).
    host_failures: HashMap<HostName, VecDeque<Timestamp>>,
    /// Free hosts by when they became free, for `--health-check-idle`
    /// (removed when a check is asked for; in memory: a restart starts
    /// the count again).
    idle_since: HashMap<HostName, Timestamp>,
    last_seq: u64,
    /// The inventory must be reconciled with the host records (after a
    /// reload of state from the store).
    resync: bool,
    /// When the next retention step runs.
    next_retention: tokio::time::Instant,
    /// Gauges and histograms for `/metrics` (relaxed atomics).
    stats: Arc<CoreStats>,
    /// Projects: the policy, their usage, the hosts principals hold.
    shares: ShareBook,
    /// Free hosts and counts per state, kept with the host records.
    index: HostIndex,
    /// Bookings and maintenance windows not yet ended.
    book: crate::lease::booking::Book,
    /// Queue positions to publish when `next_publish` comes (a long queue).
    publish_due: bool,
    next_publish: tokio::time::Instant,
    /// When a scheduling pass next looks at every waiter for a client gone
    /// away (see `schedule_pass`).
    next_gone_scan: tokio::time::Instant,
}

impl Actor {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start(
        config: CoreConfig,
        store: Arc<dyn Store>,
        inventory: Inventory,
        reclaimer: Arc<dyn Reclaimer>,
        clock: Arc<dyn Clock>,
        links: Links,
    ) -> Result<Actor, CoreError> {
        let Links {
            tx,
            events,
            stats,
            outbox_wake,
        } = links;
        let snapshot = load(&store).await?;
        let policy = config.policy.clone();
        let mut actor = Actor {
            webhooks: config.webhooks.clone(),
            warnings: BTreeSet::new(),
            warned: HashMap::new(),
            preemptible: BTreeSet::new(),
            preempting: BTreeSet::new(),
            outbox_wake,
            config,
            store,
            clock,
            reclaimer,
            tx: tx.downgrade(),
            events,
            inventory: Arc::new(inventory),
            hosts: BTreeMap::new(),
            leases: HashMap::new(),
            by_grant: BTreeSet::new(),
            expiries: BTreeSet::new(),
            ended: BTreeSet::new(),
            queue: Queue::default(),
            waiters: HashMap::new(),
            handles: HashMap::new(),
            by_request: HashMap::new(),
            waiting: HashMap::new(),
            detached: BTreeSet::new(),
            orphans: Vec::new(),
            recent_grants: RecentGrants::default(),
            next_provisional: PROVISIONAL_IDS,
            retired_specs: HashMap::new(),
            reclaiming: HashSet::new(),
            unreachable: BTreeMap::new(),
            host_failures: HashMap::new(),
            idle_since: HashMap::new(),
            last_seq: 0,
            resync: false,
            next_retention: tokio::time::Instant::now(),
            stats,
            shares: ShareBook::new(policy),
            index: HostIndex::stale(),
            book: Default::default(),
            publish_due: false,
            next_publish: tokio::time::Instant::now(),
            next_gone_scan: tokio::time::Instant::now(),
        };
        let now = actor.clock.now();
        actor.restore(snapshot, now, Detached::Restart);
        actor.idle_since = actor
            .hosts
            .iter()
            .filter(|(_, h)| h.state == HostState::Available)
            .map(|(n, _)| (n.clone(), now))
            .collect();
        let mut p = Pending::default();
        let summary = actor.sync_inventory(&mut p, now, &Principal::server());
        actor.withdraw_orphans(&mut p, now);
        actor.drop_unsatisfiable(&mut p, now);
        actor.expire_due(&mut p, now);
        actor.bookings_due(&mut p, now);
        actor.recall_warnings(now).await;
        actor.warn_due(&mut p, now);
        p.reclaims.extend(actor.reclaiming_hosts());
        let active = actor.expiries.len();
        let waiting = actor.queue.len();
        if let Some(e) = actor.commit(p).await {
            return Err(e);
        }
        actor.publish_stats();
        info!(
            hosts = summary.hosts,
            active_leases = active,
            waiting,
            last_event = actor.last_seq,
            "core started"
        );
        Ok(actor)
    }

    /// Adopt a snapshot from the store as the current state. Its waiters
    /// are detached (`why`): those with a request id keep their place for
    /// the grace period, the others are withdrawn in the next batch.
    fn restore(&mut self, snapshot: Snapshot, now: Timestamp, why: Detached) {
        self.hosts = snapshot
            .hosts
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
        self.expiries.clear();
        self.warnings.clear();
        self.ended.clear();
        self.by_grant.clear();
        self.preemptible.clear();
        self.preempting.clear();
        self.leases.clear();
        self.recent_grants = RecentGrants::default();
        let mut leases = snapshot.leases;
        leases.sort_by_key(|l| (l.granted_at, l.id));
        for l in leases {
            self.index_lease(&l);
            if let Some(r) = &l.request_id {
                self.recent_grants
                    .insert((l.holder.clone(), r.clone()), l.id);
            }
            self.leases.insert(l.id, l);
        }
        self.last_seq = snapshot.last_event_seq;
        self.book = Default::default();
        for b in snapshot.bookings {
            self.book.put(b);
        }
        self.queue = Queue::default();
        self.waiters.clear();
        self.handles.clear();
        self.by_request.clear();
        self.waiting.clear();
        self.detached.clear();
        self.orphans.clear();
        let until = now.saturating_add(self.config.reattach_grace);
        for mut w in snapshot.waiters {
            let id = w.id;
            *self.waiting.entry(w.principal.clone()).or_default() += 1;
            if w.check.is_some() || w.booking.is_some() {
                // The server's own health check, or a booking's request:
                // nobody to wait for.
                self.enqueue(w);
                self.waiters.insert(id, Slot::for_check());
                continue;
            }
            w.detached = true;
            let detached_until = match &w.request_id {
                Some(r) => {
                    self.by_request.insert((w.principal.clone(), r.clone()), id);
                    self.detached.insert((until, id));
                    Some(until)
                }
                None => {
                    self.orphans.push((id, why.orphan_detail()));
                    None
                }
            };
            self.enqueue(w);
            self.waiters.insert(
                id,
                Slot {
                    client: None,
                    detached_until,
                    no_wait: false,
                },
            );
        }
        self.shares.recount(self.leases.values(), now);
        self.index.invalidate();
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut cmds = Vec::with_capacity(self.config.max_batch);
        loop {
            let expiry = self
                .expiries
                .first()
                .map(|(t, _)| self.clock.instant_at(*t));
            let grace = self
                .detached
                .first()
                .map(|(t, _)| self.clock.instant_at(*t));
            let idle = self.idle_due().map(|t| self.clock.instant_at(t));
            let warning = self
                .warnings
                .first()
                .map(|(t, _)| self.clock.instant_at(*t));
            let publish = self.publish_due.then_some(self.next_publish);
            let booking = self.book.next_due().map(|t| self.clock.instant_at(t));
            let deadline = [
                booking,
                expiry,
                warning,
                grace,
                idle,
                publish,
                Some(self.next_retention),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                n = rx.recv_many(&mut cmds, self.config.max_batch) => {
                    if n == 0 {
                        break;
                    }
                    self.stats.batch_commands.observe(n as f64);
                }
                () = sleep_until(deadline) => {}
            }
            let now = self.clock.now();
            let mut p = Pending::default();
            if std::mem::take(&mut self.resync) {
                self.sync_inventory(&mut p, now, &Principal::server());
            }
            self.withdraw_orphans(&mut p, now);
            self.withdraw_ghosts(&mut p, now);
            self.expire_due(&mut p, now);
            self.bookings_due(&mut p, now);
            self.idle_checks(&mut p, now);
            self.warn_due(&mut p, now);
            for cmd in cmds.drain(..) {
                self.handle(&mut p, now, cmd);
            }
            self.schedule(&mut p, now);
            let changed = !p.batch.is_empty() || p.publish;
            let stop = p.stop.take();
            self.commit(p).await;
            self.publish_stats();
            if let Some(reply) = stop {
                let _ = reply.send(Ok(()));
                info!(
                    waiting = self.queue.len(),
                    "core stopped; waiting requests stay in the store"
                );
                return;
            }
            if changed || self.publish_due {
                // A long queue is told its positions at most every
                // PUBLISH_EVERY (estimating 10,000 waiters is not free);
                // streams send at most one update a second anyway.
                let at = tokio::time::Instant::now();
                if self.queue.len() <= PUBLISH_THROTTLE_ABOVE || at >= self.next_publish {
                    self.publish_queue(self.clock.now());
                    self.publish_due = false;
                    self.next_publish = at + PUBLISH_EVERY;
                } else {
                    self.publish_due = true;
                }
            }
            if tokio::time::Instant::now() >= self.next_retention {
                self.retention().await;
            }
        }
        debug!("core actor stopped");
    }

    fn handle(&mut self, p: &mut Pending, now: Timestamp, cmd: Command) {
        match cmd {
            Command::Acquire {
                caller,
                handle,
                request,
                state,
            } => self.acquire(p, now, caller, handle, request, state),
            Command::Withdraw { handle } => {
                if let Some(&waiter) = self.handles.get(&handle) {
                    self.withdraw(p, now, waiter, "the client went away");
                }
            }
            Command::Renew {
                caller,
                lease,
                ttl,
                reply,
            } => {
                let r = self.renew(p, now, &caller, lease, ttl);
                p.reply(reply, r);
            }
            Command::Release {
                caller,
                lease,
                reply,
            } => {
                let r = self.release(p, now, &caller, lease);
                p.reply(reply, r);
            }
            Command::ListQueue { reply } => {
                let projects = self.shares.projects(now);
                let entries = self
                    .queue
                    .estimate_fair(&self.candidates(now), now, &projects, &|w| {
                        self.shares.standing(w)
                    })
                    .into_iter()
                    .filter_map(|e| {
                        let w = self.queue.get(e.waiter)?;
                        Some(QueueEntry {
                            waiter: e.waiter,
                            principal: w.principal.clone(),
                            spec: w.spec.clone(),
                            queued_at: w.queued_at,
                            position: e.position,
                            eta: e.eta,
                            detached: w.detached,
                            project: if w.check.is_some() {
                                String::new()
                            } else {
                                self.shares.project_name(&w.principal).to_owned()
                            },
                            held_back: e.held_back,
                            waiting_for: self.booking_in_the_way(w, now),
                        })
                    })
                    .collect();
                p.reply(reply, Ok(entries));
            }
            Command::RecentLeases { limit, reply } => {
                let leases = self
                    .by_grant
                    .iter()
                    .rev()
                    .take(limit)
                    .filter_map(|(_, id)| self.leases.get(id).cloned())
                    .collect();
                p.reply(reply, Ok(leases));
            }
            Command::GetLease { lease, reply } => {
                let r = self
                    .leases
                    .get(&lease)
                    .cloned()
                    .ok_or_else(|| not_found("lease", lease));
                p.reply(reply, r);
            }
            Command::ListLeases { query, reply } => {
                let page = self.list_leases(&query);
                p.reply(reply, Ok(page));
            }
            Command::ListHosts { rack, reply } => {
                let v = match rack {
                    None => self
                        .host_order()
                        .into_iter()
                        .filter_map(|h| self.view(&h))
                        .collect(),
                    // One rack (an agent's state): its hosts, then those
                    // retired from it, without a walk of every host.
                    Some(r) => {
                        let mut retired: Vec<&HostName> = self
                            .retired_specs
                            .values()
                            .filter(|s| s.rack == r && self.inventory.host(&s.name).is_none())
                            .map(|s| &s.name)
                            .collect();
                        retired.sort();
                        self.inventory
                            .hosts_in_rack(&r)
                            .map(|s| &s.name)
                            .chain(retired)
                            .filter_map(|h| self.view(h))
                            .collect()
                    }
                };
                p.reply(reply, Ok(v));
            }
            Command::GetHost { host, reply } => {
                let r = self.view(&host).ok_or_else(|| not_found("host", &host));
                p.reply(reply, r);
            }
            Command::CreateBooking {
                caller,
                request,
                reply,
            } => {
                let r = self.create_booking(p, now, &caller, request);
                p.reply(reply, r);
            }
            Command::CancelBooking { caller, id, reply } => {
                let r = self.cancel_booking(p, now, &caller, id);
                p.reply(reply, r);
            }
            Command::ListBookings { host, reply } => {
                let r = Ok(self.list_bookings(host.as_ref()));
                p.reply(reply, r);
            }
            Command::SetMaintenance {
                caller,
                host,
                on,
                reason,
                reply,
            } => {
                let r = self.set_maintenance(p, now, &caller, &host, on, reason);
                p.reply(reply, r);
            }
            Command::SetQuarantine {
                caller,
                host,
                on,
                reason,
                reply,
            } => {
                let r = self.set_quarantine(p, now, &caller, &host, on, reason);
                p.reply(reply, r);
            }
            Command::HostVerdict {
                host,
                lease,
                verdict,
            } => self.host_verdict(p, now, &host, lease, verdict),
            Command::CheckHost {
                caller,
                host,
                reply,
            } => {
                let r = self.check_host(p, now, &caller, &host);
                p.reply(reply, r);
            }
            Command::SetInventory {
                actor,
                inventory,
                reply,
            } => {
                p.rollback_inventory = Some((self.inventory.clone(), self.retired_specs.clone()));
                for old in &self.inventory.hosts {
                    if inventory.host(&old.name).is_none() {
                        self.retired_specs.insert(old.name.clone(), old.clone());
                    }
                }
                self.inventory = inventory;
                self.index.invalidate();
                let r = self.sync_inventory(p, now, &actor);
                self.drop_unsatisfiable(p, now);
                p.reply(reply, Ok(r));
            }
            Command::Reclaimed {
                host,
                lease,
                failure,
            } => self.reclaimed(p, now, host, lease, failure),
            Command::SetUnreachable { hosts } => self.set_unreachable(p, now, hosts),
            Command::GetInventory { reply } => {
                let inv = self.inventory.clone();
                p.reply(reply, Ok(inv));
            }
            Command::Record { note, reply } => {
                let e = self.event(p, now, &note.actor, note.kind);
                e.hosts = note.hosts;
                e.lease = note.lease;
                e.detail = note.detail;
                let seq = e.seq;
                p.reply(reply, Ok(seq));
            }
            Command::SetPolicy { policy, reply } => {
                info!(
                    projects = policy.projects().len(),
                    half_life = %humantime::format_duration(policy.half_life),
                    "policy in force"
                );
                self.shares.set_policy(policy, self.leases.values(), now);
                self.queue.retag(|w| self.shares.standing(w).project);
                p.publish = true;
                p.reply(reply, Ok(()));
            }
            Command::SetWebhooks { webhooks, reply } => {
                let kept = webhooks.names();
                for gone in self.webhooks.names().difference(&kept) {
                    info!(hook = %gone, "webhook removed; its pending deliveries are dropped");
                    p.batch.writes.push(Write::DropOutbox {
                        hook: (*gone).to_owned(),
                    });
                }
                drop(kept);
                self.webhooks = webhooks;
                p.reply(reply, Ok(()));
            }
            Command::Stop { reply } => p.stop = Some(reply),
        }
    }

    // ------------------------------------------------------------ records

    fn event<'p>(
        &mut self,
        p: &'p mut Pending,
        now: Timestamp,
        actor: &Principal,
        kind: EventKind,
    ) -> &'p mut EventRecord {
        self.last_seq += 1;
        p.batch.events.push(EventRecord {
            seq: self.last_seq,
            time: now,
            actor: actor.clone(),
            kind,
            hosts: Vec::new(),
            lease: None,
            waiter: None,
            request: None,
            detail: String::new(),
            booking: None,
        });
        p.batch.events.last_mut().expect("just pushed")
    }

    /// Puts a waiter into the queue, tagged with its project.
    fn enqueue(&mut self, w: Waiter) {
        let project = self.shares.standing(&w).project;
        self.queue.push_in(w, project);
    }

    fn put_host(&mut self, p: &mut Pending, rec: HostRecord) {
        p.batch.writes.push(Write::Host(rec.clone()));
        let unreachable = self.unreachable.contains_key(&rec.name);
        let old = self.hosts.insert(rec.name.clone(), rec.clone());
        self.index
            .changed(&self.inventory, old.as_ref(), &rec, unreachable);
    }

    fn host_apply(
        &mut self,
        p: &mut Pending,
        name: &HostName,
        ev: HostEvent,
    ) -> Result<(), CoreError> {
        let rec = self
            .hosts
            .get(name)
            .ok_or_else(|| not_found("host", name))?;
        let next = rec.apply(ev)?;
        self.put_host(p, next);
        Ok(())
    }

    /// When `l`'s expiry warning is due, if it gets one: its TTL is longer
    /// than the warning period (which is not zero).
    fn warning_time(&self, l: &Lease) -> Option<Timestamp> {
        let d = self.config.expiry_warning;
        (!d.is_zero() && Duration::from_millis(l.ttl_ms) > d)
            .then(|| l.expires_at.saturating_sub(d))
    }

    /// Add a lease to the expiry, warning, end-time and grant-time indexes.
    fn index_lease(&mut self, l: &Lease) {
        self.by_grant.insert((l.granted_at, l.id));
        if l.is_active() && l.preemptible {
            if l.preempted_at.is_none() {
                self.preemptible.insert((l.granted_at, l.id));
            } else {
                self.preempting.insert(l.id);
            }
        }
        if l.is_active() {
            self.expiries.insert((l.expires_at, l.id));
            if self.warned.get(&l.id) != Some(&l.expires_at)
                && let Some(t) = self.warning_time(l)
            {
                self.warnings.insert((t, l.id));
            }
        } else {
            self.warned.remove(&l.id);
            if let Some(t) = l.ended_at {
                self.ended.insert((t, l.id));
            }
        }
    }

    fn unindex_lease(&mut self, l: &Lease) {
        self.by_grant.remove(&(l.granted_at, l.id));
        self.preemptible.remove(&(l.granted_at, l.id));
        self.preempting.remove(&l.id);
        self.expiries.remove(&(l.expires_at, l.id));
        if let Some(t) = self.warning_time(l) {
            self.warnings.remove(&(t, l.id));
        }
        if let Some(t) = l.ended_at {
            self.ended.remove(&(t, l.id));
        }
    }

    fn put_lease(&mut self, p: &mut Pending, lease: Lease) {
        let old = self.leases.get(&lease.id).cloned();
        self.shares.lease_changed(old.as_ref(), &lease);
        if let Some(old) = old {
            self.unindex_lease(&old);
        }
        self.index_lease(&lease);
        p.batch.writes.push(Write::Lease(lease.clone()));
        self.leases.insert(lease.id, lease);
    }

    /// One page of leases, by grant time. Active leases only: from the
    /// expiry index (few); with ended ones: a walk of the grant-time index
    /// that looks at no more than [`LEASE_SCAN_LIMIT`] leases.
    fn list_leases(&self, q: &LeaseQuery) -> LeasePage {
        let wanted = |l: &Lease| q.holder.as_ref().is_none_or(|h| &l.holder == h);
        let limit = q.limit.max(1);
        let mut page = LeasePage::default();
        if !q.include_ended {
            let mut keys: Vec<LeaseKey> = self
                .expiries
                .iter()
                .filter_map(|(_, id)| self.leases.get(id))
                .filter(|l| wanted(l))
                .map(|l| (l.granted_at, l.id))
                .filter(|k| q.after.is_none_or(|a| *k > a))
                .collect();
            keys.sort();
            let more = keys.len() > limit;
            keys.truncate(limit);
            page.leases = keys.iter().map(|(_, id)| self.leases[id].clone()).collect();
            if more {
                page.next = keys.last().copied();
            }
            return page;
        }
        let range = match q.after {
            Some(a) => self
                .by_grant
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.by_grant.range(..),
        };
        let mut last = None;
        for (scanned, key) in range.enumerate() {
            if page.leases.len() == limit || scanned == LEASE_SCAN_LIMIT {
                // More follow: continue after the last one looked at.
                page.next = last;
                break;
            }
            last = Some(*key);
            if let Some(l) = self.leases.get(&key.1)
                && wanted(l)
            {
                page.leases.push(l.clone());
            }
        }
        page
    }

    // ------------------------------------------------------------ the queue

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: Caller,
        handle: u64,
        request: AcquireRequest,
        state: watch::Sender<WaitState>,
    ) {
        let AcquireRequest {
            spec,
            no_wait,
            request_id,
            preemptible,
        } = request;
        // A retry of a request this principal made before?
        if let Some(r) = &request_id {
            let key = (caller.principal.clone(), r.clone());
            if let Some(&waiter) = self.by_request.get(&key) {
                self.reattach(p, waiter, handle, state, r);
                return;
            }
            if let Some(lease) = self
                .recent_grants
                .get(&key)
                .and_then(|id| self.leases.get(&id))
            {
                info!(principal = %caller.principal, request_id = %r, lease = %lease.id, "lease request asked again after its grant: answered with its lease");
                p.notify(state, WaitState::Granted(lease.clone()));
                return;
            }
        }
        self.shares.saw_role(&caller.principal, caller.role);
        let checks = self
            .check_priority(&caller, spec.priority)
            .and_then(|()| self.check_spec(&caller, &spec))
            .and_then(|()| {
                let waiting = self.waiting.get(&caller.principal).copied().unwrap_or(0);
                if !no_wait && waiting >= self.config.max_waiting_per_principal {
                    return Err(CoreError::TooManyWaiting {
                        principal: caller.principal.clone(),
                        max: self.config.max_waiting_per_principal,
                    });
                }
                Ok(())
            });
        if let Err(e) = checks {
            debug!(principal = %caller.principal, error = %e, "lease request refused");
            p.notify(state, WaitState::Failed(e));
            return;
        }
        let waiter = if no_wait {
            // Decided in this batch; recorded only if granted.
            self.next_provisional += 1;
            p.no_wait.push(self.next_provisional);
            self.next_provisional
        } else {
            let e = self.event(p, now, &caller.principal, EventKind::LeaseRequested);
            // The request's event sequence number is its waiter id: unique
            // across restarts, and its place in line within a priority.
            e.waiter = Some(e.seq);
            e.request = Some(spec.clone());
            if preemptible {
                e.detail = "preemptible".into();
            }
            e.seq
        };
        debug!(waiter, principal = %caller.principal, count = spec.count, priority = spec.priority, no_wait, "lease requested");
        let w = Waiter {
            id: waiter,
            principal: caller.principal.clone(),
            spec,
            request_id: request_id.clone(),
            queued_at: now,
            detached: false,
            check: None,
            preemptible,
            booking: None,
        };
        if !no_wait {
            p.batch.writes.push(Write::Waiter(w.clone()));
            *self.waiting.entry(caller.principal.clone()).or_default() += 1;
        }
        if let Some(r) = request_id {
            self.by_request.insert((caller.principal, r), waiter);
        }
        self.enqueue(w);
        self.waiters.insert(
            waiter,
            Slot {
                client: Some((handle, state)),
                detached_until: None,
                no_wait,
            },
        );
        self.handles.insert(handle, waiter);
    }

    /// A client asked again for a request that waits: its stream replaces
    /// the old one (which is told so), and the request keeps its place.
    fn reattach(
        &mut self,
        p: &mut Pending,
        waiter: WaiterId,
        handle: u64,
        state: watch::Sender<WaitState>,
        request_id: &RequestId,
    ) {
        let Some(slot) = self.waiters.get_mut(&waiter) else {
            return;
        };
        if let Some((old, tx)) = slot.client.take() {
            self.handles.remove(&old);
            let _ = tx.send(WaitState::Failed(CoreError::Superseded {
                request_id: request_id.clone(),
            }));
        }
        if let Some(t) = slot.detached_until.take() {
            self.detached.remove(&(t, waiter));
        }
        slot.client = Some((handle, state));
        self.handles.insert(handle, waiter);
        self.queue.set_detached(waiter, false);
        p.publish = true;
        info!(waiter, request_id = %request_id, "lease request resumed by its client");
    }

    /// Take a waiter out of the queue and the maps (and the store, unless
    /// it is a `no_wait` request); its client's state channel is returned
    /// for a final answer (dropping it tells the client nothing more will
    /// come).
    fn take_waiter(
        &mut self,
        p: &mut Pending,
        waiter: WaiterId,
    ) -> Option<(Waiter, Slot, Option<watch::Sender<WaitState>>)> {
        let w = self.queue.remove(waiter)?;
        let mut slot = self.waiters.remove(&waiter)?;
        let tx = slot.client.take().map(|(handle, tx)| {
            self.handles.remove(&handle);
            tx
        });
        if let Some(t) = slot.detached_until {
            self.detached.remove(&(t, waiter));
        }
        if let Some(r) = &w.request_id {
            let key = (w.principal.clone(), r.clone());
            if self.by_request.get(&key) == Some(&waiter) {
                self.by_request.remove(&key);
            }
        }
        if !slot.no_wait {
            p.batch.writes.push(Write::DeleteWaiter(waiter));
            if let Some(n) = self.waiting.get_mut(&w.principal) {
                *n -= 1;
                if *n == 0 {
                    self.waiting.remove(&w.principal);
                }
            }
        }
        Some((w, slot, tx))
    }

    /// Withdraw a waiting request (with a REQUEST_WITHDRAWN event, unless
    /// it is a `no_wait` request, which leaves no trace).
    fn withdraw(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        waiter: WaiterId,
        why: &str,
    ) -> Option<watch::Sender<WaitState>> {
        let (w, slot, tx) = self.take_waiter(p, waiter)?;
        if slot.no_wait {
            debug!(principal = %w.principal, why, "no_wait lease request refused");
        } else {
            let e = self.event(p, now, &w.principal, EventKind::RequestWithdrawn);
            e.waiter = Some(waiter);
            e.detail = why.to_owned();
            debug!(waiter, why, "lease request withdrawn");
        }
        tx
    }

    /// Waiters loaded from the store that nobody can resume.
    fn withdraw_orphans(&mut self, p: &mut Pending, now: Timestamp) {
        for (waiter, why) in std::mem::take(&mut self.orphans) {
            self.withdraw(p, now, waiter, why);
        }
    }

    /// Detached waiters whose client did not come back in time.
    fn withdraw_ghosts(&mut self, p: &mut Pending, now: Timestamp) {
        while let Some(&(t, waiter)) = self.detached.first() {
            if t > now {
                break;
            }
            self.detached.pop_first();
            let why = format!(
                "its client did not come back within {} after the server lost its stream",
                humantime::format_duration(self.config.reattach_grace)
            );
            info!(waiter, "detached lease request withdrawn: {why}");
            self.withdraw(p, now, waiter, &why);
        }
    }

    /// After an inventory change: refuse waiting requests that can never be met now.
    fn drop_unsatisfiable(&mut self, p: &mut Pending, now: Timestamp) {
        let doomed: Vec<(WaiterId, CoreError)> = self
            .queue
            .iter()
            .filter_map(|w| self.check_hosts(&w.spec).err().map(|e| (w.id, e)))
            .collect();
        for (waiter, err) in doomed {
            if let Some(state) = self.withdraw(
                p,
                now,
                waiter,
                "the inventory changed and can no longer meet it",
            ) {
                p.notify(state, WaitState::Failed(err));
            }
        }
    }

    /// The priority rule: the caller's project's (or role's) `max_priority`
    /// under the policy, else the server's cap for `ci` and `developer`.
    fn check_priority(&self, caller: &Caller, priority: i32) -> Result<(), CoreError> {
        match self
            .shares
            .policy()
            .max_priority(&caller.principal, caller.role)
        {
            Some(max) if priority > max => Err(CoreError::PermissionDenied(
                policy::Denied::PriorityAboveProjectLimit {
                    principal: caller.principal.clone(),
                    project: self.shares.project_name(&caller.principal).to_owned(),
                    priority,
                    max,
                },
            )),
            Some(_) => Ok(()),
            None => policy::may_use_priority(caller, priority, self.config.max_user_priority)
                .map_err(CoreError::from),
        }
    }

    /// The one TTL rule, for requests and renewals alike: the server's
    /// `--max-ttl`, or less when the caller's project (or role) says so.
    fn check_ttl(
        &self,
        caller: &Caller,
        field: &'static str,
        ttl: Duration,
    ) -> Result<(), CoreError> {
        let (max, whose) = match self.shares.policy().max_ttl(&caller.principal, caller.role) {
            Some(m) if m < self.config.max_ttl => (
                m,
                format!(
                    " (the policy of project {})",
                    self.shares.project_name(&caller.principal)
                ),
            ),
            _ => (self.config.max_ttl, String::new()),
        };
        if ttl.is_zero() || ttl > max {
            return Err(CoreError::InvalidArgument {
                field,
                reason: format!(
                    "must be more than 0 and at most {}{whose}",
                    humantime::format_duration(max)
                ),
            });
        }
        Ok(())
    }

    fn check_spec(&self, caller: &Caller, spec: &crate::lease::LeaseSpec) -> Result<(), CoreError> {
        self.check_ttl(caller, "request.ttl", spec.ttl)?;
        self.check_hosts(spec)
    }

    /// Whether the inventory can ever meet `spec`.
    fn check_hosts(&self, spec: &crate::lease::LeaseSpec) -> Result<(), CoreError> {
        if let Some(h) = spec.hosts.iter().find(|h| self.inventory.host(h).is_none()) {
            return Err(CoreError::InvalidArgument {
                field: "request.hosts",
                reason: format!("no host named {h} in the inventory"),
            });
        }
        // Counted until enough: a request that can be met costs what it
        // asks for, not the inventory's size.
        let matching = self
            .inventory
            .hosts
            .iter()
            .filter(|h| {
                self.hosts.get(&h.name).is_some_and(|r| !r.retired)
                    && spec.arch.is_none_or(|a| a == h.arch)
                    && spec.flags.is_subset(&h.flags)
                    && (spec.hosts.is_empty() || spec.hosts.contains(&h.name))
            })
            .take(spec.count as usize)
            .count();
        if matching < spec.count as usize {
            return Err(CoreError::Unsatisfiable {
                reason: format!(
                    "{} host(s) asked for, {matching} in the inventory match",
                    spec.count
                ),
            });
        }
        Ok(())
    }

    // ------------------------------------------------------------ leases

    fn renew(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: &Caller,
        id: LeaseId,
        ttl: Option<Duration>,
    ) -> Result<Lease, CoreError> {
        let lease = self.leases.get(&id).ok_or_else(|| not_found("lease", id))?;
        policy::may_manage_lease(caller, lease, "renew")?;
        let ttl = ttl.unwrap_or(lease.ttl());
        self.check_ttl(caller, "ttl", ttl)?;
        let next = lease.apply(&LeaseEvent::Renew { now, ttl })?;
        let e = self.event(p, now, &caller.principal, EventKind::LeaseRenewed);
        e.lease = Some(id);
        e.hosts = next.hosts.clone();
        e.detail = format!("expires {}", next.expires_at);
        debug!(lease = %id, expires = %next.expires_at, "lease renewed");
        self.put_lease(p, next.clone());
        Ok(next)
    }

    fn release(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: &Caller,
        id: LeaseId,
    ) -> Result<Lease, CoreError> {
        let lease = self.leases.get(&id).ok_or_else(|| not_found("lease", id))?;
        policy::may_manage_lease(caller, lease, "release")?;
        let next = lease.apply(&LeaseEvent::Release { now })?;
        let kind = if next.state == LeaseState::Expired {
            EventKind::LeaseExpired
        } else {
            EventKind::LeaseReleased
        };
        self.end_lease(p, now, &caller.principal, next.clone(), kind);
        Ok(next)
    }

    fn expire_due(&mut self, p: &mut Pending, now: Timestamp) {
        while let Some(&(t, id)) = self.expiries.first() {
            if t > now {
                break;
            }
            self.expiries.pop_first();
            let Some(lease) = self.leases.get(&id) else {
                continue;
            };
            match lease.apply(&LeaseEvent::Expire { now }) {
                Ok(next) => {
                    info!(lease = %id, holder = %next.holder, hosts = %join(&next.hosts), "lease expired");
                    let check = is_check(&next).then(|| next.hosts.clone());
                    self.end_lease(p, now, &Principal::server(), next, EventKind::LeaseExpired);
                    // (The lease has ended: the outcome does not end it again.)
                    let why = format!(
                        "no READY within {}",
                        humantime::format_duration(self.config.health_check_timeout)
                    );
                    for h in check.into_iter().flatten() {
                        self.check_outcome(p, now, id, &h, CheckResult::Fail(why.clone()));
                    }
                }
                Err(e) => error!(lease = %id, error = %e, "cannot expire lease"),
            }
        }
    }

    /// `LEASE_EXPIRING` for every active lease whose warning is due.
    fn warn_due(&mut self, p: &mut Pending, now: Timestamp) {
        while let Some(&(t, id)) = self.warnings.first() {
            if t > now {
                break;
            }
            self.warnings.pop_first();
            let Some(lease) = self.leases.get(&id).filter(|l| l.is_active()) else {
                continue;
            };
            let (expires_at, hosts, holder) =
                (lease.expires_at, lease.hosts.clone(), lease.holder.clone());
            let left = expires_at.since(now);
            info!(lease = %id, holder = %holder, expires = %expires_at, "lease expiring");
            let e = self.event(p, now, &Principal::server(), EventKind::LeaseExpiring);
            e.lease = Some(id);
            e.hosts = hosts;
            e.detail = expiring_detail(expires_at, left);
            self.warned.insert(id, expires_at);
            p.warned.push(id);
        }
    }

    /// After a restart: the leases whose warning is due were perhaps
    /// warned before it; their event logs say (one indexed read each, for
    /// the few leases within the warning period of their expiry).
    async fn recall_warnings(&mut self, now: Timestamp) {
        let due: Vec<(LeaseId, Timestamp)> = self
            .warnings
            .iter()
            .take_while(|(t, _)| *t <= now)
            .filter_map(|(_, id)| self.leases.get(id).map(|l| (*id, l.expires_at)))
            .collect();
        if due.is_empty() {
            return;
        }
        let store = self.store.clone();
        let warned = tokio::task::spawn_blocking(move || {
            due.into_iter()
                .filter(|(id, expires_at)| {
                    let marker = expiring_marker(*expires_at);
                    store
                        .events(&EventQuery {
                            limit: 100_000,
                            lease: Some(*id),
                            ..Default::default()
                        })
                        .is_ok_and(|es| {
                            es.iter().any(|e| {
                                e.kind == EventKind::LeaseExpiring && e.detail.starts_with(&marker)
                            })
                        })
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (id, expires_at) in warned {
            if let Some(l) = self.leases.get(&id).cloned() {
                self.unindex_lease(&l);
                self.warned.insert(id, expires_at);
                self.index_lease(&l);
            }
        }
    }

    /// Record the lease's end and start reclaiming its hosts.
    fn end_lease(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        actor: &Principal,
        lease: Lease,
        kind: EventKind,
    ) {
        let id = lease.id;
        let hosts = lease.hosts.clone();
        self.put_lease(p, lease);
        let e = self.event(p, now, actor, kind);
        e.lease = Some(id);
        e.hosts = hosts.clone();
        let mut reclaiming = Vec::with_capacity(hosts.len());
        let every = self.config.health_check_every;
        for h in &hosts {
            match self.host_apply(p, h, HostEvent::EndLease(id)) {
                Ok(()) => {
                    reclaiming.push(h.clone());
                    if every > 0
                        && self
                            .hosts
                            .get(h)
                            .is_some_and(|r| r.leases_since_check >= every)
                    {
                        self.request_check(p, now, h, format!("after {every} leases"));
                    }
                }
                Err(err) => {
                    error!(host = %h, lease = %id, error = %err, "host does not hold the ending lease")
                }
            }
        }
        let e = self.event(p, now, &Principal::server(), EventKind::HostReclaiming);
        e.lease = Some(id);
        e.hosts = hosts;
        for h in reclaiming {
            let immediate = self
                .inventory
                .host(&h)
                .or_else(|| self.retired_specs.get(&h))
                .is_none_or(|spec| self.reclaimer.is_immediate(spec, &self.inventory));
            if immediate {
                self.reclaimed(p, now, h, id, None);
            } else {
                p.reclaims.push((h, id));
            }
        }
    }

    fn reclaimed(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        host: HostName,
        lease: LeaseId,
        failure: Option<String>,
    ) {
        self.reclaiming.remove(&host);
        if let Err(err) = self.host_apply(p, &host, HostEvent::Reclaimed(lease)) {
            debug!(host = %host, lease = %lease, error = %err, "stale reclaim report");
            return;
        }
        let e = self.event(p, now, &Principal::server(), EventKind::HostAvailable);
        e.hosts = vec![host.clone()];
        e.lease = Some(lease);
        self.idle_since.insert(host.clone(), now);
        // A check's own reclaim failing says what the check said already.
        if let Some(why) = failure
            && !self.leases.get(&lease).is_some_and(is_check)
        {
            self.request_check(p, now, &host, format!("after a reclaim that failed: {why}"));
        }
        if self.hosts.get(&host).is_some_and(|h| h.retired) {
            self.remove_host(p, now, &Principal::server(), &host);
        }
    }

    fn remove_host(&mut self, p: &mut Pending, now: Timestamp, actor: &Principal, host: &HostName) {
        self.retired_specs.remove(host);
        self.index.invalidate();
        if let Some(rec) = self.hosts.remove(host) {
            p.batch.writes.push(Write::DeleteHost {
                name: host.clone(),
                generation: rec.generation,
            });
            let e = self.event(p, now, actor, EventKind::HostRemoved);
            e.hosts = vec![host.clone()];
        }
    }

    // ------------------------------------------------------------ scheduling

    /// Hosts in inventory order, as the queue sees them.
    /// The hosts that may be granted or checked now, as candidates (all a
    /// scheduling pass needs; the index must be fresh).
    fn free_candidates(&self, now: Timestamp, limit: usize) -> Vec<Candidate<'_>> {
        self.index
            .free()
            .take(limit)
            .filter_map(|name| {
                let spec = self.inventory.host(name)?;
                let rec = self.hosts.get(name)?;
                Some(Candidate {
                    name: &spec.name,
                    arch: spec.arch,
                    flags: &spec.flags,
                    grantable: rec.is_grantable(),
                    checkable: rec.is_checkable(),
                    gone: rec.retired,
                    free_at: Some(now),
                    window: self.window(name, now),
                })
            })
            .collect()
    }

    /// Every host of the inventory as a candidate (for estimates).
    fn candidates(&self, now: Timestamp) -> Vec<Candidate<'_>> {
        self.inventory
            .hosts
            .iter()
            .filter_map(|spec| {
                let rec = self.hosts.get(&spec.name)?;
                let unreachable = self.unreachable.contains_key(&spec.name);
                let free_at = match rec.state {
                    _ if rec.maintenance || rec.retired || unreachable => None,
                    HostState::Available => Some(now),
                    HostState::Leased(l) => self.leases.get(&l).map(|l| l.expires_at),
                    HostState::Reclaiming(_) => Some(now),
                };
                // For estimates, a booking's window keeps the host until
                // the booking ends.
                let window = self.window(&spec.name, now);
                let free_at = match window {
                    Window::Booked(b) => {
                        let end = self.book.get(b).map(|b| b.end);
                        free_at.zip(end).map(|(f, e)| f.max(e))
                    }
                    Window::Open | Window::Left(_) => free_at,
                };
                Some(Candidate {
                    name: &spec.name,
                    arch: spec.arch,
                    flags: &spec.flags,
                    grantable: rec.is_grantable() && !unreachable,
                    checkable: rec.is_checkable() && !unreachable,
                    gone: rec.retired,
                    free_at,
                    window,
                })
            })
            .collect()
    }

    fn schedule(&mut self, p: &mut Pending, now: Timestamp) {
        if self.queue.is_empty() {
            // Nothing waits: nothing to grant, preempt or withdraw.
            return;
        }
        let started = std::time::Instant::now();
        self.schedule_pass(p, now);
        self.stats
            .schedule_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    fn schedule_pass(&mut self, p: &mut Pending, now: Timestamp) {
        // Requests whose client is gone do not take hosts. A client that
        // goes away sends a withdrawal (a command) as it does; when that
        // could not be sent (the channel was full), a grant to it is caught
        // below, and what it reserves at most until the next look at every
        // waiter (every GONE_SCAN_EVERY: with 10,000 waiters a walk of them
        // all would be most of a pass).
        let at = tokio::time::Instant::now();
        if at >= self.next_gone_scan {
            self.next_gone_scan = at + GONE_SCAN_EVERY;
            let gone: Vec<WaiterId> = self
                .waiters
                .iter()
                .filter(|(_, s)| s.client.as_ref().is_some_and(|(_, tx)| tx.is_closed()))
                .map(|(w, _)| *w)
                .collect();
            for w in gone {
                self.withdraw(p, now, w, "the client went away");
            }
        }
        // No-wait requests that cannot be granted now are refused first, so
        // they neither hold hosts back from the waiters behind them nor
        // appear to be waiting when those are granted.
        let grants = loop {
            self.refresh_index();
            let projects = self.shares.projects(now);
            let standing = |w: &Waiter| self.shares.standing(w);
            // First with the first free hosts only (as many as the waiters
            // could take, and some): in an idle lab of 10,000 hosts a pass
            // then costs what the queue asks for. Only when a waiter is left
            // waiting is the pass run again over every free host, so that
            // one that could be served by a host further down is.
            let asked = self.queue.asked().saturating_add(SCHEDULE_PREFIX);
            let free = self.index.free_len();
            let mut grants = Vec::new();
            if asked < free {
                grants = self.queue.schedule_fair(
                    &self.free_candidates(now, asked),
                    &projects,
                    &standing,
                );
            }
            if asked >= free || grants.len() < self.queue.len() {
                grants = self.queue.schedule_fair(
                    &self.free_candidates(now, usize::MAX),
                    &projects,
                    &standing,
                );
            }
            let refused: Vec<WaiterId> = p
                .no_wait
                .iter()
                .copied()
                .filter(|w| self.queue.contains(*w) && !grants.iter().any(|(g, _)| g == w))
                .collect();
            let gone: Vec<WaiterId> = grants
                .iter()
                .map(|(w, _)| *w)
                .filter(|w| {
                    self.waiters
                        .get(w)
                        .and_then(|s| s.client.as_ref())
                        .is_some_and(|(_, tx)| tx.is_closed())
                })
                .collect();
            if refused.is_empty() && gone.is_empty() {
                break grants;
            }
            for w in gone {
                self.withdraw(p, now, w, "the client went away");
            }
            for w in refused {
                let booked = self.queue.get(w).and_then(|w| self.booked_reason(w, now));
                if let Some(state) = self.withdraw(p, now, w, "no hosts free and no_wait was set") {
                    let e = match booked {
                        Some(reason) => CoreError::BusyBooked { reason },
                        None => CoreError::Busy,
                    };
                    p.notify(state, WaitState::Failed(e));
                }
            }
        };
        p.no_wait.clear();
        for (granted, hosts) in grants {
            let Some((waiter, slot, state)) = self.take_waiter(p, granted) else {
                continue;
            };
            let waiter_id = if slot.no_wait {
                // Recorded now that it is granted; its id is behind every
                // waiter it was behind under its provisional one.
                let e = self.event(p, now, &waiter.principal, EventKind::LeaseRequested);
                e.waiter = Some(e.seq);
                e.request = Some(waiter.spec.clone());
                if waiter.preemptible {
                    e.detail = "preemptible".into();
                }
                e.seq
            } else {
                granted
            };
            self.stats
                .queue_wait
                .observe(now.0.saturating_sub(waiter.queued_at.0).max(0) as f64 / 1000.0);
            // No lease runs into a booking of its hosts (`lease::booking`):
            // the next one's start is the hard cap; a booking's own lease
            // lasts until the booking ends.
            let mut max_expires_at = now.saturating_add(self.config.max_lifetime);
            if let Some(cap) = self.booking_cap(&hosts, now, waiter.booking) {
                max_expires_at = max_expires_at.min(cap);
            }
            let until = match waiter.booking.and_then(|b| self.book.get(b)) {
                Some(b) => b.end,
                None => now.saturating_add(waiter.spec.ttl),
            };
            let lease = Lease {
                id: LeaseId::random(),
                holder: waiter.principal.clone(),
                hosts: hosts.clone(),
                state: LeaseState::Active,
                profile: waiter.spec.profile.clone(),
                priority: waiter.spec.priority,
                comment: waiter.spec.comment.clone(),
                ttl_ms: u64::try_from(waiter.spec.ttl.as_millis()).unwrap_or(u64::MAX),
                granted_at: now,
                expires_at: until.min(max_expires_at),
                max_expires_at,
                ended_at: None,
                waiter_id,
                request_id: waiter.request_id.clone(),
                generation: Generation(1),
                ssh_public_key: waiter.spec.ssh_public_key.clone(),
                preemptible: waiter.preemptible,
                preempted_at: None,
                booking: waiter.booking,
            };
            if let Some(b) = waiter.booking {
                self.booking_granted(p, b, lease.id);
            }
            for h in &hosts {
                let grant = if waiter.check.is_some() {
                    HostEvent::GrantCheck(lease.id)
                } else {
                    HostEvent::Grant(lease.id)
                };
                if let Err(e) = self.host_apply(p, h, grant) {
                    // The queue only offers grantable hosts: this is a bug.
                    error!(host = %h, error = %e, "scheduler offered a host it may not grant");
                }
            }
            let e = self.event(p, now, &waiter.principal, EventKind::LeaseGranted);
            e.lease = Some(lease.id);
            e.waiter = Some(waiter_id);
            e.hosts = hosts.clone();
            info!(lease = %lease.id, holder = %lease.holder, hosts = %join(&hosts), waiter = waiter_id, "lease granted");
            if let Some(trigger) = &waiter.check {
                let e = self.event(p, now, &Principal::health(), EventKind::HealthCheckStarted);
                e.lease = Some(lease.id);
                e.hosts = hosts.clone();
                e.detail = trigger.clone();
                info!(lease = %lease.id, host = %join(&hosts), trigger = %trigger, "health check started");
            }
            if let Some(r) = &waiter.request_id {
                self.recent_grants
                    .insert((waiter.principal.clone(), r.clone()), lease.id);
            }
            self.put_lease(p, lease.clone());
            if let Some(state) = state {
                p.notify(state, WaitState::Granted(lease));
            }
        }
        self.preempt(p, now);
    }

    /// Preemptible leases give way: walking the waiters that are not
    /// preemptible (attached, not held back by a quota) in queue order,
    /// each counts the hosts it could use that are free or already coming
    /// free from a noticed lease; when that is not enough and enough
    /// preemptible leases (the most recent first) hold hosts it could use,
    /// those leases get a notice and end after `--preempt-grace`. A waiter
    /// that preemption could not satisfy preempts nothing.
    fn preempt(&mut self, p: &mut Pending, now: Timestamp) {
        if self.preemptible.is_empty() {
            return;
        }
        // Hosts coming free from leases already noticed.
        let coming: Vec<HostName> = self
            .preempting
            .iter()
            .filter_map(|id| self.leases.get(id))
            .flat_map(|l| l.hosts.iter().cloned())
            .collect();
        let mut claimed: HashSet<HostName> = HashSet::new();
        let projects = self.shares.projects(now);
        let mut notices: Vec<(LeaseId, WaiterId, Principal, i32)> = Vec::new();
        let mut noticed: HashSet<LeaseId> = HashSet::new();
        let usable = |spec: &crate::lease::LeaseSpec, inv: &Inventory, h: &HostName| {
            inv.host(h).is_some_and(|s| spec.fits(h, s.arch, &s.flags))
        };
        // A bounded walk: the head of the queue is what preemption serves.
        for w in self.queue.iter().take(PREEMPT_WALK) {
            if w.preemptible || w.detached || w.check.is_some() {
                continue;
            }
            if crate::lease::queue::beyond_quota(&projects, w, &self.shares.standing(w)) {
                continue;
            }
            let need = w.spec.count as usize;
            let mut have: Vec<HostName> = self
                .index
                .free()
                .chain(coming.iter())
                .filter(|h| {
                    !claimed.contains(*h)
                        && usable(&w.spec, &self.inventory, h)
                        && w.allows(self.window(h, now))
                })
                .take(need)
                .cloned()
                .collect();
            let mut take: Vec<LeaseId> = Vec::new();
            for &(_, id) in self.preemptible.iter().rev() {
                if have.len() >= need {
                    break;
                }
                if noticed.contains(&id) {
                    continue;
                }
                let Some(l) = self.leases.get(&id) else {
                    continue;
                };
                let hosts: Vec<&HostName> = l
                    .hosts
                    .iter()
                    .filter(|h| {
                        !claimed.contains(*h)
                            && usable(&w.spec, &self.inventory, h)
                            && w.allows(self.window(h, now))
                    })
                    .collect();
                if hosts.is_empty() {
                    continue;
                }
                have.extend(hosts.into_iter().cloned());
                take.push(id);
            }
            if have.len() < need {
                // Preemption cannot serve it now: leave everything be.
                continue;
            }
            claimed.extend(have);
            for id in take {
                noticed.insert(id);
                notices.push((id, w.id, w.principal.clone(), w.spec.priority));
            }
        }
        let grace = self.config.preempt_grace;
        for (id, waiter, principal, priority) in notices {
            let Some(l) = self.leases.get(&id) else {
                continue;
            };
            let next = match l.apply(&LeaseEvent::Preempt { now, grace }) {
                Ok(n) => n,
                Err(e) => {
                    error!(lease = %id, error = %e, "preemption refused");
                    continue;
                }
            };
            let e = self.event(p, now, &Principal::server(), EventKind::LeasePreempted);
            e.lease = Some(id);
            e.waiter = Some(waiter);
            e.hosts = next.hosts.clone();
            e.detail = format!(
                "preempted for request {waiter} of {principal} (priority {priority}); ends at {}",
                next.expires_at
            );
            info!(lease = %id, holder = %next.holder, waiter, ends = %next.expires_at, "preemptible lease noticed");
            self.put_lease(p, next);
        }
    }

    /// Tell every attached waiter its position and ETA (only when they
    /// changed).
    fn publish_queue(&mut self, now: Timestamp) {
        if self.queue.is_empty() {
            return;
        }
        let len = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        let projects = self.shares.projects(now);
        let estimates = self
            .queue
            .estimate_fair(&self.candidates(now), now, &projects, &|w| {
                self.shares.standing(w)
            });
        for Estimate {
            waiter: w,
            position,
            eta,
            held_back,
        } in estimates
        {
            let Some((_, tx)) = self.waiters.get(&w).and_then(|s| s.client.as_ref()) else {
                continue;
            };
            let waiting_for = self
                .queue
                .get(w)
                .and_then(|w| self.booking_in_the_way(w, now));
            tx.send_if_modified(|s| {
                let changed = match s {
                    WaitState::Queued {
                        position: p0,
                        queue_length: l0,
                        eta: e0,
                        held_back: h0,
                        waiting_for: f0,
                        ..
                    } => {
                        *p0 != position
                            || *l0 != len
                            || *h0 != held_back
                            || *f0 != waiting_for
                            || match (*e0, eta) {
                                (Some(a), Some(b)) => (a.0 - b.0).abs() >= 5_000,
                                (a, b) => a.is_some() != b.is_some(),
                            }
                    }
                    _ => false,
                };
                if changed {
                    *s = WaitState::Queued {
                        waiter: w,
                        position,
                        queue_length: len,
                        eta,
                        held_back: held_back.clone(),
                        waiting_for: waiting_for.clone(),
                    };
                }
                changed
            });
        }
    }

    // ------------------------------------------------------------ retention

    /// One retention step: remove at most `retention_batch` ended leases
    /// (one commit) and at most as many events (one transaction) older than
    /// the retention period. A lease a host still names (being reclaimed)
    /// stays. Runs again soon while a backlog remains.
    async fn retention(&mut self) {
        let now = self.clock.now();
        let cutoff = now.saturating_sub(self.config.retention);
        let max = self.config.retention_batch.max(1);
        let named: HashSet<LeaseId> = self.hosts.values().filter_map(|h| h.lease()).collect();
        let old: Vec<(Timestamp, LeaseId)> = self
            .ended
            .range(..(cutoff, LeaseId(uuid::Uuid::nil())))
            .filter(|(_, id)| !named.contains(id))
            .take(max + 1)
            .copied()
            .collect();
        let mut more = old.len() > max;
        let mut p = Pending::default();
        for (_, id) in old.into_iter().take(max) {
            let Some(lease) = self.leases.remove(&id) else {
                continue;
            };
            // (A recent grant naming it is no longer found: a retry of its
            // request is a new request.)
            self.unindex_lease(&lease);
            p.batch.writes.push(Write::DeleteLease {
                id,
                generation: lease.generation,
            });
        }
        let leases = p.batch.writes.len();
        if self.commit(p).await.is_some() {
            more = false;
        }
        let store = self.store.clone();
        let events = match tokio::task::spawn_blocking(move || store.prune_events(cutoff, max))
            .await
        {
            Ok(Ok(pruned)) => {
                more |= pruned.more;
                pruned.events
            }
            Ok(Err(e)) => {
                error!(error = %error_chain(&e), "retention could not remove old events; trying again later");
                0
            }
            Err(_) => 0,
        };
        if leases > 0 || events > 0 {
            info!(leases, events, before = %cutoff, "retention removed ended leases and events");
        }
        self.next_retention = tokio::time::Instant::now()
            + if more {
                RETENTION_BACKLOG_PAUSE
            } else {
                self.config.retention_interval()
            };
    }

    // ------------------------------------------------------------ hosts

    fn reclaiming_hosts(&self) -> Vec<(HostName, LeaseId)> {
        self.hosts
            .iter()
            .filter_map(|(name, rec)| match rec.state {
                HostState::Reclaiming(l) => Some((name.clone(), l)),
                _ => None,
            })
            .collect()
    }

    fn host_order(&self) -> Vec<HostName> {
        let mut v: Vec<HostName> = self
            .inventory
            .hosts
            .iter()
            .map(|h| h.name.clone())
            .collect();
        v.extend(
            self.hosts
                .keys()
                .filter(|h| self.inventory.host(h).is_none())
                .cloned(),
        );
        v
    }

    fn view(&self, name: &HostName) -> Option<HostView> {
        let record = self.hosts.get(name)?.clone();
        Some(HostView {
            spec: self
                .inventory
                .host(name)
                .or_else(|| self.retired_specs.get(name))
                .cloned(),
            lease: record.lease().and_then(|l| self.leases.get(&l)).cloned(),
            unreachable: self.unreachable.get(name).cloned(),
            record,
        })
    }

    /// Replace the set of unreachable hosts; every change is an event.
    fn set_unreachable(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        hosts: BTreeMap<HostName, String>,
    ) {
        let hosts: BTreeMap<HostName, String> = hosts
            .into_iter()
            .filter(|(h, _)| self.hosts.contains_key(h))
            .collect();
        let back: Vec<HostName> = self
            .unreachable
            .keys()
            .filter(|h| !hosts.contains_key(*h))
            .cloned()
            .collect();
        for h in back {
            info!(host = %h, "host reachable again");
            let e = self.event(p, now, &Principal::server(), EventKind::HostReachable);
            e.hosts = vec![h.clone()];
            if let Some(why) = self.unreachable.get(&h).cloned()
                && checks::check_when_back(&why)
            {
                self.request_check(p, now, &h, format!("reachable again after: {why}"));
            }
        }
        for (h, why) in &hosts {
            if self.unreachable.get(h) != Some(why) {
                warn!(host = %h, reason = %why, "host unreachable");
                let e = self.event(p, now, &Principal::server(), EventKind::HostUnreachable);
                e.hosts = vec![h.clone()];
                e.detail = why.clone();
            }
        }
        if self.unreachable != hosts {
            self.unreachable = hosts;
            self.index.invalidate();
        }
    }

    fn set_maintenance(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: &Caller,
        host: &HostName,
        on: bool,
        reason: String,
    ) -> Result<HostView, CoreError> {
        policy::operators_only(caller, "change maintenance")?;
        self.switch_maintenance(p, now, &caller.principal, host, on, reason)?;
        self.view(host).ok_or_else(|| not_found("host", host))
    }

    /// Maintenance on or off for `host`, logged with `reason` when it
    /// changes (an operator's call, or a maintenance window's start and
    /// end; permissions are the caller's business).
    fn switch_maintenance(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        actor: &Principal,
        host: &HostName,
        on: bool,
        reason: String,
    ) -> Result<(), CoreError> {
        let rec = self
            .hosts
            .get(host)
            .ok_or_else(|| not_found("host", host))?;
        if rec.maintenance != on {
            self.host_apply(p, host, HostEvent::SetMaintenance(on))?;
            let kind = if on {
                EventKind::HostMaintenanceOn
            } else {
                EventKind::HostMaintenanceOff
            };
            let e = self.event(p, now, actor, kind);
            e.hosts = vec![host.clone()];
            e.detail = reason;
            info!(host = %host, maintenance = on, by = %actor, "maintenance changed");
        }
        Ok(())
    }

    fn set_quarantine(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: &Caller,
        host: &HostName,
        on: bool,
        reason: String,
    ) -> Result<HostView, CoreError> {
        policy::operators_only(caller, "quarantine hosts")?;
        let rec = self
            .hosts
            .get(host)
            .ok_or_else(|| not_found("host", host))?;
        let health = if on {
            if reason.trim().is_empty() {
                return Err(CoreError::InvalidArgument {
                    field: "reason",
                    reason: "a quarantine needs a reason".into(),
                });
            }
            // An operator's quarantine (or one held until released) stays
            // as it is; an automatic one that a passing check would lift
            // becomes the operator's.
            if let Health::Quarantined {
                until_released: true,
                ..
            } = rec.health
            {
                return self.view(host).ok_or_else(|| not_found("host", host));
            }
            Health::Quarantined {
                reason,
                since: now,
                by: caller.principal.clone(),
                until_released: true,
            }
        } else {
            // A release forgives the failures counted so far.
            self.host_failures.remove(host);
            if !rec.check_failures.is_empty() {
                self.host_apply(p, host, HostEvent::SetCheckFailures(Vec::new()))?;
            }
            Health::Healthy
        };
        self.set_health(p, now, &caller.principal, host, health)?;
        self.view(host).ok_or_else(|| not_found("host", host))
    }

    /// A provisioning failed through the host's fault (suspect; quarantined
    /// at the configured count within the window), or reached READY (a
    /// suspicion is cleared). Failures of the job or the lab say nothing
    /// about the host.
    fn host_verdict(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        host: &HostName,
        lease: LeaseId,
        verdict: HostVerdict,
    ) {
        if self
            .leases
            .get(&lease)
            .is_some_and(|l| is_check(l) && l.is_active() && l.hosts.contains(host))
        {
            let result = self.check_result(host, verdict);
            self.check_outcome(p, now, lease, host, result);
            return;
        }
        let Some(rec) = self.hosts.get(host) else {
            return;
        };
        let health = match verdict {
            HostVerdict::Failed(f) if f.class == FailureClass::Host => {
                let window = self.config.quarantine_window;
                let failures = self.host_failures.entry(host.clone()).or_default();
                failures.push_back(now);
                while failures.front().is_some_and(|t| now.since(*t) > window) {
                    failures.pop_front();
                }
                let n = failures.len();
                let why = format!("{} in lease {lease}: {}", f.rule, f.line);
                if rec.health.is_quarantined() {
                    return;
                }
                self.request_check(
                    p,
                    now,
                    host,
                    format!("after a host failure in lease {lease}: {}", f.rule),
                );
                if n >= self.config.quarantine_after {
                    Health::Quarantined {
                        reason: format!(
                            "{n} host failures within {}; the last: {why}",
                            humantime::format_duration(window)
                        ),
                        since: now,
                        by: Principal::server(),
                        until_released: true,
                    }
                } else {
                    Health::Suspect {
                        reason: why,
                        since: now,
                    }
                }
            }
            HostVerdict::Failed(_) => return,
            HostVerdict::Ready { .. } => match rec.health {
                Health::Suspect { .. } => Health::Healthy,
                _ => return,
            },
        };
        if let Err(e) = self.set_health(p, now, &Principal::server(), host, health) {
            warn!(host = %host, error = %e, "cannot record the host's health");
        }
    }

    /// `lab host check`: operators only, not in maintenance; joins a check
    /// already pending.
    fn check_host(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: &Caller,
        host: &HostName,
    ) -> Result<HostView, CoreError> {
        policy::operators_only(caller, "check hosts")?;
        let rec = self
            .hosts
            .get(host)
            .ok_or_else(|| not_found("host", host))?;
        if rec.maintenance || rec.retired {
            return Err(CoreError::Transition(crate::lease::TransitionError::Host {
                host: host.clone(),
                state: if rec.retired {
                    "retired"
                } else {
                    "in maintenance"
                },
                action: "be checked",
            }));
        }
        self.request_check(p, now, host, format!("asked for by {}", caller.principal));
        self.view(host).ok_or_else(|| not_found("host", host))
    }

    /// Is a health check of `host` waiting or running?
    fn check_pending(&self, host: &HostName) -> bool {
        self.queue
            .iter()
            .any(|w| w.check.is_some() && w.spec.hosts.contains(host))
            || self
                .hosts
                .get(host)
                .and_then(|r| match r.state {
                    HostState::Leased(l) => self.leases.get(&l),
                    _ => None,
                })
                .is_some_and(is_check)
    }

    /// Ask for a health check of `host` (why: `trigger`): a request of
    /// `lab-health` for that host with profile `health-check`, queued ahead
    /// of every other and durable like any. A trigger while a check is
    /// pending joins it.
    fn request_check(&mut self, p: &mut Pending, now: Timestamp, host: &HostName, trigger: String) {
        let Some(rec) = self.hosts.get(host) else {
            return;
        };
        if rec.retired || self.inventory.host(host).is_none() {
            return;
        }
        self.idle_since.remove(host);
        if self.check_pending(host) {
            debug!(host = %host, trigger = %trigger, "health check already pending: joined");
            return;
        }
        let principal = Principal::health();
        let spec = crate::lease::LeaseSpec {
            arch: None,
            flags: Default::default(),
            hosts: [host.clone()].into(),
            count: 1,
            profile: Some(ProfileName::new(CHECK_PROFILE).expect("a valid profile name")),
            ttl: self.config.health_check_timeout,
            priority: 0,
            comment: format!("health check: {trigger}"),
            ssh_public_key: None,
            min_ttl: None,
        };
        let id = self.queue_own_request(p, now, principal, spec, Some(trigger.clone()), None);
        info!(host = %host, trigger = %trigger, waiter = id, "health check requested");
    }

    /// A request the server makes itself (a health check for `check`, or
    /// booking `booking`'s at its start): logged as `LEASE_REQUESTED`,
    /// stored and queued like any, with no client to wait for. Its id.
    fn queue_own_request(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        principal: Principal,
        spec: crate::lease::LeaseSpec,
        check: Option<String>,
        booking: Option<crate::lease::booking::BookingId>,
    ) -> WaiterId {
        let e = self.event(p, now, &principal, EventKind::LeaseRequested);
        e.waiter = Some(e.seq);
        e.request = Some(spec.clone());
        e.booking = booking;
        if let Some(trigger) = &check {
            e.hosts = spec.hosts.iter().cloned().collect();
            e.detail = trigger.clone();
        }
        let id = e.seq;
        let w = Waiter {
            id,
            principal: principal.clone(),
            spec,
            request_id: None,
            queued_at: now,
            detached: false,
            check,
            preemptible: false,
            booking,
        };
        p.batch.writes.push(Write::Waiter(w.clone()));
        *self.waiting.entry(principal).or_default() += 1;
        self.enqueue(w);
        self.waiters.insert(id, Slot::for_check());
        id
    }

    /// What a check lease's provisioning says: READY with the facts line
    /// compared with the inventory, or a failed boot.
    fn check_result(&self, host: &HostName, verdict: HostVerdict) -> CheckResult {
        match verdict {
            HostVerdict::Failed(f) if f.rule.is_empty() => {
                CheckResult::Fail(format!("the boot failed: {}", f.line))
            }
            HostVerdict::Failed(f) => CheckResult::Fail(format!(
                "the boot failed ({}: {}): {}",
                f.class, f.rule, f.line
            )),
            HostVerdict::Ready { ready_line } if ready_line.trim().is_empty() => {
                CheckResult::Fail(format!(
                    "READY without a facts line (the agent sent none; the profile's ready text must match the {} line)",
                    facts::FACTS_MARKER
                ))
            }
            HostVerdict::Ready { ready_line } => {
                let Some(spec) = self.inventory.host(host) else {
                    return CheckResult::Fail("the host is no longer in the inventory".into());
                };
                match Facts::parse(&ready_line) {
                    Err(e) => CheckResult::Fail(format!("unreadable facts line: {e}")),
                    Ok(f) => match facts::compare(&f, spec) {
                        CheckVerdict::Pass => CheckResult::Pass,
                        CheckVerdict::Fail { reason } => CheckResult::Fail(reason),
                    },
                }
            }
        }
    }

    /// A health check ended: its event, the host's health by the loop's
    /// rules ([`checks::after_check`]), and the end of its lease if it is
    /// still active (the host is reclaimed as after any lease).
    fn check_outcome(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        lease: LeaseId,
        host: &HostName,
        result: CheckResult,
    ) {
        let Some(rec) = self.hosts.get(host) else {
            return;
        };
        let rules = LoopRules {
            quarantine_after: self.config.quarantine_after,
            window: self.config.quarantine_window,
        };
        let (health, failures) =
            checks::after_check(&rec.health, &rec.check_failures, &result, now, rules);
        let failures_changed = failures != rec.check_failures;
        let actor = Principal::health();
        let (kind, detail) = match &result {
            CheckResult::Pass => (
                EventKind::HealthCheckPassed,
                "the facts match the inventory".to_string(),
            ),
            CheckResult::Fail(why) => (EventKind::HealthCheckFailed, why.clone()),
        };
        match &result {
            CheckResult::Pass => info!(host = %host, lease = %lease, "health check passed"),
            CheckResult::Fail(why) => {
                warn!(host = %host, lease = %lease, reason = %why, "health check failed")
            }
        }
        let e = self.event(p, now, &actor, kind);
        e.hosts = vec![host.clone()];
        e.lease = Some(lease);
        e.detail = detail;
        if failures_changed
            && let Err(e) = self.host_apply(p, host, HostEvent::SetCheckFailures(failures))
        {
            warn!(host = %host, error = %e, "cannot record the check's failure");
        }
        if matches!(health, Health::Healthy) {
            // A pass clears provisioning suspicions counted so far.
            self.host_failures.remove(host);
        }
        if let Err(e) = self.set_health(p, now, &actor, host, health) {
            warn!(host = %host, error = %e, "cannot record the host's health");
        }
        if let Some(l) = self.leases.get(&lease).filter(|l| l.is_active())
            && let Ok(next) = l.apply(&LeaseEvent::Release { now })
        {
            self.end_lease(p, now, &actor, next, EventKind::LeaseReleased);
        }
    }

    /// When the next idle check is due: the earliest free-since time plus
    /// `--health-check-idle` of the hosts that may be checked now.
    fn idle_due(&self) -> Option<Timestamp> {
        let idle = self.config.health_check_idle?;
        self.idle_since
            .iter()
            .filter(|(h, _)| self.idle_checkable(h))
            .map(|(_, t)| t.saturating_add(idle))
            .min()
    }

    fn idle_checkable(&self, host: &HostName) -> bool {
        self.hosts.get(host).is_some_and(|r| {
            r.is_checkable()
                && !matches!(
                    r.health,
                    Health::Quarantined {
                        until_released: true,
                        ..
                    }
                )
        }) && !self.unreachable.contains_key(host)
    }

    /// Check the hosts free for longer than `--health-check-idle`.
    fn idle_checks(&mut self, p: &mut Pending, now: Timestamp) {
        let Some(idle) = self.config.health_check_idle else {
            return;
        };
        let due: Vec<HostName> = self
            .idle_since
            .iter()
            .filter(|(h, t)| t.saturating_add(idle) <= now && self.idle_checkable(h))
            .map(|(h, _)| h.clone())
            .collect();
        for h in due {
            let trigger = format!("idle for {}", humantime::format_duration(idle));
            self.request_check(p, now, &h, trigger);
        }
    }

    /// Records a change of `host`'s health (nothing when it is the same),
    /// with a `HOST_HEALTH` event.
    fn set_health(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        actor: &Principal,
        host: &HostName,
        health: Health,
    ) -> Result<(), CoreError> {
        let Some(rec) = self.hosts.get(host) else {
            return Err(not_found("host", host));
        };
        if rec.health == health {
            return Ok(());
        }
        let was = rec.health.name();
        let detail = match &health {
            Health::Healthy => format!("healthy (was {was})"),
            Health::Suspect { reason, .. } => format!("suspect: {reason}"),
            Health::Quarantined { reason, .. } => format!("quarantined: {reason}"),
        };
        info!(host = %host, health = health.name(), was, by = %actor, "host health changed");
        self.host_apply(p, host, HostEvent::SetHealth(health))?;
        let e = self.event(p, now, actor, EventKind::HostHealth);
        e.hosts = vec![host.clone()];
        e.detail = detail;
        Ok(())
    }

    /// Bring host records in line with the inventory: add new hosts, retire
    /// removed ones (deleted at once when free, after their lease otherwise).
    fn sync_inventory(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        actor: &Principal,
    ) -> ReloadSummary {
        let inventory = self.inventory.clone();
        let mut added = 0;
        let mut removed = 0;
        for spec in &inventory.hosts {
            match self.hosts.get(&spec.name) {
                None => {
                    self.put_host(p, HostRecord::new(spec.name.clone()));
                    let e = self.event(p, now, actor, EventKind::HostAdded);
                    e.hosts = vec![spec.name.clone()];
                    added += 1;
                }
                Some(rec) if rec.retired => {
                    let name = spec.name.clone();
                    if let Err(err) = self.host_apply(p, &name, HostEvent::SetRetired(false)) {
                        error!(host = %name, error = %err, "cannot bring host back");
                    }
                    let e = self.event(p, now, actor, EventKind::HostAdded);
                    e.hosts = vec![name];
                    e.detail = "back in the inventory".into();
                    added += 1;
                }
                Some(_) => {}
            }
        }
        let gone: Vec<HostName> = self
            .hosts
            .keys()
            .filter(|h| inventory.host(h).is_none())
            .cloned()
            .collect();
        for name in gone {
            let rec = &self.hosts[&name];
            if rec.state == HostState::Available {
                self.remove_host(p, now, actor, &name);
                removed += 1;
            } else if !rec.retired {
                if let Err(err) = self.host_apply(p, &name, HostEvent::SetRetired(true)) {
                    error!(host = %name, error = %err, "cannot retire host");
                }
                let e = self.event(p, now, actor, EventKind::HostRetired);
                e.hosts = vec![name];
                e.detail = "removed from the inventory; kept until its lease ends".into();
                removed += 1;
            }
        }
        let summary = ReloadSummary {
            hosts: inventory.hosts.len(),
            added,
            removed,
        };
        let e = self.event(p, now, actor, EventKind::InventoryLoaded);
        e.detail = format!("{} hosts, {added} added, {removed} removed", summary.hosts);
        summary
    }

    // ------------------------------------------------------------ commit

    /// Commit the batch, then answer. Returns the error if it failed.
    /// The gauges of `/metrics`, from the state after a batch.
    fn publish_stats(&mut self) {
        self.refresh_index();
        self.stats.set_state(
            self.index.tally(),
            self.unreachable.len(),
            self.expiries.len(),
            self.queue.len(),
        );
    }

    fn refresh_index(&mut self) {
        self.index
            .refresh(&self.inventory, &self.hosts, &self.unreachable);
    }

    async fn commit(&mut self, mut p: Pending) -> Option<CoreError> {
        // The outbox rows of the batch's events, in the same transaction.
        if !self.webhooks.is_empty() && !p.batch.events.is_empty() {
            let rows = crate::webhooks::outbox_rows(&self.webhooks, &p.batch.events, |l| {
                self.leases.get(&l).map(|l| l.holder.clone())
            });
            p.batch.writes.extend(rows.into_iter().map(Write::Outbox));
        }
        let result = if p.batch.is_empty() {
            Ok(Batch::default())
        } else {
            let store = self.store.clone();
            let batch = std::mem::take(&mut p.batch);
            let started = std::time::Instant::now();
            let r = match tokio::task::spawn_blocking(move || store.commit(&batch).map(|()| batch))
                .await
            {
                Ok(r) => r,
                Err(join) => Err(StoreError::Backend {
                    op: "commit",
                    source: Box::new(join),
                }),
            };
            self.stats
                .commit_seconds
                .observe_duration(started.elapsed());
            r
        };
        match result {
            Ok(batch) => {
                for f in p.after {
                    f(None);
                }
                if batch.writes.iter().any(|w| matches!(w, Write::Outbox(_))) {
                    self.outbox_wake.notify_one();
                }
                for e in batch.events {
                    let _ = self.events.send(e);
                }
                for (host, lease) in p.reclaims {
                    self.spawn_reclaim(host, lease);
                }
                None
            }
            Err(e) => {
                error!(error = %error_chain(&e), "commit failed; answering UNAVAILABLE and reloading state from the store");
                let err = CoreError::Store(Arc::new(e));
                for f in std::mem::take(&mut p.after) {
                    f(Some(&err));
                }
                // Warnings that were not committed go out again.
                for id in std::mem::take(&mut p.warned) {
                    self.warned.remove(&id);
                }
                // Every waiting client is answered UNAVAILABLE: its request
                // may not be what the store holds. The store's waiters
                // (reloaded below) wait detached for their clients to
                // resume them by request id.
                let now = self.clock.now();
                let until = now.saturating_add(self.config.reattach_grace);
                for (&w, slot) in self.waiters.iter_mut() {
                    if let Some((handle, tx)) = slot.client.take() {
                        self.handles.remove(&handle);
                        let _ = tx.send(WaitState::Failed(err.clone()));
                        slot.detached_until = Some(until);
                        self.detached.insert((until, w));
                        self.queue.set_detached(w, true);
                    }
                }
                // An inventory reload answered UNAVAILABLE does not take effect.
                if let Some((inventory, retired)) = p.rollback_inventory.take() {
                    self.inventory = inventory;
                    self.index.invalidate();
                    self.retired_specs = retired;
                }
                match load(&self.store).await {
                    Ok(snapshot) => {
                        self.restore(snapshot, now, Detached::FailedCommit);
                        self.resync = true;
                        // Reclaims whose start was in the failed batch; running
                        // ones are not started twice.
                        for (name, l) in self.reclaiming_hosts() {
                            self.spawn_reclaim(name, l);
                        }
                    }
                    Err(e2) => {
                        error!(error = %e2, "reloading state failed too; state may be ahead of the store")
                    }
                }
                Some(err)
            }
        }
    }

    /// Run the reclaim step for a host, retrying with backoff until it
    /// succeeds, then report back to the actor.
    fn spawn_reclaim(&mut self, host: HostName, lease: LeaseId) {
        if !self.reclaiming.insert(host.clone()) {
            return;
        }
        let job = self
            .inventory
            .host(&host)
            .or_else(|| self.retired_specs.get(&host))
            .map(|spec| ReclaimJob {
                host: spec.clone(),
                lease,
                profile: self.leases.get(&lease).and_then(|l| l.profile.clone()),
            });
        let reclaimer = self.reclaimer.clone();
        let Some(tx) = self.tx.upgrade() else { return };
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            let mut failure = None;
            if let Some(job) = job {
                loop {
                    // Nothing to do any more, e.g. the rack lost its agent in
                    // an inventory reload while this was being retried.
                    if let Some(inventory) = current_inventory(&tx).await
                        && reclaimer.is_immediate(&job.host, &inventory)
                    {
                        break;
                    }
                    let Err(e) = reclaimer.reclaim(&job).await else {
                        break;
                    };
                    warn!(host = %host, lease = %lease, error = %error_chain(&e), retry_in = ?delay, "reclaim failed");
                    if e.host_fault {
                        failure.get_or_insert_with(|| error_chain(&e));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
            let _ = tx
                .send(Command::Reclaimed {
                    host,
                    lease,
                    failure,
                })
                .await;
        });
    }
}

async fn load(store: &Arc<dyn Store>) -> Result<Snapshot, CoreError> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.load()).await {
        Ok(r) => r.map_err(|e| CoreError::Store(Arc::new(e))),
        Err(_) => Err(CoreError::ShuttingDown),
    }
}

/// The inventory in force, asked of the actor from a task of its own.
async fn current_inventory(tx: &mpsc::Sender<Command>) -> Option<Arc<Inventory>> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    tx.send(Command::GetInventory { reply }).await.ok()?;
    rx.await.ok()?.ok()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn join(hosts: &[HostName]) -> String {
    hosts
        .iter()
        .map(HostName::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// A health check's lease (its holder is the server's `lab-health`, a
/// principal no token can have).
fn is_check(lease: &Lease) -> bool {
    lease.holder == Principal::health()
}

/// How a `LEASE_EXPIRING` detail starts: names the expiry it warns of.
fn expiring_marker(expires_at: Timestamp) -> String {
    format!("expires {expires_at}")
}

fn expiring_detail(expires_at: Timestamp, left: Duration) -> String {
    format!(
        "{} (in {})",
        expiring_marker(expires_at),
        humantime::format_duration(Duration::from_secs(
            (left.as_millis() as u64).div_ceil(1000)
        ))
    )
}

fn not_found(what: &'static str, name: impl std::fmt::Display) -> CoreError {
    CoreError::NotFound {
        what,
        name: name.to_string(),
    }
}

pub use lab_types::error_chain;
