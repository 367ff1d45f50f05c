//! Durable state behind a narrow trait: host records, leases, waiting
//! requests and the event log. Every record write is compare-and-set on the
//! record's generation, and one [`Batch`] (records plus their events)
//! commits atomically and durably, so a reply is only sent for what is on
//! disk.
//!
//! The event log is indexed by host and by lease (written in the same
//! transaction as the events), so a filtered query reads only the events it
//! returns. Retention removes old events in bounded steps
//! ([`Store::prune_events`]); ended leases are removed through the batch
//! ([`Write::DeleteLease`]).
//!
//! Webhook deliveries wait in an **outbox**: a row per (event, hook)
//! written through the batch ([`Write::Outbox`]) in the same transaction as
//! the event, so an event that is committed is never lost to a crash
//! before its delivery. A row carries the whole body it delivers, so
//! retention may prune the event itself. The delivery task reads the rows
//! that are due ([`Store::outbox_due`]), then deletes or reschedules them
//! ([`Store::outbox_settle`]).
//!
//! Backends: [`redb::RedbStore`] (the embedded default),
//! [`etcd::EtcdStore`] (replicas on several sites, docs/multi-site.md) and
//! [`memory::MemStore`] (tests; can be told to fail). The conformance
//! tests every backend passes are in `contract` (also built with the
//! feature `store-contract`, for the etcd suite of the lab-tests crate).

pub mod etcd;
pub mod memory;
pub mod redb;

use crate::events::EventRecord;
use crate::lease::booking::{Booking, BookingId};
use crate::lease::{HostRecord, Lease, Waiter};
use crate::types::{Generation, HostName, LeaseId, Timestamp, WaiterId};
use serde::{Deserialize, Serialize};

/// A store failure. The core answers UNAVAILABLE and reloads its state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("generation conflict on {key}: expected {expected:?}, found {found:?}")]
    Conflict {
        key: String,
        expected: Option<Generation>,
        found: Option<Generation>,
    },
    #[error("stored record {key} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("event sequence gap: next is {expected}, batch starts at {got}")]
    EventGap { expected: u64, got: u64 },
    #[error("waiter {id} is {}", if *.stored { "already stored" } else { "not stored" })]
    WaiterConflict { id: WaiterId, stored: bool },
    /// The etcd store's leader fence failed: this server's election key is
    /// gone or was created again, so another server may be the leader.
    #[error("this server is no longer the leader: its election key {key} is gone")]
    Fenced { key: String },
    #[error("storage backend failed during {op}")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One record write. A record whose generation is `g` replaces the stored
/// one only if that has generation `g - 1` (or is absent when `g` is 1).
#[derive(Debug, Clone)]
pub enum Write {
    Host(HostRecord),
    /// Delete a host record whose stored generation is the one given.
    DeleteHost {
        name: HostName,
        generation: Generation,
    },
    Lease(Lease),
    /// Delete an (ended) lease whose stored generation is the one given
    /// (retention).
    DeleteLease {
        id: LeaseId,
        generation: Generation,
    },
    /// A request entered the queue. Waiters have no generation: one is
    /// written once and deleted once; writing an existing one, or deleting
    /// one that is not stored, is a conflict.
    Waiter(Waiter),
    /// A waiting request left the queue (granted or withdrawn).
    DeleteWaiter(WaiterId),
    /// A booking (`lease::booking`), compare-and-set like a lease.
    Booking(Booking),
    /// A booking ended or was cancelled: delete it (its stored generation
    /// is the one given).
    DeleteBooking {
        id: BookingId,
        generation: Generation,
    },
    /// A webhook delivery to make (its event is in the same batch).
    Outbox(OutboxRow),
    /// Every outbox row of a hook that was removed from the configuration.
    DropOutbox {
        hook: String,
    },
}

/// One webhook delivery waiting in the outbox, keyed by (event, hook).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRow {
    /// The event's sequence number.
    pub seq: u64,
    /// The hook's name in the webhooks file.
    pub hook: String,
    /// Unique, the same for every attempt (`X-Lab-Delivery`).
    pub delivery: String,
    /// The event kind's API name (`X-Lab-Event`).
    pub kind: String,
    /// The JSON body, as it is signed and sent.
    pub body: String,
    /// When the event happened: the delivery is given up 24 h later.
    pub created: Timestamp,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not tried again before this time.
    pub next_attempt: Timestamp,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
}

impl OutboxRow {
    pub fn key(&self) -> OutboxKey {
        (self.seq, self.hook.clone())
    }
}

/// An outbox row's key: (event seq, hook name).
pub type OutboxKey = (u64, String);

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Delivered, given up or dropped: the row goes.
    Delete(OutboxKey),
    /// Failed; try again as the row now says (attempts, next attempt, last
    /// error). Nothing happens if the row is gone meanwhile (its hook was
    /// removed).
    Retry(OutboxRow),
}

impl Write {
    fn key(&self) -> String {
        match self {
            Write::Host(h) => format!("host/{}", h.name),
            Write::DeleteHost { name, .. } => format!("host/{name}"),
            Write::Lease(l) => format!("lease/{}", l.id),
            Write::DeleteLease { id, .. } => format!("lease/{id}"),
            Write::Waiter(w) => format!("waiter/{}", w.id),
            Write::DeleteWaiter(id) => format!("waiter/{id}"),
            Write::Booking(b) => format!("booking/{}", b.id),
            Write::DeleteBooking { id, .. } => format!("booking/{id}"),
            Write::Outbox(r) => format!("outbox/{}/{}", r.seq, r.hook),
            Write::DropOutbox { hook } => format!("outbox/*/{hook}"),
        }
    }
}

/// What commits together: record writes and the events they cause.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub writes: Vec<Write>,
    /// With consecutive `seq` numbers following the last stored one.
    pub events: Vec<EventRecord>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.events.is_empty()
    }
}

/// Everything the core needs at start.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub hosts: Vec<HostRecord>,
    pub leases: Vec<Lease>,
    /// Requests that were waiting (in id order).
    pub waiters: Vec<Waiter>,
    /// Bookings not yet ended.
    pub bookings: Vec<Booking>,
    pub last_event_seq: u64,
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub after_seq: u64,
    pub limit: usize,
    pub host: Option<HostName>,
    pub lease: Option<LeaseId>,
}

impl EventQuery {
    pub fn matches(&self, e: &EventRecord) -> bool {
        e.seq > self.after_seq
            && self.host.as_ref().is_none_or(|h| e.hosts.contains(h))
            && self.lease.is_none_or(|l| e.lease == Some(l))
    }
}

/// What one [`Store::prune_events`] step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    /// Events removed.
    pub events: usize,
    /// More events are older than the cutoff (the step hit its bound).
    pub more: bool,
}

/// The narrow storage interface. Implementations are synchronous; the core
/// calls them off the async workers.
pub trait Store: Send + Sync + 'static {
    /// All host records, all leases, all waiting requests, all bookings,
    /// and the last event's sequence number.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Apply a batch atomically and durably, or not at all.
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
    /// Events matching the query, in sequence order, at most `query.limit`.
    /// With a host or lease filter, reads only matching events (an index).
    fn events(&self, query: &EventQuery) -> Result<Vec<EventRecord>, StoreError>;
    /// Sequence number of the last event in the log (0 when empty).
    fn last_event_seq(&self) -> Result<u64, StoreError>;
    /// Remove at most `max` of the oldest events whose time is before
    /// `before`, in one transaction. The last event of the log is never
    /// removed, so sequence numbers continue after a restart.
    fn prune_events(&self, before: Timestamp, max: usize) -> Result<Pruned, StoreError>;
    /// At most `limit` outbox rows whose next attempt is at or before
    /// `now`, earliest first.
    fn outbox_due(&self, now: Timestamp, limit: usize) -> Result<Vec<OutboxRow>, StoreError>;
    /// The earliest next attempt of any outbox row.
    fn outbox_next_due(&self) -> Result<Option<Timestamp>, StoreError>;
    /// Apply the outcomes of delivery attempts, in one transaction.
    fn outbox_settle(&self, outcomes: &[Settle]) -> Result<(), StoreError>;
    /// Rows in the outbox.
    fn outbox_len(&self) -> Result<u64, StoreError>;
    /// Remove the oldest rows (by event) beyond `max` rows, at most
    /// `step` in one transaction; returns the rows removed.
    fn outbox_trim(&self, max: u64, step: usize) -> Result<Vec<OutboxRow>, StoreError>;
}

/// Events of a batch must continue the log without a gap.
fn check_event_seqs(last: u64, events: &[EventRecord]) -> Result<(), StoreError> {
    for (expected, e) in (last + 1..).zip(events) {
        if e.seq != expected {
            return Err(StoreError::EventGap {
                expected,
                got: e.seq,
            });
        }
    }
    Ok(())
}

/// The compare-and-set rule shared by the backends.
fn check_generation(
    key: String,
    stored: Option<Generation>,
    new: Generation,
) -> Result<(), StoreError> {
    let expected = if new.0 <= 1 {
        None
    } else {
        Some(Generation(new.0 - 1))
    };
    if stored == expected {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            key,
            expected,
            found: stored,
        })
    }
}

/// A delete's compare-and-set: the stored generation is the one given.
fn check_delete(
    key: String,
    stored: Option<Generation>,
    expected: Generation,
) -> Result<(), StoreError> {
    if stored == Some(expected) {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            key,
            expected: Some(expected),
            found: stored,
        })
    }
}

/// A waiter is written once and deleted once (`stored`: it is stored now).
fn check_waiter(id: WaiterId, write: bool, stored: bool) -> Result<(), StoreError> {
    if write != stored {
        Ok(())
    } else {
        Err(StoreError::WaiterConflict { id, stored })
    }
}

#[cfg(any(test, feature = "store-contract"))]
#[allow(clippy::missing_panics_doc)]
pub mod contract {
    //! Tests every backend must pass.
    use super::*;
    use crate::events::EventKind;
    use crate::lease::{HostEvent, LeaseState};
    use crate::types::Principal;

    fn host(name: &str) -> HostRecord {
        HostRecord::new(HostName::new(name).unwrap())
    }

    fn event(seq: u64, kind: EventKind, hosts: &[&str]) -> EventRecord {
        EventRecord {
            seq,
            time: Timestamp(seq as i64),
            actor: Principal::server(),
            kind,
            hosts: hosts.iter().map(|h| HostName::new(*h).unwrap()).collect(),
            lease: None,
            waiter: None,
            request: None,
            detail: String::new(),
            booking: None,
        }
    }

    pub fn run_all(store: &dyn Store) {
        round_trip_and_cas(store);
    }

    fn round_trip_and_cas(store: &dyn Store) {
        let h1 = host("h1");
        let h2 = host("h2");
        store
            .commit(&Batch {
                writes: vec![Write::Host(h1.clone()), Write::Host(h2.clone())],
                events: vec![
                    event(1, EventKind::HostAdded, &["h1"]),
                    event(2, EventKind::HostAdded, &["h2"]),
                ],
            })
            .unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.hosts.len(), 2);
        assert_eq!(snap.last_event_seq, 2);
        assert_eq!(store.last_event_seq().unwrap(), 2);

        // Creating again (generation 1 over 1) conflicts; nothing of the batch lands.
        let err = store
            .commit(&Batch {
                writes: vec![
                    Write::Host(h1.apply(HostEvent::SetMaintenance(true)).unwrap()),
                    Write::Host(h2.clone()),
                ],
                events: vec![event(3, EventKind::HostMaintenanceOn, &["h1"])],
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        let snap = store.load().unwrap();
        assert!(
            snap.hosts.iter().all(|h| !h.maintenance),
            "a failed batch must not be partly applied"
        );
        assert_eq!(snap.last_event_seq, 2);

        // Two successive generations of one record in one batch are fine.
        let g2 = h1.apply(HostEvent::SetMaintenance(true)).unwrap();
        let g3 = g2.apply(HostEvent::SetMaintenance(false)).unwrap();
        store
            .commit(&Batch {
                writes: vec![Write::Host(g2), Write::Host(g3.clone())],
                events: vec![
                    event(3, EventKind::HostMaintenanceOn, &["h1"]),
                    event(4, EventKind::HostMaintenanceOff, &["h1"]),
                ],
            })
            .unwrap();

        // Event gap refused.
        let err = store
            .commit(&Batch {
                writes: vec![],
                events: vec![event(9, EventKind::HostAdded, &[])],
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::EventGap {
                    expected: 5,
                    got: 9
                }
            ),
            "{err}"
        );

        // Leases round-trip.
        let lease = Lease {
            id: LeaseId(uuid::Uuid::from_u128(42)),
            holder: Principal::new("ci").unwrap(),
            hosts: vec![HostName::new("h1").unwrap()],
            state: LeaseState::Active,
            profile: None,
            priority: 3,
            comment: "c".into(),
            ttl_ms: 1000,
            granted_at: Timestamp(1),
            expires_at: Timestamp(1001),
            max_expires_at: Timestamp(5000),
            ended_at: None,
            waiter_id: 7,
            request_id: None,
            generation: Generation(1),
            ssh_public_key: None,
            preemptible: false,
            preempted_at: None,
            booking: None,
        };
        store
            .commit(&Batch {
                writes: vec![Write::Lease(lease.clone())],
                events: vec![],
            })
            .unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.leases, vec![lease]);

        // Delete with the right generation only.
        let err = store
            .commit(&Batch {
                writes: vec![Write::DeleteHost {
                    name: h2.name.clone(),
                    generation: Generation(5),
                }],
                events: vec![],
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }));
        store
            .commit(&Batch {
                writes: vec![Write::DeleteHost {
                    name: h2.name.clone(),
                    generation: Generation(1),
                }],
                events: vec![],
            })
            .unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.hosts, vec![g3]);

        // Event queries.
        let all = store
            .events(&EventQuery {
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        let q = EventQuery {
            after_seq: 1,
            limit: 2,
            host: Some(HostName::new("h1").unwrap()),
            lease: None,
        };
        assert_eq!(
            store
                .events(&q)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
    }

    fn waiter(id: WaiterId) -> Waiter {
        Waiter {
            id,
            principal: Principal::new("ci").unwrap(),
            spec: crate::lease::LeaseSpec {
                arch: None,
                flags: Default::default(),
                hosts: Default::default(),
                count: 1,
                profile: None,
                ttl: std::time::Duration::from_secs(60),
                priority: 0,
                ssh_public_key: None,
                comment: "c".into(),
                min_ttl: None,
            },
            request_id: Some(crate::types::RequestId::new("r-1").unwrap()),
            queued_at: Timestamp(5),
            detached: false,
            check: None,
            preemptible: false,
            booking: None,
        }
    }

    /// Waiters are written once and deleted once; ended leases are deleted
    /// with compare-and-set. (A fresh store.)
    pub fn waiters_and_deletes(store: &dyn Store) {
        store
            .commit(&Batch {
                writes: vec![Write::Waiter(waiter(7)), Write::Waiter(waiter(9))],
                events: vec![],
            })
            .unwrap();
        assert_eq!(
            store.load().unwrap().waiters,
            vec![waiter(7), waiter(9)],
            "round trip, in id order"
        );
        let again = store.commit(&Batch {
            writes: vec![Write::Waiter(waiter(7))],
            events: vec![],
        });
        assert!(
            matches!(
                again,
                Err(StoreError::WaiterConflict {
                    id: 7,
                    stored: true
                })
            ),
            "{again:?}"
        );
        store
            .commit(&Batch {
                writes: vec![Write::DeleteWaiter(7)],
                events: vec![],
            })
            .unwrap();
        let twice = store.commit(&Batch {
            writes: vec![Write::DeleteWaiter(7)],
            events: vec![],
        });
        assert!(
            matches!(
                twice,
                Err(StoreError::WaiterConflict {
                    id: 7,
                    stored: false
                })
            ),
            "{twice:?}"
        );
        assert_eq!(store.load().unwrap().waiters, vec![waiter(9)]);

        let lease = Lease {
            id: LeaseId(uuid::Uuid::from_u128(5)),
            holder: Principal::new("ci").unwrap(),
            hosts: vec![HostName::new("h1").unwrap()],
            state: LeaseState::Released,
            profile: None,
            priority: 0,
            comment: String::new(),
            ttl_ms: 1000,
            granted_at: Timestamp(1),
            expires_at: Timestamp(1001),
            max_expires_at: Timestamp(5000),
            ended_at: Some(Timestamp(2)),
            ssh_public_key: None,
            preemptible: false,
            preempted_at: None,
            booking: None,
            waiter_id: 9,
            request_id: None,
            generation: Generation(1),
        };
        store
            .commit(&Batch {
                writes: vec![Write::Lease(lease.clone())],
                events: vec![],
            })
            .unwrap();
        let stale = store.commit(&Batch {
            writes: vec![Write::DeleteLease {
                id: lease.id,
                generation: Generation(3),
            }],
            events: vec![],
        });
        assert!(
            matches!(stale, Err(StoreError::Conflict { .. })),
            "{stale:?}"
        );
        store
            .commit(&Batch {
                writes: vec![Write::DeleteLease {
                    id: lease.id,
                    generation: Generation(1),
                }],
                events: vec![],
            })
            .unwrap();
        assert!(store.load().unwrap().leases.is_empty());

        // Bookings: compare-and-set on the generation, deleted with theirs.
        use crate::lease::booking::{BookingKind, BookingState};
        let booking = |id: u64, generation: u64| Booking {
            id,
            kind: BookingKind::Lease,
            holder: Principal::new("ci").unwrap(),
            hosts: vec![HostName::new("h1").unwrap()],
            start: Timestamp(10_000),
            end: Timestamp(20_000),
            comment: "nightly".into(),
            profile: None,
            state: BookingState::Scheduled,
            lease: None,
            created_at: Timestamp(1),
            generation: Generation(generation),
        };
        let commit = |w: Write| {
            store.commit(&Batch {
                writes: vec![w],
                events: vec![],
            })
        };
        commit(Write::Booking(booking(12, 1))).unwrap();
        commit(Write::Booking(booking(40, 1))).unwrap();
        let again = commit(Write::Booking(booking(12, 1)));
        assert!(
            matches!(again, Err(StoreError::Conflict { .. })),
            "{again:?}"
        );
        let mut started = booking(12, 2);
        started.state = BookingState::Started;
        commit(Write::Booking(started.clone())).unwrap();
        assert_eq!(
            store.load().unwrap().bookings,
            vec![started, booking(40, 1)],
            "round trip, in id order"
        );
        let stale = commit(Write::DeleteBooking {
            id: 12,
            generation: Generation(1),
        });
        assert!(
            matches!(stale, Err(StoreError::Conflict { .. })),
            "{stale:?}"
        );
        commit(Write::DeleteBooking {
            id: 12,
            generation: Generation(2),
        })
        .unwrap();
        assert_eq!(store.load().unwrap().bookings, vec![booking(40, 1)]);
        commit(Write::DeleteBooking {
            id: 40,
            generation: Generation(1),
        })
        .unwrap();
    }

    /// Pruning removes the oldest events before the cutoff, at most `max` a
    /// step, never the last one, and their index entries with them. (A
    /// fresh store.)
    pub fn pruning(store: &dyn Store) {
        let lease = LeaseId(uuid::Uuid::from_u128(9));
        let events: Vec<EventRecord> = (1..=10)
            .map(|seq| {
                let mut e = event(seq, EventKind::LeaseRenewed, &["h1"]);
                e.time = Timestamp(seq as i64 * 100);
                e.lease = Some(lease);
                e
            })
            .collect();
        store
            .commit(&Batch {
                writes: vec![],
                events,
            })
            .unwrap();
        let seqs = |q: EventQuery| -> Vec<u64> {
            store.events(&q).unwrap().iter().map(|e| e.seq).collect()
        };
        let all = || EventQuery {
            limit: 100,
            ..Default::default()
        };
        // Times 100..=1000: before 450 are 1..=4; three per step.
        assert_eq!(
            store.prune_events(Timestamp(450), 3).unwrap(),
            Pruned {
                events: 3,
                more: true
            }
        );
        assert_eq!(
            store.prune_events(Timestamp(450), 3).unwrap(),
            Pruned {
                events: 1,
                more: false
            }
        );
        assert_eq!(
            store.prune_events(Timestamp(450), 3).unwrap(),
            Pruned {
                events: 0,
                more: false
            }
        );
        assert_eq!(seqs(all()), (5..=10).collect::<Vec<_>>());
        for q in [
            EventQuery {
                host: Some(HostName::new("h1").unwrap()),
                ..all()
            },
            EventQuery {
                lease: Some(lease),
                ..all()
            },
        ] {
            assert_eq!(seqs(q), (5..=10).collect::<Vec<_>>(), "the indexes follow");
        }
        // Everything is old: all but the last event go; numbering goes on.
        assert_eq!(
            store.prune_events(Timestamp(i64::MAX), 100).unwrap(),
            Pruned {
                events: 5,
                more: false
            }
        );
        assert_eq!(seqs(all()), [10]);
        assert_eq!(store.last_event_seq().unwrap(), 10);
        assert_eq!(store.load().unwrap().last_event_seq, 10);
        store
            .commit(&Batch {
                writes: vec![],
                events: vec![event(11, EventKind::HostAdded, &["h2"])],
            })
            .unwrap();
        assert_eq!(
            seqs(EventQuery {
                after_seq: 10,
                ..all()
            }),
            [11]
        );
    }

    pub fn row(seq: u64, hook: &str, next: i64) -> OutboxRow {
        OutboxRow {
            seq,
            hook: hook.into(),
            delivery: format!("d-{seq}-{hook}"),
            kind: "HOST_ADDED".into(),
            body: format!("{{\"id\":{seq}}}"),
            created: Timestamp(seq as i64),
            attempts: 0,
            next_attempt: Timestamp(next),
            last_error: None,
        }
    }

    /// Outbox rows commit with their events (or not at all), come due in
    /// order of next attempt, are deleted or rescheduled, outlive the
    /// pruning of their events, go with their hook and are trimmed oldest
    /// first. (A fresh store.)
    pub fn outbox(store: &dyn Store) {
        let keys = |rows: Vec<OutboxRow>| -> Vec<(u64, String)> {
            rows.iter().map(OutboxRow::key).collect()
        };
        let k = |seq: u64, hook: &str| (seq, hook.to_owned());
        store
            .commit(&Batch {
                writes: vec![
                    Write::Outbox(row(1, "a", 10)),
                    Write::Outbox(row(1, "b", 10)),
                    Write::Outbox(row(2, "a", 5)),
                ],
                events: vec![
                    event(1, EventKind::HostAdded, &["h1"]),
                    event(2, EventKind::HostAdded, &["h2"]),
                ],
            })
            .unwrap();
        // A batch that fails leaves no row behind.
        let err = store.commit(&Batch {
            writes: vec![Write::Outbox(row(9, "a", 0))],
            events: vec![event(9, EventKind::HostAdded, &[])],
        });
        assert!(matches!(err, Err(StoreError::EventGap { .. })), "{err:?}");
        assert_eq!(store.outbox_len().unwrap(), 3);
        assert_eq!(keys(store.outbox_due(Timestamp(4), 10).unwrap()), []);
        assert_eq!(store.outbox_next_due().unwrap(), Some(Timestamp(5)));
        assert_eq!(
            keys(store.outbox_due(Timestamp(10), 10).unwrap()),
            [k(2, "a"), k(1, "a"), k(1, "b")]
        );
        assert_eq!(
            keys(store.outbox_due(Timestamp(10), 1).unwrap()),
            [k(2, "a")]
        );
        assert_eq!(
            store.outbox_due(Timestamp(10), 1).unwrap()[0],
            row(2, "a", 5)
        );

        // Delivered: deleted; failed: rescheduled; a row that is gone is not
        // brought back by a late retry.
        let mut retry = row(1, "b", 100);
        retry.attempts = 1;
        retry.last_error = Some("HTTP 503".into());
        store
            .outbox_settle(&[
                Settle::Delete(k(1, "a")),
                Settle::Retry(retry.clone()),
                Settle::Retry(row(7, "zz", 0)),
            ])
            .unwrap();
        assert_eq!(store.outbox_len().unwrap(), 2);
        assert_eq!(
            keys(store.outbox_due(Timestamp(99), 10).unwrap()),
            [k(2, "a")]
        );
        assert_eq!(store.outbox_due(Timestamp(100), 10).unwrap()[1], retry);

        // Retention prunes the events; the rows carry their bodies.
        store.prune_events(Timestamp(i64::MAX), 100).unwrap();
        assert_eq!(store.outbox_len().unwrap(), 2);

        // A removed hook's rows go with it.
        store
            .commit(&Batch {
                writes: vec![
                    Write::Outbox(row(3, "b", 0)),
                    Write::DropOutbox { hook: "a".into() },
                ],
                events: vec![event(3, EventKind::HostAdded, &[])],
            })
            .unwrap();
        assert_eq!(store.outbox_len().unwrap(), 2);
        assert_eq!(
            keys(store.outbox_due(Timestamp(1000), 10).unwrap()),
            [k(3, "b"), k(1, "b")]
        );

        // Over the bound: the oldest events' rows go first, `step` at most.
        store
            .commit(&Batch {
                writes: (4..=6).map(|s| Write::Outbox(row(s, "b", 0))).collect(),
                events: (4..=6)
                    .map(|s| event(s, EventKind::HostAdded, &[]))
                    .collect(),
            })
            .unwrap();
        assert_eq!(store.outbox_len().unwrap(), 5);
        assert_eq!(
            keys(store.outbox_trim(2, 2).unwrap()),
            [k(1, "b"), k(3, "b")]
        );
        assert_eq!(keys(store.outbox_trim(2, 2).unwrap()), [k(4, "b")]);
        assert_eq!(keys(store.outbox_trim(2, 2).unwrap()), []);
        assert_eq!(store.outbox_len().unwrap(), 2);
        assert_eq!(
            keys(store.outbox_due(Timestamp(1000), 10).unwrap()),
            [k(5, "b"), k(6, "b")]
        );
    }
}
