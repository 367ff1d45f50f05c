//! The crash loop (`lab_tests::crash_loop`) with lab-server on a 3-member
//! etcd: 64 clients of mixed load, the server SIGKILLed 6 times and started
//! again on the same port — each time a standby until the killed server's
//! election lease runs out, then the leader. Writes must resume within 5 s
//! of every kill; then the crash loop's checks: nothing acknowledged lost,
//! the history checker over the whole log (no double grant, queue order,
//! every waiter granted at most once), each request id one lease.

use lab_tests::crash_loop::{Options, run};
use lab_tests::etcd::EtcdCluster;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crash_loop_on_etcd() {
    let cluster = tokio::task::block_in_place(|| EtcdCluster::start(3)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        kills: 6,
        etcd: Some(cluster.endpoints()),
        ..Options::default()
    };
    let report = match run(dir.path(), &o).await {
        Ok(r) => r,
        Err(e) => {
            let kept = dir.keep();
            panic!("{e:#} (kept in {})", kept.display());
        }
    };
    eprintln!("{}", report.summary());
    assert_eq!(report.lost, 0);
    assert_eq!(report.resumed.len(), 6);
    assert!(
        report.resumed.iter().all(|d| *d < Duration::from_secs(5)),
        "writes resumed after {:?}",
        report.resumed
    );
    assert!(report.grants >= 100, "{}", report.summary());
}
