//! 64 concurrent clients hammer 8 hosts with acquire/renew/release (single
//! and multi-host requests, priorities, flags, no-wait), over gRPC against a
//! server with the durable store. The history checker
//! (`lab_tests::history`, whose own test shows it catches violations) then
//! replays the server's event log and proves: no host ever had two holders,
//! every grant respected the documented queue order (a waiter is only
//! granted hosts that no earlier waiting request could use), and every
//! waiter was granted at most once. The clients' own observations are
//! checked too: the intervals in which they believed they held a host never
//! overlap.

use lab_proto::v1 as pb;
use lab_tests::history::{check_history, inventory_hosts};
use lab_tests::{Clients, InProcessServer, ServerOptions};
use std::collections::BTreeMap;
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
    let h = check_history(&events, &inventory_hosts(HOSTS));
    let (grants, order_checks) = (h.grants, h.order_checks);
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
