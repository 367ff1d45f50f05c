//! Advance bookings and planned maintenance windows: a host set reserved
//! for `[start, end)`. Pure: the records, their lifecycle and the book the
//! scheduler asks ("may this host be granted for this long now?").
//!
//! ```text
//! booking:  Scheduled --start (now >= start)--> Started --end (now >= end)--> (deleted)
//!           Scheduled | Started --cancel--> (deleted)
//! ```
//!
//! The rule the core keeps with it: **no lease overlaps a booking of its
//! hosts**. A booking is only created over hosts whose leases end before
//! its start (their hard cap, `max_expires_at`, is then lowered to the
//! start, so renewals cannot cross it), and a lease is only granted on a
//! host for as long as the host is free of bookings: its hard cap is the
//! next booking's start. A request whose TTL does not fit waits, or is
//! granted a shorter lease if it allows one (`min_ttl`). During its window
//! a host is offered to nobody but the booking's own request (a lease
//! booking) or kept in maintenance (a maintenance window).
//!
//! A booking's id is the sequence number of its `BOOKING_CREATED` event.

use crate::types::{Generation, HostName, LeaseId, Principal, ProfileName, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A booking's id: the sequence number of its `BOOKING_CREATED` event.
pub type BookingId = u64;

/// What a booking is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BookingKind {
    /// At its start its holder is granted a lease of the hosts until its end.
    Lease,
    /// The hosts are in maintenance from its start to its end (operators).
    Maintenance,
}

impl std::fmt::Display for BookingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BookingKind::Lease => "lease",
            BookingKind::Maintenance => "maintenance",
        })
    }
}

/// Where a booking is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BookingState {
    Scheduled,
    /// Its window began: its request waits for (or holds) the hosts, or
    /// they are in maintenance.
    Started,
}

/// A booking, as persisted. Removed from the store when it ends or is
/// cancelled (the event log keeps its history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booking {
    pub id: BookingId,
    pub kind: BookingKind,
    /// Who gets the lease (who asked, for a maintenance window).
    pub holder: Principal,
    pub hosts: Vec<HostName>,
    pub start: Timestamp,
    pub end: Timestamp,
    pub comment: String,
    /// The profile of the lease it grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileName>,
    pub state: BookingState,
    /// The lease granted for it, once granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseId>,
    pub created_at: Timestamp,
    pub generation: Generation,
}

impl Booking {
    /// Does its window meet `[start, end)`?
    pub fn overlaps(&self, start: Timestamp, end: Timestamp) -> bool {
        self.start < end && start < self.end
    }

    /// Scheduled → Started (the window began).
    pub fn started(&self) -> Option<Booking> {
        (self.state == BookingState::Scheduled).then(|| Booking {
            state: BookingState::Started,
            generation: self.generation.next(),
            ..self.clone()
        })
    }

    /// Its lease was granted.
    pub fn granted(&self, lease: LeaseId) -> Booking {
        Booking {
            lease: Some(lease),
            generation: self.generation.next(),
            ..self.clone()
        }
    }
}

/// What bookings leave of a host for a grant at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// No booking ahead.
    Free,
    /// Free until this booking's start.
    Until(Timestamp, BookingId),
    /// A booking's window runs now.
    Booked(BookingId),
}

/// Every booking not yet ended, indexed by host and by the times the core
/// must act on (starts of scheduled ones, ends of all).
#[derive(Debug, Default, Clone)]
pub struct Book {
    bookings: BTreeMap<BookingId, Booking>,
    /// Per host, its bookings by start (they never overlap on one host).
    by_host: HashMap<HostName, BTreeSet<(Timestamp, BookingId)>>,
    /// Scheduled bookings by start.
    starts: BTreeSet<(Timestamp, BookingId)>,
    /// All bookings by end.
    ends: BTreeSet<(Timestamp, BookingId)>,
}

impl Book {
    pub fn is_empty(&self) -> bool {
        self.bookings.is_empty()
    }

    pub fn get(&self, id: BookingId) -> Option<&Booking> {
        self.bookings.get(&id)
    }

    /// In id (creation) order.
    pub fn iter(&self) -> impl Iterator<Item = &Booking> {
        self.bookings.values()
    }

    /// Adds or replaces a booking.
    pub fn put(&mut self, b: Booking) {
        self.remove(b.id);
        for h in &b.hosts {
            self.by_host
                .entry(h.clone())
                .or_default()
                .insert((b.start, b.id));
        }
        if b.state == BookingState::Scheduled {
            self.starts.insert((b.start, b.id));
        }
        self.ends.insert((b.end, b.id));
        self.bookings.insert(b.id, b);
    }

    pub fn remove(&mut self, id: BookingId) -> Option<Booking> {
        let b = self.bookings.remove(&id)?;
        for h in &b.hosts {
            if let Some(set) = self.by_host.get_mut(h) {
                set.remove(&(b.start, b.id));
                if set.is_empty() {
                    self.by_host.remove(h);
                }
            }
        }
        self.starts.remove(&(b.start, b.id));
        self.ends.remove(&(b.end, b.id));
        Some(b)
    }

    /// The earliest time the core must act: a scheduled booking's start or
    /// any booking's end.
    pub fn next_due(&self) -> Option<Timestamp> {
        let s = self.starts.first().map(|(t, _)| *t);
        let e = self.ends.first().map(|(t, _)| *t);
        s.into_iter().chain(e).min()
    }

    /// Scheduled bookings whose window has begun, in start order.
    pub fn due_starts(&self, now: Timestamp) -> Vec<BookingId> {
        self.starts
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Bookings whose window is over, in end order.
    pub fn due_ends(&self, now: Timestamp) -> Vec<BookingId> {
        self.ends
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| *id)
            .collect()
    }

    /// What bookings leave of `host` at `now`, not counting `own` (a
    /// booking's request is granted its own booked hosts).
    pub fn room(&self, host: &HostName, now: Timestamp, own: Option<BookingId>) -> Room {
        let Some(set) = self.by_host.get(host) else {
            return Room::Free;
        };
        for &(start, id) in set {
            if Some(id) == own {
                continue;
            }
            let Some(b) = self.bookings.get(&id) else {
                continue;
            };
            if b.end <= now {
                // Ended; removed in the batch that notices.
                continue;
            }
            return if start <= now {
                Room::Booked(id)
            } else {
                Room::Until(start, id)
            };
        }
        Room::Free
    }

    /// The first booking of any of `hosts` that meets `[start, end)`,
    /// other than `except`.
    pub fn conflict<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a HostName>,
        start: Timestamp,
        end: Timestamp,
    ) -> Option<&Booking> {
        hosts
            .into_iter()
            .filter_map(|h| self.by_host.get(h))
            .flat_map(|set| set.iter())
            .filter_map(|(_, id)| self.bookings.get(id))
            .filter(|b| b.overlaps(start, end))
            .min_by_key(|b| (b.start, b.id))
    }

    /// The most hosts that lease bookings accepted by `whose` hold at one
    /// moment of `[start, end)` (maintenance windows hold none for anyone).
    pub fn peak_hosts(
        &self,
        start: Timestamp,
        end: Timestamp,
        whose: impl Fn(&Principal) -> bool,
    ) -> usize {
        // Each booking, clipped to the window, adds its hosts at its start
        // and takes them back at its end; at one instant an end sorts
        // before a start (windows are half-open).
        let mut steps: Vec<(Timestamp, isize)> = Vec::new();
        for b in self.bookings.values() {
            if b.kind == BookingKind::Lease && b.overlaps(start, end) && whose(&b.holder) {
                let n = b.hosts.len() as isize;
                steps.push((b.start.max(start), n));
                steps.push((b.end, -n));
            }
        }
        steps.sort_unstable();
        let (mut held, mut peak) = (0isize, 0isize);
        for (_, n) in steps {
            held += n;
            peak = peak.max(held);
        }
        peak as usize
    }

    /// Scheduled or started bookings of `principal`.
    pub fn count_of(&self, principal: &Principal) -> usize {
        self.bookings
            .values()
            .filter(|b| &b.holder == principal)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }

    fn booking(id: BookingId, hosts: &[&str], start: i64, end: i64) -> Booking {
        Booking {
            id,
            kind: BookingKind::Lease,
            holder: Principal::new("alice").unwrap(),
            hosts: hosts.iter().map(|n| h(n)).collect(),
            start: Timestamp(start),
            end: Timestamp(end),
            comment: String::new(),
            profile: None,
            state: BookingState::Scheduled,
            lease: None,
            created_at: Timestamp(0),
            generation: Generation(1),
        }
    }

    #[test]
    fn room_by_time_as_a_table() {
        let mut book = Book::default();
        book.put(booking(1, &["a"], 1000, 2000));
        book.put(booking(2, &["a", "b"], 3000, 4000));
        // (host, now, own) -> room
        let table: &[(&str, i64, Option<BookingId>, Room)] = &[
            ("a", 0, None, Room::Until(Timestamp(1000), 1)),
            ("a", 999, None, Room::Until(Timestamp(1000), 1)),
            ("a", 1000, None, Room::Booked(1)),
            ("a", 1999, None, Room::Booked(1)),
            ("a", 2000, None, Room::Until(Timestamp(3000), 2)),
            ("a", 1500, Some(1), Room::Until(Timestamp(3000), 2)),
            ("a", 3500, None, Room::Booked(2)),
            ("a", 4000, None, Room::Free),
            ("b", 0, None, Room::Until(Timestamp(3000), 2)),
            ("b", 3000, Some(2), Room::Free),
            ("c", 0, None, Room::Free),
        ];
        for &(host, now, own, want) in table {
            assert_eq!(
                book.room(&h(host), Timestamp(now), own),
                want,
                "{host} at {now} (own {own:?})"
            );
        }
    }

    #[test]
    fn conflicts_dues_and_removal() {
        let mut book = Book::default();
        book.put(booking(1, &["a"], 1000, 2000));
        book.put(booking(2, &["b"], 1500, 2500));
        let hosts = [h("a"), h("b")];
        assert_eq!(book.conflict(&hosts, Timestamp(0), Timestamp(1000)), None);
        assert_eq!(
            book.conflict(&hosts, Timestamp(0), Timestamp(1001))
                .map(|b| b.id),
            Some(1)
        );
        assert_eq!(
            book.conflict(&hosts[1..], Timestamp(2499), Timestamp(9000))
                .map(|b| b.id),
            Some(2)
        );
        assert_eq!(
            book.conflict(&hosts, Timestamp(2500), Timestamp(9000)),
            None
        );
        assert_eq!(book.next_due(), Some(Timestamp(1000)));
        assert_eq!(book.due_starts(Timestamp(1500)), vec![1, 2]);
        let started = book.get(1).unwrap().started().unwrap();
        assert_eq!(started.generation, Generation(2));
        assert!(started.started().is_none(), "a started booking starts once");
        book.put(started);
        assert_eq!(book.due_starts(Timestamp(1500)), vec![2]);
        assert_eq!(book.due_ends(Timestamp(2000)), vec![1]);
        assert!(book.remove(1).is_some());
        assert_eq!(book.room(&h("a"), Timestamp(1500), None), Room::Free);
        assert_eq!(book.next_due(), Some(Timestamp(1500)));
        assert_eq!(book.count_of(&Principal::new("alice").unwrap()), 1);
    }

    #[test]
    fn peak_hosts_as_a_table() {
        let mut book = Book::default();
        book.put(booking(1, &["a", "b"], 1000, 2000));
        book.put(booking(2, &["c"], 1500, 3000));
        book.put(booking(3, &["d", "e", "f"], 2000, 2500));
        let mut other = booking(4, &["g", "h", "i", "j"], 0, 9000);
        other.holder = Principal::new("bob").unwrap();
        book.put(other);
        let mut window = booking(5, &["k", "l", "m", "n", "o"], 0, 9000);
        window.kind = BookingKind::Maintenance;
        book.put(window);
        let alice = |p: &Principal| p.as_str() == "alice";
        // (start, end) -> alice's peak
        let table: &[(i64, i64, usize)] = &[
            (0, 1000, 0),
            (0, 1001, 2),
            (1000, 1500, 2),
            (1000, 1501, 3),
            (1999, 2000, 3),
            (2000, 2001, 4),
            (2000, 2500, 4),
            (2500, 3000, 1),
            (3000, 9000, 0),
            (0, 9000, 4),
        ];
        for &(start, end, want) in table {
            assert_eq!(
                book.peak_hosts(Timestamp(start), Timestamp(end), alice),
                want,
                "[{start}, {end})"
            );
        }
        assert_eq!(
            book.peak_hosts(Timestamp(0), Timestamp(9000), |_| true),
            8,
            "bob's 4 hosts with alice's peak of 4; the maintenance window counts for no one"
        );
    }
}
