//! The embedded durable store on redb: one file, ACID transactions, fsync on
//! every commit (`Durability::Immediate`, redb's default). Tables:
//! `hosts` (name → JSON record), `leases` (id → JSON record), `events`
//! (seq → JSON record). The core groups concurrent changes into one commit.

use super::{
    Batch, EventQuery, Snapshot, Store, StoreError, Write, check_event_seqs, check_generation,
};
use crate::events::EventRecord;
use crate::lease::{HostRecord, Lease};
use crate::types::Generation;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// The redb-backed store (`<data-dir>/lab.redb`).
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

fn backend(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: Box::new(e),
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl RedbStore {
    /// Open (or create) the store file and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| backend("open")(e.into()))?;
        let txn = db.begin_write().map_err(|e| backend("open")(e.into()))?;
        {
            txn.open_table(HOSTS)
                .map_err(|e| backend("open")(e.into()))?;
            txn.open_table(LEASES)
                .map_err(|e| backend("open")(e.into()))?;
            txn.open_table(EVENTS)
                .map_err(|e| backend("open")(e.into()))?;
        }
        txn.commit().map_err(|e| backend("open")(e.into()))?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn commit_inner(&self, batch: &Batch) -> Result<(), StoreError> {
        let be = |op| {
            move |e: redb::Error| StoreError::Backend {
                op,
                source: Box::new(e),
            }
        };
        let txn = self.db.begin_write().map_err(|e| be("commit")(e.into()))?;
        {
            let mut hosts = txn.open_table(HOSTS).map_err(|e| be("commit")(e.into()))?;
            let mut leases = txn.open_table(LEASES).map_err(|e| be("commit")(e.into()))?;
            let mut events = txn.open_table(EVENTS).map_err(|e| be("commit")(e.into()))?;
            for w in &batch.writes {
                match w {
                    Write::Host(h) => {
                        let key = h.name.as_str();
                        let found = match hosts.get(key).map_err(|e| be("read")(e.into()))? {
                            Some(v) => Some(decode::<HostRecord>(key, v.value())?.generation),
                            None => None,
                        };
                        check_generation(w.key(), found, h.generation)?;
                        hosts
                            .insert(key, encode(h).as_slice())
                            .map_err(|e| be("write")(e.into()))?;
                    }
                    Write::DeleteHost { name, generation } => {
                        let key = name.as_str();
                        let found: Option<Generation> =
                            match hosts.get(key).map_err(|e| be("read")(e.into()))? {
                                Some(v) => Some(decode::<HostRecord>(key, v.value())?.generation),
                                None => None,
                            };
                        if found != Some(*generation) {
                            return Err(StoreError::Conflict {
                                key: w.key(),
                                expected: Some(*generation),
                                found,
                            });
                        }
                        hosts.remove(key).map_err(|e| be("write")(e.into()))?;
                    }
                    Write::Lease(l) => {
                        let key = l.id.to_string();
                        let found =
                            match leases.get(key.as_str()).map_err(|e| be("read")(e.into()))? {
                                Some(v) => Some(decode::<Lease>(&key, v.value())?.generation),
                                None => None,
                            };
                        check_generation(w.key(), found, l.generation)?;
                        leases
                            .insert(key.as_str(), encode(l).as_slice())
                            .map_err(|e| be("write")(e.into()))?;
                    }
                }
            }
            let last = events
                .last()
                .map_err(|e| be("read")(e.into()))?
                .map_or(0, |(k, _)| k.value());
            check_event_seqs(last, &batch.events)?;
            for e in &batch.events {
                events
                    .insert(e.seq, encode(e).as_slice())
                    .map_err(|e| be("write")(e.into()))?;
            }
        }
        // Dropping an uncommitted transaction aborts it (the early returns above).
        txn.commit().map_err(|e| be("commit")(e.into()))
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let be = |e: redb::Error| StoreError::Backend {
            op: "load",
            source: Box::new(e),
        };
        let txn = self.db.begin_read().map_err(|e| be(e.into()))?;
        let mut snap = Snapshot::default();
        let hosts = txn.open_table(HOSTS).map_err(|e| be(e.into()))?;
        for entry in hosts.iter().map_err(|e| be(e.into()))? {
            let (k, v) = entry.map_err(|e| be(e.into()))?;
            snap.hosts.push(decode(k.value(), v.value())?);
        }
        let leases = txn.open_table(LEASES).map_err(|e| be(e.into()))?;
        for entry in leases.iter().map_err(|e| be(e.into()))? {
            let (k, v) = entry.map_err(|e| be(e.into()))?;
            snap.leases.push(decode(k.value(), v.value())?);
        }
        let events = txn.open_table(EVENTS).map_err(|e| be(e.into()))?;
        snap.last_event_seq = events
            .last()
            .map_err(|e| be(e.into()))?
            .map_or(0, |(k, _)| k.value());
        Ok(snap)
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.commit_inner(batch)
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        let be = |e: redb::Error| StoreError::Backend {
            op: "read last event",
            source: Box::new(e),
        };
        let txn = self.db.begin_read().map_err(|e| be(e.into()))?;
        let events = txn.open_table(EVENTS).map_err(|e| be(e.into()))?;
        Ok(events
            .last()
            .map_err(|e| be(e.into()))?
            .map_or(0, |(k, _)| k.value()))
    }

    fn events(&self, query: &EventQuery) -> Result<Vec<EventRecord>, StoreError> {
        let be = |e: redb::Error| StoreError::Backend {
            op: "list events",
            source: Box::new(e),
        };
        let txn = self.db.begin_read().map_err(|e| be(e.into()))?;
        let events = txn.open_table(EVENTS).map_err(|e| be(e.into()))?;
        let mut out = Vec::new();
        for entry in events
            .range(query.after_seq.saturating_add(1)..)
            .map_err(|e| be(e.into()))?
        {
            let (k, v) = entry.map_err(|e| be(e.into()))?;
            let e: EventRecord = decode(&format!("event/{}", k.value()), v.value())?;
            if query.matches(&e) {
                out.push(e);
                if out.len() >= query.limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("lab.redb")).unwrap();
        super::super::contract::run_all(&store);
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
}
