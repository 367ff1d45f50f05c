//! The embedded durable store on redb: one file, ACID transactions, fsync on
//! every commit (`Durability::Immediate`, redb's default). Tables:
//!
//! | table | key | value |
//! |-------|-----|-------|
//! | `hosts` | host name | JSON host record |
//! | `leases` | lease id (text) | JSON lease |
//! | `waiters` | waiter id | JSON waiting request |
//! | `bookings` | booking id | JSON booking |
//! | `events` | seq | JSON event |
//! | `events_by_host` | (host name, seq) | — |
//! | `events_by_lease` | (lease id as u128, seq) | — |
//! | `meta` | name | u64 |
//! | `outbox` | (event seq, hook name) | JSON outbox row |
//! | `outbox_due` | (next attempt ms, event seq, hook name) | — |
//!
//! `outbox_due` orders the outbox by next attempt, so the delivery task
//! reads only the rows that are due; `meta["outbox_rows"]` counts the
//! outbox (both written in the transaction that changes the outbox).
//!
//! The two index tables are written in the same transaction as the events
//! they index, so a filtered query reads the index range and then only the
//! events it returns. `meta["events_indexed_through"]` is the last seq the
//! index covers: a store written before the index existed is indexed at
//! [`RedbStore::open`], in transactions of [`INDEX_CHUNK`] events, resuming
//! where it stopped if the process dies meanwhile. The core groups
//! concurrent changes into one commit.

use super::{
    Batch, EventQuery, OutboxRow, Pruned, Settle, Snapshot, Store, StoreError, Write, check_delete,
    check_event_seqs, check_generation, check_waiter,
};
use crate::events::EventRecord;
use crate::lease::booking::Booking;
use crate::lease::{HostRecord, Lease, Waiter};
use crate::types::{Generation, Timestamp};
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const WAITERS: TableDefinition<u64, &[u8]> = TableDefinition::new("waiters");
const BOOKINGS: TableDefinition<u64, &[u8]> = TableDefinition::new("bookings");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const EVENTS_BY_HOST: TableDefinition<(&str, u64), ()> = TableDefinition::new("events_by_host");
const EVENTS_BY_LEASE: TableDefinition<(u128, u64), ()> = TableDefinition::new("events_by_lease");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const OUTBOX: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("outbox");
const OUTBOX_DUE: TableDefinition<(i64, u64, &str), ()> = TableDefinition::new("outbox_due");

/// `meta` key: rows in the outbox.
const OUTBOX_ROWS: &str = "outbox_rows";

/// `meta` key: the last event seq the host and lease indexes cover.
const INDEXED_THROUGH: &str = "events_indexed_through";

/// Events indexed per transaction when an older store is indexed at open.
pub const INDEX_CHUNK: usize = 10_000;

/// The redb-backed store (`<data-dir>/lab.redb`).
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    /// Table rows read by event queries (index entries and events): what a
    /// query cost, for tests and benchmarks.
    rows_read: AtomicU64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

fn backend<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: Box::new(e.into()),
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

fn decode_event(seq: u64, bytes: &[u8]) -> Result<EventRecord, StoreError> {
    decode(&format!("event/{seq}"), bytes)
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

/// Add (or, with `add` false, remove) an event's index entries.
fn index_event(
    by_host: &mut Table<(&str, u64), ()>,
    by_lease: &mut Table<(u128, u64), ()>,
    e: &EventRecord,
    add: bool,
) -> Result<(), StoreError> {
    for h in &e.hosts {
        if add {
            by_host
                .insert((h.as_str(), e.seq), ())
                .map_err(backend("write index"))?;
        } else {
            by_host
                .remove((h.as_str(), e.seq))
                .map_err(backend("write index"))?;
        }
    }
    if let Some(l) = e.lease {
        if add {
            by_lease
                .insert((l.0.as_u128(), e.seq), ())
                .map_err(backend("write index"))?;
        } else {
            by_lease
                .remove((l.0.as_u128(), e.seq))
                .map_err(backend("write index"))?;
        }
    }
    Ok(())
}

/// The events named by an index range (`seqs`, ascending) that match the
/// query, at most `query.limit`; `rows` counts index entries and events read.
fn by_index(
    events: &redb::ReadOnlyTable<u64, &[u8]>,
    seqs: impl Iterator<Item = Result<u64, StoreError>>,
    query: &EventQuery,
    rows: &mut u64,
) -> Result<Vec<EventRecord>, StoreError> {
    let mut out = Vec::new();
    if query.limit == 0 {
        return Ok(out);
    }
    for seq in seqs {
        let seq = seq?;
        *rows += 1;
        // Pruned in the same transaction as its index entries; tolerate a
        // missing one all the same.
        let Some(v) = events.get(seq).map_err(backend("list events"))? else {
            continue;
        };
        *rows += 1;
        let e = decode_event(seq, v.value())?;
        if query.matches(&e) {
            out.push(e);
            if out.len() >= query.limit {
                break;
            }
        }
    }
    Ok(out)
}

/// The outbox tables open in a write transaction, and the change of its
/// row count (saved to `meta` with [`Outbox::save`]).
struct Outbox<'t> {
    rows: Table<'t, (u64, &'static str), &'static [u8]>,
    due: Table<'t, (i64, u64, &'static str), ()>,
    op: &'static str,
    added: i64,
}

impl<'t> Outbox<'t> {
    fn open(txn: &'t redb::WriteTransaction, op: &'static str) -> Result<Self, StoreError> {
        Ok(Self {
            rows: txn.open_table(OUTBOX).map_err(backend(op))?,
            due: txn.open_table(OUTBOX_DUE).map_err(backend(op))?,
            op,
            added: 0,
        })
    }

    fn get(&self, seq: u64, hook: &str) -> Result<Option<OutboxRow>, StoreError> {
        match self.rows.get((seq, hook)).map_err(backend(self.op))? {
            Some(v) => Ok(Some(decode(&format!("outbox/{seq}/{hook}"), v.value())?)),
            None => Ok(None),
        }
    }

    /// Insert or replace a row (`create`: also when it is not stored).
    fn put(&mut self, row: &OutboxRow, create: bool) -> Result<(), StoreError> {
        match self.get(row.seq, &row.hook)? {
            Some(old) => {
                self.due
                    .remove((old.next_attempt.0, old.seq, old.hook.as_str()))
                    .map_err(backend(self.op))?;
            }
            None if create => self.added += 1,
            None => return Ok(()),
        }
        self.rows
            .insert((row.seq, row.hook.as_str()), encode(row).as_slice())
            .map_err(backend(self.op))?;
        self.due
            .insert((row.next_attempt.0, row.seq, row.hook.as_str()), ())
            .map_err(backend(self.op))?;
        Ok(())
    }

    fn delete(&mut self, seq: u64, hook: &str) -> Result<Option<OutboxRow>, StoreError> {
        let Some(old) = self.get(seq, hook)? else {
            return Ok(None);
        };
        self.rows.remove((seq, hook)).map_err(backend(self.op))?;
        self.due
            .remove((old.next_attempt.0, seq, hook))
            .map_err(backend(self.op))?;
        self.added -= 1;
        Ok(Some(old))
    }

    fn drop_hook(&mut self, hook: &str) -> Result<(), StoreError> {
        let mut keys = Vec::new();
        for entry in self.rows.iter().map_err(backend(self.op))? {
            let (k, _) = entry.map_err(backend(self.op))?;
            let (seq, h) = k.value();
            if h == hook {
                keys.push(seq);
            }
        }
        for seq in keys {
            self.delete(seq, hook)?;
        }
        Ok(())
    }

    fn save(&self, meta: &mut Table<&str, u64>) -> Result<(), StoreError> {
        if self.added != 0 {
            let n = meta
                .get(OUTBOX_ROWS)
                .map_err(backend(self.op))?
                .map_or(0, |v| v.value());
            let n = n.saturating_add_signed(self.added);
            meta.insert(OUTBOX_ROWS, n).map_err(backend(self.op))?;
        }
        Ok(())
    }
}

impl RedbStore {
    /// Open (or create) the store file and its tables, and index events
    /// the host and lease indexes do not cover yet (a store written by an
    /// older version).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(backend("open"))?;
        let txn = db.begin_write().map_err(backend("open"))?;
        {
            txn.open_table(HOSTS).map_err(backend("open"))?;
            txn.open_table(LEASES).map_err(backend("open"))?;
            txn.open_table(WAITERS).map_err(backend("open"))?;
            txn.open_table(BOOKINGS).map_err(backend("open"))?;
            txn.open_table(EVENTS).map_err(backend("open"))?;
            txn.open_table(EVENTS_BY_HOST).map_err(backend("open"))?;
            txn.open_table(EVENTS_BY_LEASE).map_err(backend("open"))?;
            txn.open_table(META).map_err(backend("open"))?;
            txn.open_table(OUTBOX).map_err(backend("open"))?;
            txn.open_table(OUTBOX_DUE).map_err(backend("open"))?;
        }
        txn.commit().map_err(backend("open"))?;
        let store = Self {
            db,
            path: path.to_owned(),
            rows_read: AtomicU64::new(0),
        };
        store.build_index()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Table rows read by event queries since the store was opened.
    pub fn rows_read(&self) -> u64 {
        self.rows_read.load(Ordering::Relaxed)
    }

    /// Index the events after `meta[INDEXED_THROUGH]`, [`INDEX_CHUNK`] per
    /// transaction. Returns how many were indexed.
    fn build_index(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let txn = self.db.begin_write().map_err(backend("index"))?;
            let done;
            {
                let mut meta = txn.open_table(META).map_err(backend("index"))?;
                let through = meta
                    .get(INDEXED_THROUGH)
                    .map_err(backend("index"))?
                    .map_or(0, |v| v.value());
                let events = txn.open_table(EVENTS).map_err(backend("index"))?;
                let mut by_host = txn.open_table(EVENTS_BY_HOST).map_err(backend("index"))?;
                let mut by_lease = txn.open_table(EVENTS_BY_LEASE).map_err(backend("index"))?;
                let mut last = through;
                let mut n = 0;
                for entry in events.range(through + 1..).map_err(backend("index"))? {
                    let (k, v) = entry.map_err(backend("index"))?;
                    let e = decode_event(k.value(), v.value())?;
                    index_event(&mut by_host, &mut by_lease, &e, true)?;
                    last = k.value();
                    n += 1;
                    if n == INDEX_CHUNK {
                        break;
                    }
                }
                meta.insert(INDEXED_THROUGH, last)
                    .map_err(backend("index"))?;
                total += n;
                done = n < INDEX_CHUNK;
            }
            txn.commit().map_err(backend("index"))?;
            if done {
                if total > 0 {
                    tracing::info!(events = total, store = %self.path.display(), "indexed events by host and lease");
                }
                return Ok(total);
            }
        }
    }

    fn commit_inner(&self, batch: &Batch) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend("commit"))?;
        {
            let mut hosts = txn.open_table(HOSTS).map_err(backend("commit"))?;
            let mut leases = txn.open_table(LEASES).map_err(backend("commit"))?;
            let mut waiters = txn.open_table(WAITERS).map_err(backend("commit"))?;
            let mut bookings = txn.open_table(BOOKINGS).map_err(backend("commit"))?;
            let mut events = txn.open_table(EVENTS).map_err(backend("commit"))?;
            let mut by_host = txn.open_table(EVENTS_BY_HOST).map_err(backend("commit"))?;
            let mut by_lease = txn.open_table(EVENTS_BY_LEASE).map_err(backend("commit"))?;
            let mut meta = txn.open_table(META).map_err(backend("commit"))?;
            let mut outbox = Outbox::open(&txn, "commit")?;
            let host_generation = |hosts: &Table<&str, &[u8]>, key: &str| match hosts
                .get(key)
                .map_err(backend("read"))?
            {
                Some(v) => Ok(Some(decode::<HostRecord>(key, v.value())?.generation)),
                None => Ok::<_, StoreError>(None),
            };
            let lease_generation = |leases: &Table<&str, &[u8]>, key: &str| match leases
                .get(key)
                .map_err(backend("read"))?
            {
                Some(v) => Ok(Some(decode::<Lease>(key, v.value())?.generation)),
                None => Ok::<_, StoreError>(None),
            };
            let booking_generation = |bookings: &Table<u64, &[u8]>, id: u64| match bookings
                .get(id)
                .map_err(backend("read"))?
            {
                Some(v) => Ok(Some(
                    decode::<Booking>(&format!("booking/{id}"), v.value())?.generation,
                )),
                None => Ok::<_, StoreError>(None),
            };
            for w in &batch.writes {
                match w {
                    Write::Booking(b) => {
                        let found = booking_generation(&bookings, b.id)?;
                        check_generation(w.key(), found, b.generation)?;
                        bookings
                            .insert(b.id, encode(b).as_slice())
                            .map_err(backend("write"))?;
                    }
                    Write::DeleteBooking { id, generation } => {
                        let found = booking_generation(&bookings, *id)?;
                        check_delete(w.key(), found, *generation)?;
                        bookings.remove(*id).map_err(backend("write"))?;
                    }
                    Write::Host(h) => {
                        let key = h.name.as_str();
                        check_generation(w.key(), host_generation(&hosts, key)?, h.generation)?;
                        hosts
                            .insert(key, encode(h).as_slice())
                            .map_err(backend("write"))?;
                    }
                    Write::DeleteHost { name, generation } => {
                        let key = name.as_str();
                        let found: Option<Generation> = host_generation(&hosts, key)?;
                        check_delete(w.key(), found, *generation)?;
                        hosts.remove(key).map_err(backend("write"))?;
                    }
                    Write::Lease(l) => {
                        let key = l.id.to_string();
                        check_generation(w.key(), lease_generation(&leases, &key)?, l.generation)?;
                        leases
                            .insert(key.as_str(), encode(l).as_slice())
                            .map_err(backend("write"))?;
                    }
                    Write::DeleteLease { id, generation } => {
                        let key = id.to_string();
                        check_delete(w.key(), lease_generation(&leases, &key)?, *generation)?;
                        leases.remove(key.as_str()).map_err(backend("write"))?;
                    }
                    Write::Waiter(waiter) => {
                        let stored = waiters.get(waiter.id).map_err(backend("read"))?.is_some();
                        check_waiter(waiter.id, true, stored)?;
                        waiters
                            .insert(waiter.id, encode(waiter).as_slice())
                            .map_err(backend("write"))?;
                    }
                    Write::DeleteWaiter(id) => {
                        let stored = waiters.remove(*id).map_err(backend("write"))?.is_some();
                        check_waiter(*id, false, stored)?;
                    }
                    Write::Outbox(row) => outbox.put(row, true)?,
                    Write::DropOutbox { hook } => outbox.drop_hook(hook)?,
                }
            }
            outbox.save(&mut meta)?;
            let last = events
                .last()
                .map_err(backend("read"))?
                .map_or(0, |(k, _)| k.value());
            check_event_seqs(last, &batch.events)?;
            for e in &batch.events {
                events
                    .insert(e.seq, encode(e).as_slice())
                    .map_err(backend("write"))?;
                index_event(&mut by_host, &mut by_lease, e, true)?;
            }
            if let Some(e) = batch.events.last() {
                meta.insert(INDEXED_THROUGH, e.seq)
                    .map_err(backend("write"))?;
            }
        }
        // Dropping an uncommitted transaction aborts it (the early returns above).
        txn.commit().map_err(backend("commit"))
    }

    fn count(&self, rows: u64) {
        self.rows_read.fetch_add(rows, Ordering::Relaxed);
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(backend("load"))?;
        let mut snap = Snapshot::default();
        let hosts = txn.open_table(HOSTS).map_err(backend("load"))?;
        for entry in hosts.iter().map_err(backend("load"))? {
            let (k, v) = entry.map_err(backend("load"))?;
            snap.hosts.push(decode(k.value(), v.value())?);
        }
        let leases = txn.open_table(LEASES).map_err(backend("load"))?;
        for entry in leases.iter().map_err(backend("load"))? {
            let (k, v) = entry.map_err(backend("load"))?;
            snap.leases.push(decode(k.value(), v.value())?);
        }
        let waiters = txn.open_table(WAITERS).map_err(backend("load"))?;
        for entry in waiters.iter().map_err(backend("load"))? {
            let (k, v) = entry.map_err(backend("load"))?;
            let w: Waiter = decode(&format!("waiter/{}", k.value()), v.value())?;
            snap.waiters.push(w);
        }
        let bookings = txn.open_table(BOOKINGS).map_err(backend("load"))?;
        for entry in bookings.iter().map_err(backend("load"))? {
            let (k, v) = entry.map_err(backend("load"))?;
            snap.bookings
                .push(decode(&format!("booking/{}", k.value()), v.value())?);
        }
        let events = txn.open_table(EVENTS).map_err(backend("load"))?;
        snap.last_event_seq = events
            .last()
            .map_err(backend("load"))?
            .map_or(0, |(k, _)| k.value());
        Ok(snap)
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.commit_inner(batch)
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        let op = "read last event";
        let txn = self.db.begin_read().map_err(backend(op))?;
        let events = txn.open_table(EVENTS).map_err(backend(op))?;
        Ok(events
            .last()
            .map_err(backend(op))?
            .map_or(0, |(k, _)| k.value()))
    }

    fn events(&self, query: &EventQuery) -> Result<Vec<EventRecord>, StoreError> {
        let op = "list events";
        let txn = self.db.begin_read().map_err(backend(op))?;
        let events = txn.open_table(EVENTS).map_err(backend(op))?;
        let from = query.after_seq.saturating_add(1);
        let mut rows = 0;
        let result = match (&query.lease, &query.host) {
            // With a filter, walk its index and read only the events it
            // names (the lease's when both are given: the fewer).
            (Some(l), _) => {
                let index = txn.open_table(EVENTS_BY_LEASE).map_err(backend(op))?;
                let key = l.0.as_u128();
                let seqs = index
                    .range((key, from)..=(key, u64::MAX))
                    .map_err(backend(op))?
                    .map(|entry| entry.map(|(k, _)| k.value().1).map_err(backend(op)));
                by_index(&events, seqs, query, &mut rows)
            }
            (None, Some(h)) => {
                let index = txn.open_table(EVENTS_BY_HOST).map_err(backend(op))?;
                let seqs = index
                    .range((h.as_str(), from)..=(h.as_str(), u64::MAX))
                    .map_err(backend(op))?
                    .map(|entry| entry.map(|(k, _)| k.value().1).map_err(backend(op)));
                by_index(&events, seqs, query, &mut rows)
            }
            (None, None) => (|| {
                let mut out = Vec::new();
                if query.limit == 0 {
                    return Ok(out);
                }
                for entry in events.range(from..).map_err(backend(op))? {
                    let (k, v) = entry.map_err(backend(op))?;
                    rows += 1;
                    out.push(decode_event(k.value(), v.value())?);
                    if out.len() >= query.limit {
                        break;
                    }
                }
                Ok(out)
            })(),
        };
        self.count(rows);
        result
    }

    fn prune_events(&self, before: Timestamp, max: usize) -> Result<Pruned, StoreError> {
        let op = "prune events";
        let txn = self.db.begin_write().map_err(backend(op))?;
        let pruned;
        {
            let mut events = txn.open_table(EVENTS).map_err(backend(op))?;
            let mut by_host = txn.open_table(EVENTS_BY_HOST).map_err(backend(op))?;
            let mut by_lease = txn.open_table(EVENTS_BY_LEASE).map_err(backend(op))?;
            let last = events
                .last()
                .map_err(backend(op))?
                .map_or(0, |(k, _)| k.value());
            // The oldest events before the cutoff, one more than allowed to
            // know whether more remain; never the last one.
            let mut old = Vec::new();
            for entry in events.range(..last).map_err(backend(op))? {
                let (k, v) = entry.map_err(backend(op))?;
                let e = decode_event(k.value(), v.value())?;
                if e.time >= before || old.len() > max {
                    break;
                }
                old.push(e);
            }
            let more = old.len() > max;
            old.truncate(max);
            for e in &old {
                index_event(&mut by_host, &mut by_lease, e, false)?;
                events.remove(e.seq).map_err(backend(op))?;
            }
            pruned = Pruned {
                events: old.len(),
                more,
            };
        }
        txn.commit().map_err(backend(op))?;
        Ok(pruned)
    }

    fn outbox_due(&self, now: Timestamp, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.outbox_due_inner(now, limit)
    }

    fn outbox_next_due(&self) -> Result<Option<Timestamp>, StoreError> {
        let op = "read outbox";
        let txn = self.db.begin_read().map_err(backend(op))?;
        let due = txn.open_table(OUTBOX_DUE).map_err(backend(op))?;
        Ok(due
            .first()
            .map_err(backend(op))?
            .map(|(k, _)| Timestamp(k.value().0)))
    }

    fn outbox_settle(&self, outcomes: &[Settle]) -> Result<(), StoreError> {
        self.outbox_write("settle outbox", |outbox| {
            for o in outcomes {
                match o {
                    Settle::Delete((seq, hook)) => {
                        outbox.delete(*seq, hook)?;
                    }
                    Settle::Retry(row) => outbox.put(row, false)?,
                }
            }
            Ok(())
        })
    }

    fn outbox_len(&self) -> Result<u64, StoreError> {
        let op = "read outbox";
        let txn = self.db.begin_read().map_err(backend(op))?;
        let meta = txn.open_table(META).map_err(backend(op))?;
        Ok(meta
            .get(OUTBOX_ROWS)
            .map_err(backend(op))?
            .map_or(0, |v| v.value()))
    }

    fn outbox_trim(&self, max: u64, step: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let len = self.outbox_len()?;
        let excess = usize::try_from(len.saturating_sub(max)).unwrap_or(usize::MAX);
        if excess == 0 {
            return Ok(Vec::new());
        }
        self.outbox_write("trim outbox", |outbox| {
            let mut keys = Vec::new();
            for entry in outbox.rows.iter().map_err(backend("trim outbox"))? {
                if keys.len() >= excess.min(step) {
                    break;
                }
                let (k, _) = entry.map_err(backend("trim outbox"))?;
                let (seq, hook) = k.value();
                keys.push((seq, hook.to_owned()));
            }
            let mut removed = Vec::with_capacity(keys.len());
            for (seq, hook) in keys {
                removed.extend(outbox.delete(seq, &hook)?);
            }
            Ok(removed)
        })
    }
}

impl RedbStore {
    fn outbox_write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Outbox<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(backend(op))?;
        let out;
        {
            let mut meta = txn.open_table(META).map_err(backend(op))?;
            let mut outbox = Outbox::open(&txn, op)?;
            out = f(&mut outbox)?;
            outbox.save(&mut meta)?;
        }
        txn.commit().map_err(backend(op))?;
        Ok(out)
    }

    fn outbox_due_inner(&self, now: Timestamp, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let op = "read outbox";
        let txn = self.db.begin_read().map_err(backend(op))?;
        let due = txn.open_table(OUTBOX_DUE).map_err(backend(op))?;
        let rows = txn.open_table(OUTBOX).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in due
            .range((i64::MIN, 0, "")..(now.0.saturating_add(1), 0, ""))
            .map_err(backend(op))?
        {
            if out.len() >= limit {
                break;
            }
            let (k, _) = entry.map_err(backend(op))?;
            let (_, seq, hook) = k.value();
            if let Some(v) = rows.get((seq, hook)).map_err(backend(op))? {
                out.push(decode(&format!("outbox/{seq}/{hook}"), v.value())?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;
    use crate::types::{HostName, LeaseId, Principal};

    #[test]
    fn contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("lab.redb")).unwrap();
        super::super::contract::run_all(&store);
        let store = RedbStore::open(&dir.path().join("b.redb")).unwrap();
        super::super::contract::waiters_and_deletes(&store);
        let store = RedbStore::open(&dir.path().join("c.redb")).unwrap();
        super::super::contract::pruning(&store);
        let store = RedbStore::open(&dir.path().join("d.redb")).unwrap();
        super::super::contract::outbox(&store);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            super::super::contract::run_all(&store);
        }
        let store = RedbStore::open(&path).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.hosts.len(), 1);
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(snap.last_event_seq, 4);
    }

    #[test]
    fn the_outbox_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            super::super::contract::outbox(&store);
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.outbox_len().unwrap(), 2);
        let due = store.outbox_due(Timestamp(1000), 10).unwrap();
        assert_eq!(
            due,
            [
                super::super::contract::row(5, "b", 0),
                super::super::contract::row(6, "b", 0)
            ]
        );
    }

    const RARE_LEASE: u128 = 77;

    /// `n` events: every 1000th about host `rare` and lease 77, the others
    /// about host `busy` and a lease of their own.
    fn log(n: u64) -> Vec<EventRecord> {
        (1..=n)
            .map(|seq| {
                let rare = seq % 1000 == 0;
                EventRecord {
                    seq,
                    time: Timestamp(seq as i64),
                    actor: Principal::server(),
                    kind: EventKind::LeaseRenewed,
                    hosts: vec![HostName::new(if rare { "rare" } else { "busy" }).unwrap()],
                    lease: Some(LeaseId(uuid::Uuid::from_u128(if rare {
                        RARE_LEASE
                    } else {
                        1000 + u128::from(seq)
                    }))),
                    waiter: None,
                    request: None,
                    detail: "x".repeat(200),
                    booking: None,
                }
            })
            .collect()
    }

    /// Rows read by a host query and a lease query for the rare events.
    fn cost_of_rare_queries(store: &RedbStore) -> (usize, u64) {
        let before = store.rows_read();
        let by_host = store
            .events(&EventQuery {
                limit: 1000,
                host: Some(HostName::new("rare").unwrap()),
                ..Default::default()
            })
            .unwrap();
        let by_lease = store
            .events(&EventQuery {
                limit: 1000,
                lease: Some(LeaseId(uuid::Uuid::from_u128(RARE_LEASE))),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(by_host, by_lease);
        assert!(by_host.iter().all(|e| e.hosts[0].as_str() == "rare"));
        (by_host.len(), store.rows_read() - before)
    }

    #[test]
    fn filtered_queries_read_only_what_they_return() {
        let dir = tempfile::tempdir().unwrap();
        let mut costs = Vec::new();
        for (i, n) in [5_000u64, 40_000].into_iter().enumerate() {
            let store = RedbStore::open(&dir.path().join(format!("{i}.redb"))).unwrap();
            let events = log(n);
            for chunk in events.chunks(5_000) {
                store
                    .commit(&Batch {
                        writes: vec![],
                        events: chunk.to_vec(),
                    })
                    .unwrap();
            }
            // 8 rare events beyond the first 5,000 in the bigger log: ask
            // for the first 5 so that both logs answer the same.
            let before = store.rows_read();
            let page = store
                .events(&EventQuery {
                    limit: 5,
                    host: Some(HostName::new("rare").unwrap()),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(page.len(), 5);
            costs.push(store.rows_read() - before);
            let (matches, rows) = cost_of_rare_queries(&store);
            assert_eq!(matches as u64, n / 1000);
            // An index entry and an event per match, per query.
            assert_eq!(rows, 2 * 2 * matches as u64, "log of {n}");
        }
        assert_eq!(costs, [10, 10], "the cost does not grow with the log");
    }

    #[test]
    fn an_older_store_is_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.redb");
        let n = 2 * INDEX_CHUNK as u64 + 500;
        {
            // The layout before the indexes: hosts, leases, events only.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                txn.open_table(HOSTS).unwrap();
                txn.open_table(LEASES).unwrap();
                let mut events = txn.open_table(EVENTS).unwrap();
                for e in log(n) {
                    events.insert(e.seq, encode(&e).as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let (matches, rows) = cost_of_rare_queries(&store);
        assert_eq!(matches as u64, n / 1000);
        assert_eq!(rows, 4 * matches as u64);
        // New events are indexed as they are committed; reopening indexes
        // nothing more.
        let mut e = log(1000).pop().unwrap();
        e.seq = n + 1;
        store
            .commit(&Batch {
                writes: vec![],
                events: vec![e],
            })
            .unwrap();
        assert_eq!(cost_of_rare_queries(&store).0 as u64, n / 1000 + 1);
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.build_index().unwrap(), 0);
        assert_eq!(cost_of_rare_queries(&store).0 as u64, n / 1000 + 1);
    }
}
