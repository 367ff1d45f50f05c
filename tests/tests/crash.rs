//! Process tests of the real `lab-server` binary and its redb store:
//! SIGKILL under load loses no acknowledged lease and TTLs keep running
//! across the restart; a crash loop (10 kills under 64 clients that resume
//! their requests by request id) loses nothing and grants nothing twice; a
//! waiting `lab lease acquire` keeps its place across a SIGKILL and gets
//! its lease; a short-TTL lease nobody renews frees its host in real time.

use lab_proto::convert::millis_from_timestamp;
use lab_proto::v1 as pb;
use lab_tests::{Clients, ServerProcess, inventory_toml};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn spawn(dir: &Path) -> ServerProcess {
    ServerProcess::spawn_dev(dir, &inventory_toml(32)).unwrap()
}

/// What a client was told about a lease.
#[derive(Debug, Clone)]
enum Acked {
    Active { expires_at: i64 },
    Ended { state: i32 },
}

#[derive(Debug, Clone)]
struct Record {
    acked: Acked,
    /// A release or renew was sent and its answer never came.
    release_in_flight: bool,
}

fn ttl(s: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s as i64,
        nanos: 0,
    })
}

async fn load(i: u64, c: Clients, log: Arc<Mutex<HashMap<String, Record>>>) {
    let mut leases = c.leases.clone();
    let mut x = i * 7919 + 1;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    loop {
        let req = pb::AcquireRequest {
            request: Some(pb::LeaseRequest {
                count: 1 + rand(2) as u32,
                ttl: ttl(3 + rand(3)),
                ..Default::default()
            }),
            no_wait: false,
            ..Default::default()
        };
        let Ok(stream) = leases.acquire(req).await else {
            return;
        };
        let mut stream = stream.into_inner();
        let lease = loop {
            match stream.message().await {
                Ok(Some(pb::AcquireUpdate {
                    update: Some(pb::acquire_update::Update::Granted(l)),
                })) => break l,
                Ok(Some(_)) => {}
                _ => return,
            }
        };
        let expires_at = millis_from_timestamp(lease.expires_at.as_ref().unwrap());
        log.lock().unwrap().insert(
            lease.id.clone(),
            Record {
                acked: Acked::Active { expires_at },
                release_in_flight: false,
            },
        );
        if rand(6) == 0 {
            // Abandoned: the holder "dies"; only the TTL frees the hosts.
            continue;
        }
        if rand(2) == 0 {
            match leases
                .renew(pb::RenewRequest {
                    lease_id: lease.id.clone(),
                    ttl: None,
                })
                .await
            {
                Ok(l) => {
                    let expires_at =
                        millis_from_timestamp(l.into_inner().expires_at.as_ref().unwrap());
                    log.lock().unwrap().get_mut(&lease.id).unwrap().acked =
                        Acked::Active { expires_at };
                }
                Err(_) => return,
            }
        }
        log.lock()
            .unwrap()
            .get_mut(&lease.id)
            .unwrap()
            .release_in_flight = true;
        match leases
            .release(pb::ReleaseRequest {
                lease_id: lease.id.clone(),
            })
            .await
        {
            Ok(l) => {
                let mut g = log.lock().unwrap();
                let r = g.get_mut(&lease.id).unwrap();
                r.acked = Acked::Ended {
                    state: l.into_inner().state,
                };
                r.release_in_flight = false;
            }
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = spawn(dir.path());
    let log = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = Clients::connect(server.addr, Some(&format!("c{i}")))
            .await
            .unwrap();
        tasks.push(tokio::spawn(load(i, c, log.clone())));
    }
    // Wait for real load, then kill in the middle of it.
    let start = Instant::now();
    while log.lock().unwrap().len() < 200 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    let killed_at = now_ms();
    for t in tasks {
        let _ = t.await;
    }
    let log = log.lock().unwrap().clone();
    assert!(
        log.len() >= 200,
        "not enough load before the kill: {} leases",
        log.len()
    );

    let server = spawn(dir.path());
    let mut c = Clients::connect(server.addr, Some("checker"))
        .await
        .unwrap();
    let mut still_active = Vec::new();
    let (mut n_active, mut n_ended) = (0, 0);
    for (id, rec) in &log {
        let l = c
            .leases
            .get_lease(pb::GetLeaseRequest {
                lease_id: id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("acknowledged lease {id} lost after SIGKILL: {s}"))
            .into_inner();
        let exp = millis_from_timestamp(l.expires_at.as_ref().unwrap());
        match rec.acked {
            Acked::Ended { state } => {
                n_ended += 1;
                assert_eq!(
                    l.state, state,
                    "lease {id}: acknowledged end not kept: {l:?}"
                );
            }
            Acked::Active { expires_at } => {
                n_active += 1;
                assert!(
                    exp >= expires_at,
                    "lease {id}: acknowledged expiry {expires_at} shortened to {exp}"
                );
                match pb::LeaseState::try_from(l.state).unwrap() {
                    pb::LeaseState::Active => {
                        assert!(
                            exp > killed_at - 1000,
                            "lease {id} should have been expired at restart: {l:?}"
                        );
                        still_active.push(id.clone());
                    }
                    pb::LeaseState::Released => {
                        assert!(
                            rec.release_in_flight,
                            "lease {id} released without a release being sent"
                        )
                    }
                    pb::LeaseState::Expired => {
                        assert!(exp <= now_ms(), "lease {id} expired before its time: {l:?}")
                    }
                    s => panic!("lease {id}: unexpected state {s:?}"),
                }
            }
        }
    }
    eprintln!(
        "{} acknowledged leases checked after SIGKILL ({n_ended} ended, {n_active} active when killed, {} still active after restart)",
        log.len(),
        still_active.len()
    );

    // The TTLs keep running: every lease left active expires (at most 5 s TTL,
    // renewed once) and every host comes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active = c
            .leases
            .list_leases(pb::ListLeasesRequest {
                include_ended: false,
                holder: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .leases;
        let hosts = c
            .hosts
            .list_hosts(pb::ListHostsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .hosts;
        if active.is_empty()
            && hosts
                .iter()
                .all(|h| h.state == pb::HostState::Available as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leases never expired after restart: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in still_active {
        let l = c
            .leases
            .get_lease(pb::GetLeaseRequest {
                lease_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(l.state, pb::LeaseState::Expired as i32, "lease {id}");
        assert_eq!(l.ended_at, l.expires_at, "lease {id} ended at its TTL");
    }
}

#[tokio::test]
async fn a_short_lease_without_renewals_frees_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn(dir.path());
    let mut c = Clients::connect(server.addr, Some("ci")).await.unwrap();
    let req = pb::AcquireRequest {
        request: Some(pb::LeaseRequest {
            hosts: vec!["h03".into()],
            ttl: ttl(2),
            ..Default::default()
        }),
        no_wait: true,
        ..Default::default()
    };
    let mut s = c.leases.acquire(req).await.unwrap().into_inner();
    let Some(pb::AcquireUpdate {
        update: Some(pb::acquire_update::Update::Granted(lease)),
    }) = s.message().await.unwrap()
    else {
        panic!("no grant")
    };
    let granted = Instant::now();
    let host = || pb::GetHostRequest { name: "h03".into() };
    assert_eq!(
        c.hosts.get_host(host()).await.unwrap().into_inner().state,
        pb::HostState::Leased as i32
    );
    loop {
        let h = c.hosts.get_host(host()).await.unwrap().into_inner();
        if h.state == pb::HostState::Available as i32 {
            break;
        }
        assert!(
            granted.elapsed() < Duration::from_secs(15),
            "host never freed: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        granted.elapsed() >= Duration::from_millis(1900),
        "freed before its TTL: {:?}",
        granted.elapsed()
    );
    let l = c
        .leases
        .get_lease(pb::GetLeaseRequest { lease_id: lease.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.state, pb::LeaseState::Expired as i32);
    let events = c
        .events
        .list_events(pb::ListEventsRequest {
            lease_id: l.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let kinds: Vec<i32> = events.iter().map(|e| e.kind).collect();
    use pb::EventKind as K;
    assert_eq!(
        kinds,
        vec![
            K::LeaseGranted as i32,
            K::LeaseExpired as i32,
            K::HostReclaiming as i32,
            K::HostAvailable as i32
        ]
    );
    assert_eq!(events[1].actor, "server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_loses_nothing_and_grants_nothing_twice() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let o = lab_tests::crash_loop::Options::default();
    let result = std::panic::AssertUnwindSafe(lab_tests::crash_loop::run(dir.path(), &o))
        .catch_unwind()
        .await;
    let report = match result {
        Ok(Ok(report)) => report,
        failed => {
            // Keep the store, the server's log and the event log.
            let kept = dir.keep();
            let why = match failed {
                Ok(Err(e)) => format!("{e:#}"),
                Err(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
                Ok(Ok(_)) => unreachable!(),
            };
            panic!(
                "{why}\n(server log, store and events.txt kept in {})",
                kept.display()
            );
        }
    };
    eprintln!("{}", report.summary());
    assert_eq!(report.kills, o.kills);
    assert_eq!(report.lost, 0);
    assert!(report.grants >= 200, "too little load: {}", report.grants);
    assert!(
        report.broken_while_queued > 0 && report.resumed_grants > 0,
        "no request was caught waiting by a kill: the loop proves little"
    );
}

/// `lab lease acquire` waiting in the queue when the server is killed: it
/// sends its request again with the same request id until the restarted
/// server answers, keeps its place (one request in the log), and gets the
/// lease when the host frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_cli_keeps_its_place_across_a_sigkill() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inventory.toml"), inventory_toml(2)).unwrap();
    // A fixed port, so the CLI finds the restarted server where it was.
    let port = lab_tests::crash_loop::free_port(now_ms() as u64).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let spawn_at = || {
        ServerProcess::spawn(
            &[
                "--dev-insecure-no-auth",
                "--listen",
                &listen,
                "--inventory",
                &dir.path().join("inventory.toml").to_string_lossy(),
                "--data-dir",
                &dir.path().join("data").to_string_lossy(),
            ],
            &dir.path().join("server.log"),
        )
        .unwrap()
    };
    let mut server = spawn_at();
    let mut holder = Clients::connect(server.addr, Some("holder")).await.unwrap();
    let held = holder
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h00".into()],
            ttl: ttl(600),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut cli = Command::new(lab_tests::bin_path("lab"))
        .args([
            "--json", "lease", "acquire", "--host", "h00", "--ttl", "10m",
        ])
        .env("LAB_SERVER", format!("http://{listen}"))
        .env("LAB_TOKEN", "waiter")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = cli.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = || {
        lines_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a line from lab on stderr")
    };
    let first = next_line();
    assert!(first.starts_with("waiting: position 1 of 1"), "{first}");

    server.kill();
    let lost = next_line();
    assert!(
        lost.starts_with("lab: lost the request's stream ("),
        "{lost}"
    );
    let server = spawn_at();
    let back = next_line();
    assert_eq!(back, "lab: the request is back with the server");
    let again = next_line();
    assert!(again.starts_with("waiting: position 1 of 1"), "{again}");

    let mut holder = Clients::connect(server.addr, Some("holder")).await.unwrap();
    holder
        .leases
        .release(pb::ReleaseRequest {
            lease_id: held.id.clone(),
        })
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lease: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(lease["holder"], "waiter");
    assert_eq!(lease["hosts"], serde_json::json!(["h00"]));

    // One request in the log, granted once.
    let events = holder
        .events
        .list_events(pb::ListEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    let mine: Vec<(i32, u64)> = events
        .iter()
        .filter(|e| e.actor == "waiter")
        .map(|e| (e.kind, e.waiter_id))
        .collect();
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert_eq!(mine[0].0, pb::EventKind::LeaseRequested as i32);
    assert_eq!(mine[1], (pb::EventKind::LeaseGranted as i32, mine[0].1));
}
