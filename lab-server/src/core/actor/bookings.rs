//! The actor's side of advance bookings and maintenance windows
//! (`lease::booking` has the records and the rule): making and cancelling
//! them, starting and ending them on time, and what the scheduler asks of
//! them (a host's window, a grant's hard cap).

use super::{Actor, Pending, not_found};
use crate::core::{BookingRequest, CoreError, policy};
use crate::events::EventKind;
use crate::lease::booking::{Booking, BookingId, BookingKind, BookingState, Room};
use crate::lease::queue::Window;
use crate::lease::{HostState, LeaseEvent, LeaseSpec, Waiter};
use crate::store::Write;
use crate::types::{Caller, Generation, HostName, Principal, Timestamp};
use std::time::Duration;
use tracing::{error, info};

/// Most bookings (scheduled or running) one principal may have.
pub(crate) const MAX_BOOKINGS_PER_PRINCIPAL: usize = 32;
/// How far ahead a booking may start.
pub(crate) const BOOKING_HORIZON: Duration = Duration::from_secs(90 * 24 * 3600);
/// Longest maintenance window.
pub(crate) const MAX_MAINTENANCE: Duration = Duration::from_secs(90 * 24 * 3600);
/// A start this little in the past means "now" (clocks and round trips).
const START_SLACK: Duration = Duration::from_secs(60);

impl Actor {
    /// What bookings leave of `host` for a grant now.
    pub(super) fn window(&self, host: &HostName, now: Timestamp) -> Window {
        if self.book.is_empty() {
            return Window::Open;
        }
        match self.book.room(host, now, None) {
            Room::Free => Window::Open,
            Room::Until(start, _) => Window::Left(start.since(now)),
            Room::Booked(id) => Window::Booked(id),
        }
    }

    /// The hard cap bookings put on a lease of `hosts` granted now for
    /// booking `own` (if any): the next booking's start.
    pub(super) fn booking_cap(
        &self,
        hosts: &[HostName],
        now: Timestamp,
        own: Option<BookingId>,
    ) -> Option<Timestamp> {
        hosts
            .iter()
            .filter_map(|h| match self.book.room(h, now, own) {
                Room::Until(start, _) => Some(start),
                Room::Free | Room::Booked(_) => None,
            })
            .min()
    }

    /// Why a request refused for `no_wait` could not be granted, when a
    /// booking is in the way of a host it could otherwise have had.
    pub(super) fn booked_reason(&self, w: &Waiter, now: Timestamp) -> Option<String> {
        if self.book.is_empty() {
            return None;
        }
        self.index.free().find_map(|h| {
            let spec = self.inventory.host(h)?;
            if !w.spec.fits(h, spec.arch, &spec.flags) {
                return None;
            }
            let b = match self.book.room(h, now, None) {
                Room::Free => return None,
                Room::Until(_, id) | Room::Booked(id) => self.book.get(id)?,
            };
            Some(format!(
                "{}; a lease of {} would overlap it{}",
                booked_from(h, b),
                humantime::format_duration(w.spec.ttl),
                if b.start > now && w.spec.min_ttl.is_none() {
                    " (ask for less, or accept a shorter lease with min_ttl)"
                } else {
                    ""
                }
            ))
        })
    }

    /// What a waiter for hosts it named waits for when a booking of one
    /// of them is in its way: running now, or starting before the shortest
    /// lease it accepts would end. Said on its queue line.
    pub(super) fn booking_in_the_way(&self, w: &Waiter, now: Timestamp) -> Option<String> {
        if self.book.is_empty() || w.spec.hosts.is_empty() || w.booking.is_some() {
            return None;
        }
        w.spec
            .hosts
            .iter()
            .find_map(|h| match self.book.room(h, now, None) {
                Room::Free => None,
                Room::Booked(id) => {
                    let b = self.book.get(id)?;
                    Some(format!("{h} is booked until {} (booking {})", b.end, b.id))
                }
                Room::Until(start, id) if start.since(now) < w.spec.shortest() => {
                    Some(booked_from(h, self.book.get(id)?))
                }
                Room::Until(..) => None,
            })
    }

    pub(super) fn list_bookings(&self, host: Option<&HostName>) -> Vec<Booking> {
        let mut v: Vec<Booking> = self
            .book
            .iter()
            .filter(|b| host.is_none_or(|h| b.hosts.contains(h)))
            .cloned()
            .collect();
        v.sort_by_key(|b| (b.start, b.id));
        v
    }

    pub(super) fn create_booking(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: &Caller,
        r: BookingRequest,
    ) -> Result<Booking, CoreError> {
        let invalid =
            |field: &'static str, reason: String| CoreError::InvalidArgument { field, reason };
        if r.kind == BookingKind::Maintenance {
            policy::operators_only(caller, "plan maintenance windows")?;
        }
        let start = if r.start < now {
            if now.since(r.start) > START_SLACK {
                return Err(invalid("start", format!("{} is in the past", r.start)));
            }
            now
        } else {
            r.start
        };
        if start.since(now) > BOOKING_HORIZON {
            return Err(invalid(
                "start",
                format!(
                    "at most {} ahead",
                    humantime::format_duration(BOOKING_HORIZON)
                ),
            ));
        }
        match r.kind {
            BookingKind::Lease => self.check_ttl(caller, "duration", r.duration)?,
            BookingKind::Maintenance => {
                if r.duration.is_zero() || r.duration > MAX_MAINTENANCE {
                    return Err(invalid(
                        "duration",
                        format!(
                            "must be more than 0 and at most {}",
                            humantime::format_duration(MAX_MAINTENANCE)
                        ),
                    ));
                }
            }
        }
        if r.duration < Duration::from_secs(1) {
            return Err(invalid("duration", "must be at least 1s".into()));
        }
        let end = start.saturating_add(r.duration);
        let held = self.book.count_of(&caller.principal);
        if held >= MAX_BOOKINGS_PER_PRINCIPAL {
            return Err(CoreError::BookingConflict {
                reason: format!(
                    "{} already has {held} bookings (the most one principal may have)",
                    caller.principal
                ),
            });
        }
        let hosts = if r.hosts.is_empty() {
            self.pick_hosts(&r, start, end)?
        } else {
            for h in &r.hosts {
                let known = self.inventory.host(h).is_some()
                    && self.hosts.get(h).is_some_and(|rec| !rec.retired);
                if !known {
                    return Err(not_found("host", h));
                }
                if let Some(reason) = self.in_the_way(h, start, end) {
                    return Err(CoreError::BookingConflict { reason });
                }
            }
            let mut hosts = r.hosts.clone();
            hosts.sort();
            hosts.dedup();
            hosts
        };
        if r.kind == BookingKind::Lease {
            self.check_booked_quota(caller, hosts.len(), start, end)?;
        }
        // Leases that end before the start may not be renewed past it.
        let capped: Vec<_> = hosts
            .iter()
            .filter_map(|h| self.hosts.get(h)?.lease())
            .filter_map(|id| self.leases.get(&id))
            .filter(|l| l.is_active() && l.max_expires_at > start)
            .filter_map(|l| l.apply(&LeaseEvent::Cap { at: start }).ok())
            .collect();
        for l in capped {
            info!(lease = %l.id, cap = %l.max_expires_at, "a booking ahead caps the lease's renewals");
            self.put_lease(p, l);
        }
        let e = self.event(p, now, &caller.principal, EventKind::BookingCreated);
        let id = e.seq;
        e.booking = Some(id);
        e.hosts = hosts.clone();
        e.detail = format!("{} booking from {start} to {end}", r.kind);
        if !r.comment.is_empty() {
            e.detail.push_str(&format!(": {}", r.comment));
        }
        let b = Booking {
            id,
            kind: r.kind,
            holder: caller.principal.clone(),
            hosts,
            start,
            end,
            comment: r.comment,
            profile: r.profile,
            state: BookingState::Scheduled,
            lease: None,
            created_at: now,
            generation: Generation(1),
        };
        info!(booking = id, kind = %b.kind, holder = %b.holder, hosts = %super::join(&b.hosts), start = %start, end = %end, "booking made");
        p.batch.writes.push(Write::Booking(b.clone()));
        self.book.put(b.clone());
        Ok(b)
    }

    /// A project may not book more hosts at one moment than it may hold
    /// (`max_hosts`), nor a principal more than its role may: `count` more
    /// hosts over `[start, end)` on top of the bookings it has there.
    fn check_booked_quota(
        &self,
        caller: &Caller,
        count: usize,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<(), CoreError> {
        let policy = self.shares.policy();
        let project = policy.project_of(&caller.principal);
        if let Some(max) = policy.project(project).limits.max_hosts {
            let booked = self
                .book
                .peak_hosts(start, end, |h| policy.project_of(h) == project);
            if booked + count > max as usize {
                return Err(CoreError::BookingConflict {
                    reason: format!(
                        "project {} may hold {max} hosts (max_hosts) and has {booked} booked then; {count} more would exceed it",
                        policy.project(project).name
                    ),
                });
            }
        }
        if let Some(max) = policy.role_limits(caller.role).and_then(|l| l.max_hosts) {
            let booked = self.book.peak_hosts(start, end, |h| h == &caller.principal);
            if booked + count > max as usize {
                return Err(CoreError::BookingConflict {
                    reason: format!(
                        "{} may hold {max} hosts (its role's max_hosts) and has {booked} booked then; {count} more would exceed it",
                        caller.principal
                    ),
                });
            }
        }
        Ok(())
    }

    /// Why `host` cannot be booked for `[start, end)`: another booking, or
    /// a lease that runs past `start`.
    fn in_the_way(&self, host: &HostName, start: Timestamp, end: Timestamp) -> Option<String> {
        if let Some(b) = self.book.conflict([host], start, end) {
            return Some(format!(
                "{host} is booked from {} to {} (booking {} of {})",
                b.start, b.end, b.id, b.holder
            ));
        }
        let rec = self.hosts.get(host)?;
        if let HostState::Leased(id) = rec.state
            && let Some(l) = self.leases.get(&id)
            && l.is_active()
            && l.expires_at > start
        {
            return Some(format!(
                "{host} is leased until {} (lease {}), past the booking's start",
                l.expires_at, l.id
            ));
        }
        None
    }

    /// `count` hosts with the request's flags and arch, free of bookings
    /// and leases over the window, in inventory order.
    fn pick_hosts(
        &self,
        r: &BookingRequest,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<HostName>, CoreError> {
        let count = r.count.max(1) as usize;
        let mut matching = 0;
        let mut hosts = Vec::with_capacity(count);
        for spec in &self.inventory.hosts {
            let usable = r.arch.is_none_or(|a| a == spec.arch)
                && r.flags.is_subset(&spec.flags)
                && self.hosts.get(&spec.name).is_some_and(|h| !h.retired);
            if !usable {
                continue;
            }
            matching += 1;
            if self.in_the_way(&spec.name, start, end).is_none() {
                hosts.push(spec.name.clone());
                if hosts.len() == count {
                    return Ok(hosts);
                }
            }
        }
        if matching < count {
            return Err(CoreError::Unsatisfiable {
                reason: format!("the inventory has {matching} matching hosts, {count} asked for"),
            });
        }
        Err(CoreError::BookingConflict {
            reason: format!(
                "only {} of the {matching} matching hosts are free of bookings and leases from {start} to {end}; {count} asked for",
                hosts.len()
            ),
        })
    }

    pub(super) fn cancel_booking(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        caller: &Caller,
        id: BookingId,
    ) -> Result<Booking, CoreError> {
        let b = self.book.get(id).ok_or_else(|| not_found("booking", id))?;
        policy::may_cancel_booking(caller, b)?;
        let b = self.end_booking(p, now, &caller.principal, id, EventKind::BookingCancelled)?;
        Ok(b)
    }

    /// Starts and ends the bookings that are due.
    pub(super) fn bookings_due(&mut self, p: &mut Pending, now: Timestamp) {
        for id in self.book.due_ends(now) {
            if let Err(e) =
                self.end_booking(p, now, &Principal::server(), id, EventKind::BookingEnded)
            {
                error!(booking = id, error = %e, "booking could not be ended");
            }
        }
        for id in self.book.due_starts(now) {
            self.start_booking(p, now, id);
        }
    }

    fn start_booking(&mut self, p: &mut Pending, now: Timestamp, id: BookingId) {
        let Some(started) = self.book.get(id).and_then(Booking::started) else {
            return;
        };
        let e = self.event(p, now, &Principal::server(), EventKind::BookingStarted);
        e.booking = Some(id);
        e.hosts = started.hosts.clone();
        e.detail = format!(
            "{} booking of {} until {}",
            started.kind, started.holder, started.end
        );
        info!(booking = id, kind = %started.kind, holder = %started.holder, "booking started");
        match started.kind {
            BookingKind::Lease => self.queue_booking(p, now, &started),
            BookingKind::Maintenance => {
                let reason = window_reason(&started);
                for h in &started.hosts {
                    self.window_maintenance(p, now, &started.holder, h, true, &reason);
                }
            }
        }
        p.batch.writes.push(Write::Booking(started.clone()));
        self.book.put(started);
    }

    /// A lease booking's request: first in the queue, the only one that may
    /// have the booked hosts until the booking ends.
    fn queue_booking(&mut self, p: &mut Pending, now: Timestamp, b: &Booking) {
        let spec = LeaseSpec {
            arch: None,
            flags: Default::default(),
            hosts: b.hosts.iter().cloned().collect(),
            count: u32::try_from(b.hosts.len()).unwrap_or(u32::MAX),
            profile: b.profile.clone(),
            ttl: b.end.since(now).max(Duration::from_millis(1)),
            priority: 0,
            comment: if b.comment.is_empty() {
                format!("booking {}", b.id)
            } else {
                format!("booking {}: {}", b.id, b.comment)
            },
            ssh_public_key: None,
            min_ttl: None,
        };
        self.queue_own_request(p, now, b.holder.clone(), spec, None, Some(b.id));
    }

    /// Ends (or cancels) a booking: its record goes; its request, if still
    /// waiting, is withdrawn; its maintenance window is lifted. Its lease,
    /// once granted, runs to its own expiry (the booking's end).
    fn end_booking(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        actor: &Principal,
        id: BookingId,
        kind: EventKind,
    ) -> Result<Booking, CoreError> {
        let b = self
            .book
            .remove(id)
            .ok_or_else(|| not_found("booking", id))?;
        p.batch.writes.push(Write::DeleteBooking {
            id,
            generation: b.generation,
        });
        let e = self.event(p, now, actor, kind);
        e.booking = Some(id);
        e.hosts = b.hosts.clone();
        e.lease = b.lease;
        e.detail = format!(
            "{} booking of {} from {} to {}",
            b.kind, b.holder, b.start, b.end
        );
        info!(booking = id, by = %actor, ended = ?kind, "booking over");
        if b.state == BookingState::Started {
            match b.kind {
                BookingKind::Lease => {
                    let waiting = self
                        .queue
                        .iter()
                        .find(|w| w.booking == Some(id))
                        .map(|w| w.id);
                    if let Some(w) = waiting {
                        self.withdraw(p, now, w, "its booking ended before its hosts were free");
                    }
                }
                BookingKind::Maintenance => {
                    let reason = format!("{} ended", window_reason(&b));
                    for h in &b.hosts {
                        self.window_maintenance(p, now, actor, h, false, &reason);
                    }
                }
            }
        }
        Ok(b)
    }

    /// Maintenance on or off for a window (no permission check: the window
    /// was allowed when it was made).
    fn window_maintenance(
        &mut self,
        p: &mut Pending,
        now: Timestamp,
        actor: &Principal,
        host: &HostName,
        on: bool,
        reason: &str,
    ) {
        if let Err(e) = self.switch_maintenance(p, now, actor, host, on, reason.to_owned()) {
            error!(host = %host, error = %e, "maintenance window not applied");
        }
    }

    /// Its lease was granted: the booking remembers it.
    pub(super) fn booking_granted(
        &mut self,
        p: &mut Pending,
        id: BookingId,
        lease: crate::types::LeaseId,
    ) {
        let Some(b) = self.book.get(id) else {
            return;
        };
        let next = b.granted(lease);
        p.batch.writes.push(Write::Booking(next.clone()));
        self.book.put(next);
    }
}

fn window_reason(b: &Booking) -> String {
    if b.comment.is_empty() {
        format!("maintenance window {}", b.id)
    } else {
        format!("maintenance window {}: {}", b.id, b.comment)
    }
}

/// `h1 is booked from S to E (booking N)`, as refusals and queue lines say.
fn booked_from(h: &HostName, b: &Booking) -> String {
    format!(
        "{h} is booked from {} to {} (booking {})",
        b.start, b.end, b.id
    )
}
