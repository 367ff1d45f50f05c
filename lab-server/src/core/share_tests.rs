//! Projects through the core, on paused time: fair share between flooding
//! projects (equal shares, 3 : 1), quotas that hold requests back without
//! reserving hosts, and the policy's TTL and priority limits.

use super::clock::TokioClock;
use super::reclaim::Immediate;
use super::tests::{ask, caller, granted, settle, spec};
use super::*;
use crate::store::memory::MemStore;
use crate::types::Timestamp;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

fn inventory(hosts: usize) -> Inventory {
    let mut text = String::from("[[rack]]\nname = \"r1\"\nagent = \"a1\"\n");
    for i in 1..=hosts {
        text.push_str(&format!(
            "\n[[host]]\nname = \"h{i}\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:{i:02x}\"\n"
        ));
    }
    Inventory::parse(&text, Path::new("inv.toml")).unwrap()
}

async fn start(hosts: usize, policy: &str) -> Core {
    let mut config = CoreConfig::new("inv.toml".into());
    config.policy = Arc::new(Policy::parse(policy, Path::new("policy.toml")).unwrap());
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_000_000)));
    Core::start(
        config,
        Arc::new(MemStore::new()),
        inventory(hosts),
        Arc::new(Immediate),
        clock,
    )
    .await
    .unwrap()
    .0
}

/// Each principal keeps `clients` requests waiting at all times; each
/// lease runs its TTL out (its host then goes to the next). Grants per
/// principal once `total` were made.
async fn flood(
    core: &Core,
    principals: &[(&str, usize)],
    ttl_s: u64,
    total: usize,
) -> HashMap<String, usize> {
    let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let made = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (who, clients) in principals {
        for _ in 0..*clients {
            let (core, counts, made, who) =
                (core.clone(), counts.clone(), made.clone(), who.to_string());
            tasks.push(tokio::spawn(async move {
                while made.load(Ordering::SeqCst) < total {
                    granted(&core, &who, spec(1, ttl_s)).await;
                    if made.fetch_add(1, Ordering::SeqCst) < total {
                        *counts.lock().unwrap().entry(who.clone()).or_default() += 1;
                    }
                }
            }));
        }
    }
    while made.load(Ordering::SeqCst) < total {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for t in tasks {
        t.abort();
    }
    counts.lock().unwrap().clone()
}

const TWO_PROJECTS: &str = r#"
[[project]]
name = "alpha"
share = SHARE
members = ["alice"]

[[project]]
name = "beta"
members = ["bob"]
"#;

#[tokio::test(start_paused = true)]
async fn equal_shares_split_a_flooded_lab_evenly() {
    let core = start(4, &TWO_PROJECTS.replace("SHARE", "1")).await;
    // Alice keeps three times as many requests waiting: first come, first
    // served would give her about 3/4.
    let got = flood(&core, &[("alice", 6), ("bob", 2)], 600, 200).await;
    let alice = got["alice"] as f64 / 200.0;
    assert!((0.40..=0.60).contains(&alice), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn a_three_to_one_share_gets_three_quarters() {
    let core = start(4, &TWO_PROJECTS.replace("SHARE", "3")).await;
    let got = flood(&core, &[("alice", 4), ("bob", 4)], 600, 200).await;
    let alice = got["alice"] as f64 / 200.0;
    assert!((0.65..=0.85).contains(&alice), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn a_project_at_its_quota_waits_and_holds_nothing_back() {
    let core = start(
        3,
        r#"
[[project]]
name = "alpha"
members = ["alice"]
max_hosts = 1
"#,
    )
    .await;
    let first = granted(&core, "alice", spec(1, 600)).await;
    // Two more of alice's wait, held back by the quota, though hosts are
    // free; they are ahead of bob's request, which is granted at once.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        waiting.push(
            core.acquire(caller("alice"), ask(spec(1, 600), false))
                .await
                .unwrap(),
        );
    }
    settle().await;
    let queue = core.list_queue().await.unwrap();
    assert_eq!(queue.len(), 2, "{queue:?}");
    for e in &queue {
        assert_eq!(e.project, "alpha");
        assert_eq!(
            e.held_back.as_deref(),
            Some("project alpha holds 1 of its 1 hosts (max_hosts)")
        );
    }
    match waiting[0].next().await.unwrap() {
        WaitState::Queued { held_back, .. } => assert_eq!(
            held_back.as_deref(),
            Some("project alpha holds 1 of its 1 hosts (max_hosts)")
        ),
        s => panic!("expected queued, got {s:?}"),
    }
    let b = granted(&core, "bob", spec(2, 600)).await;
    assert_eq!(b.hosts.len(), 2);
    // When alice's lease ends, the next of hers is granted (the quota
    // counts it again): still one host at a time.
    core.release(caller("alice"), first.id).await.unwrap();
    let next = loop {
        match waiting[0].next().await.unwrap() {
            WaitState::Granted(l) => break l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(next.holder.as_str(), "alice");
    settle().await;
    let queue = core.list_queue().await.unwrap();
    assert_eq!(queue.len(), 1);
    assert!(queue[0].held_back.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_role_limit_holds_each_principal_and_limits_ttl_and_priority() {
    let core = start(
        4,
        r#"
[role.ci]
max_hosts = 1
max_ttl = "30m"
max_priority = 3

[[project]]
name = "release"
members = ["rel"]
max_ttl = "2h"
max_priority = 50
"#,
    )
    .await;
    let _a = granted(&core, "ci-a", spec(1, 600)).await;
    let mut second = core
        .acquire(caller("ci-a"), ask(spec(1, 600), false))
        .await
        .unwrap();
    settle().await;
    // Another ci principal is not held back by ci-a's hosts.
    granted(&core, "ci-b", spec(1, 600)).await;
    match second.next().await.unwrap() {
        WaitState::Queued { held_back, .. } => assert_eq!(
            held_back.as_deref(),
            Some("ci-a holds 1 of the 1 hosts its role may hold (max_hosts)")
        ),
        s => panic!("expected queued, got {s:?}"),
    }
    // TTL and priority: the role's limits, or the project's own.
    let refused = |who: &str, ttl_s: u64, priority: i32| {
        let core = core.clone();
        let who = who.to_owned();
        async move {
            let s = LeaseSpec {
                priority,
                ..spec(1, ttl_s)
            };
            let mut acq = core.acquire(caller(&who), ask(s, true)).await.unwrap();
            loop {
                match acq.next().await.unwrap() {
                    WaitState::Failed(e) => return Some(e.to_string()),
                    WaitState::Granted(_) => return None,
                    WaitState::Queued { .. } => continue,
                }
            }
        }
    };
    let e = refused("ci-c", 3600, 0).await.expect("refused");
    assert!(
        e.contains("at most 30m (the policy of project default)"),
        "{e}"
    );
    let e = refused("ci-c", 600, 4).await.expect("refused");
    assert!(
        e.contains("may not ask for priority 4: at most 3 in project default"),
        "{e}"
    );
    assert_eq!(
        refused("rel", 3600, 50).await,
        None,
        "the project's own limits"
    );
    let e = refused("rel", 3 * 3600, 0).await.expect("refused");
    assert!(
        e.contains("at most 2h (the policy of project release)"),
        "{e}"
    );
    // A renewal beyond the limit is refused too.
    let l = granted(&core, "ci-c", spec(1, 600)).await;
    let e = core
        .renew(caller("ci-c"), l.id, Some(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 30m"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_new_policy_moves_principals_and_recounts_usage() {
    let core = start(2, "").await;
    assert_eq!(core.project_of(&Principal::new("bob").unwrap()), "default");
    // Bob's use so far moves with him to his new project: with alpha
    // (alice, unused) at the same share, alice's later request goes first.
    let l = granted(&core, "bob", spec(2, 600)).await;
    tokio::time::advance(Duration::from_secs(300)).await;
    core.release(caller("bob"), l.id).await.unwrap();
    let policy = Policy::parse(
        "[[project]]\nname = \"alpha\"\nmembers = [\"alice\"]\n[[project]]\nname = \"beta\"\nmembers = [\"bob\"]\n",
        Path::new("policy.toml"),
    )
    .unwrap();
    core.set_policy(Arc::new(policy)).await.unwrap();
    assert_eq!(core.project_of(&Principal::new("bob").unwrap()), "beta");
    let hold = granted(&core, "carol", spec(2, 600)).await;
    let mut b = core
        .acquire(caller("bob"), ask(spec(1, 60), false))
        .await
        .unwrap();
    settle().await;
    let mut a = core
        .acquire(caller("alice"), ask(spec(1, 60), false))
        .await
        .unwrap();
    settle().await;
    let queue = core.list_queue().await.unwrap();
    let order: Vec<(&str, u32)> = queue
        .iter()
        .map(|e| (e.principal.as_str(), e.position))
        .collect();
    assert_eq!(order, [("alice", 1), ("bob", 2)]);
    core.release(caller("carol"), hold.id).await.unwrap();
    for acq in [&mut a, &mut b] {
        loop {
            match acq.next().await.unwrap() {
                WaitState::Granted(_) => break,
                WaitState::Queued { .. } => continue,
                WaitState::Failed(e) => panic!("{e}"),
            }
        }
    }
}
