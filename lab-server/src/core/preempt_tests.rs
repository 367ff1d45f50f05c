//! Preemptible leases through the core, on paused time: a lease asked for
//! with `preemptible` gives way, after a notice and the grace period, to a
//! request that is not; and never otherwise.

use super::clock::TokioClock;
use super::reclaim::Immediate;
use super::tests::{ask, caller, granted, settle, spec};
use super::*;
use crate::lease::LeaseState;
use crate::store::memory::MemStore;
use crate::types::Timestamp;
use std::path::Path;

const GRACE: Duration = Duration::from_secs(60);

async fn start(hosts: usize) -> Core {
    let mut text = String::from("[[rack]]\nname = \"r1\"\nagent = \"a1\"\n");
    for i in 1..=hosts {
        text.push_str(&format!(
            "\n[[host]]\nname = \"h{i}\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:{i:02x}\"\n"
        ));
    }
    let mut config = CoreConfig::new("inv.toml".into());
    config.preempt_grace = GRACE;
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_000_000)));
    Core::start(
        config,
        Arc::new(MemStore::new()),
        Inventory::parse(&text, Path::new("inv.toml")).unwrap(),
        Arc::new(Immediate),
        clock,
    )
    .await
    .unwrap()
    .0
}

fn preemptible(s: LeaseSpec) -> AcquireRequest {
    AcquireRequest {
        preemptible: true,
        ..ask(s, false)
    }
}

async fn grant(core: &Core, who: &str, req: AcquireRequest) -> Lease {
    let mut acq = core.acquire(caller(who), req).await.unwrap();
    loop {
        match acq.next().await.expect("a final state") {
            WaitState::Granted(l) => return l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    }
}

async fn kinds(core: &Core) -> Vec<(String, Option<LeaseId>)> {
    core.list_events(EventQuery {
        limit: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .events
    .into_iter()
    .map(|e| (e.kind.name().to_owned(), e.lease))
    .collect()
}

#[tokio::test(start_paused = true)]
async fn a_preemptible_lease_gives_way_after_its_grace_period() {
    let core = start(2).await;
    let older = grant(&core, "spot", preemptible(spec(1, 3600))).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let newer = grant(&core, "spot", preemptible(spec(1, 3600))).await;
    assert!(older.preemptible && newer.preemptible);
    // A request that is not preemptible: the most recent preemptible lease
    // (it loses the least work) is noticed, and only that one.
    let mut ci = core
        .acquire(caller("ci"), ask(spec(1, 600), false))
        .await
        .unwrap();
    settle().await;
    let noticed = core.get_lease(newer.id).await.unwrap();
    let at = noticed.preempted_at.expect("noticed");
    assert_eq!(noticed.expires_at, at.saturating_add(GRACE));
    assert!(
        core.get_lease(older.id)
            .await
            .unwrap()
            .preempted_at
            .is_none()
    );
    assert!(
        kinds(&core)
            .await
            .contains(&("LEASE_PREEMPTED".into(), Some(newer.id))),
        "{:?}",
        kinds(&core).await
    );
    // It cannot be renewed past its end.
    let e = core
        .renew(caller("spot"), newer.id, Some(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is being preempted"), "{e}");
    // Not before the grace period is over...
    tokio::time::advance(GRACE - Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(
        core.get_lease(newer.id).await.unwrap().state,
        LeaseState::Active
    );
    // ...then it ends, and the waiting request gets its host.
    let l = loop {
        match ci.next().await.unwrap() {
            WaitState::Granted(l) => break l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(l.hosts, newer.hosts);
    assert_eq!(
        core.get_lease(newer.id).await.unwrap().state,
        LeaseState::Expired
    );
    assert_eq!(
        core.get_lease(older.id).await.unwrap().state,
        LeaseState::Active
    );
}

#[tokio::test(start_paused = true)]
async fn preemption_happens_only_when_it_serves_a_request_that_is_not_preemptible() {
    let core = start(3).await;
    let spot = grant(&core, "spot", preemptible(spec(1, 600))).await;
    // A free host serves the next request: nothing is preempted.
    let normal = granted(&core, "ci", spec(1, 600)).await;
    // Another preemptible request waits after any other; none preempts.
    let _spot2 = grant(&core, "spot", preemptible(spec(1, 600))).await;
    let mut later_spot = core
        .acquire(caller("spot"), preemptible(spec(1, 600)))
        .await
        .unwrap();
    settle().await;
    // A request that preemption cannot serve (3 hosts, one held by a lease
    // that is not preemptible) preempts nothing.
    let mut big = core
        .acquire(caller("ci"), ask(spec(3, 600), false))
        .await
        .unwrap();
    settle().await;
    tokio::time::advance(Duration::from_secs(300)).await;
    settle().await;
    assert!(
        !kinds(&core)
            .await
            .iter()
            .any(|(k, _)| k == "LEASE_PREEMPTED"),
        "{:?}",
        kinds(&core).await
    );
    assert!(
        core.get_lease(spot.id)
            .await
            .unwrap()
            .preempted_at
            .is_none()
    );
    // When the normal lease ends, the pair of the big request could be
    // served by preempting both preemptible leases: they are noticed.
    core.release(caller("ci"), normal.id).await.unwrap();
    settle().await;
    let noticed = kinds(&core)
        .await
        .into_iter()
        .filter(|(k, _)| k == "LEASE_PREEMPTED")
        .count();
    assert_eq!(noticed, 2);
    // The waiting preemptible request is not granted the freed host: the
    // big request reserves it.
    tokio::time::advance(GRACE).await;
    let l = loop {
        match big.next().await.unwrap() {
            WaitState::Granted(l) => break l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(l.hosts.len(), 3);
    assert!(matches!(
        later_spot.next().await.unwrap(),
        WaitState::Queued { .. }
    ));
    // Without a waiting request, a preemptible lease runs its TTL out.
    let core = start(1).await;
    let spot = grant(&core, "spot", preemptible(spec(1, 600))).await;
    tokio::time::advance(Duration::from_secs(599)).await;
    settle().await;
    let l = core.get_lease(spot.id).await.unwrap();
    assert_eq!((l.state, l.preempted_at), (LeaseState::Active, None));
}
