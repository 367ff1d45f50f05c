//! An in-memory [`Store`] for tests, with the same compare-and-set rules as
//! the durable one, a switch that makes commits fail, and counters of what
//! was written (commits, the largest commit, the largest prune step).

use super::{
    Batch, EventQuery, OutboxKey, OutboxRow, Pruned, Settle, Snapshot, Store, StoreError, Write,
    check_delete, check_event_seqs, check_generation, check_waiter,
};
use crate::events::EventRecord;
use crate::lease::booking::{Booking, BookingId};
use crate::lease::{HostRecord, Lease, Waiter};
use crate::types::{HostName, LeaseId, Timestamp, WaiterId};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Debug, Default, Clone)]
struct Data {
    hosts: BTreeMap<HostName, HostRecord>,
    leases: BTreeMap<LeaseId, Lease>,
    waiters: BTreeMap<WaiterId, Waiter>,
    bookings: BTreeMap<BookingId, Booking>,
    events: Vec<EventRecord>,
    outbox: BTreeMap<OutboxKey, OutboxRow>,
    /// Sequence number of the last event ever stored.
    last_seq: u64,
}

/// Volatile store; `fail_commits(true)` makes every commit fail.
#[derive(Debug, Default)]
pub struct MemStore {
    data: Mutex<Data>,
    failing: AtomicBool,
    commits: AtomicUsize,
    largest_commit: AtomicUsize,
    largest_prune: AtomicUsize,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn fail_commits(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    /// Successful commits so far.
    pub fn commits(&self) -> usize {
        self.commits.load(Ordering::SeqCst)
    }

    /// Most records and events one commit wrote.
    pub fn largest_commit(&self) -> usize {
        self.largest_commit.load(Ordering::SeqCst)
    }

    /// Most events one `prune_events` call removed.
    pub fn largest_prune(&self) -> usize {
        self.largest_prune.load(Ordering::SeqCst)
    }

    /// Every event in the store.
    pub fn all_events(&self) -> Vec<EventRecord> {
        lock(&self.data).events.clone()
    }

    /// Every stored waiting request.
    pub fn waiters(&self) -> Vec<Waiter> {
        lock(&self.data).waiters.values().cloned().collect()
    }
}

fn lock(m: &Mutex<Data>) -> std::sync::MutexGuard<'_, Data> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store for MemStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let d = lock(&self.data);
        Ok(Snapshot {
            hosts: d.hosts.values().cloned().collect(),
            leases: d.leases.values().cloned().collect(),
            waiters: d.waiters.values().cloned().collect(),
            bookings: d.bookings.values().cloned().collect(),
            last_event_seq: d.last_seq,
        })
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Backend {
                op: "commit",
                source: "commits are switched off for this test".into(),
            });
        }
        let mut guard = lock(&self.data);
        let mut d = guard.clone();
        for w in &batch.writes {
            match w {
                Write::Host(h) => {
                    check_generation(
                        w.key(),
                        d.hosts.get(&h.name).map(|x| x.generation),
                        h.generation,
                    )?;
                    d.hosts.insert(h.name.clone(), h.clone());
                }
                Write::DeleteHost { name, generation } => {
                    check_delete(
                        w.key(),
                        d.hosts.get(name).map(|x| x.generation),
                        *generation,
                    )?;
                    d.hosts.remove(name);
                }
                Write::DeleteLease { id, generation } => {
                    check_delete(w.key(), d.leases.get(id).map(|x| x.generation), *generation)?;
                    d.leases.remove(id);
                }
                Write::Waiter(waiter) => {
                    check_waiter(waiter.id, true, d.waiters.contains_key(&waiter.id))?;
                    d.waiters.insert(waiter.id, waiter.clone());
                }
                Write::DeleteWaiter(id) => {
                    check_waiter(*id, false, d.waiters.contains_key(id))?;
                    d.waiters.remove(id);
                }
                Write::Lease(l) => {
                    check_generation(
                        w.key(),
                        d.leases.get(&l.id).map(|x| x.generation),
                        l.generation,
                    )?;
                    d.leases.insert(l.id, l.clone());
                }
                Write::Booking(b) => {
                    check_generation(
                        w.key(),
                        d.bookings.get(&b.id).map(|x| x.generation),
                        b.generation,
                    )?;
                    d.bookings.insert(b.id, b.clone());
                }
                Write::DeleteBooking { id, generation } => {
                    check_delete(
                        w.key(),
                        d.bookings.get(id).map(|x| x.generation),
                        *generation,
                    )?;
                    d.bookings.remove(id);
                }
                Write::Outbox(row) => {
                    d.outbox.insert(row.key(), row.clone());
                }
                Write::DropOutbox { hook } => d.outbox.retain(|(_, h), _| h != hook),
            }
        }
        check_event_seqs(d.last_seq, &batch.events)?;
        d.events.extend(batch.events.iter().cloned());
        d.last_seq = d.events.last().map_or(d.last_seq, |e| e.seq);
        *guard = d;
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.largest_commit
            .fetch_max(batch.writes.len() + batch.events.len(), Ordering::SeqCst);
        Ok(())
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        Ok(lock(&self.data).last_seq)
    }

    fn prune_events(&self, before: Timestamp, max: usize) -> Result<Pruned, StoreError> {
        let mut d = lock(&self.data);
        // Never the last event.
        let prunable = d.events.len().saturating_sub(1);
        let old = d.events[..prunable]
            .iter()
            .take_while(|e| e.time < before)
            .count();
        let n = old.min(max);
        d.events.drain(..n);
        self.largest_prune.fetch_max(n, Ordering::SeqCst);
        Ok(Pruned {
            events: n,
            more: old > n,
        })
    }

    fn outbox_due(&self, now: Timestamp, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let d = lock(&self.data);
        let mut due: Vec<&OutboxRow> = d
            .outbox
            .values()
            .filter(|r| r.next_attempt <= now)
            .collect();
        due.sort_by_key(|r| (r.next_attempt, r.seq, r.hook.clone()));
        Ok(due.into_iter().take(limit).cloned().collect())
    }

    fn outbox_next_due(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(lock(&self.data)
            .outbox
            .values()
            .map(|r| r.next_attempt)
            .min())
    }

    fn outbox_settle(&self, outcomes: &[Settle]) -> Result<(), StoreError> {
        let mut d = lock(&self.data);
        for o in outcomes {
            match o {
                Settle::Delete(key) => {
                    d.outbox.remove(key);
                }
                Settle::Retry(row) => {
                    if let Some(r) = d.outbox.get_mut(&row.key()) {
                        *r = row.clone();
                    }
                }
            }
        }
        Ok(())
    }

    fn outbox_len(&self) -> Result<u64, StoreError> {
        Ok(lock(&self.data).outbox.len() as u64)
    }

    fn outbox_trim(&self, max: u64, step: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut d = lock(&self.data);
        let excess = (d.outbox.len() as u64).saturating_sub(max) as usize;
        let mut removed = Vec::new();
        for _ in 0..excess.min(step) {
            if let Some((_, r)) = d.outbox.pop_first() {
                removed.push(r);
            }
        }
        Ok(removed)
    }

    fn events(&self, query: &EventQuery) -> Result<Vec<EventRecord>, StoreError> {
        let d = lock(&self.data);
        let start = d.events.partition_point(|e| e.seq <= query.after_seq);
        Ok(d.events[start..]
            .iter()
            .filter(|e| query.matches(e))
            .take(query.limit)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn contract() {
        super::super::contract::run_all(&super::MemStore::new());
        super::super::contract::waiters_and_deletes(&super::MemStore::new());
        super::super::contract::pruning(&super::MemStore::new());
        super::super::contract::outbox(&super::MemStore::new());
    }
}
