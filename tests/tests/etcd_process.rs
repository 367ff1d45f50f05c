//! lab-server on a 3-member etcd (Debian's `etcd-server` on loopback), as
//! real processes driven through the real `lab` CLI: a lease acquired, the
//! etcd leader SIGKILLed, then the lease renewed and released and a new one
//! granted — writes stall while etcd elects a new leader, then go on; and
//! two servers on one etcd: one leads, the other answers UNAVAILABLE naming
//! it and takes over when it dies; a leader whose election lease is revoked
//! is fenced and stops.

use lab_tests::etcd::EtcdCluster;
use lab_tests::{ServerProcess, bin_path, inventory_toml};
use std::process::Command;
use std::time::Instant;

fn lab(server: &ServerProcess, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("lab"))
        .args(args)
        .env("LAB_SERVER", format!("http://{}", server.addr))
        .env("LAB_TOKEN", token)
        .output()
        .expect("run lab");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn spawn_on_etcd(dir: &std::path::Path, cluster: &EtcdCluster, name: &str) -> ServerProcess {
    let inventory = dir.join("inventory.toml");
    if !inventory.exists() {
        std::fs::write(&inventory, inventory_toml(2)).unwrap();
    }
    ServerProcess::spawn(
        &[
            "--dev-insecure-no-auth",
            "--listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--inventory",
            &inventory.to_string_lossy(),
            "--store",
            "etcd",
            "--etcd-endpoints",
            &cluster.endpoints(),
        ],
        &dir.join(format!("{name}.log")),
    )
    .unwrap()
}

#[test]
fn leases_go_on_when_the_etcd_leader_is_killed() {
    let mut cluster = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_on_etcd(dir.path(), &cluster, "server");

    let (code, out, err) = lab(
        &server,
        "alice",
        &["--json", "lease", "acquire", "--ttl", "10m"],
    );
    assert_eq!(code, 0, "{err}");
    let id = json(&out)["id"].as_str().unwrap().to_owned();

    let leader = cluster.leader().expect("etcd has a leader");
    cluster.kill(leader);
    let killed = Instant::now();

    let (code, out, err) = lab(
        &server,
        "alice",
        &["--json", "lease", "renew", &id, "--ttl", "20m"],
    );
    let stall = killed.elapsed();
    assert_eq!(code, 0, "renew after the etcd leader died: {err}");
    assert_eq!(json(&out)["state"], "active");
    eprintln!("renew answered {stall:?} after the etcd leader was killed");
    assert!(
        cluster.leader().is_some(),
        "the two others elected a leader"
    );

    let (code, _, err) = lab(&server, "alice", &["lease", "release", &id]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = lab(
        &server,
        "bob",
        &["--json", "lease", "acquire", "--count", "2", "--ttl", "10m"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["hosts"].as_array().unwrap().len(), 2);

    // Everything acknowledged is in etcd: a second server on the same
    // cluster loads it. The first one stops gracefully (SIGTERM): it gives
    // up the lead at once, without waiting for its election lease's TTL.
    let mut server = server;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        server.child.wait().unwrap().success(),
        "{}",
        server.log_text()
    );
    assert!(server.log_text().contains("lab-server stopped"));
    let again = spawn_on_etcd(dir.path(), &cluster, "again");
    let took = until(
        "the new server leads",
        std::time::Duration::from_secs(20),
        || lab(&again, "alice", &["hosts"]).0 == 0,
    );
    eprintln!("a new server led {took:?} after the old one resigned");
    let (code, out, err) = lab(&again, "alice", &["--json", "lease", "show", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["state"], "released");
    let (code, out, _) = lab(&again, "alice", &["hosts"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().filter(|l| l.contains("bob")).count(),
        2,
        "{out}"
    );
}

/// Until `f` is true, polling (a deadline, no fixed sleep).
fn until(
    what: &str,
    within: std::time::Duration,
    mut f: impl FnMut() -> bool,
) -> std::time::Duration {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
fn one_leader_a_standby_that_takes_over_and_a_fenced_leader_that_stops() {
    let cluster = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut a = spawn_on_etcd(dir.path(), &cluster, "a");
    until("a leads", std::time::Duration::from_secs(20), || {
        lab(&a, "alice", &["hosts"]).0 == 0
    });
    let b = spawn_on_etcd(dir.path(), &cluster, "b");

    // The standby answers UNAVAILABLE, naming the leader (message and
    // metadata), and is NOT_SERVING to health checks.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let mut c = lab_tests::Clients::connect(b.addr, Some("alice"))
            .await
            .unwrap();
        c.hosts
            .list_hosts(lab_proto::v1::ListHostsRequest::default())
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let leader = format!("http://{}", a.addr);
    assert!(status.message().contains(&leader), "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("lab-leader")
            .and_then(|v| v.to_str().ok()),
        Some(leader.as_str())
    );

    let (code, out, err) = lab(&a, "alice", &["--json", "lease", "acquire", "--ttl", "10m"]);
    assert_eq!(code, 0, "{err}");
    let id = json(&out)["id"].as_str().unwrap().to_owned();

    // The leader dies: the standby takes over within the election TTL,
    // with the state.
    a.kill();
    let took = until("b takes over", std::time::Duration::from_secs(20), || {
        lab(&b, "alice", &["hosts"]).0 == 0
    });
    eprintln!("the standby answered {took:?} after the leader's SIGKILL");
    let (code, out, err) = lab(&b, "alice", &["--json", "lease", "show", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["state"], "active");

    // Its election lease revoked under it (a leader cut off from etcd for
    // a TTL): its writes are fenced and it stops.
    let mut b = b;
    cluster.revoke_lease_of("/lab/election/leader").unwrap();
    let (code, _, err) = lab(&b, "alice", &["lease", "renew", &id, "--ttl", "20m"]);
    let status = until("b stops", std::time::Duration::from_secs(20), || {
        b.child.try_wait().unwrap().is_some()
    });
    eprintln!("renew on the fenced leader: exit {code} ({err}); it stopped within {status:?}");
    assert!(!b.child.wait().unwrap().success());
    assert!(
        b.log_text().contains("lost the etcd leadership"),
        "{}",
        b.log_text()
    );
    assert_ne!(code, 0, "a fenced leader acknowledged a renewal");
}
