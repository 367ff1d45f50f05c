//! Process tests of the real `lab-server` binary and its redb store:
//! SIGKILL under load loses no acknowledged lease and TTLs keep running
//! across the restart; a short-TTL lease nobody renews frees its host in
//! real time.

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
