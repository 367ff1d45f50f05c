//! Advance bookings and maintenance windows through the core, on paused
//! time: no lease ever overlaps a booking of its hosts (a random test checks
//! it over many bookings and requests), a request is refused, waits or is
//! shortened around one, the booking's holder is granted the hosts at its
//! start, a maintenance window comes and goes, and bookings survive a
//! restart.

use super::clock::TokioClock;
use super::reclaim::Immediate;
use super::tests::{ask, caller, granted, settle, spec};
use super::*;
use crate::lease::booking::BookingState;
use crate::store::memory::MemStore;
use crate::types::{Role, Timestamp};
use std::path::Path;

const T0: Timestamp = Timestamp(1_000_000);
const MIN: u64 = 60;

fn inventory(hosts: usize) -> Inventory {
    let mut text = String::from("[[rack]]\nname = \"r1\"\nagent = \"a1\"\n");
    for i in 1..=hosts {
        let flags = if i % 2 == 0 {
            "flags = [\"iommu\"]\n"
        } else {
            ""
        };
        text.push_str(&format!(
            "\n[[host]]\nname = \"h{i}\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:{i:02x}\"\n{flags}"
        ));
    }
    Inventory::parse(&text, Path::new("inv.toml")).unwrap()
}

async fn start_on(store: Arc<MemStore>, hosts: usize) -> Core {
    let mut config = CoreConfig::new("inv.toml".into());
    config.max_ttl = Duration::from_secs(48 * 3600);
    let clock = Arc::new(TokioClock::starting_at(T0));
    Core::start(config, store, inventory(hosts), Arc::new(Immediate), clock)
        .await
        .unwrap()
        .0
}

fn at(s: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(s))
}

fn h(n: &str) -> HostName {
    HostName::new(n).unwrap()
}

fn book(hosts: &[&str], start_s: u64, dur_s: u64) -> BookingRequest {
    BookingRequest {
        kind: BookingKind::Lease,
        hosts: hosts.iter().map(|n| h(n)).collect(),
        flags: Default::default(),
        arch: None,
        count: 1,
        start: at(start_s),
        duration: Duration::from_secs(dur_s),
        comment: "nightly".into(),
        profile: None,
    }
}

fn operator(name: &str) -> Caller {
    Caller {
        principal: Principal::new(name).unwrap(),
        role: Role::Operator,
    }
}

fn on(hosts: &[&str], ttl_s: u64) -> LeaseSpec {
    LeaseSpec {
        hosts: hosts.iter().map(|n| h(n)).collect(),
        ..spec(hosts.len() as u32, ttl_s)
    }
}

/// Advance paused time to `t` (the actor wakes on its own deadlines).
async fn until(t: Timestamp, clock_now: impl Fn() -> Timestamp) {
    let now = clock_now();
    if t > now {
        tokio::time::advance(t.since(now)).await;
    }
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn requests_are_refused_shortened_or_wait_around_a_booking_and_its_holder_gets_it() {
    let core = start_on(Arc::new(MemStore::new()), 1).await;
    let clock = core.clock();
    let now = || clock.now();
    let b = core
        .create_booking(caller("alice"), book(&["h1"], 3600, 30 * MIN))
        .await
        .unwrap();
    assert_eq!(b.state, BookingState::Scheduled);
    assert_eq!((b.start, b.end), (at(3600), at(3600 + 30 * MIN)));

    // Two hours do not fit before it: refused, naming the booking.
    let mut acq = core
        .acquire(caller("bob"), ask(on(&["h1"], 7200), true))
        .await
        .unwrap();
    let refused = loop {
        match acq.next().await.unwrap() {
            WaitState::Failed(e) => break e,
            WaitState::Queued { .. } => continue,
            WaitState::Granted(l) => panic!("granted across a booking: {l:?}"),
        }
    };
    let text = refused.to_string();
    assert!(matches!(refused, CoreError::BusyBooked { .. }), "{text}");
    assert!(
        text.contains(&format!("booking {}", b.id)) && text.contains("min_ttl"),
        "{text}"
    );

    // Allowed to be shorter: granted until the booking's start.
    let shorter = LeaseSpec {
        min_ttl: Some(Duration::from_secs(10 * MIN)),
        ..on(&["h1"], 7200)
    };
    let l = granted(&core, "bob", shorter).await;
    assert_eq!(l.expires_at, at(3600), "shortened to fit");
    assert_eq!(l.max_expires_at, at(3600), "and renewals stop there");
    let renewed = core
        .renew(caller("bob"), l.id, Some(Duration::from_secs(7200)))
        .await
        .unwrap();
    assert_eq!(renewed.expires_at, at(3600));

    // During the window nobody else gets h1: carol waits.
    let mut carol = core
        .acquire(caller("carol"), ask(on(&["h1"], 600), false))
        .await
        .unwrap();
    until(at(3600), now).await;
    let leases = core
        .list_leases(LeaseQuery {
            include_ended: false,
            holder: None,
            after: None,
            limit: 100,
        })
        .await
        .unwrap()
        .leases;
    assert_eq!(leases.len(), 1, "{leases:?}");
    let alices = &leases[0];
    assert_eq!(alices.holder.as_str(), "alice");
    assert_eq!(alices.booking, Some(b.id));
    assert_eq!(
        alices.expires_at,
        at(3600 + 30 * MIN),
        "until the booking ends"
    );
    assert_eq!(
        alices.comment,
        "booking ".to_owned() + &b.id.to_string() + ": nightly"
    );
    let listed = core.list_bookings(None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, BookingState::Started);
    assert_eq!(listed[0].lease, Some(alices.id));
    // Alice gives h1 back early: still, nobody else gets it during the
    // window, and carol's ETA is the booking's end.
    core.release(caller("alice"), alices.id).await.unwrap();
    settle().await;
    let q = core.list_queue().await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].eta, Some(at(3600 + 30 * MIN)), "{q:?}");
    // Her queue line names the booking in her way.
    assert_eq!(
        q[0].waiting_for,
        Some(format!(
            "h1 is booked until {} (booking {})",
            at(3600 + 30 * MIN),
            b.id
        ))
    );
    // Carol is granted once the booking's lease is over.
    until(at(3600 + 30 * MIN), now).await;
    let got = loop {
        match carol.next().await.unwrap() {
            WaitState::Granted(l) => break l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    };
    assert!(got.granted_at >= at(3600 + 30 * MIN), "{got:?}");
    assert!(core.list_bookings(None).await.unwrap().is_empty(), "ended");
    let kinds: Vec<String> = core
        .list_events(EventQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .events
        .iter()
        .map(|e| e.kind.name().to_owned())
        .filter(|k| k.starts_with("BOOKING"))
        .collect();
    assert_eq!(
        kinds,
        ["BOOKING_CREATED", "BOOKING_STARTED", "BOOKING_ENDED"]
    );
}

#[tokio::test(start_paused = true)]
async fn bookings_are_refused_over_leases_and_bookings_and_picked_by_flags() {
    let core = start_on(Arc::new(MemStore::new()), 4).await;
    // h1 leased for 2 h: a booking starting in 1 h is refused, one in 3 h
    // is made and caps the lease's renewals at its start.
    let l = granted(&core, "bob", on(&["h1"], 7200)).await;
    let e = core
        .create_booking(caller("alice"), book(&["h1"], 3600, 600))
        .await
        .unwrap_err();
    assert!(
        matches!(e, CoreError::BookingConflict { .. }) && e.to_string().contains("leased until"),
        "{e}"
    );
    let b = core
        .create_booking(caller("alice"), book(&["h1"], 3 * 3600, 600))
        .await
        .unwrap();
    let capped = core.get_lease(l.id).await.unwrap();
    assert_eq!(capped.max_expires_at, b.start);
    assert_eq!(capped.expires_at, l.expires_at, "its TTL is untouched");
    // Overlapping the same host: refused; touching it end to start: fine.
    let e = core
        .create_booking(caller("carol"), book(&["h1"], 3 * 3600 + 599, 600))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&format!("booking {}", b.id)), "{e}");
    core.create_booking(caller("carol"), book(&["h1"], 3 * 3600 + 600, 600))
        .await
        .unwrap();
    // By flags and count: the iommu hosts (h2, h4) free over the window.
    let by_flags = BookingRequest {
        hosts: vec![],
        flags: [crate::types::Flag::new("iommu").unwrap()].into(),
        count: 2,
        ..book(&[], 3600, 600)
    };
    let got = core
        .create_booking(caller("dave"), by_flags.clone())
        .await
        .unwrap();
    assert_eq!(got.hosts, vec![h("h2"), h("h4")]);
    let e = core
        .create_booking(caller("erin"), by_flags.clone())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("only 0 of the 2 matching hosts"),
        "{e}"
    );
    let e = core
        .create_booking(
            caller("erin"),
            BookingRequest {
                count: 3,
                ..by_flags
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::Unsatisfiable { .. }), "{e}");
    // Permissions: maintenance windows are for operators; a booking is
    // cancelled by its holder or an operator.
    let maint = BookingRequest {
        kind: BookingKind::Maintenance,
        ..book(&["h3"], 600, 600)
    };
    let e = core
        .create_booking(caller("erin"), maint.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::PermissionDenied(_)), "{e}");
    let e = core
        .cancel_booking(caller("erin"), got.id)
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::PermissionDenied(_)), "{e}");
    core.cancel_booking(caller("dave"), got.id).await.unwrap();
    core.cancel_booking(operator("root"), b.id).await.unwrap();
    // Bad windows.
    for (start, dur, field) in [
        (0, 0, "duration"),
        (0, 49 * 3600, "duration"),
        (91 * 86400, 60, "start"),
    ] {
        let e = core
            .create_booking(caller("erin"), book(&["h3"], start, dur))
            .await
            .unwrap_err();
        assert!(
            matches!(e, CoreError::InvalidArgument { field: f, .. } if f == field),
            "{e}"
        );
    }
    let past = BookingRequest {
        start: Timestamp(T0.0 - 120_000),
        ..book(&["h3"], 0, 60)
    };
    let e = core.create_booking(caller("erin"), past).await.unwrap_err();
    assert!(e.to_string().contains("in the past"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_maintenance_window_comes_and_goes_and_bookings_survive_a_restart() {
    let store = Arc::new(MemStore::new());
    let core = start_on(store.clone(), 2).await;
    let maint = BookingRequest {
        kind: BookingKind::Maintenance,
        comment: "firmware update".into(),
        ..book(&["h1"], 600, 600)
    };
    let w = core.create_booking(operator("root"), maint).await.unwrap();
    let b = core
        .create_booking(caller("alice"), book(&["h2"], 900, 600))
        .await
        .unwrap();
    core.stop().await;

    // A new core on the same store: both bookings are back and act on time.
    let core = start_on(store, 2).await;
    let clock = core.clock();
    let now = || clock.now();
    let listed: Vec<_> = core
        .list_bookings(None)
        .await
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(listed, vec![w.id, b.id]);
    let maintenance =
        |core: Core| async move { core.get_host(h("h1")).await.unwrap().record.maintenance };
    assert!(!maintenance(core.clone()).await);
    until(at(600), now).await;
    assert!(
        maintenance(core.clone()).await,
        "in maintenance during its window"
    );
    // A request for h1 waits through the window.
    let mut acq = core
        .acquire(caller("bob"), ask(on(&["h1"], 60), false))
        .await
        .unwrap();
    until(at(900), now).await;
    let alices = core
        .list_leases(LeaseQuery {
            include_ended: false,
            holder: Some(Principal::new("alice").unwrap()),
            after: None,
            limit: 10,
        })
        .await
        .unwrap()
        .leases;
    assert_eq!(alices.len(), 1, "the booking's lease after the restart");
    assert_eq!(alices[0].booking, Some(b.id));
    until(at(1200), now).await;
    assert!(!maintenance(core.clone()).await, "lifted at its end");
    let l = loop {
        match acq.next().await.unwrap() {
            WaitState::Granted(l) => break l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    };
    assert!(l.granted_at >= at(1200));
}

/// Many random bookings and requests over simulated days: every lease
/// ever granted stays out of every booking of its hosts but its own, and
/// every booking that started on free hosts got its lease.
#[tokio::test(start_paused = true)]
async fn no_lease_ever_overlaps_a_booking() {
    const HOSTS: usize = 4;
    let core = start_on(Arc::new(MemStore::new()), HOSTS).await;
    let clock = core.clock();
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut bookings: Vec<crate::lease::booking::Booking> = Vec::new();
    let mut refused = 0;
    let mut waiting = Vec::new();
    for step in 0..300u64 {
        let now = clock.now();
        let host = format!("h{}", 1 + next(HOSTS as u64));
        match next(4) {
            0 => {
                let start = now.saturating_add(Duration::from_secs(60 * (1 + next(240))));
                let r = BookingRequest {
                    start,
                    ..book(&[&host], 0, 60 * (1 + next(120)))
                };
                match core.create_booking(caller(&format!("b{step}")), r).await {
                    Ok(b) => bookings.push(b),
                    Err(CoreError::BookingConflict { .. }) => refused += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            1 => {
                let s = LeaseSpec {
                    min_ttl: (next(2) == 0).then(|| Duration::from_secs(60)),
                    ..on(&[&host], 60 * (1 + next(180)))
                };
                waiting.push(
                    core.acquire(caller(&format!("c{step}")), ask(s, false))
                        .await
                        .unwrap(),
                );
            }
            2 => {
                let s = spec(1 + next(2) as u32, 60 * (1 + next(60)));
                waiting.push(
                    core.acquire(caller(&format!("d{step}")), ask(s, next(2) == 0))
                        .await
                        .unwrap(),
                );
            }
            _ => {
                tokio::time::advance(Duration::from_secs(60 * next(30))).await;
                settle().await;
            }
        }
    }
    tokio::time::advance(Duration::from_secs(48 * 3600)).await;
    settle().await;
    drop(waiting);
    let leases = core
        .list_leases(LeaseQuery {
            include_ended: true,
            holder: None,
            after: None,
            limit: 100_000,
        })
        .await
        .unwrap()
        .leases;
    assert!(
        bookings.len() > 20 && refused > 0,
        "{} bookings, {refused} refused",
        bookings.len()
    );
    let mut booked_leases = 0;
    for l in &leases {
        let end = l.ended_at.unwrap_or(l.expires_at);
        for b in &bookings {
            if l.booking == Some(b.id) {
                booked_leases += 1;
                assert_eq!(l.hosts, b.hosts);
                assert!(l.granted_at >= b.start && end <= b.end, "{l:?} vs {b:?}");
                continue;
            }
            let shared = l.hosts.iter().any(|h| b.hosts.contains(h));
            assert!(
                !shared || end <= b.start || l.granted_at >= b.end,
                "lease {} on {:?} [{}, {end}) overlaps booking {} [{}, {})",
                l.id,
                l.hosts,
                l.granted_at,
                b.id,
                b.start,
                b.end
            );
        }
    }
    assert!(
        booked_leases > 10,
        "only {booked_leases} bookings got their lease"
    );
}

/// A hostile holder: a flood of bookings stops at the per-principal cap,
/// and others can still book.
#[tokio::test(start_paused = true)]
async fn booking_floods_stop_at_the_limits() {
    use super::actor::bookings::MAX_BOOKINGS_PER_PRINCIPAL;
    let core = start_on(Arc::new(MemStore::new()), 2).await;
    for i in 0..MAX_BOOKINGS_PER_PRINCIPAL as u64 {
        core.create_booking(caller("mallory"), book(&["h1"], 3600 * (i + 1), 60))
            .await
            .unwrap();
    }
    let e = core
        .create_booking(caller("mallory"), book(&["h2"], 3600, 60))
        .await
        .unwrap_err();
    assert!(
        matches!(e, CoreError::BookingConflict { .. })
            && e.to_string().contains("the most one principal may have"),
        "{e}"
    );
    core.create_booking(caller("alice"), book(&["h2"], 3600, 60))
        .await
        .unwrap();
    assert_eq!(
        core.list_bookings(None).await.unwrap().len(),
        MAX_BOOKINGS_PER_PRINCIPAL + 1
    );
}

#[tokio::test(start_paused = true)]
async fn bookings_count_against_max_hosts_at_every_moment() {
    let mut config = CoreConfig::new("inv.toml".into());
    config.max_ttl = Duration::from_secs(48 * 3600);
    config.policy = Arc::new(
        crate::projects::Policy::parse(
            r#"
[[project]]
name = "alpha"
members = ["alice", "amy"]
max_hosts = 2

[role.developer]
max_hosts = 1
"#,
            Path::new("policy.toml"),
        )
        .unwrap(),
    );
    let clock = Arc::new(TokioClock::starting_at(T0));
    let core = Core::start(
        config,
        Arc::new(MemStore::new()),
        inventory(6),
        Arc::new(Immediate),
        clock,
    )
    .await
    .unwrap()
    .0;
    let conflict = |e: CoreError, want: &str| {
        assert!(
            matches!(e, CoreError::BookingConflict { .. }) && e.to_string().contains(want),
            "{e}"
        )
    };
    // alice books her project's 2 hosts for [1h, 2h).
    core.create_booking(caller("alice"), book(&["h1", "h2"], 3600, 3600))
        .await
        .unwrap();
    // Her project mate may not book a third over any part of it, one host
    // at a time or by count; before or after it she may.
    for (start, dur) in [(3600, 60), (0, 3601), (7199, 60), (0, 9000)] {
        let e = core
            .create_booking(caller("amy"), book(&["h3"], start, dur))
            .await
            .unwrap_err();
        conflict(
            e,
            "project alpha may hold 2 hosts (max_hosts) and has 2 booked",
        );
    }
    let mut by_count = book(&[], 5400, 60);
    by_count.count = 1;
    conflict(
        core.create_booking(caller("amy"), by_count)
            .await
            .unwrap_err(),
        "project alpha",
    );
    core.create_booking(caller("amy"), book(&["h3", "h4"], 7200, 3600))
        .await
        .unwrap();
    core.create_booking(caller("amy"), book(&["h3"], 0, 3600))
        .await
        .unwrap();
    // Another project is not held back by alpha's bookings.
    core.create_booking(caller("bob"), book(&["h5", "h6"], 3600, 3600))
        .await
        .unwrap();
    // A developer's role may book 1 host at a moment, whatever its project.
    let dev = |n: &str| Caller {
        principal: Principal::new(n).unwrap(),
        role: Role::Developer,
    };
    core.create_booking(dev("dan"), book(&["h5"], 0, 3600))
        .await
        .unwrap();
    conflict(
        core.create_booking(dev("dan"), book(&["h4"], 1800, 3600))
            .await
            .unwrap_err(),
        "dan may hold 1 hosts (its role's max_hosts) and has 1 booked",
    );
    // A maintenance window is no one's quota.
    core.create_booking(
        operator("olga"),
        BookingRequest {
            kind: BookingKind::Maintenance,
            ..book(&["h1", "h2", "h3", "h4", "h5", "h6"], 20_000, 3600)
        },
    )
    .await
    .unwrap();
    assert_eq!(core.list_bookings(None).await.unwrap().len(), 6);
}
