//! The core actor: the one task that owns hosts, leases and the queue, and
//! the only writer of the store. See the parent module for the batch cycle.

use super::clock::Clock;
use super::policy;
use super::reclaim::{ReclaimJob, Reclaimer};
use super::{Command, CoreConfig, CoreError, HostView, ReloadSummary, Reply, WaitState};
use crate::events::{EventKind, EventRecord};
use crate::inventory::{HostSpec, Inventory};
use crate::lease::{
    Candidate, HostEvent, HostRecord, HostState, Lease, LeaseEvent, LeaseSpec, LeaseState, Queue,
    Waiter,
};
use crate::store::{Batch, Snapshot, Store, StoreError, Write};
use crate::types::{Caller, Generation, HostName, LeaseId, Principal, Timestamp, WaiterId};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, error, info, warn};

type AfterCommit = Box<dyn FnOnce(Option<&CoreError>) + Send>;

/// What one batch produced: the records and events to commit, and what to do
/// once the commit succeeded or failed.
#[derive(Default)]
struct Pending {
    batch: Batch,
    after: Vec<AfterCommit>,
    reclaims: Vec<(HostName, LeaseId)>,
    no_wait: Vec<WaiterId>,
    /// Waiters whose request event is in this batch.
    queued: Vec<WaiterId>,
    /// Waiters that left the queue in this batch (granted or withdrawn), and
    /// deferred withdrawals written in this batch.
    ended: Vec<(WaiterId, Principal)>,
    /// The inventory before a reload in this batch, restored if the commit fails.
    rollback_inventory: Option<(Arc<Inventory>, HashMap<HostName, HostSpec>)>,
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
    leases: HashMap<LeaseId, Lease>,
    /// Active leases by expiry.
    expiries: BTreeSet<(Timestamp, LeaseId)>,
    queue: Queue,
    waiters: HashMap<WaiterId, (u64, watch::Sender<WaitState>)>,
    /// Request handle → waiter id, for withdrawals by dropped acquisitions.
    handles: HashMap<u64, WaiterId>,
    /// Descriptions of hosts removed from the inventory while leased, for
    /// their reclaim and for display until they are gone.
    retired_specs: HashMap<HostName, HostSpec>,
    /// Waiters dropped by a failed commit whose request event was already
    /// committed: their REQUEST_WITHDRAWN goes into the next batch.
    deferred_withdrawals: Vec<(WaiterId, Principal)>,
    /// Hosts with a reclaim task running.
    reclaiming: HashSet<HostName>,
    /// Hosts that cannot be driven now (agent away, BMC silent) and why.
    /// Not persisted: agents report it again after every restart.
    unreachable: BTreeMap<HostName, String>,
    last_seq: u64,
    /// The inventory must be reconciled with the host records (after a
    /// reload of state from the store).
    resync: bool,
}

impl Actor {
    pub(super) async fn start(
        config: CoreConfig,
        store: Arc<dyn Store>,
        inventory: Inventory,
        reclaimer: Arc<dyn Reclaimer>,
        clock: Arc<dyn Clock>,
        tx: mpsc::Sender<Command>,
        events: broadcast::Sender<EventRecord>,
    ) -> Result<Actor, CoreError> {
        let snapshot = load(&store).await?;
        let mut actor = Actor {
            config,
            store,
            clock,
            reclaimer,
            tx: tx.downgrade(),
            events,
            inventory: Arc::new(inventory),
            hosts: BTreeMap::new(),
            leases: HashMap::new(),
            expiries: BTreeSet::new(),
            queue: Queue::default(),
            waiters: HashMap::new(),
            handles: HashMap::new(),
            retired_specs: HashMap::new(),
            deferred_withdrawals: Vec::new(),
            reclaiming: HashSet::new(),
            unreachable: BTreeMap::new(),
            last_seq: 0,
            resync: false,
        };
        actor.restore(snapshot);
        let now = actor.clock.now();
        let mut p = Pending::default();
        let summary = actor.sync_inventory(&mut p, now, &Principal::server());
        actor.expire_due(&mut p, now);
        p.reclaims.extend(actor.reclaiming_hosts());
        let active = actor.expiries.len();
        if let Some(e) = actor.commit(p).await {
            return Err(e);
        }
        info!(
            hosts = summary.hosts,
            active_leases = active,
            last_event = actor.last_seq,
            "core started"
        );
        Ok(actor)
    }

    /// Adopt a snapshot from the store as the current state.
    fn restore(&mut self, snapshot: Snapshot) {
        self.hosts = snapshot
            .hosts
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
        self.expiries = snapshot
            .leases
            .iter()
            .filter(|l| l.is_active())
            .map(|l| (l.expires_at, l.id))
            .collect();
        self.leases = snapshot.leases.into_iter().map(|l| (l.id, l)).collect();
        self.last_seq = snapshot.last_event_seq;
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut cmds = Vec::with_capacity(self.config.max_batch);
        loop {
            let deadline = self
                .expiries
                .first()
                .map(|(t, _)| self.clock.instant_at(*t));
            tokio::select! {
                n = rx.recv_many(&mut cmds, self.config.max_batch) => {
                    if n == 0 {
                        break;
                    }
                }
                () = sleep_until(deadline) => {}
            }
            let now = self.clock.now();
            let mut p = Pending::default();
            if std::mem::take(&mut self.resync) {
                self.sync_inventory(&mut p, now, &Principal::server());
            }
            for (waiter, principal) in std::mem::take(&mut self.deferred_withdrawals) {
                p.ended.push((waiter, principal.clone()));
                let e = self.event(&mut p, now, &principal, EventKind::RequestWithdrawn);
                e.waiter = Some(waiter);
                e.detail =
                    "the store failed to commit; the request was answered UNAVAILABLE".into();
            }
            self.expire_due(&mut p, now);
            for cmd in cmds.drain(..) {
                self.handle(&mut p, now, cmd);
            }
            self.schedule(&mut p, now);
            let changed = !p.batch.is_empty();
            self.commit(p).await;
            if changed {
                self.publish_queue(self.clock.now());
            }
        }
        debug!("core actor stopped");
    }

    fn handle(&mut self, p: &mut Pending, now: Timestamp, cmd: Command) {
        match cmd {
            Command::Acquire {
                caller,
                handle,
                spec,
                no_wait,
                state,
            } => self.acquire(p, now, caller, handle, spec, no_wait, state),
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
            Command::GetLease { lease, reply } => {
                let r = self
                    .leases
                    .get(&lease)
                    .cloned()
                    .ok_or_else(|| not_found("lease", lease));
                p.reply(reply, r);
            }
            Command::ListLeases {
                include_ended,
                holder,
                reply,
            } => {
                let mut v: Vec<Lease> = self
                    .leases
                    .values()
                    .filter(|l| include_ended || l.is_active())
                    .filter(|l| holder.as_ref().is_none_or(|h| &l.holder == h))
                    .cloned()
                    .collect();
                v.sort_by_key(|l| (l.granted_at, l.id));
                p.reply(reply, Ok(v));
            }
            Command::ListHosts { reply } => {
                let v = self
                    .host_order()
                    .into_iter()
                    .filter_map(|h| self.view(&h))
                    .collect();
                p.reply(reply, Ok(v));
            }
            Command::GetHost { host, reply } => {
                let r = self.view(&host).ok_or_else(|| not_found("host", &host));
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
                let r = self.sync_inventory(p, now, &actor);
                self.drop_unsatisfiable(p, now);
                p.reply(reply, Ok(r));
            }
            Command::Reclaimed { host, lease } => self.reclaimed(p, now, host, lease),
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
        });
        p.batch.events.last_mut().expect("just pushed")
    }

    fn put_host(&mut self, p: &mut Pending, rec: HostRecord) {
        p.batch.writes.push(Write::Host(rec.clone()));
        self.hosts.insert(rec.name.clone(), rec);
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

    fn put_lease(&mut self, p: &mut Pending, lease: Lease) {
        if let Some(old) = self.leases.get(&lease.id) {
            self.expiries.remove(&(old.expires_at, old.id));
        }
        if lease.is_active() {
            self.expiries.insert((lease.expires_at, lease.id));
        }
        p.batch.writes.push(Write::Lease(lease.clone()));
        self.leases.insert(lease.id, lease);
    }

    // ------------------------------------------------------------ leases

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: Caller,
        handle: u64,
        spec: LeaseSpec,
        no_wait: bool,
        state: watch::Sender<WaitState>,
    ) {
        if let Err(e) = self.check_spec(&spec) {
            debug!(principal = %caller.principal, error = %e, "lease request refused");
            p.notify(state, WaitState::Failed(e));
            return;
        }
        let e = self.event(p, now, &caller.principal, EventKind::LeaseRequested);
        // The request's event sequence number is its waiter id: unique
        // across restarts, and its place in line within a priority.
        let waiter = e.seq;
        e.waiter = Some(waiter);
        e.request = Some(spec.clone());
        debug!(waiter, principal = %caller.principal, count = spec.count, priority = spec.priority, "lease requested");
        self.queue.push(Waiter {
            id: waiter,
            principal: caller.principal,
            spec,
        });
        self.waiters.insert(waiter, (handle, state));
        self.handles.insert(handle, waiter);
        p.queued.push(waiter);
        if no_wait {
            p.no_wait.push(waiter);
        }
    }

    /// Take a waiter out of the queue and the maps; its state sender is
    /// returned for a final answer (dropping it tells the client nothing more
    /// will come).
    fn take_waiter(
        &mut self,
        p: &mut Pending,
        waiter: WaiterId,
    ) -> Option<(Waiter, watch::Sender<WaitState>)> {
        let w = self.queue.remove(waiter)?;
        let (handle, state) = self.waiters.remove(&waiter)?;
        self.handles.remove(&handle);
        p.ended.push((waiter, w.principal.clone()));
        Some((w, state))
    }

    /// Withdraw a waiting request with a REQUEST_WITHDRAWN event.
    fn withdraw(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        waiter: WaiterId,
        why: &str,
    ) -> Option<watch::Sender<WaitState>> {
        let (w, state) = self.take_waiter(p, waiter)?;
        let e = self.event(p, now, &w.principal, EventKind::RequestWithdrawn);
        e.waiter = Some(waiter);
        e.detail = why.to_owned();
        debug!(waiter, why, "lease request withdrawn");
        Some(state)
    }

    /// After an inventory change: refuse waiting requests that can never be met now.
    fn drop_unsatisfiable(&mut self, p: &mut Pending, now: Timestamp) {
        let doomed: Vec<(WaiterId, CoreError)> = self
            .queue
            .iter()
            .filter_map(|w| self.check_spec(&w.spec).err().map(|e| (w.id, e)))
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

    /// The one TTL rule, for requests and renewals alike.
    fn check_ttl(&self, field: &'static str, ttl: Duration) -> Result<(), CoreError> {
        if ttl.is_zero() || ttl > self.config.max_ttl {
            return Err(CoreError::InvalidArgument {
                field,
                reason: format!(
                    "must be more than 0 and at most {}",
                    humantime::format_duration(self.config.max_ttl)
                ),
            });
        }
        Ok(())
    }

    fn check_spec(&self, spec: &LeaseSpec) -> Result<(), CoreError> {
        self.check_ttl("request.ttl", spec.ttl)?;
        if let Some(h) = spec.hosts.iter().find(|h| self.inventory.host(h).is_none()) {
            return Err(CoreError::InvalidArgument {
                field: "request.hosts",
                reason: format!("no host named {h} in the inventory"),
            });
        }
        let cands = self.candidates(Timestamp(0));
        let matching = cands.iter().filter(|c| spec.matches(c)).count();
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
        self.check_ttl("ttl", ttl)?;
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
                    self.end_lease(p, now, &Principal::server(), next, EventKind::LeaseExpired);
                }
                Err(e) => error!(lease = %id, error = %e, "cannot expire lease"),
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
        for h in &hosts {
            match self.host_apply(p, h, HostEvent::EndLease(id)) {
                Ok(()) => reclaiming.push(h.clone()),
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
                self.reclaimed(p, now, h, id);
            } else {
                p.reclaims.push((h, id));
            }
        }
    }

    fn reclaimed(&mut self, p: &mut Pending, now: Timestamp, host: HostName, lease: LeaseId) {
        self.reclaiming.remove(&host);
        if let Err(err) = self.host_apply(p, &host, HostEvent::Reclaimed(lease)) {
            debug!(host = %host, lease = %lease, error = %err, "stale reclaim report");
            return;
        }
        let e = self.event(p, now, &Principal::server(), EventKind::HostAvailable);
        e.hosts = vec![host.clone()];
        e.lease = Some(lease);
        if self.hosts.get(&host).is_some_and(|h| h.retired) {
            self.remove_host(p, now, &Principal::server(), &host);
        }
    }

    fn remove_host(&mut self, p: &mut Pending, now: Timestamp, actor: &Principal, host: &HostName) {
        self.retired_specs.remove(host);
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
                Some(Candidate {
                    name: &spec.name,
                    arch: spec.arch,
                    flags: &spec.flags,
                    grantable: rec.is_grantable() && !unreachable,
                    gone: rec.retired,
                    free_at,
                })
            })
            .collect()
    }

    fn schedule(&mut self, p: &mut Pending, now: Timestamp) {
        // Requests whose client is gone do not take hosts.
        let gone: Vec<WaiterId> = self
            .waiters
            .iter()
            .filter(|(_, (_, tx))| tx.is_closed())
            .map(|(w, _)| *w)
            .collect();
        for w in gone {
            self.withdraw(p, now, w, "the client went away");
        }
        // No-wait requests that cannot be granted now are refused first, so
        // they neither hold hosts back from the waiters behind them nor
        // appear to be waiting when those are granted.
        let grants = loop {
            let grants = self.queue.schedule(&self.candidates(now));
            let refused: Vec<WaiterId> = p
                .no_wait
                .iter()
                .copied()
                .filter(|w| self.queue.contains(*w) && !grants.iter().any(|(g, _)| g == w))
                .collect();
            if refused.is_empty() {
                break grants;
            }
            for w in refused {
                if let Some(state) = self.withdraw(p, now, w, "no hosts free and no_wait was set") {
                    p.notify(state, WaitState::Failed(CoreError::Busy));
                }
            }
        };
        p.no_wait.clear();
        for (waiter_id, hosts) in grants {
            let Some((waiter, state)) = self.take_waiter(p, waiter_id) else {
                continue;
            };
            let max_expires_at = now.saturating_add(self.config.max_lifetime);
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
                expires_at: now.saturating_add(waiter.spec.ttl).min(max_expires_at),
                max_expires_at,
                ended_at: None,
                waiter_id,
                generation: Generation(1),
                ssh_public_key: waiter.spec.ssh_public_key.clone(),
            };
            for h in &hosts {
                if let Err(e) = self.host_apply(p, h, HostEvent::Grant(lease.id)) {
                    // The queue only offers grantable hosts: this is a bug.
                    error!(host = %h, error = %e, "scheduler offered a host it may not grant");
                }
            }
            let e = self.event(p, now, &waiter.principal, EventKind::LeaseGranted);
            e.lease = Some(lease.id);
            e.waiter = Some(waiter_id);
            e.hosts = hosts.clone();
            info!(lease = %lease.id, holder = %lease.holder, hosts = %join(&hosts), waiter = waiter_id, "lease granted");
            self.put_lease(p, lease.clone());
            p.notify(state, WaitState::Granted(lease));
        }
    }

    /// Tell every waiter its position and ETA (only when they changed).
    fn publish_queue(&mut self, now: Timestamp) {
        if self.queue.is_empty() {
            return;
        }
        let len = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        let estimates = self.queue.estimate(&self.candidates(now), now);
        for (w, position, eta) in estimates {
            let Some((_, tx)) = self.waiters.get(&w) else {
                continue;
            };
            tx.send_if_modified(|s| {
                let changed = match s {
                    WaitState::Queued {
                        position: p0,
                        queue_length: l0,
                        eta: e0,
                        ..
                    } => {
                        *p0 != position
                            || *l0 != len
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
                    };
                }
                changed
            });
        }
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
            e.hosts = vec![h];
        }
        for (h, why) in &hosts {
            if self.unreachable.get(h) != Some(why) {
                warn!(host = %h, reason = %why, "host unreachable");
                let e = self.event(p, now, &Principal::server(), EventKind::HostUnreachable);
                e.hosts = vec![h.clone()];
                e.detail = why.clone();
            }
        }
        self.unreachable = hosts;
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
            let e = self.event(p, now, &caller.principal, kind);
            e.hosts = vec![host.clone()];
            e.detail = reason;
            info!(host = %host, maintenance = on, by = %caller.principal, "maintenance changed");
        }
        self.view(host).ok_or_else(|| not_found("host", host))
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
    async fn commit(&mut self, mut p: Pending) -> Option<CoreError> {
        let result = if p.batch.is_empty() {
            Ok(Batch::default())
        } else {
            let store = self.store.clone();
            let batch = std::mem::take(&mut p.batch);
            match tokio::task::spawn_blocking(move || store.commit(&batch).map(|()| batch)).await {
                Ok(r) => r,
                Err(join) => Err(StoreError::Backend {
                    op: "commit",
                    source: Box::new(join),
                }),
            }
        };
        match result {
            Ok(batch) => {
                for f in p.after {
                    f(None);
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
                // The queue is memory only: fail every waiter, so that no
                // request lives on whose events were lost, and record the
                // withdrawal of those whose request event was committed.
                let waiting: Vec<WaiterId> = self.queue.iter().map(|w| w.id).collect();
                for w in waiting {
                    if let Some((_, state)) = self.take_waiter(&mut p, w) {
                        let _ = state.send(WaitState::Failed(err.clone()));
                    }
                }
                for (w, principal) in std::mem::take(&mut p.ended) {
                    if !p.queued.contains(&w) {
                        self.deferred_withdrawals.push((w, principal));
                    }
                }
                // An inventory reload answered UNAVAILABLE does not take effect.
                if let Some((inventory, retired)) = p.rollback_inventory.take() {
                    self.inventory = inventory;
                    self.retired_specs = retired;
                }
                match load(&self.store).await {
                    Ok(snapshot) => {
                        self.restore(snapshot);
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
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
            let _ = tx.send(Command::Reclaimed { host, lease }).await;
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

fn not_found(what: &'static str, name: impl std::fmt::Display) -> CoreError {
    CoreError::NotFound {
        what,
        name: name.to_string(),
    }
}

pub use lab_types::error_chain;
