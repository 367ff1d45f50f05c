//! 64 concurrent clients hammer 8 hosts with acquire/renew/release (single
//! and multi-host requests, priorities, flags, no-wait), over gRPC against a
//! server with the durable store. A checker then replays the server's event
//! log and proves: no host ever had two holders, and every grant respected
//! the documented queue order (a waiter is only granted hosts that no
//! earlier waiting request could use). The clients' own observations are
//! checked too: the intervals in which they believed they held a host never
//! overlap.

use lab_proto::v1 as pb;
use lab_tests::{Clients, InProcessServer, ServerOptions};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const ROUNDS: usize = 30;
const HOSTS: usize = 8;

/// Deterministic per-client pseudo-random numbers (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone)]
struct Held {
    host: String,
    client: usize,
    from: Instant,
    to: Instant,
}

fn host_flags(name: &str) -> Vec<&'static str> {
    let i: usize = name[1..].parse().unwrap();
    if i.is_multiple_of(4) {
        vec!["iommu"]
    } else {
        vec![]
    }
}

fn request(rng: &mut Rng) -> pb::LeaseRequest {
    let mut r = pb::LeaseRequest {
        count: 1,
        ttl: Some(prost_types::Duration {
            seconds: 120,
            nanos: 0,
        }),
        priority: rng.below(3) as i32,
        ..Default::default()
    };
    match rng.below(10) {
        0 | 1 => r.count = 2,
        2 => r.count = 3,
        3 => r.flags = vec!["iommu".into()],
        4 => {
            let a = rng.below(HOSTS as u64);
            let b = (a + 1 + rng.below(HOSTS as u64 - 1)) % HOSTS as u64;
            r.hosts = vec![format!("h{a:02}"), format!("h{b:02}")];
            r.count = 1 + rng.below(2) as u32;
        }
        _ => {}
    }
    r
}

async fn client(i: usize, c: Clients, held: Arc<Mutex<Vec<Held>>>, ops: Arc<Mutex<usize>>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 0x1000_0001));
    let mut leases = c.leases.clone();
    let mut n = 0;
    for _ in 0..ROUNDS {
        let no_wait = rng.below(8) == 0;
        let req = pb::AcquireRequest {
            request: Some(request(&mut rng)),
            no_wait,
            ..Default::default()
        };
        n += 1;
        let mut stream = match leases.acquire(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => panic!("client {i}: acquire refused at once: {s}"),
        };
        let lease = loop {
            match stream.message().await {
                Ok(Some(pb::AcquireUpdate {
                    update: Some(pb::acquire_update::Update::Granted(l)),
                })) => break Some(l),
                Ok(Some(_)) => continue,
                Ok(None) => panic!("client {i}: stream ended without a grant"),
                Err(s) if no_wait && s.code() == tonic::Code::ResourceExhausted => break None,
                Err(s) => panic!("client {i}: acquire failed: {s}"),
            }
        };
        let Some(lease) = lease else { continue };
        let from = Instant::now();
        // Hold a little while, sometimes renewing.
        tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
        if rng.below(3) == 0 {
            n += 1;
            leases
                .renew(pb::RenewRequest {
                    lease_id: lease.id.clone(),
                    ttl: None,
                })
                .await
                .unwrap_or_else(|s| panic!("client {i}: renew: {s}"));
        }
        let to = Instant::now();
        n += 1;
        let released = leases
            .release(pb::ReleaseRequest {
                lease_id: lease.id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("client {i}: release: {s}"))
            .into_inner();
        assert_eq!(released.state, pb::LeaseState::Released as i32);
        let mut h = held.lock().unwrap();
        for host in lease.hosts {
            h.push(Held {
                host,
                client: i,
                from,
                to,
            });
        }
    }
    *ops.lock().unwrap() += n;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Free,
    Held,
    Reclaiming,
}

struct WaitingReq {
    priority: i32,
    req: pb::LeaseRequest,
}

fn could_use(req: &pb::LeaseRequest, host: &str) -> bool {
    let flags = host_flags(host);
    req.flags.iter().all(|f| flags.contains(&f.as_str()))
        && (req.hosts.is_empty() || req.hosts.iter().any(|h| h == host))
}

/// Replays the event log; panics with the offending event on any violation.
fn check_history(events: &[pb::Event]) -> (usize, usize) {
    use pb::EventKind as K;
    let mut slots: BTreeMap<String, (Slot, String)> = (0..HOSTS)
        .map(|i| (format!("h{i:02}"), (Slot::Free, String::new())))
        .collect();
    let mut waiting: BTreeMap<(i32, u64), WaitingReq> = BTreeMap::new(); // key: (-priority, waiter)
    let mut keys: HashMap<u64, (i32, u64)> = HashMap::new();
    let mut grants = 0;
    let mut order_checks = 0;
    let mut last_seq = 0;
    for e in events {
        assert_eq!(e.seq, last_seq + 1, "event log has a gap before {e:?}");
        last_seq = e.seq;
        match K::try_from(e.kind).unwrap() {
            K::LeaseRequested => {
                let req = e.request.clone().expect("request recorded");
                let key = (-req.priority, e.waiter_id);
                keys.insert(e.waiter_id, key);
                waiting.insert(
                    key,
                    WaitingReq {
                        priority: req.priority,
                        req,
                    },
                );
            }
            K::RequestWithdrawn => {
                let key = keys
                    .remove(&e.waiter_id)
                    .expect("withdrawn waiter was waiting");
                waiting.remove(&key);
            }
            K::LeaseGranted => {
                grants += 1;
                let key = keys
                    .remove(&e.waiter_id)
                    .unwrap_or_else(|| panic!("grant to unknown waiter: {e:?}"));
                let me = waiting.remove(&key).unwrap();
                assert_eq!(
                    e.hosts.len(),
                    me.req.count.max(1) as usize,
                    "wrong host count: {e:?}"
                );
                for h in &e.hosts {
                    assert!(
                        could_use(&me.req, h),
                        "granted a host the request cannot use: {e:?}"
                    );
                    let slot = slots.get_mut(h).unwrap();
                    assert_eq!(
                        slot.0,
                        Slot::Free,
                        "host {h} granted while {:?} by {}: {e:?}",
                        slot.0,
                        slot.1
                    );
                    *slot = (Slot::Held, e.lease_id.clone());
                }
                // Order: no earlier waiter still waiting could have used any granted host.
                for (k, other) in waiting.range(..key) {
                    order_checks += 1;
                    for h in &e.hosts {
                        assert!(
                            !could_use(&other.req, h),
                            "waiter {} (priority {}) was granted {h}, which earlier waiter {} (priority {}) could use: {e:?}",
                            e.waiter_id,
                            me.priority,
                            k.1,
                            other.priority
                        );
                    }
                }
            }
            K::LeaseReleased | K::LeaseExpired => {
                for h in &e.hosts {
                    let slot = slots.get_mut(h).unwrap();
                    assert_eq!(
                        *slot,
                        (Slot::Held, e.lease_id.clone()),
                        "host {h} ended a lease it did not hold: {e:?}"
                    );
                    slot.0 = Slot::Reclaiming;
                }
            }
            K::HostAvailable => {
                for h in &e.hosts {
                    let slot = slots.get_mut(h).unwrap();
                    assert_eq!(
                        slot.0,
                        Slot::Reclaiming,
                        "host {h} available without reclaim: {e:?}"
                    );
                    *slot = (Slot::Free, String::new());
                }
            }
            _ => {}
        }
    }
    assert!(
        waiting.is_empty(),
        "requests neither granted nor withdrawn: {:?}",
        waiting.keys().collect::<Vec<_>>()
    );
    (grants, order_checks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_never_share_a_host_and_respect_queue_order() {
    let server = InProcessServer::start(ServerOptions {
        hosts: HOSTS,
        ..Default::default()
    })
    .await
    .unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let ops = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let c = Clients::connect(server.addr, Some(&format!("client{i}")))
            .await
            .unwrap();
        tasks.push(tokio::spawn(client(i, c, held.clone(), ops.clone())));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let ops = *ops.lock().unwrap();

    // Client-side view: no two clients believed they held the same host at once.
    let mut by_host: BTreeMap<String, Vec<Held>> = BTreeMap::new();
    for h in held.lock().unwrap().iter() {
        by_host.entry(h.host.clone()).or_default().push(h.clone());
    }
    for (host, mut v) in by_host {
        v.sort_by_key(|h| h.from);
        for w in v.windows(2) {
            assert!(
                w[0].to <= w[1].from,
                "clients {} and {} both held {host}",
                w[0].client,
                w[1].client
            );
        }
    }

    // Server-side view: replay the whole event log (let the last reclaims land first).
    let mut c = server.clients("checker").await.unwrap();
    let mut events = Vec::new();
    for _ in 0..100 {
        events.clear();
        let mut after = 0;
        loop {
            let page = c
                .events
                .list_events(pb::ListEventsRequest {
                    after_seq: after,
                    limit: 10_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .events;
            let Some(last) = page.last() else { break };
            after = last.seq;
            events.extend(page);
        }
        let hosts = c
            .hosts
            .list_hosts(pb::ListHostsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .hosts;
        if hosts
            .iter()
            .all(|h| h.state == pb::HostState::Available as i32)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (grants, order_checks) = check_history(&events);
    eprintln!(
        "{ops} client operations ({grants} grants, {} events, {order_checks} order checks) by {CLIENTS} clients in {elapsed:?}",
        events.len()
    );
    assert!(
        ops >= 2_000,
        "the run must be several thousand operations, was {ops}"
    );
    assert!(grants >= CLIENTS * ROUNDS / 2);
    server.stop().await;
}

/// The checker itself must catch violations (a checker that cannot fail
/// proves nothing).
#[test]
fn checker_catches_double_grant_and_queue_jumping() {
    fn ev(
        seq: u64,
        kind: pb::EventKind,
        hosts: &[&str],
        lease: &str,
        waiter: u64,
        req: Option<pb::LeaseRequest>,
    ) -> pb::Event {
        pb::Event {
            seq,
            kind: kind as i32,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            lease_id: lease.into(),
            waiter_id: waiter,
            request: req,
            ..Default::default()
        }
    }
    use pb::EventKind as K;
    let one = || {
        Some(pb::LeaseRequest {
            count: 1,
            ..Default::default()
        })
    };
    let double = vec![
        ev(1, K::LeaseRequested, &[], "", 1, one()),
        ev(2, K::LeaseGranted, &["h01"], "a", 1, None),
        ev(3, K::LeaseRequested, &[], "", 2, one()),
        ev(4, K::LeaseGranted, &["h01"], "b", 2, None),
    ];
    assert!(std::panic::catch_unwind(|| check_history(&double)).is_err());
    let jump = vec![
        ev(
            1,
            K::LeaseRequested,
            &[],
            "",
            1,
            Some(pb::LeaseRequest {
                count: 2,
                ..Default::default()
            }),
        ),
        ev(2, K::LeaseRequested, &[], "", 2, one()),
        ev(3, K::LeaseGranted, &["h01"], "b", 2, None),
        ev(4, K::RequestWithdrawn, &[], "", 1, None),
    ];
    assert!(std::panic::catch_unwind(|| check_history(&jump)).is_err());
    let fine = vec![
        ev(
            1,
            K::LeaseRequested,
            &[],
            "",
            1,
            Some(pb::LeaseRequest {
                count: 1,
                flags: vec!["iommu".into()],
                ..Default::default()
            }),
        ),
        ev(2, K::LeaseRequested, &[], "", 2, one()),
        ev(3, K::LeaseGranted, &["h01"], "b", 2, None),
        ev(4, K::LeaseReleased, &["h01"], "b", 0, None),
        ev(5, K::HostAvailable, &["h01"], "b", 0, None),
        ev(6, K::LeaseGranted, &["h00"], "a", 1, None),
    ];
    check_history(&fine);
}
