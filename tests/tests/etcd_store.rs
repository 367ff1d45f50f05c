//! The etcd store against a real etcd (Debian's `etcd-server`, one member
//! on loopback per test, each part on its own key prefix): the store conformance
//! tests every backend passes, each on a fresh key prefix, and what is
//! particular to etcd — a batch far over etcd's default 128 operations
//! still commits as one transaction, a transaction sent again after a lost
//! answer is recognized as landed, and one over lab-server's own limit is
//! refused before it is sent; and the leader's fence: once its election
//! lease is revoked, a running leader's next commit fails.

use lab_server::events::{EventKind, EventRecord};
use lab_server::lease::HostRecord;
use lab_server::store::etcd::election::{Campaign, Election};
use lab_server::store::etcd::{EtcdConfig, EtcdStore};
use lab_server::store::{Batch, Store, StoreError, Write, contract};
use lab_server::types::{HostName, Principal, Timestamp};
use lab_tests::etcd::EtcdCluster;

fn store(cluster: &EtcdCluster, prefix: &str, max_txn_ops: usize) -> EtcdStore {
    let mut config = EtcdConfig::new(cluster.urls());
    config.prefix = format!("/{prefix}/");
    config.max_txn_ops = max_txn_ops;
    EtcdStore::connect(config).expect("connect to the test etcd")
}

fn hosts_batch(n: usize) -> Batch {
    Batch {
        writes: (0..n)
            .map(|i| Write::Host(HostRecord::new(HostName::new(format!("h{i}")).unwrap())))
            .collect(),
        events: (0..n)
            .map(|i| EventRecord {
                seq: i as u64 + 1,
                time: Timestamp(i as i64),
                actor: Principal::server(),
                kind: EventKind::HostAdded,
                hosts: vec![HostName::new(format!("h{i}")).unwrap()],
                lease: None,
                waiter: None,
                request: None,
                detail: String::new(),
                booking: None,
            })
            .collect(),
    }
}

#[test]
fn the_store_contract_holds_on_etcd() {
    let cluster = EtcdCluster::start(1).unwrap();
    contract::run_all(&store(&cluster, "run_all", 16_384));
    contract::waiters_and_deletes(&store(&cluster, "waiters", 16_384));
    contract::pruning(&store(&cluster, "pruning", 16_384));
    contract::outbox(&store(&cluster, "outbox", 16_384));

    // 600 hosts and their events: 2,400 operations, one transaction.
    let big = store(&cluster, "big", 16_384);
    big.commit(&hosts_batch(600)).unwrap();
    let snap = big.load().unwrap();
    assert_eq!((snap.hosts.len(), snap.last_event_seq), (600, 600));

    // A timeout is not a failure: the same transaction sent again after
    // its answer was lost is recognized as landed (its commit token), not
    // taken for a conflict, and applies once.
    let twice = store(&cluster, "twice", 16_384);
    twice.commit_sent_twice(&hosts_batch(3)).unwrap();
    let snap = twice.load().unwrap();
    assert_eq!((snap.hosts.len(), snap.last_event_seq), (3, 3));

    // Over lab-server's limit: refused whole, before etcd sees it.
    let small = store(&cluster, "small", 100);
    let err = small.commit(&hosts_batch(60)).unwrap_err();
    assert!(
        matches!(err, StoreError::Backend { .. }),
        "{err}: {:?}",
        std::error::Error::source(&err)
    );
    let chain = std::error::Error::source(&err)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(chain.contains("max-txn-ops"), "{chain}");
    assert_eq!(small.load().unwrap().hosts.len(), 0, "nothing landed");
}

#[test]
fn a_deposed_leader_cannot_commit() {
    let cluster = EtcdCluster::start(1).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = store(&cluster, "fence", 16_384);
    let b = store(&cluster, "fence", 16_384);
    let election_a = Election::new(a.client(), a.prefix(), "http://a:7621".into());
    let election_b = Election::new(b.client(), b.prefix(), "http://b:7621".into());

    let Campaign::Won(leadership) = rt.block_on(election_a.campaign()).unwrap() else {
        panic!("the first campaign wins");
    };
    a.set_fence(Some(leadership.fence.clone()));
    let Campaign::Lost { leader } = rt.block_on(election_b.campaign()).unwrap() else {
        panic!("a second campaign loses while the leader lives");
    };
    assert_eq!(leader.as_deref(), Some("http://a:7621"));
    a.commit(&hosts_batch(1)).unwrap();

    // The lease goes (as when the leader is cut off for a TTL): the
    // leader's next commit is refused, and nothing of it lands.
    rt.block_on(a.client().lease_revoke(leadership.lease))
        .unwrap();
    let mut next = hosts_batch(2);
    next.writes.remove(0);
    next.events.remove(0);
    let err = a.commit(&next).unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert_eq!(a.load().unwrap().hosts.len(), 1);

    // A new leader's fence is not the old one's: the old leader stays
    // fenced out, the new one commits.
    let Campaign::Won(new) = rt.block_on(election_b.campaign()).unwrap() else {
        panic!("the key is free again");
    };
    assert_ne!(new.fence, leadership.fence);
    b.set_fence(Some(new.fence.clone()));
    assert!(matches!(a.commit(&next), Err(StoreError::Fenced { .. })));
    b.commit(&next).unwrap();
    assert_eq!(b.load().unwrap().hosts.len(), 2);
    // And the old leader knows it lost: its keep-alive finds the lease gone.
    let mut old = leadership;
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(10), old.lost())
            .await
            .expect("the keep-alive notices the revoked lease")
    });
}
