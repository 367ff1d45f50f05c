//! lab-server on a 3-member etcd (Debian's `etcd-server` on loopback), as
//! real processes driven through the real `lab` CLI: a lease acquired, the
//! etcd leader SIGKILLed, then the lease renewed and released and a new one
//! granted — writes stall while etcd elects a new leader, then go on; and
//! two servers on one etcd: one leads, the other answers UNAVAILABLE (and
//! 503 on its web port) naming it and takes over when it dies; a leader whose election lease is revoked
//! is fenced and stops; and clients that fail over: with a rack agent and
//! a waiting `lab lease acquire` (both given both servers), the leader
//! SIGKILLed, the standby takes over, the agent attaches to it, and the
//! waiter is granted in its place — no lease lost or doubled.

use lab_tests::etcd::EtcdCluster;
use lab_tests::lab_cli as lab;
use lab_tests::{ServerProcess, bin_path, inventory_toml, json};
use std::process::Command;
use std::time::Instant;

fn spawn_on_etcd(dir: &std::path::Path, cluster: &EtcdCluster, name: &str) -> ServerProcess {
    ServerProcess::spawn_dev_with(
        dir,
        &inventory_toml(2),
        &["--store", "etcd", "--etcd-endpoints", &cluster.endpoints()],
        &format!("{name}.log"),
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
    let ask_b = || {
        rt.block_on(async {
            let mut c = lab_tests::Clients::connect(b.addr, Some("alice"))
                .await
                .unwrap();
            c.hosts
                .list_hosts(lab_proto::v1::ListHostsRequest::default())
                .await
                .unwrap_err()
        })
    };
    // (Until its first campaign has seen the leader.)
    until(
        "b knows the leader",
        std::time::Duration::from_secs(10),
        || ask_b().metadata().get("lab-leader").is_some(),
    );
    let status = ask_b();
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

    // Its web port answers 503 at once, naming the leader.
    let web = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(b.web.expect("the web port")).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(web.starts_with("HTTP/1.1 503"), "{web}");
    assert!(web.contains(&format!("lab-leader: {leader}")), "{web}");

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

#[test]
fn the_agent_and_a_waiting_cli_follow_the_new_leader() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let cluster = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("inventory.toml"),
        lab_tests::inventory_toml_with_agent(2),
    )
    .unwrap();
    let mut a = spawn_on_etcd(dir.path(), &cluster, "a");
    until("a leads", std::time::Duration::from_secs(20), || {
        lab(&a, "alice", &["hosts"]).0 == 0
    });
    let b = spawn_on_etcd(dir.path(), &cluster, "b");
    let both = format!("http://{},http://{}", a.addr, b.addr);
    let lab_both = |token: &str, args: &[&str]| {
        let out = Command::new(bin_path("lab"))
            .args(args)
            .env("LAB_SERVER", &both)
            .env("LAB_TOKEN", token)
            .output()
            .expect("run lab");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let reachable = |lab_out: &str| {
        json(lab_out)
            .as_array()
            .is_some_and(|hs| hs.iter().all(|h| h["reachable"] == true))
    };

    // The agent knows both servers (the standby first: it is sent on).
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = lab_tests::agent::AgentProcess::spawn_to(
        &agent_dir,
        &format!("http://{},http://{}", b.addr, a.addr),
        "",
    )
    .unwrap();
    until(
        "the agent attaches to a",
        std::time::Duration::from_secs(30),
        || {
            let (code, out, _) = lab(&a, "alice", &["--json", "hosts"]);
            code == 0 && reachable(&out)
        },
    );

    let (code, out, err) = lab_both(
        "holder",
        &[
            "--json", "lease", "acquire", "--host", "h00", "--ttl", "10m",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let held = json(&out)["id"].as_str().unwrap().to_owned();
    // The waiter is given the standby first, too.
    let mut waiter = Command::new(bin_path("lab"))
        .args([
            "--json", "lease", "acquire", "--host", "h00", "--ttl", "10m",
        ])
        .env("LAB_SERVER", format!("http://{},http://{}", b.addr, a.addr))
        .env("LAB_TOKEN", "waiter")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = waiter.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |what: &str| {
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("lab printed no line: {what}"))
    };
    let first = next_line("waiting");
    assert!(first.starts_with("waiting: position 1 of 1"), "{first}");

    // The leader dies.
    a.kill();
    let killed = Instant::now();
    let mut seen = Vec::new();
    loop {
        let line = next_line("back in the queue");
        seen.push(line.clone());
        if line.starts_with("waiting: position 1 of 1") {
            break;
        }
    }
    eprintln!(
        "the waiter was back in its place {:?} after the kill: {seen:#?}",
        killed.elapsed()
    );
    assert!(
        seen.iter()
            .any(|l| l == "lab: the request is back with the server"),
        "{seen:?}"
    );
    until(
        "the agent attaches to b",
        std::time::Duration::from_secs(30),
        || {
            let (code, out, _) = lab(&b, "alice", &["--json", "hosts"]);
            code == 0 && reachable(&out)
        },
    );
    eprintln!(
        "the agent was attached to b {:?} after the kill",
        killed.elapsed()
    );

    // The holder releases through the list; the waiter gets h00.
    let (code, _, err) = lab_both("holder", &["lease", "release", &held]);
    assert_eq!(code, 0, "{err}");
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let granted = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(granted["hosts"][0], "h00");
    assert_eq!(granted["holder"], "waiter");

    // The whole log, across both servers: no double grant, one request and
    // one grant for the waiter, the queue's order kept.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = rt.block_on(async {
        let mut c = lab_tests::Clients::connect(b.addr, Some("alice"))
            .await
            .unwrap();
        lab_tests::crash_loop::all_events(&mut c.events)
            .await
            .unwrap()
    });
    let history =
        lab_tests::history::check_history(&events, &lab_tests::history::inventory_hosts(2));
    assert_eq!((history.requests, history.grants), (2, 2), "{history:?}");
    let (code, out, _) = lab(&b, "alice", &["--json", "lease", "list", "--all"]);
    assert_eq!(code, 0);
    let leases = json(&out);
    let leases = leases.as_array().unwrap();
    assert_eq!(leases.len(), 2, "{leases:#?}");
    assert!(agent.log_text_contains(&format!("http://{}", b.addr)));
}
