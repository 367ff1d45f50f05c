//! The etcd store against a real etcd (Debian's `etcd-server`, one member
//! on loopback, started once for the whole file): the store conformance
//! tests every backend passes, each on a fresh key prefix, and what is
//! particular to etcd — a batch far over etcd's default 128 operations
//! still commits as one transaction, and one over lab-server's own limit is
//! refused before it is sent.

use lab_server::events::{EventKind, EventRecord};
use lab_server::lease::HostRecord;
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
