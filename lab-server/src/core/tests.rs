//! Core tests on paused time: TTL expiry, renewal caps, queue hand-over and
//! commit failures, with an in-memory store and no network.

use super::clock::TokioClock;
use super::reclaim::Immediate;
use super::*;
use crate::lease::LeaseState;
use crate::store::memory::MemStore;
use crate::types::{Role, Timestamp};
use std::collections::BTreeSet;
use std::path::Path;

const INVENTORY: &str = r#"
[[rack]]
name = "r1"
agent = "a1"

[[host]]
name = "h1"
arch = "x86_64"
firmware = "bios"
rack = "r1"
mac = "52:54:00:00:00:01"

[[host]]
name = "h2"
arch = "x86_64"
firmware = "bios"
rack = "r1"
mac = "52:54:00:00:00:02"
"#;

fn caller(name: &str) -> Caller {
    Caller {
        principal: Principal::new(name).unwrap(),
        role: Role::Ci,
    }
}

fn spec(count: u32, ttl_s: u64) -> LeaseSpec {
    LeaseSpec {
        arch: None,
        flags: BTreeSet::new(),
        hosts: BTreeSet::new(),
        count,
        profile: None,
        ttl: Duration::from_secs(ttl_s),
        priority: 0,
        comment: String::new(),
    }
}

/// A request without a request id.
fn ask(spec: LeaseSpec, no_wait: bool) -> AcquireRequest {
    AcquireRequest {
        spec,
        no_wait,
        request_id: None,
    }
}

async fn start(store: Arc<MemStore>) -> Core {
    let inv = Inventory::parse(INVENTORY, Path::new("inv.toml")).unwrap();
    let mut config = CoreConfig::new("inv.toml".into());
    config.max_lifetime = Duration::from_secs(100);
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_000_000)));
    Core::start(config, store, inv, Arc::new(Immediate), clock)
        .await
        .unwrap()
        .0
}

async fn granted(core: &Core, who: &str, s: LeaseSpec) -> Lease {
    let mut acq = core.acquire(caller(who), ask(s, false)).await.unwrap();
    loop {
        match acq.next().await.expect("a final state") {
            WaitState::Granted(l) => return l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    }
}

async fn host_state(core: &Core, h: &str) -> crate::lease::HostState {
    core.get_host(HostName::new(h).unwrap())
        .await
        .unwrap()
        .record
        .state
}

/// Let the actor and the reclaim tasks run (time is paused, so this takes
/// no real time beyond the work itself).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_without_renewal_expires_exactly_at_its_ttl() {
    let core = start(Arc::new(MemStore::new())).await;
    let lease = granted(&core, "ci", spec(1, 30)).await;
    assert_eq!(
        lease.expires_at,
        lease.granted_at.saturating_add(Duration::from_secs(30))
    );
    tokio::time::advance(Duration::from_secs(29)).await;
    settle().await;
    assert!(
        core.get_lease(lease.id).await.unwrap().is_active(),
        "still active 1 s before expiry"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    let l = core.get_lease(lease.id).await.unwrap();
    assert_eq!(l.state, LeaseState::Expired);
    assert_eq!(l.ended_at, Some(lease.expires_at));
    assert_eq!(
        host_state(&core, lease.hosts[0].as_str()).await,
        crate::lease::HostState::Available
    );
    let err = core.renew(caller("ci"), lease.id, None).await.unwrap_err();
    assert!(matches!(err, CoreError::Transition(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn renewals_keep_a_lease_alive_up_to_the_hard_cap() {
    let core = start(Arc::new(MemStore::new())).await;
    let lease = granted(&core, "ci", spec(1, 30)).await;
    // Renew every 20 s: alive until the 100 s cap, then expired.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(20)).await;
        let l = core.renew(caller("ci"), lease.id, None).await.unwrap();
        assert!(l.expires_at <= lease.max_expires_at);
    }
    tokio::time::advance(Duration::from_secs(19)).await;
    settle().await;
    assert!(core.get_lease(lease.id).await.unwrap().is_active());
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    let l = core.get_lease(lease.id).await.unwrap();
    assert_eq!(l.state, LeaseState::Expired);
    assert_eq!(l.ended_at, Some(lease.max_expires_at));
}

#[tokio::test(start_paused = true)]
async fn an_expiry_hands_the_host_to_the_next_waiter_with_queue_updates() {
    let core = start(Arc::new(MemStore::new())).await;
    let first = granted(&core, "a", spec(2, 60)).await;
    let mut acq = core
        .acquire(caller("b"), ask(spec(1, 60), false))
        .await
        .unwrap();
    match acq.next().await.unwrap() {
        WaitState::Queued {
            position,
            queue_length,
            eta,
            ..
        } => {
            assert_eq!((position, queue_length), (1, 1));
            assert_eq!(eta, Some(first.expires_at), "ETA is the holder's expiry");
        }
        s => panic!("expected queued, got {s:?}"),
    }
    tokio::time::advance(Duration::from_secs(61)).await;
    match acq.next().await.unwrap() {
        WaitState::Granted(l) => assert_eq!(l.holder.as_str(), "b"),
        s => panic!("expected grant, got {s:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn only_the_holder_or_an_operator_may_release() {
    let core = start(Arc::new(MemStore::new())).await;
    let lease = granted(&core, "alice", spec(1, 60)).await;
    let err = core.release(caller("bob"), lease.id).await.unwrap_err();
    assert!(matches!(err, CoreError::PermissionDenied { .. }), "{err}");
    let op = Caller {
        principal: Principal::new("root").unwrap(),
        role: Role::Operator,
    };
    assert_eq!(
        core.release(op, lease.id).await.unwrap().state,
        LeaseState::Released
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_commit_answers_unavailable_and_loses_nothing_acknowledged() {
    let store = Arc::new(MemStore::new());
    let core = start(store.clone()).await;
    let kept = granted(&core, "ci", spec(1, 60)).await;
    store.fail_commits(true);
    let err = core.renew(caller("ci"), kept.id, None).await.unwrap_err();
    assert!(matches!(err, CoreError::Store(_)), "{err}");
    let mut acq = core
        .acquire(caller("ci"), ask(spec(1, 60), false))
        .await
        .unwrap();
    assert!(matches!(
        acq.next().await.unwrap(),
        WaitState::Failed(CoreError::Store(_))
    ));
    store.fail_commits(false);
    // State was reloaded from the store: the acknowledged lease is as acknowledged.
    let l = core.get_lease(kept.id).await.unwrap();
    assert_eq!(l, kept);
    let other = granted(&core, "ci", spec(1, 60)).await;
    assert_ne!(other.hosts, kept.hosts);
}

#[tokio::test(start_paused = true)]
async fn leases_survive_a_restart_and_their_ttl_keeps_running() {
    let store = Arc::new(MemStore::new());
    let core = start(store.clone()).await;
    let lease = granted(&core, "ci", spec(1, 30)).await;
    drop(core);
    // A new core on the same store, 10 s later (the clock starts again at 1 000 000 ms,
    // so move it on): the lease is there with its expiry.
    tokio::time::advance(Duration::from_secs(10)).await;
    let inv = Inventory::parse(INVENTORY, Path::new("inv.toml")).unwrap();
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_010_000)));
    let (core, _) = Core::start(
        CoreConfig::new("inv.toml".into()),
        store,
        inv,
        Arc::new(Immediate),
        clock,
    )
    .await
    .unwrap();
    assert_eq!(core.get_lease(lease.id).await.unwrap(), lease);
    tokio::time::advance(Duration::from_secs(21)).await;
    settle().await;
    assert_eq!(
        core.get_lease(lease.id).await.unwrap().state,
        LeaseState::Expired
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_no_wait_request_does_not_hold_back_the_waiters_behind_it() {
    let core = start(Arc::new(MemStore::new())).await;
    let h2 = granted(
        &core,
        "x",
        LeaseSpec {
            hosts: [HostName::new("h2").unwrap()].into(),
            ..spec(1, 60)
        },
    )
    .await;
    // Both requests reach the actor in one batch: the pair (no_wait) cannot be
    // met; the single one behind it gets the free host at once.
    let mut pair = core
        .acquire(caller("a"), ask(spec(2, 60), true))
        .await
        .unwrap();
    let mut single = core
        .acquire(caller("b"), ask(spec(1, 60), false))
        .await
        .unwrap();
    assert!(matches!(
        pair.next().await.unwrap(),
        WaitState::Failed(CoreError::Busy)
    ));
    match single.next().await.unwrap() {
        WaitState::Granted(l) => {
            assert_eq!(l.hosts[0].as_str(), "h1");
            assert_eq!(
                l.granted_at, h2.granted_at,
                "granted at once, not when another lease ends"
            );
        }
        s => panic!("expected a grant, got {s:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_hard_cap_applies_from_the_grant() {
    let core = start(Arc::new(MemStore::new())).await;
    let l = granted(&core, "ci", spec(1, 200)).await;
    assert_eq!(l.expires_at, l.max_expires_at);
    assert_eq!(
        l.max_expires_at,
        l.granted_at.saturating_add(Duration::from_secs(100))
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_commit_fails_the_waiters_and_logs_their_withdrawal() {
    let store = Arc::new(MemStore::new());
    let core = start(store.clone()).await;
    let both = granted(&core, "x", spec(2, 60)).await;
    let mut waiting = core
        .acquire(caller("w"), ask(spec(1, 60), false))
        .await
        .unwrap();
    let WaitState::Queued { waiter, .. } = waiting.next().await.unwrap() else {
        panic!("not queued")
    };
    store.fail_commits(true);
    let err = core.renew(caller("x"), both.id, None).await.unwrap_err();
    assert!(matches!(err, CoreError::Store(_)));
    assert!(matches!(
        waiting.next().await.unwrap(),
        WaitState::Failed(CoreError::Store(_))
    ));
    store.fail_commits(false);
    // The next batch records the withdrawal of the request whose event was committed.
    let _ = core.list_hosts().await.unwrap();
    let events = core
        .list_events(EventQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .events;
    let kinds: Vec<_> = events
        .iter()
        .filter(|e| e.waiter == Some(waiter))
        .map(|e| e.kind)
        .collect();
    use crate::events::EventKind;
    assert_eq!(
        kinds,
        vec![EventKind::LeaseRequested, EventKind::RequestWithdrawn]
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_makes_a_request_impossible_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inv.toml");
    std::fs::write(&path, INVENTORY).unwrap();
    let inv = Inventory::load(&path).unwrap();
    let (core, _) = Core::start(
        CoreConfig::new(path.clone()),
        Arc::new(MemStore::new()),
        inv,
        Arc::new(Immediate),
        Arc::new(TokioClock::new()),
    )
    .await
    .unwrap();
    let _one = granted(&core, "x", spec(1, 60)).await;
    let mut pair = core
        .acquire(caller("a"), ask(spec(2, 60), false))
        .await
        .unwrap();
    assert!(matches!(
        pair.next().await.unwrap(),
        WaitState::Queued { .. }
    ));
    // Drop h2 from the inventory: two hosts can never be had again.
    let one_host = &INVENTORY[..INVENTORY.rfind("[[host]]").unwrap()];
    std::fs::write(&path, one_host).unwrap();
    let op = Caller {
        principal: Principal::new("op").unwrap(),
        role: Role::Operator,
    };
    core.reload_inventory(&op).await.unwrap();
    assert!(matches!(
        pair.next().await.unwrap(),
        WaitState::Failed(CoreError::Unsatisfiable { .. })
    ));
}
