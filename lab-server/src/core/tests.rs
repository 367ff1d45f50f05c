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

pub(super) fn caller(name: &str) -> Caller {
    Caller {
        principal: Principal::new(name).unwrap(),
        role: Role::Ci,
    }
}

pub(super) fn spec(count: u32, ttl_s: u64) -> LeaseSpec {
    LeaseSpec {
        arch: None,
        flags: BTreeSet::new(),
        hosts: BTreeSet::new(),
        count,
        profile: None,
        ttl: Duration::from_secs(ttl_s),
        priority: 0,
        comment: String::new(),
        ssh_public_key: None,
        min_ttl: None,
    }
}

/// A request without a request id.
pub(super) fn ask(spec: LeaseSpec, no_wait: bool) -> AcquireRequest {
    AcquireRequest {
        spec,
        no_wait,
        request_id: None,
        preemptible: false,
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

pub(super) async fn granted(core: &Core, who: &str, s: LeaseSpec) -> Lease {
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
pub(super) async fn settle() {
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

// ------------------------------------------------------------ abuse and restarts

fn operator(name: &str) -> Caller {
    Caller {
        principal: Principal::new(name).unwrap(),
        role: Role::Operator,
    }
}

fn on_host(h: &str, ttl_s: u64) -> LeaseSpec {
    LeaseSpec {
        hosts: [HostName::new(h).unwrap()].into(),
        ..spec(1, ttl_s)
    }
}

/// A request with a request id.
fn with_id(spec: LeaseSpec, id: &str) -> AcquireRequest {
    AcquireRequest {
        spec,
        no_wait: false,
        request_id: Some(RequestId::new(id).unwrap()),
        preemptible: false,
    }
}

/// A core on `store` whose clock starts at `base`, with `config`'s limits;
/// its actor's task handle, so that a test can "crash" it (abort).
async fn start_at(
    store: Arc<MemStore>,
    config: CoreConfig,
    base: i64,
    reclaimer: Arc<dyn Reclaimer>,
) -> (Core, tokio::task::JoinHandle<()>) {
    let inv = Inventory::parse(INVENTORY, Path::new("inv.toml")).unwrap();
    let clock = Arc::new(TokioClock::starting_at(Timestamp(base)));
    Core::start(config, store, inv, reclaimer, clock)
        .await
        .unwrap()
}

fn config() -> CoreConfig {
    CoreConfig::new("inv.toml".into())
}

/// Kill the actor as a crash would: nothing more reaches the store.
async fn crash(actor: tokio::task::JoinHandle<()>) {
    actor.abort();
    let _ = actor.await;
}

async fn queued(acq: &mut Acquisition) -> (WaiterId, u32, u32) {
    match acq.next().await.expect("a state") {
        WaitState::Queued {
            waiter,
            position,
            queue_length,
            ..
        } => (waiter, position, queue_length),
        s => panic!("expected queued, got {s:?}"),
    }
}

async fn grant_of(acq: &mut Acquisition) -> Lease {
    loop {
        match acq.next().await.expect("a state") {
            WaitState::Granted(l) => return l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    }
}

fn kinds_of(store: &MemStore, waiter: WaiterId) -> Vec<(EventKind, String)> {
    store
        .all_events()
        .into_iter()
        .filter(|e| e.waiter == Some(waiter))
        .map(|e| (e.kind, e.detail))
        .collect()
}

use crate::events::EventKind;
use crate::types::RequestId;

#[tokio::test(start_paused = true)]
async fn refused_no_wait_requests_leave_no_trace_in_the_store() {
    let store = Arc::new(MemStore::new());
    let core = start(store.clone()).await;
    let held = granted(&core, "x", spec(2, 60)).await;
    let (seq, commits) = (store.last_event_seq().unwrap(), store.commits());
    for i in 0..1000 {
        let mut acq = core
            .acquire(caller(&format!("p{}", i % 7)), ask(spec(1, 60), true))
            .await
            .unwrap();
        assert!(matches!(
            acq.next().await.unwrap(),
            WaitState::Failed(CoreError::Busy)
        ));
    }
    assert_eq!(store.last_event_seq().unwrap(), seq, "no events");
    assert_eq!(store.commits(), commits, "no commits at all");
    // A no_wait request that is granted is recorded like any other: its
    // LEASE_REQUESTED (with the waiter id the lease names), then the grant.
    core.release(caller("x"), held.id).await.unwrap();
    let mut acq = core
        .acquire(caller("y"), ask(spec(1, 60), true))
        .await
        .unwrap();
    let lease = grant_of(&mut acq).await;
    let kinds: Vec<EventKind> = kinds_of(&store, lease.waiter_id)
        .into_iter()
        .map(|k| k.0)
        .collect();
    assert_eq!(kinds, [EventKind::LeaseRequested, EventKind::LeaseGranted]);
    assert!(
        store.waiters().is_empty(),
        "no_wait requests are never stored"
    );
}

#[tokio::test(start_paused = true)]
async fn ci_and_developers_may_not_jump_the_queue_with_a_huge_priority() {
    let store = Arc::new(MemStore::new());
    let core = start(store.clone()).await;
    let seq = store.last_event_seq().unwrap();
    for role in [Role::Ci, Role::Developer] {
        let who = Caller {
            principal: Principal::new("mallory").unwrap(),
            role,
        };
        let mut acq = core
            .acquire(
                who,
                ask(
                    LeaseSpec {
                        priority: i32::MAX,
                        ..spec(1, 60)
                    },
                    false,
                ),
            )
            .await
            .unwrap();
        match acq.next().await.unwrap() {
            WaitState::Failed(CoreError::PermissionDenied(d)) => assert_eq!(
                d.to_string(),
                format!(
                    "mallory ({role}) may not ask for priority 2147483647: at most 10 for roles ci and developer"
                )
            ),
            s => panic!("{s:?}"),
        }
    }
    assert_eq!(store.last_event_seq().unwrap(), seq, "refused: no event");
    // At the limit, and an operator above it, are fine.
    granted(
        &core,
        "ci",
        LeaseSpec {
            priority: 10,
            ..spec(1, 60)
        },
    )
    .await;
    let mut acq = core
        .acquire(
            operator("root"),
            ask(
                LeaseSpec {
                    priority: i32::MAX,
                    ..spec(1, 60)
                },
                false,
            ),
        )
        .await
        .unwrap();
    grant_of(&mut acq).await;
}

#[tokio::test(start_paused = true)]
async fn one_principal_may_have_only_so_many_waiting_requests() {
    let store = Arc::new(MemStore::new());
    let mut config = config();
    config.max_waiting_per_principal = 3;
    let (core, _actor) = start_at(store, config, 1_000_000, Arc::new(Immediate)).await;
    granted(&core, "x", spec(2, 600)).await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut acq = core
            .acquire(caller("m"), ask(spec(1, 60), false))
            .await
            .unwrap();
        queued(&mut acq).await;
        waiting.push(acq);
    }
    let mut fourth = core
        .acquire(caller("m"), ask(spec(1, 60), false))
        .await
        .unwrap();
    match fourth.next().await.unwrap() {
        WaitState::Failed(e @ CoreError::TooManyWaiting { .. }) => assert_eq!(
            e.to_string(),
            "m already has 3 waiting requests (the most one principal may have); wait for one to be granted or withdraw one"
        ),
        s => panic!("{s:?}"),
    }
    // no_wait requests do not wait, so they are not capped; others are not
    // affected.
    let mut nw = core
        .acquire(caller("m"), ask(spec(1, 60), true))
        .await
        .unwrap();
    assert!(matches!(
        nw.next().await.unwrap(),
        WaitState::Failed(CoreError::Busy)
    ));
    let mut other = core
        .acquire(caller("n"), ask(spec(1, 60), false))
        .await
        .unwrap();
    queued(&mut other).await;
    // One withdrawn: room for one more.
    drop(waiting.pop());
    settle().await;
    let mut again = core
        .acquire(caller("m"), ask(spec(1, 60), false))
        .await
        .unwrap();
    queued(&mut again).await;
}

#[tokio::test(start_paused = true)]
async fn a_waiter_hears_of_each_change_of_its_place_at_most_once_a_second() {
    let core = start(Arc::new(MemStore::new())).await;
    let held = granted(&core, "x", spec(2, 600)).await;
    let mut a = core
        .acquire(operator("op"), ask(spec(1, 600), false))
        .await
        .unwrap();
    assert_eq!(queued(&mut a).await.1, 1);
    let t0 = tokio::time::Instant::now();
    // Within the second after that update, a request of higher priority
    // pushes it back: it must hear of it (once the second is over) with no
    // further change to wake it.
    let b = core
        .acquire(
            caller("b"),
            ask(
                LeaseSpec {
                    priority: 5,
                    ..spec(1, 600)
                },
                false,
            ),
        )
        .await
        .unwrap();
    let (_, pos, len) = tokio::time::timeout(Duration::from_secs(10), queued(&mut a))
        .await
        .expect("the waiter missed its own queue update");
    assert_eq!((pos, len), (2, 2));
    assert!(t0.elapsed() >= QUEUE_UPDATE_INTERVAL, "{:?}", t0.elapsed());
    assert!(
        t0.elapsed() < QUEUE_UPDATE_INTERVAL * 2,
        "{:?}",
        t0.elapsed()
    );
    // Two changes within one second: only the latest is told.
    let t1 = tokio::time::Instant::now();
    let _c = core
        .acquire(
            caller("c"),
            ask(
                LeaseSpec {
                    priority: 7,
                    ..spec(1, 600)
                },
                false,
            ),
        )
        .await
        .unwrap();
    let mut d = core
        .acquire(
            caller("d"),
            ask(
                LeaseSpec {
                    priority: 8,
                    ..spec(1, 600)
                },
                false,
            ),
        )
        .await
        .unwrap();
    let (_, pos, len) = tokio::time::timeout(Duration::from_secs(10), queued(&mut a))
        .await
        .expect("no update");
    assert_eq!((pos, len), (4, 4));
    assert!(t1.elapsed() >= QUEUE_UPDATE_INTERVAL);
    // The grant is never held back by the rate limit: d heard of its
    // place just now, and hears of its grant at once.
    queued(&mut d).await;
    let t2 = tokio::time::Instant::now();
    core.release(caller("x"), held.id).await.unwrap();
    let lease = tokio::time::timeout(Duration::from_secs(10), grant_of(&mut d))
        .await
        .unwrap();
    assert_eq!(lease.holder.as_str(), "d");
    drop(b);
    assert!(t2.elapsed() < QUEUE_UPDATE_INTERVAL, "{:?}", t2.elapsed());
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_survive_a_crash_and_keep_their_places() {
    let store = Arc::new(MemStore::new());
    let (core, actor) = start_at(store.clone(), config(), 1_000_000, Arc::new(Immediate)).await;
    let held = granted(&core, "x", spec(2, 600)).await;
    let mut a = core
        .acquire(caller("a"), with_id(spec(1, 600), "req-a"))
        .await
        .unwrap();
    let mut b = core
        .acquire(caller("b"), with_id(spec(1, 600), "req-b"))
        .await
        .unwrap();
    let mut c = core
        .acquire(caller("c"), ask(spec(1, 600), false))
        .await
        .unwrap();
    let (wa, pa, _) = queued(&mut a).await;
    let (wb, pb, _) = queued(&mut b).await;
    let (wc, pc, len) = queued(&mut c).await;
    assert_eq!((pa, pb, pc, len), (1, 2, 3, 3));
    assert_eq!(
        store.waiters().len(),
        3,
        "stored in the commit that queued them"
    );

    crash(actor).await;
    drop((a, b, c, core));
    tokio::time::advance(Duration::from_secs(5)).await;
    let (core, _actor) = start_at(store.clone(), config(), 1_005_000, Arc::new(Immediate)).await;

    // c had no request id: nobody can resume it, so it is withdrawn at start.
    assert_eq!(
        kinds_of(&store, wc),
        [
            (EventKind::LeaseRequested, String::new()),
            (
                EventKind::RequestWithdrawn,
                "the server restarted and the request has no request id to resume it by".into()
            )
        ]
    );
    // b comes back first, a second: each gets its own place back.
    let mut b = core
        .acquire(caller("b"), with_id(spec(1, 600), "req-b"))
        .await
        .unwrap();
    assert_eq!(queued(&mut b).await, (wb, 2, 2));
    let mut a = core
        .acquire(caller("a"), with_id(spec(1, 600), "req-a"))
        .await
        .unwrap();
    assert_eq!(queued(&mut a).await, (wa, 1, 2));
    core.release(caller("x"), held.id).await.unwrap();
    let la = grant_of(&mut a).await;
    let lb = grant_of(&mut b).await;
    assert_eq!((la.waiter_id, lb.waiter_id), (wa, wb));
    // One request, one LEASE_REQUESTED, one grant each.
    for w in [wa, wb] {
        let kinds: Vec<EventKind> = kinds_of(&store, w).into_iter().map(|k| k.0).collect();
        assert_eq!(kinds, [EventKind::LeaseRequested, EventKind::LeaseGranted]);
    }
    assert!(store.waiters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_request_granted_before_a_crash_gets_its_lease_when_asked_again() {
    let store = Arc::new(MemStore::new());
    let (core, actor) = start_at(store.clone(), config(), 1_000_000, Arc::new(Immediate)).await;
    let held = granted(&core, "x", spec(2, 600)).await;
    let mut a = core
        .acquire(caller("a"), with_id(spec(1, 600), "req-a"))
        .await
        .unwrap();
    queued(&mut a).await;
    core.release(caller("x"), held.id).await.unwrap();
    // The grant is committed; say the client never read it.
    let lease = grant_of(&mut a).await;
    // Asked again before the crash: the same lease.
    let mut again = core
        .acquire(caller("a"), with_id(spec(1, 600), "req-a"))
        .await
        .unwrap();
    assert_eq!(grant_of(&mut again).await, lease);
    crash(actor).await;
    drop((a, again, core));
    let (core, _actor) = start_at(store.clone(), config(), 1_002_000, Arc::new(Immediate)).await;
    let mut again = core
        .acquire(caller("a"), with_id(spec(1, 600), "req-a"))
        .await
        .unwrap();
    assert_eq!(
        grant_of(&mut again).await,
        lease,
        "the lease granted before the crash"
    );
    // The id belongs to a's requests only: b's request of the same id is its own.
    let mut b = core
        .acquire(caller("b"), with_id(spec(1, 600), "req-a"))
        .await
        .unwrap();
    let lb = grant_of(&mut b).await;
    assert_ne!(lb.id, lease.id);
    let grants = store
        .all_events()
        .iter()
        .filter(|e| e.kind == EventKind::LeaseGranted && e.waiter == Some(lease.waiter_id))
        .count();
    assert_eq!(grants, 1, "granted once");
}

/// Reclaims host `h2` never finish (its agent is away); others at once.
struct StuckOn(&'static str);

impl Reclaimer for StuckOn {
    fn reclaim<'a>(&'a self, job: &'a reclaim::ReclaimJob) -> reclaim::ReclaimFuture<'a> {
        let stuck = job.host.name.as_str() == self.0;
        Box::pin(async move {
            if stuck {
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_comes_back_is_withdrawn_after_the_grace_period() {
    let store = Arc::new(MemStore::new());
    let (core, actor) = start_at(store.clone(), config(), 1_000_000, Arc::new(Immediate)).await;
    let h1 = granted(&core, "x", on_host("h1", 600)).await;
    let _h2 = granted(&core, "y", on_host("h2", 600)).await;
    let mut a = core
        .acquire(caller("a"), with_id(spec(1, 600), "req-a"))
        .await
        .unwrap();
    let mut b = core
        .acquire(caller("b"), with_id(spec(1, 600), "req-b"))
        .await
        .unwrap();
    let (wa, _, _) = queued(&mut a).await;
    queued(&mut b).await;
    crash(actor).await;
    drop((a, b, core));
    let (core, _actor) = start_at(store.clone(), config(), 1_001_000, Arc::new(Immediate)).await;
    // Only b comes back. h1 frees: it is held for a (first in line, its
    // client may still come back), so b waits.
    let mut b = core
        .acquire(caller("b"), with_id(spec(1, 600), "req-b"))
        .await
        .unwrap();
    assert_eq!(queued(&mut b).await.1, 2);
    core.release(caller("x"), h1.id).await.unwrap();
    tokio::time::advance(Duration::from_secs(55)).await;
    settle().await;
    assert!(
        tokio::time::timeout(Duration::from_secs(3), grant_of(&mut b))
            .await
            .is_err(),
        "granted while a detached waiter ahead still had its grace period"
    );
    // 60 s after the restart a is withdrawn and b gets h1.
    let lease = tokio::time::timeout(Duration::from_secs(5), grant_of(&mut b))
        .await
        .expect("b granted after the grace period");
    assert_eq!(lease.hosts[0].as_str(), "h1");
    assert_eq!(
        kinds_of(&store, wa).last().unwrap(),
        &(
            EventKind::RequestWithdrawn,
            "its client did not come back within 1m after the server lost its stream".into()
        )
    );
    // Too late now: a's client asking again queues a new request.
    let mut a = core
        .acquire(caller("a"), with_id(spec(1, 600), "req-a"))
        .await
        .unwrap();
    assert_ne!(queued(&mut a).await.0, wa);
}

#[tokio::test(start_paused = true)]
async fn a_second_stream_with_the_same_request_id_takes_the_request_over() {
    let store = Arc::new(MemStore::new());
    let core = start(store.clone()).await;
    let held = granted(&core, "x", spec(2, 60)).await;
    let mut first = core
        .acquire(caller("a"), with_id(spec(1, 60), "r1"))
        .await
        .unwrap();
    let (w, _, _) = queued(&mut first).await;
    let mut second = core
        .acquire(caller("a"), with_id(spec(1, 60), "r1"))
        .await
        .unwrap();
    assert_eq!(queued(&mut second).await, (w, 1, 1));
    match first.next().await.unwrap() {
        WaitState::Failed(e @ CoreError::Superseded { .. }) => assert_eq!(
            e.to_string(),
            "another Acquire with request id r1 took this request over"
        ),
        s => panic!("{s:?}"),
    }
    // The old stream going away does not withdraw the request.
    drop(first);
    settle().await;
    core.release(caller("x"), held.id).await.unwrap();
    assert_eq!(grant_of(&mut second).await.waiter_id, w);
}

#[tokio::test(start_paused = true)]
async fn after_a_failed_commit_a_client_resumes_its_request_by_id() {
    let store = Arc::new(MemStore::new());
    let core = start(store.clone()).await;
    let held = granted(&core, "x", spec(2, 60)).await;
    let mut a = core
        .acquire(caller("a"), with_id(spec(1, 60), "r-a"))
        .await
        .unwrap();
    let (w, _, _) = queued(&mut a).await;
    store.fail_commits(true);
    assert!(core.renew(caller("x"), held.id, None).await.is_err());
    assert!(matches!(
        a.next().await.unwrap(),
        WaitState::Failed(CoreError::Store(_))
    ));
    store.fail_commits(false);
    let mut a = core
        .acquire(caller("a"), with_id(spec(1, 60), "r-a"))
        .await
        .unwrap();
    assert_eq!(queued(&mut a).await, (w, 1, 1));
    core.release(caller("x"), held.id).await.unwrap();
    assert_eq!(grant_of(&mut a).await.waiter_id, w);
}

#[tokio::test(start_paused = true)]
async fn retention_removes_old_ended_leases_and_events_in_bounded_steps() {
    let store = Arc::new(MemStore::new());
    let mut config = config();
    config.retention = Duration::from_secs(600);
    config.retention_batch = 3;
    let (core, _actor) = start_at(store.clone(), config, 1_000_000, Arc::new(StuckOn("h2"))).await;
    let mut old = Vec::new();
    for _ in 0..10 {
        let l = granted(&core, "ci", on_host("h1", 60)).await;
        old.push(core.release(caller("ci"), l.id).await.unwrap());
    }
    // Ended, but h2 is still being reclaimed from it: kept.
    let stuck = granted(&core, "ci", on_host("h2", 60)).await;
    core.release(caller("ci"), stuck.id).await.unwrap();
    let active = granted(
        &core,
        "ci",
        LeaseSpec {
            ttl: Duration::from_secs(3600),
            ..on_host("h1", 60)
        },
    )
    .await;
    let before = store.all_events().len();
    tokio::time::advance(Duration::from_secs(599)).await;
    settle().await;
    assert_eq!(
        store.all_events().len(),
        before,
        "nothing is old enough yet"
    );
    // Ten minutes after the releases: steps of at most 3 leases and 3
    // events until none is older.
    for _ in 0..200 {
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
    }
    let page = core
        .list_leases(LeaseQuery {
            include_ended: true,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    // (Granted in the same millisecond: listed in id order.)
    let mut ids: Vec<LeaseId> = page.leases.iter().map(|l| l.id).collect();
    ids.sort();
    let mut want = [stuck.id, active.id];
    want.sort();
    assert_eq!(ids, want, "old ended leases gone");
    assert!(matches!(
        core.get_lease(old[0].id).await,
        Err(CoreError::NotFound { .. })
    ));
    let cutoff = core.clock().now().saturating_sub(Duration::from_secs(600));
    let events = store.all_events();
    assert!(events.len() < before);
    assert!(
        events.iter().all(|e| e.time >= cutoff) || events.len() == 1,
        "events older than the retention period remain: {:?}",
        events.first()
    );
    assert!(store.largest_prune() <= 3, "{}", store.largest_prune());
    assert!(store.largest_commit() <= 10, "{}", store.largest_commit());
    // The last event is kept, so sequence numbers go on after a restart.
    let last = store.last_event_seq().unwrap();
    assert_eq!(store.load().unwrap().last_event_seq, last);
    assert!(events.iter().any(|e| e.seq == last));
}

#[tokio::test(start_paused = true)]
async fn leases_are_listed_by_page() {
    let core = start(Arc::new(MemStore::new())).await;
    let mut all = Vec::new();
    for i in 0..7 {
        let who = if i % 2 == 0 { "even" } else { "odd" };
        let l = granted(&core, who, on_host("h1", 60)).await;
        all.push(core.release(caller(who), l.id).await.unwrap().id);
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    all.push(granted(&core, "odd", on_host("h2", 60)).await.id);
    let pages = |include_ended, holder: Option<&str>, limit| {
        let core = core.clone();
        let holder = holder.map(|h| Principal::new(h).unwrap());
        async move {
            let mut out: Vec<Vec<LeaseId>> = Vec::new();
            let mut after = None;
            loop {
                let page = core
                    .list_leases(LeaseQuery {
                        include_ended,
                        holder: holder.clone(),
                        after,
                        limit,
                    })
                    .await
                    .unwrap();
                out.push(page.leases.iter().map(|l| l.id).collect());
                match page.next {
                    Some(n) => after = Some(n),
                    None => return out,
                }
            }
        }
    };
    assert_eq!(
        pages(true, None, 3).await,
        [all[0..3].to_vec(), all[3..6].to_vec(), all[6..8].to_vec()]
    );
    assert_eq!(pages(false, None, 3).await, [vec![all[7]]]);
    assert_eq!(
        pages(true, Some("even"), 10).await,
        [vec![all[0], all[2], all[4], all[6]]]
    );
}

fn attribution(class: crate::health::FailureClass) -> crate::health::HostVerdict {
    crate::health::HostVerdict::Failed(crate::health::Attribution {
        class,
        rule: "no bootable device".into(),
        line: "No bootable device.".into(),
    })
}

async fn health(core: &Core, h: &str) -> crate::lease::machine::Health {
    core.get_host(HostName::new(h).unwrap())
        .await
        .unwrap()
        .record
        .health
}

/// The facts line of h1 as the inventory describes it (no expectations:
/// arch and MAC only).
const H1_FACTS: &str = "LAB-HEALTH-OK arch=x86_64 cpus=2 mem_kb=1012345 macs=52:54:00:00:00:01";

fn ready(line: &str) -> crate::health::HostVerdict {
    crate::health::HostVerdict::Ready {
        ready_line: line.into(),
    }
}

/// The active health-check lease on `h`, if any.
async fn check_lease(core: &Core, h: &str) -> Option<Lease> {
    core.get_host(HostName::new(h).unwrap())
        .await
        .unwrap()
        .lease
        .filter(|l| l.is_active() && l.holder == Principal::health())
}

fn kinds(store: &MemStore, wanted: &[EventKind]) -> Vec<String> {
    store
        .all_events()
        .into_iter()
        .filter(|e| wanted.contains(&e.kind))
        .map(|e| format!("{:?} {} {}", e.kind, e.actor, e.detail))
        .collect()
}

const CHECK_EVENTS: &[EventKind] = &[
    EventKind::HealthCheckStarted,
    EventKind::HealthCheckPassed,
    EventKind::HealthCheckFailed,
];

/// Provisioning verdicts: a host failure makes a host suspect and asks for
/// a check (queued behind the lease); a READY clears a suspicion; the
/// configured count within the window quarantines it until an operator
/// releases it (a passing check does not); job and lab failures say
/// nothing about the host; only operators quarantine.
#[tokio::test(start_paused = true)]
async fn host_failures_make_a_host_suspect_then_quarantined_until_released() {
    use crate::health::FailureClass;
    use crate::lease::machine::Health;
    let store = Arc::new(MemStore::default());
    let core = start(store.clone()).await;
    let h1 = HostName::new("h1").unwrap();
    let l = granted(&core, "ci", on_host("h1", 60)).await;

    // The job's fault and the lab's: nothing about the host.
    for class in [
        FailureClass::Job,
        FailureClass::Infra,
        FailureClass::Unknown,
    ] {
        core.host_verdict(h1.clone(), l.id, attribution(class))
            .await;
    }
    settle().await;
    assert_eq!(health(&core, "h1").await, Health::Healthy);
    assert!(core.list_queue().await.unwrap().is_empty(), "no check");

    // One host failure: suspect, still granted, and a check waits for h1.
    core.host_verdict(h1.clone(), l.id, attribution(FailureClass::Host))
        .await;
    settle().await;
    match health(&core, "h1").await {
        Health::Suspect { reason, .. } => assert_eq!(
            reason,
            format!("no bootable device in lease {}: No bootable device.", l.id)
        ),
        other => panic!("{other:?}"),
    }
    let queue = core.list_queue().await.unwrap();
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0].principal, Principal::health());
    assert_eq!(
        queue[0].spec.comment,
        format!(
            "health check: after a host failure in lease {}: no bootable device",
            l.id
        )
    );
    // A later READY clears the suspicion.
    core.host_verdict(h1.clone(), l.id, ready("")).await;
    settle().await;
    assert_eq!(health(&core, "h1").await, Health::Healthy);

    // The lease ends: the check takes h1, and passes.
    core.release(caller("ci"), l.id).await.unwrap();
    settle().await;
    let check = check_lease(&core, "h1").await.expect("the check holds h1");
    core.host_verdict(h1.clone(), check.id, ready(H1_FACTS))
        .await;
    settle().await;
    assert_eq!(
        host_state(&core, "h1").await,
        crate::lease::HostState::Available
    );

    // Two host failures within the hour: quarantined by the server, and a
    // passing check does not release that.
    let l = granted(&core, "ci", on_host("h1", 60)).await;
    core.host_verdict(h1.clone(), l.id, attribution(FailureClass::Host))
        .await;
    core.host_verdict(h1.clone(), l.id, attribution(FailureClass::Host))
        .await;
    settle().await;
    match health(&core, "h1").await {
        Health::Quarantined {
            reason,
            by,
            until_released,
            ..
        } => {
            assert_eq!(by, Principal::server());
            assert!(until_released);
            assert!(
                reason.starts_with("2 host failures within 1h; the last: no bootable device"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        core.list_queue().await.unwrap().len(),
        1,
        "one check, joined"
    );
    core.release(caller("ci"), l.id).await.unwrap();
    settle().await;
    let check = check_lease(&core, "h1")
        .await
        .expect("checked while quarantined");
    core.host_verdict(h1.clone(), check.id, ready(H1_FACTS))
        .await;
    settle().await;
    assert!(health(&core, "h1").await.is_quarantined());

    // Never granted while quarantined; h2 is.
    let e = core
        .acquire(caller("ci"), ask(on_host("h1", 60), true))
        .await
        .unwrap()
        .next()
        .await;
    assert!(
        matches!(e, Some(WaitState::Failed(CoreError::Busy))),
        "{e:?}"
    );
    let other = granted(&core, "ci", spec(1, 60)).await;
    assert_eq!(other.hosts, vec![HostName::new("h2").unwrap()]);

    // Only operators quarantine or release; a quarantine needs a reason.
    let e = core
        .set_quarantine(caller("ci"), h1.clone(), false, String::new())
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::PermissionDenied(_)), "{e}");
    let e = core
        .set_quarantine(operator("root"), h1.clone(), true, " ".into())
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::InvalidArgument { .. }), "{e}");

    // The health is durable: a restart keeps the quarantine.
    drop(core);
    let core = start(store.clone()).await;
    assert!(health(&core, "h1").await.is_quarantined());

    // An operator releases it: healthy, granted again.
    let v = core
        .set_quarantine(operator("root"), h1.clone(), false, "disk replaced".into())
        .await
        .unwrap();
    assert_eq!(v.record.health, Health::Healthy);
    let again = granted(&core, "ci", on_host("h1", 60)).await;
    assert_eq!(again.hosts, vec![h1.clone()]);

    // Every change is a HOST_HEALTH event.
    let details: Vec<String> = store
        .all_events()
        .into_iter()
        .filter(|e| e.kind == EventKind::HostHealth)
        .map(|e| format!("{} {}", e.actor, e.detail.split(':').next().unwrap()))
        .collect();
    assert_eq!(
        details,
        [
            "server suspect",
            "server healthy (was suspect)",
            "server suspect",
            "server quarantined",
            "root healthy (was quarantined)",
        ]
    );
}

/// `lab host check`: operators only, a known host not in maintenance; the
/// check is a lease of `lab-health` with profile `health-check`, granted
/// ahead of a waiter that came first; a second check joins it; a pass is
/// recorded and the lease released.
#[tokio::test(start_paused = true)]
async fn a_check_goes_ahead_of_waiters_and_passes() {
    let store = Arc::new(MemStore::default());
    let core = start(store.clone()).await;
    let h1 = HostName::new("h1").unwrap();
    let a = granted(&core, "a", on_host("h1", 60)).await;
    let mut b = core
        .acquire(caller("b"), ask(on_host("h1", 60), false))
        .await
        .unwrap();
    settle().await;

    let e = core.check_host(caller("b"), h1.clone()).await.unwrap_err();
    assert!(matches!(e, CoreError::PermissionDenied(_)), "{e}");
    let e = core
        .check_host(operator("root"), HostName::new("h9").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::NotFound { .. }), "{e}");
    core.set_maintenance(operator("root"), h1.clone(), true, "fans".into())
        .await
        .unwrap();
    let e = core
        .check_host(operator("root"), h1.clone())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "host h1 is in maintenance, cannot be checked"
    );
    core.set_maintenance(operator("root"), h1.clone(), false, String::new())
        .await
        .unwrap();

    core.check_host(operator("root"), h1.clone()).await.unwrap();
    core.check_host(operator("root"), h1.clone()).await.unwrap();
    let queue = core.list_queue().await.unwrap();
    assert_eq!(
        queue
            .iter()
            .map(|q| q.principal.to_string())
            .collect::<Vec<_>>(),
        ["lab-health", "b"],
        "one check (the second joined), ahead of b"
    );

    core.release(caller("a"), a.id).await.unwrap();
    settle().await;
    let check = check_lease(&core, "h1").await.expect("the check got h1");
    assert_eq!(
        check.profile.as_ref().map(|p| p.as_str()),
        Some("health-check")
    );
    assert_eq!(check.ttl(), Duration::from_secs(600));
    assert_eq!(check.comment, "health check: asked for by root");

    core.host_verdict(h1.clone(), check.id, ready(H1_FACTS))
        .await;
    // b gets h1 once the check is done.
    let l = loop {
        match b.next().await.expect("a final state") {
            WaitState::Granted(l) => break l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(l.hosts, vec![h1.clone()]);
    assert_eq!(
        core.get_lease(check.id).await.unwrap().state,
        LeaseState::Released
    );
    assert_eq!(
        kinds(&store, CHECK_EVENTS),
        [
            "HealthCheckStarted lab-health asked for by root",
            "HealthCheckPassed lab-health the facts match the inventory",
        ]
    );
}

/// The loop: a failed check quarantines (even an expired one), a later
/// pass on the quarantined host clears it, K failures within the window
/// stick until an operator's release, and an operator's quarantine stays
/// through a pass. Durable: the K-th failure counts those before a restart.
#[tokio::test(start_paused = true)]
async fn the_health_loop_closes_by_itself_except_for_repeat_offenders() {
    use crate::lease::machine::Health;
    let store = Arc::new(MemStore::default());
    let core = start(store.clone()).await;
    let h1 = HostName::new("h1").unwrap();
    let root = || operator("root");
    let mut expect_log: Vec<String> = Vec::new();

    // 1. Wrong facts: quarantined, reason naming the mismatch.
    core.check_host(root(), h1.clone()).await.unwrap();
    settle().await;
    let c = check_lease(&core, "h1").await.unwrap();
    core.host_verdict(
        h1.clone(),
        c.id,
        ready("LAB-HEALTH-OK arch=x86_64 macs=52:54:00:00:00:09"),
    )
    .await;
    settle().await;
    let why = "inventory MAC 52:54:00:00:00:01 not among the NICs seen (52:54:00:00:00:09)";
    match health(&core, "h1").await {
        Health::Quarantined { reason, by, .. } => {
            assert_eq!(reason, format!("health check failed: {why}"));
            assert_eq!(by, Principal::health());
        }
        other => panic!("{other:?}"),
    }
    expect_log.push(format!("HealthCheckFailed lab-health {why}"));

    // 2. A check of the quarantined host passes: healthy again (outside
    // the window, so the count starts over).
    tokio::time::advance(Duration::from_secs(3601)).await;
    core.check_host(root(), h1.clone()).await.unwrap();
    settle().await;
    let c = check_lease(&core, "h1")
        .await
        .expect("granted while quarantined");
    core.host_verdict(h1.clone(), c.id, ready(H1_FACTS)).await;
    settle().await;
    assert_eq!(health(&core, "h1").await, Health::Healthy);
    expect_log.push("HealthCheckPassed lab-health the facts match the inventory".into());

    // 3. No READY in time: a failure.
    core.check_host(root(), h1.clone()).await.unwrap();
    settle().await;
    assert!(check_lease(&core, "h1").await.is_some());
    tokio::time::advance(Duration::from_secs(601)).await;
    settle().await;
    assert!(check_lease(&core, "h1").await.is_none());
    assert!(health(&core, "h1").await.is_quarantined());
    expect_log.push("HealthCheckFailed lab-health no READY within 10m".into());

    // A restart in between: the failures are on the host record.
    drop(core);
    let core = start(store.clone()).await;

    // 4. A failed boot within the window: the second failure sticks.
    core.check_host(root(), h1.clone()).await.unwrap();
    settle().await;
    let c = check_lease(&core, "h1").await.unwrap();
    core.host_verdict(
        h1.clone(),
        c.id,
        attribution(crate::health::FailureClass::Host),
    )
    .await;
    settle().await;
    expect_log.push("HealthCheckFailed lab-health the boot failed (host: no bootable device): No bootable device.".into());
    let sticky = health(&core, "h1").await;
    match &sticky {
        Health::Quarantined {
            reason,
            until_released,
            ..
        } => {
            assert!(until_released);
            assert!(
                reason.starts_with("2 failed health checks within 1h; stays quarantined until `lab host release-quarantine`; the last: the boot failed"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // ... through a pass.
    core.check_host(root(), h1.clone()).await.unwrap();
    settle().await;
    let c = check_lease(&core, "h1").await.unwrap();
    core.host_verdict(h1.clone(), c.id, ready(H1_FACTS)).await;
    settle().await;
    assert_eq!(health(&core, "h1").await, sticky);
    expect_log.push("HealthCheckPassed lab-health the facts match the inventory".into());

    // 5. The operator releases it; then quarantines it: a pass keeps that.
    core.set_quarantine(root(), h1.clone(), false, String::new())
        .await
        .unwrap();
    let v = core
        .set_quarantine(root(), h1.clone(), true, "fan noise".into())
        .await
        .unwrap();
    assert!(v.record.check_failures.is_empty(), "a release forgives");
    core.check_host(root(), h1.clone()).await.unwrap();
    settle().await;
    let c = check_lease(&core, "h1").await.unwrap();
    core.host_verdict(h1.clone(), c.id, ready(H1_FACTS)).await;
    settle().await;
    match health(&core, "h1").await {
        Health::Quarantined { reason, by, .. } => {
            assert_eq!(
                (reason.as_str(), by),
                ("fan noise", Principal::new("root").unwrap())
            );
        }
        other => panic!("{other:?}"),
    }
    expect_log.push("HealthCheckPassed lab-health the facts match the inventory".into());
    let got: Vec<String> = kinds(&store, CHECK_EVENTS)
        .into_iter()
        .filter(|e| !e.starts_with("HealthCheckStarted"))
        .collect();
    assert_eq!(got, expect_log);
}

/// What triggers a check besides an operator: a host reachable again
/// after its BMC was silent (not after its agent was away), every N
/// leases, idle for D; a queued check survives a restart.
#[tokio::test(start_paused = true)]
async fn checks_are_triggered_by_reachability_lease_count_and_idleness() {
    let store = Arc::new(MemStore::default());
    let inv = Inventory::parse(INVENTORY, Path::new("inv.toml")).unwrap();
    let mut config = CoreConfig::new("inv.toml".into());
    config.max_lifetime = Duration::from_secs(100);
    config.health_check_every = 2;
    config.health_check_idle = Some(Duration::from_secs(3600));
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_000_000)));
    let (core, _) = Core::start(
        config.clone(),
        store.clone(),
        inv.clone(),
        Arc::new(Immediate),
        clock.clone(),
    )
    .await
    .unwrap();
    let h = |n: &str| HostName::new(n).unwrap();
    let triggers = |store: &MemStore| -> Vec<String> {
        store
            .all_events()
            .into_iter()
            .filter(|e| e.kind == EventKind::LeaseRequested && e.actor == Principal::health())
            .map(|e| format!("{} {}", e.hosts[0], e.detail))
            .collect()
    };

    // Reachability: the agent away, then back: no check. The BMC silent,
    // then back: a check.
    core.set_unreachable([(h("h1"), "agent a1 of rack r1 is not attached".to_string())].into())
        .await
        .unwrap();
    core.set_unreachable(BTreeMap::new()).await.unwrap();
    core.set_unreachable([(h("h2"), "BMC 10.0.0.2:623 does not answer".to_string())].into())
        .await
        .unwrap();
    core.set_unreachable(BTreeMap::new()).await.unwrap();
    settle().await;
    assert_eq!(
        triggers(&store),
        ["h2 reachable again after: BMC 10.0.0.2:623 does not answer"]
    );
    let c = check_lease(&core, "h2").await.unwrap();
    core.host_verdict(h("h2"), c.id, ready("LAB-HEALTH-OK"))
        .await;
    settle().await;

    // Every 2 leases: h1's second lease ends with a check queued (which
    // waits for h1 behind a lease asked for meanwhile? No: ahead of it).
    for _ in 0..2 {
        let l = granted(&core, "ci", on_host("h1", 60)).await;
        core.release(caller("ci"), l.id).await.unwrap();
    }
    settle().await;
    assert_eq!(triggers(&store)[1], "h1 after 2 leases");
    let c = check_lease(&core, "h1").await.expect("h1 checked");
    core.host_verdict(h("h1"), c.id, ready(H1_FACTS)).await;
    settle().await;
    assert_eq!(triggers(&store).len(), 2);

    // A check queued behind a lease survives a restart.
    let l = granted(&core, "ci", on_host("h1", 60)).await;
    core.check_host(operator("root"), h("h1")).await.unwrap();
    drop(core);
    let (core, _) = Core::start(config, store.clone(), inv, Arc::new(Immediate), clock)
        .await
        .unwrap();
    core.release(caller("ci"), l.id).await.unwrap();
    settle().await;
    let c = check_lease(&core, "h1")
        .await
        .expect("the stored check was granted");
    core.host_verdict(h("h1"), c.id, ready(H1_FACTS)).await;
    settle().await;

    // Idle for an hour: both hosts checked (h2 free the longest).
    let before = triggers(&store).len();
    tokio::time::advance(Duration::from_secs(3601)).await;
    settle().await;
    let idle: Vec<String> = triggers(&store)[before..].to_vec();
    assert_eq!(idle.len(), 2, "{idle:?}");
    assert!(idle.iter().all(|t| t.ends_with("idle for 1h")), "{idle:?}");
}

/// An operator's quarantine of a host a failed check quarantined takes
/// over: a later passing check no longer lifts it.
#[tokio::test(start_paused = true)]
async fn an_operators_quarantine_replaces_a_checks() {
    use crate::lease::machine::Health;
    let core = start(Arc::new(MemStore::default())).await;
    let h1 = HostName::new("h1").unwrap();
    core.check_host(operator("root"), h1.clone()).await.unwrap();
    settle().await;
    let c = check_lease(&core, "h1").await.unwrap();
    core.host_verdict(h1.clone(), c.id, ready("LAB-HEALTH-OK arch=aarch64"))
        .await;
    settle().await;
    assert!(matches!(
        health(&core, "h1").await,
        Health::Quarantined { ref by, until_released: false, .. } if *by == Principal::health()
    ));
    core.set_quarantine(operator("root"), h1.clone(), true, "bad PSU".into())
        .await
        .unwrap();
    core.check_host(operator("root"), h1.clone()).await.unwrap();
    settle().await;
    let c = check_lease(&core, "h1").await.unwrap();
    core.host_verdict(h1.clone(), c.id, ready(H1_FACTS)).await;
    settle().await;
    match health(&core, "h1").await {
        Health::Quarantined { reason, by, .. } => {
            assert_eq!((reason.as_str(), by.as_str()), ("bad PSU", "root"))
        }
        other => panic!("{other:?}"),
    }
}

/// LEASE_EXPIRING events in the store, as (lease, detail).
fn expiring(store: &MemStore) -> Vec<(LeaseId, String)> {
    store
        .all_events()
        .into_iter()
        .filter(|e| e.kind == EventKind::LeaseExpiring)
        .map(|e| (e.lease.unwrap(), e.detail))
        .collect()
}

fn warning_config(warning_s: u64) -> CoreConfig {
    let mut c = config();
    c.max_lifetime = Duration::from_secs(1000);
    c.expiry_warning = Duration::from_secs(warning_s);
    c
}

#[tokio::test(start_paused = true)]
async fn an_expiring_lease_is_warned_once_and_a_renewal_re_arms_it() {
    let store = Arc::new(MemStore::new());
    let (core, _) = start_at(
        store.clone(),
        warning_config(10),
        1_000_000,
        Arc::new(Immediate),
    )
    .await;
    let lease = granted(&core, "ci", spec(1, 60)).await;
    // A lease whose TTL is not longer than the warning gets none.
    let short = granted(&core, "bob", spec(1, 10)).await;
    tokio::time::advance(Duration::from_secs(49)).await;
    settle().await;
    assert_eq!(expiring(&store), [], "not before 10 s ahead of the expiry");
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    let first = expiring(&store);
    assert_eq!(
        first,
        [(lease.id, format!("expires {} (in 9s)", lease.expires_at))]
    );
    let e = store
        .all_events()
        .into_iter()
        .find(|e| e.kind == EventKind::LeaseExpiring)
        .unwrap();
    assert_eq!(e.hosts, lease.hosts);
    assert_eq!(e.actor, Principal::server());
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    assert_eq!(expiring(&store).len(), 1, "once per expiry");
    // Renewed at 56 s for 60 s: warned again at 106 s.
    let renewed = core.renew(caller("ci"), lease.id, None).await.unwrap();
    tokio::time::advance(Duration::from_secs(49)).await;
    settle().await;
    assert_eq!(expiring(&store).len(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(
        expiring(&store)[1],
        (
            renewed.id,
            format!("expires {} (in 9s)", renewed.expires_at)
        )
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        core.get_lease(lease.id).await.unwrap().state,
        LeaseState::Expired
    );
    assert_eq!(
        core.get_lease(short.id).await.unwrap().state,
        LeaseState::Expired
    );
    assert_eq!(expiring(&store).len(), 2, "{:?}", expiring(&store));
}

#[tokio::test(start_paused = true)]
async fn no_expiry_warnings_when_switched_off() {
    let store = Arc::new(MemStore::new());
    let (core, _) = start_at(
        store.clone(),
        warning_config(0),
        1_000_000,
        Arc::new(Immediate),
    )
    .await;
    let lease = granted(&core, "ci", spec(1, 60)).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    settle().await;
    assert!(!core.get_lease(lease.id).await.unwrap().is_active());
    assert_eq!(expiring(&store), []);
}

#[tokio::test(start_paused = true)]
async fn a_warning_survives_a_crash_once_and_one_due_meanwhile_is_sent_at_start() {
    let store = Arc::new(MemStore::new());
    let (core, actor) = start_at(
        store.clone(),
        warning_config(10),
        1_000_000,
        Arc::new(Immediate),
    )
    .await;
    let warned = granted(&core, "ci", spec(1, 60)).await;
    let later = granted(&core, "bob", spec(1, 120)).await;
    tokio::time::advance(Duration::from_secs(51)).await;
    settle().await;
    assert_eq!(expiring(&store).len(), 1);
    crash(actor).await;
    drop(core);
    // Back 60 s later (the clock restarts at the new base): the first lease
    // was warned already (and has expired by now); the second one's warning
    // fell due while the server was down.
    tokio::time::advance(Duration::from_secs(60)).await;
    let (core, _) = start_at(
        store.clone(),
        warning_config(10),
        1_111_000,
        Arc::new(Immediate),
    )
    .await;
    settle().await;
    let ids: Vec<LeaseId> = expiring(&store).into_iter().map(|(l, _)| l).collect();
    assert_eq!(ids, [warned.id, later.id]);
    drop(core);
    // And again just after: nothing is sent twice.
    let (_core, _) = start_at(
        store.clone(),
        warning_config(10),
        1_112_000,
        Arc::new(Immediate),
    )
    .await;
    settle().await;
    assert_eq!(expiring(&store).len(), 2, "{:?}", expiring(&store));
}

fn webhooks(text: &str) -> crate::webhooks::SharedWebhooks {
    Arc::new(crate::webhooks::Webhooks::parse(text, Path::new("w.toml")).unwrap())
}

#[tokio::test(start_paused = true)]
async fn events_that_hooks_want_get_outbox_rows_in_their_commit() {
    let store = Arc::new(MemStore::new());
    let mut config = warning_config(10);
    config.webhooks = webhooks(
        r#"
[[webhook]]
name = "ci"
url = "http://127.0.0.1:1/"
events = ["LEASE_GRANTED", "LEASE_EXPIRING"]
secret = "k"
holders = ["ci"]

[[webhook]]
name = "ops"
url = "http://127.0.0.1:1/ops"
events = ["HOST_HEALTH"]
secret = "k"
"#,
    );
    let (core, _) = start_at(store.clone(), config, 1_000_000, Arc::new(Immediate)).await;
    let wake = core.outbox_wake();
    let rows = |store: &MemStore| -> Vec<(String, String, u64)> {
        store
            .outbox_due(Timestamp(i64::MAX), 100)
            .unwrap()
            .into_iter()
            .map(|r| (r.hook, r.kind, r.seq))
            .collect()
    };
    let mine = granted(&core, "ci", spec(1, 60)).await;
    let _theirs = granted(&core, "bob", spec(1, 60)).await;
    // The delivery task is woken by the commit that wrote rows.
    tokio::time::timeout(Duration::from_secs(1), wake.notified())
        .await
        .expect("woken");
    let grant = store
        .all_events()
        .into_iter()
        .find(|e| e.kind == EventKind::LeaseGranted && e.lease == Some(mine.id))
        .unwrap();
    assert_eq!(
        rows(&store),
        [("ci".into(), "LEASE_GRANTED".into(), grant.seq)]
    );
    let body: serde_json::Value =
        serde_json::from_str(&store.outbox_due(Timestamp(i64::MAX), 1).unwrap()[0].body).unwrap();
    assert_eq!(body["principal"], "ci");
    assert_eq!(body["lease"], mine.id.to_string());

    let op = Caller {
        principal: Principal::new("root").unwrap(),
        role: Role::Operator,
    };
    core.set_quarantine(op, HostName::new("h1").unwrap(), true, "flaky".into())
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(51)).await;
    settle().await;
    let kinds: Vec<(String, String)> = rows(&store).into_iter().map(|(h, k, _)| (h, k)).collect();
    assert_eq!(
        kinds,
        [
            ("ci".into(), "LEASE_GRANTED".into()),
            ("ops".into(), "HOST_HEALTH".into()),
            ("ci".into(), "LEASE_EXPIRING".into()),
        ]
    );

    // A reload that removes a hook drops its rows (in its own commit).
    core.set_webhooks(webhooks(
        "[[webhook]]\nname = \"ops\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\nsecret = \"k\"\n",
    ))
    .await
    .unwrap();
    let kinds: Vec<String> = rows(&store).into_iter().map(|(h, _, _)| h).collect();
    assert_eq!(kinds, ["ops"]);
}
