//! 64 concurrent clients hammer 8 hosts with acquire/renew/release (single
//! and multi-host requests, priorities, flags, no-wait), over gRPC against a
//! server with the durable store; once without a policy, once with the
//! clients in three projects of unequal shares, two of them with a
//! `max_hosts` below the inventory's size, and one request in ten
//! preemptible. The history checker (`lab_tests::history`, whose own test
//! shows it catches violations) then replays the server's event log and
//! proves: no host ever had two holders, every grant respected the
//! documented queue order (a waiter is only granted hosts that no earlier
//! waiting request could use), and every waiter was granted at most once;
//! with the policy, no project ever held more than its `max_hosts`,
//! waiters held back by a quota reserved nothing, the order held wherever
//! fair share leaves it known (priority first; within a project, arrival;
//! preemptible requests last), and preemption notices went only to
//! preemptible leases, for a waiter that could use their hosts, and were
//! not followed by renewals. The clients' own observations are checked
//! too: the intervals in which they believed they held a host never
//! overlap.

use lab_proto::v1 as pb;
use lab_server::types::Role;
use lab_tests::history::{History, Quotas, check_history, check_history_with, inventory_hosts};
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

/// One client's rounds; with `spot`, one request in ten is preemptible
/// (given up after 1 s of waiting; its renewal may be refused once its
/// lease is noticed).
async fn client(
    i: usize,
    c: Clients,
    held: Arc<Mutex<Vec<Held>>>,
    ops: Arc<Mutex<usize>>,
    spot: bool,
) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 0x1000_0001));
    let mut leases = c.leases.clone();
    let mut n = 0;
    for _ in 0..ROUNDS {
        let no_wait = rng.below(8) == 0;
        let mut request = request(&mut rng);
        request.preemptible = spot && rng.below(10) == 0;
        let preemptible = request.preemptible;
        // With bookings, one request in four accepts a lease shortened to
        // fit before one (it may then run out before it is released).
        if spot && rng.below(4) == 0 {
            request.min_ttl = Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            });
        }
        let shortened = request.min_ttl.is_some();
        // A preemptible request waits behind every other: it is given up
        // (withdrawn) after a moment, so that it does not hold its client
        // until the others are done; a grant it might get as it goes
        // expires soon.
        let give_up =
            preemptible.then(|| tokio::time::Instant::now() + Duration::from_millis(1000));
        if preemptible {
            request.ttl = Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            });
        }
        let req = pb::AcquireRequest {
            request: Some(request),
            no_wait,
            ..Default::default()
        };
        n += 1;
        let mut stream = match leases.acquire(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => panic!("client {i}: acquire refused at once: {s}"),
        };
        let lease = loop {
            let next = match give_up {
                Some(at) => match tokio::time::timeout_at(at, stream.message()).await {
                    Ok(m) => m,
                    Err(_) => break None,
                },
                None => stream.message().await,
            };
            match next {
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
            match leases
                .renew(pb::RenewRequest {
                    lease_id: lease.id.clone(),
                    ttl: None,
                })
                .await
            {
                Ok(_) => {}
                Err(s) if preemptible && s.message().contains("being preempted") => {}
                Err(s) => panic!("client {i}: renew: {s}"),
            }
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
        let ended_as_expected = released.state == pb::LeaseState::Released as i32
            || (shortened && released.state == pb::LeaseState::Expired as i32);
        assert!(ended_as_expected, "client {i}: {released:?}");
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

/// The 64 clients' run against a fresh server with `policy` (and some
/// preemptible requests, bookings and requests that accept a shortened
/// lease with `spot`), then the whole event log (once every host is
/// available again).
async fn run(policy: Option<String>, spot: bool) -> (usize, Duration, Vec<pb::Event>) {
    let server = InProcessServer::start(ServerOptions {
        hosts: HOSTS,
        policy,
        ..Default::default()
    })
    .await
    .unwrap();
    if spot {
        // Bookings of h04..h07 starting one after the other in the first
        // seconds of the run, a second each: their requests jump the
        // queue, and requests that accept less get leases until their
        // start.
        for (n, host) in (4..8).enumerate() {
            let mut c = server.clients(&format!("booker{n}")).await.unwrap();
            let start = std::time::SystemTime::now() + Duration::from_secs(2 + n as u64);
            c.leases
                .create_booking(pb::CreateBookingRequest {
                    hosts: vec![format!("h{host:02}")],
                    start: Some(lab_proto::convert::system_time_to_proto(start)),
                    duration: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let held = Arc::new(Mutex::new(Vec::new()));
    let ops = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let c = Clients::connect(server.addr, Some(&format!("client{i}")))
            .await
            .unwrap();
        tasks.push(tokio::spawn(client(i, c, held.clone(), ops.clone(), spot)));
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

    // Server-side view: the whole event log (let the last reclaims land first).
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
    server.stop().await;
    (ops, elapsed, events)
}

fn report(what: &str, ops: usize, elapsed: Duration, events: usize, h: &History) {
    eprintln!(
        "{what}: {ops} client operations ({} grants, {events} events, {} order checks, {} held back, {} grants among projects, quota reached {} times) by {CLIENTS} clients in {elapsed:?}",
        h.grants, h.order_checks, h.held_back, h.fair_share_grants, h.quota_reached
    );
    assert!(
        ops >= 2_000,
        "the run must be several thousand operations, was {ops}"
    );
    assert!(h.grants >= CLIENTS * ROUNDS / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_never_share_a_host_and_respect_queue_order() {
    let (ops, elapsed, events) = run(None, false).await;
    let h = check_history(&events, &inventory_hosts(HOSTS));
    report("no policy", ops, elapsed, events.len(), &h);
}

/// Clients 0–31 in `ci` (share 3), 32–47 in `people` (share 1, at most 3
/// hosts), the rest in `default` (share 0.5, at most 5 hosts); each
/// operator at most 3 hosts (the most one request asks for: it never binds,
/// each client holds one lease at a time).
fn policy() -> String {
    let members = |r: std::ops::Range<usize>| {
        r.map(|i| format!("\"client{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[role.operator]\nmax_hosts = 3\n\n\
         [[project]]\nname = \"ci\"\nshare = 3\nmembers = [{}]\n\n\
         [[project]]\nname = \"people\"\nmembers = [{}]\nmax_hosts = 3\n\n\
         [[project]]\nname = \"default\"\nshare = 0.5\nmax_hosts = 5\n",
        members(0..32),
        members(32..48)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_in_three_projects_keep_quotas_and_queue_order() {
    let text = policy();
    let quotas = Quotas::parse(&text, Some(Role::Operator)).unwrap();
    let (ops, elapsed, events) = run(Some(text), true).await;
    let h = check_history_with(&events, &inventory_hosts(HOSTS), Some(&quotas));
    report("three projects", ops, elapsed, events.len(), &h);
    eprintln!(
        "{} preemption notices checked (preemptible requests are given up after 1 s); {} bookings started, {} booking grants",
        h.preemptions, h.bookings_started, h.booking_grants
    );
    // The checks were not vacuous: quotas were reached and held waiters
    // back, grants were made while other projects waited, and bookings
    // began and got their hosts.
    assert!(h.quota_reached > 0 && h.held_back > 0, "{h:?}");
    assert!(h.bookings_started == 4 && h.booking_grants > 0, "{h:?}");
    assert!(h.fair_share_grants > 0, "{h:?}");
}
