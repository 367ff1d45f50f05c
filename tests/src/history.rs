//! The history checker: replays the server's event log and proves what the
//! lease core promises about it, or panics naming the offending event.
//!
//! - the log is gap-free from its first event;
//! - no host ever has two holders (a host is granted only when free, ends
//!   only the lease that holds it, and is available again only after a
//!   reclaim);
//! - every grant respects the queue order (priority first, then waiter
//!   id) and the reservation rule: replaying the scheduling pass over the
//!   hosts free at the grant, each earlier request still waiting takes what
//!   it could use (all it can use when that is not enough for it), and the
//!   grant gets only hosts none of them took. An earlier request that could
//!   have been granted from the free hosts, and was not, is a violation —
//!   unless it was waiting when the server (re)started (an
//!   `INVENTORY_LOADED` by `server`): its client may not have resumed it
//!   yet, and a detached request keeps the hosts it would get but is not
//!   granted (see `docs/leases.md`);
//! - every waiter is granted at most once, with as many hosts as it asked
//!   for, each one it can use;
//! - at the end no request is left waiting (every `LEASE_REQUESTED` ended
//!   in `LEASE_GRANTED` or `REQUEST_WITHDRAWN`).
//!
//! Used by the concurrency test (64 clients on one server), the crash tests
//! and the `crash-loop` benchmark (the log across many SIGKILLs).

use lab_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap, HashSet};

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
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Free,
    Held,
    Reclaiming,
}

struct Waiting {
    priority: i32,
    req: pb::LeaseRequest,
    /// Waiting when the server started: maybe detached since.
    detached: bool,
}

/// Replays `events` over the hosts `hosts` (name, flags); panics on any
/// violation. `events` must start at the first event of the log.
pub fn check_history(events: &[pb::Event], hosts: &[(String, Vec<String>)]) -> History {
    use pb::EventKind as K;
    let flags: HashMap<&str, &[String]> = hosts
        .iter()
        .map(|(h, f)| (h.as_str(), f.as_slice()))
        .collect();
    let could_use = |req: &pb::LeaseRequest, host: &str| {
        let have = flags.get(host).copied().unwrap_or_default();
        req.flags.iter().all(|f| have.contains(f))
            && (req.hosts.is_empty() || req.hosts.iter().any(|h| h == host))
    };
    let mut slots: BTreeMap<String, (Slot, String)> = hosts
        .iter()
        .map(|(h, _)| (h.clone(), (Slot::Free, String::new())))
        .collect();
    // Hosts in maintenance or unreachable: not granted.
    let mut out_of_service: HashSet<String> = HashSet::new();
    // Key: (-priority, waiter id): the service order.
    let mut waiting: BTreeMap<(i32, u64), Waiting> = BTreeMap::new();
    let mut keys: HashMap<u64, (i32, u64)> = HashMap::new();
    let mut granted: HashSet<u64> = HashSet::new();
    let mut h = History::default();
    let mut last_seq = events.first().map_or(0, |e| e.seq.saturating_sub(1));
    for e in events {
        assert_eq!(e.seq, last_seq + 1, "event log has a gap before {e:?}");
        last_seq = e.seq;
        h.events += 1;
        match K::try_from(e.kind).unwrap() {
            K::LeaseRequested => {
                h.requests += 1;
                let req = e.request.clone().expect("request recorded");
                let key = (-req.priority, e.waiter_id);
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
                        detached: false,
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
                assert_eq!(
                    e.hosts.len(),
                    me.req.count.max(1) as usize,
                    "wrong host count: {e:?}"
                );
                // The scheduling pass, replayed: earlier waiters in order
                // over the hosts free now (in inventory order).
                let free = |host: &str| {
                    slots.get(host).is_some_and(|s| s.0 == Slot::Free)
                        && !out_of_service.contains(host)
                };
                let mut taken: HashMap<&str, u64> = HashMap::new();
                for (k, other) in waiting.range(..key) {
                    h.order_checks += 1;
                    let usable: Vec<&str> = hosts
                        .iter()
                        .map(|(host, _)| host.as_str())
                        .filter(|host| {
                            free(host) && !taken.contains_key(host) && could_use(&other.req, host)
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
        waiting.keys().collect::<Vec<_>>()
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
}
