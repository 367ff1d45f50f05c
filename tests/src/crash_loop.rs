//! The crash loop: the real `lab-server` killed with SIGKILL at random
//! moments, again and again, under many clients of mixed load, then
//! everything the clients were told checked against what the server kept.
//!
//! Each client (its own principal and connection) loops: acquire (one to
//! three hosts, flags, host lists, priorities, a `no_wait` now and then,
//! always with a fresh request id), hold a few milliseconds, sometimes
//! renew, release — or abandon the lease to its TTL (2–4 s). When a call
//! fails because the server went away, the client does what the `lab` CLI
//! does: it sends the same request again (same request id) with backoff
//! until the restarted server answers, so a waiting request resumes its
//! place and a request granted before the kill gets its lease. Releases
//! and renewals are retried too.
//!
//! After the last kill the clients finish their current request, every
//! lease runs out, and the checks are:
//! - **nothing acknowledged is lost**: every lease a client was granted
//!   exists, an acknowledged release is kept, an acknowledged expiry is not
//!   shortened;
//! - **no double grants**: the history checker ([`crate::history`]) over
//!   the whole event log, across every restart;
//! - **every request granted at most once**: each request id got one lease
//!   (asking again returned the same one), and each principal holds
//!   exactly the leases its client was told of.
//!
//! Used by `tests/tests/crash.rs` (10 kills) and the `crash-loop`
//! benchmark (100 kills, figures printed).

use crate::history::{History, check_history, inventory_hosts};
use crate::{Bearer, ServerProcess, inventory_toml};
use anyhow::{Context, Result, bail, ensure};
use lab_proto::convert::millis_from_timestamp;
use lab_proto::v1 as pb;
use lab_proto::v1::event_service_client::EventServiceClient;
use lab_proto::v1::host_service_client::HostServiceClient;
use lab_proto::v1::lease_service_client::LeaseServiceClient;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub kills: usize,
    pub clients: usize,
    pub hosts: usize,
    /// The server runs a random time in this range between kills.
    pub uptime: (Duration, Duration),
    pub seed: u64,
    /// Run lab-server on this etcd (client URLs, comma-separated) instead
    /// of redb. A restarted server is then a standby until the killed
    /// one's election lease runs out; the loop waits until the clients
    /// are acknowledged again before the next uptime.
    pub etcd: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kills: 10,
            clients: 64,
            hosts: 16,
            uptime: (Duration::from_millis(300), Duration::from_millis(2500)),
            seed: 1,
            etcd: None,
        }
    }
}

/// What was done and checked.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub kills: usize,
    /// Acquire requests (request ids) the clients made.
    pub requests: usize,
    /// Leases granted to the clients.
    pub grants: usize,
    /// Grants a client received only after its stream broke (the request
    /// was resumed, or found granted, by its request id).
    pub resumed_grants: usize,
    /// Requests whose stream broke while they waited in the queue.
    pub broken_while_queued: usize,
    pub refused_no_wait: usize,
    pub releases: usize,
    pub abandoned: usize,
    /// Acknowledged leases checked after the last restart.
    pub checked_leases: usize,
    pub lost: usize,
    pub history: History,
    /// Time from spawn to "listening" of each restart.
    pub restarts: Vec<Duration>,
    /// With etcd: time from each kill to the next acknowledged grant or
    /// release (writes resumed).
    pub resumed: Vec<Duration>,
    pub elapsed: Duration,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Deterministic pseudo-random numbers (xorshift).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span.max(1)))
    }
}

/// A free TCP port below the ephemeral range, for a server restarted on
/// the same address: no outgoing connection of its clients (which take
/// ephemeral ports) can take it while the server is down. `seed` picks
/// where to look.
pub fn free_port(seed: u64) -> Result<u16> {
    let rng = &mut Rng::new(seed ^ u64::from(std::process::id()));
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    ensure!(
        low > 12_000,
        "the ephemeral port range starts too low ({low})"
    );
    for _ in 0..200 {
        let port = 10_000 + rng.below(u64::from(low) - 11_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found below {low}")
}

/// What a client was told about a lease.
#[derive(Debug, Clone)]
enum Acked {
    Active { expires_at: i64 },
    Ended { state: i32 },
}

#[derive(Debug, Clone)]
struct Record {
    client: usize,
    acked: Acked,
    /// A release was sent and its answer never came.
    release_in_flight: bool,
}

#[derive(Default)]
struct Book {
    leases: HashMap<String, Record>,
    /// Request id → the lease it got.
    requests: HashMap<String, String>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicUsize,
    resumed: AtomicUsize,
    broken_queued: AtomicUsize,
    refused: AtomicUsize,
    releases: AtomicUsize,
    abandoned: AtomicUsize,
    /// Grants and releases acknowledged.
    acked: AtomicUsize,
}

type Leases = LeaseServiceClient<InterceptedService<Channel, Bearer>>;

/// The server went away (or is not back yet): try again.
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

/// Retry `f` on transient errors with backoff, for at most 60 s.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(50);
    loop {
        match f().await {
            Err(s) if transient(&s) && Instant::now() < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(s) if transient(&s) => panic!("{what}: the server did not come back: {s}"),
            r => return r,
        }
    }
}

fn request(rng: &mut Rng, hosts: usize) -> pb::LeaseRequest {
    let mut r = pb::LeaseRequest {
        count: 1,
        ttl: Some(prost_types::Duration {
            seconds: 2 + rng.below(3) as i64,
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
            let a = rng.below(hosts as u64);
            let b = (a + 1 + rng.below(hosts as u64 - 1)) % hosts as u64;
            r.hosts = vec![format!("h{a:02}"), format!("h{b:02}")];
            r.count = 1 + rng.below(2) as u32;
        }
        _ => {}
    }
    r
}

/// One request until it is granted (`None`: a `no_wait` refusal), sent
/// again with its request id whenever the stream breaks.
async fn acquire(
    leases: &mut Leases,
    req: pb::AcquireRequest,
    counters: &Counters,
) -> Option<(pb::Lease, bool)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut broke = false;
    let mut delay = Duration::from_millis(50);
    loop {
        assert!(
            Instant::now() < deadline,
            "request {} never answered",
            req.request_id
        );
        let mut queued = false;
        match leases.acquire(req.clone()).await {
            Ok(s) => {
                let mut stream = s.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(pb::AcquireUpdate {
                            update: Some(pb::acquire_update::Update::Granted(l)),
                        })) => return Some((l, broke)),
                        Ok(Some(_)) => queued = true,
                        Ok(None) => break,
                        Err(s) if req.no_wait && s.code() == Code::ResourceExhausted => {
                            return None;
                        }
                        Err(s) if transient(&s) => break,
                        Err(s) => panic!("request {}: {s}", req.request_id),
                    }
                }
            }
            Err(s) if transient(&s) => {}
            Err(s) => panic!("request {} refused: {s}", req.request_id),
        }
        if queued && !broke {
            counters.broken_queued.fetch_add(1, Ordering::Relaxed);
        }
        broke = true;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

#[allow(clippy::too_many_arguments)]
async fn client(
    i: usize,
    mut leases: Leases,
    hosts: usize,
    seed: u64,
    book: Arc<Mutex<Book>>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let mut rng = Rng::new(seed ^ ((i as u64 + 1) << 20));
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let request_id = format!("c{i}-{n}");
        let req = pb::AcquireRequest {
            request: Some(request(&mut rng, hosts)),
            no_wait: rng.below(8) == 0,
            request_id: request_id.clone(),
        };
        let Some((lease, resumed)) = acquire(&mut leases, req, &counters).await else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        counters.acked.fetch_add(1, Ordering::Relaxed);
        if resumed {
            counters.resumed.fetch_add(1, Ordering::Relaxed);
        }
        let expires_at = millis_from_timestamp(lease.expires_at.as_ref().unwrap());
        {
            let mut b = book.lock().unwrap();
            if let Some(prev) = b.requests.insert(request_id.clone(), lease.id.clone()) {
                panic!(
                    "request {request_id} was granted twice: {prev} and {}",
                    lease.id
                );
            }
            b.leases.insert(
                lease.id.clone(),
                Record {
                    client: i,
                    acked: Acked::Active { expires_at },
                    release_in_flight: false,
                },
            );
        }
        tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
        if rng.below(10) == 0 {
            // Abandoned: only the TTL frees the hosts.
            counters.abandoned.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if rng.below(3) == 0 {
            let req = pb::RenewRequest {
                lease_id: lease.id.clone(),
                ttl: None,
            };
            // Not retried: a renewal whose answer was lost may or may not
            // have been applied, which the check allows (the expiry only
            // grows).
            if let Ok(l) = leases.renew(req).await {
                let expires_at = millis_from_timestamp(l.get_ref().expires_at.as_ref().unwrap());
                book.lock()
                    .unwrap()
                    .leases
                    .get_mut(&lease.id)
                    .unwrap()
                    .acked = Acked::Active { expires_at };
            }
        }
        book.lock()
            .unwrap()
            .leases
            .get_mut(&lease.id)
            .unwrap()
            .release_in_flight = true;
        let id = lease.id.clone();
        let released = retry("release", || {
            let mut leases = leases.clone();
            let lease_id = id.clone();
            async move { leases.release(pb::ReleaseRequest { lease_id }).await }
        })
        .await;
        let state = match released {
            Ok(l) => {
                counters.releases.fetch_add(1, Ordering::Relaxed);
                counters.acked.fetch_add(1, Ordering::Relaxed);
                l.into_inner().state
            }
            // Released by the attempt whose answer was lost, or expired.
            Err(s) if s.code() == Code::FailedPrecondition => {
                let l = retry("get lease", || {
                    let mut leases = leases.clone();
                    let lease_id = id.clone();
                    async move { leases.get_lease(pb::GetLeaseRequest { lease_id }).await }
                })
                .await
                .unwrap_or_else(|s| panic!("lease {id} lost: {s}"));
                l.into_inner().state
            }
            Err(s) => panic!("release of {id}: {s}"),
        };
        let mut b = book.lock().unwrap();
        let r = b.leases.get_mut(&lease.id).unwrap();
        r.acked = Acked::Ended { state };
        r.release_in_flight = false;
    }
}

fn spawn(dir: &Path, port: u16, etcd: Option<&str>) -> Result<ServerProcess> {
    let inv = dir.join("inventory.toml");
    let data = dir.join("data");
    let listen = format!("127.0.0.1:{port}");
    let (inv, data) = (inv.to_string_lossy(), data.to_string_lossy());
    let mut args = vec![
        "--dev-insecure-no-auth",
        "--listen",
        &listen,
        "--web-listen",
        "127.0.0.1:0",
        "--inventory",
        &inv,
    ];
    match etcd {
        None => args.extend(["--data-dir", &data]),
        Some(endpoints) => args.extend(["--store", "etcd", "--etcd-endpoints", endpoints]),
    }
    ServerProcess::spawn(&args, &dir.join("server.log"))
}

/// Every event of the log, page by page.
pub async fn all_events(
    events: &mut EventServiceClient<InterceptedService<Channel, Bearer>>,
) -> Result<Vec<pb::Event>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = events
            .list_events(pb::ListEventsRequest {
                limit: 10_000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

/// Every lease (active and ended) of `holder` (all when empty), page by page.
pub async fn all_leases(leases: &mut Leases, holder: &str) -> Result<Vec<pb::Lease>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = leases
            .list_leases(pb::ListLeasesRequest {
                include_ended: true,
                holder: holder.to_owned(),
                page_size: 1000,
                page_token: page_token.clone(),
            })
            .await?
            .into_inner();
        out.extend(page.leases);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

/// Run the loop in `dir` (a fresh directory) and check the outcome; an
/// error or a panic names what was lost or granted twice.
pub async fn run(dir: &Path, o: &Options) -> Result<Report> {
    let started = Instant::now();
    let mut rng = Rng::new(o.seed);
    std::fs::write(dir.join("inventory.toml"), inventory_toml(o.hosts))?;
    let port = free_port(o.seed)?;
    let etcd = o.etcd.as_deref();
    let mut server = spawn(dir, port, etcd)?;
    let url = format!("http://127.0.0.1:{port}");
    let channel = |who: &str| -> Result<(Channel, Bearer)> {
        let channel = Endpoint::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        let bearer = Bearer(Some(format!("Bearer {who}").parse().expect("ascii")));
        Ok((channel, bearer))
    };
    let book = Arc::new(Mutex::new(Book::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let mut tasks = Vec::new();
    for i in 0..o.clients {
        let (ch, bearer) = channel(&format!("c{i}"))?;
        let leases = LeaseServiceClient::with_interceptor(ch, bearer);
        tasks.push(tokio::spawn(client(
            i,
            leases,
            o.hosts,
            o.seed,
            book.clone(),
            stop.clone(),
            counters.clone(),
        )));
    }

    let mut report = Report::default();
    for _ in 0..o.kills {
        tokio::time::sleep(rng.between(o.uptime.0, o.uptime.1)).await;
        let acked = counters.acked.load(Ordering::Relaxed);
        server.kill();
        report.kills += 1;
        let t = Instant::now();
        server = spawn(dir, port, etcd).context("restart after SIGKILL")?;
        report.restarts.push(t.elapsed());
        if etcd.is_some() {
            // The restarted server leads once the killed one's election
            // lease has run out: wait for the clients to be answered.
            while counters.acked.load(Ordering::Relaxed) == acked {
                ensure!(
                    t.elapsed() < Duration::from_secs(60),
                    "no grant or release acknowledged within 60 s of a kill"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            report.resumed.push(t.elapsed());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .context("a client did not finish")??;
    }

    // Every lease runs out (TTLs of at most 4 s, renewed at most once).
    let (ch, bearer) = channel("checker")?;
    let mut leases = LeaseServiceClient::with_interceptor(ch.clone(), bearer.clone());
    let mut hosts = HostServiceClient::with_interceptor(ch.clone(), bearer.clone());
    let mut events = EventServiceClient::with_interceptor(ch, bearer);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let active = leases
            .list_leases(pb::ListLeasesRequest::default())
            .await?
            .into_inner()
            .leases;
        let all = hosts
            .list_hosts(pb::ListHostsRequest::default())
            .await?
            .into_inner()
            .hosts;
        if active.is_empty()
            && all
                .iter()
                .all(|h| h.state == pb::HostState::Available as i32)
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "leases never ran out after the last restart: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No double grants, the queue order, every waiter granted at most once,
    // no request left waiting: over the whole log, across every restart.
    let log = all_events(&mut events).await?;
    ensure!(
        log.first().map(|e| e.seq) == Some(1),
        "the log must start at 1"
    );
    let hosts = inventory_hosts(o.hosts);
    match std::panic::catch_unwind(|| check_history(&log, &hosts)) {
        Ok(h) => report.history = h,
        Err(panic) => {
            // Keep the log for the post-mortem.
            let text: String = log.iter().map(|e| format!("{e:?}\n")).collect();
            let _ = std::fs::write(dir.join("events.txt"), text);
            std::panic::resume_unwind(panic);
        }
    }

    // Nothing acknowledged is lost.
    let book = std::mem::take(&mut *book.lock().unwrap());
    let now = now_ms();
    for (id, rec) in &book.leases {
        let l = match leases
            .get_lease(pb::GetLeaseRequest {
                lease_id: id.clone(),
            })
            .await
        {
            Ok(l) => l.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                report.lost += 1;
                eprintln!("acknowledged lease {id} lost");
                continue;
            }
            Err(s) => bail!("get lease {id}: {s}"),
        };
        report.checked_leases += 1;
        let exp = millis_from_timestamp(l.expires_at.as_ref().unwrap());
        match rec.acked {
            Acked::Ended { state } => ensure!(
                l.state == state,
                "lease {id}: acknowledged end not kept: {l:?}"
            ),
            Acked::Active { expires_at } => {
                ensure!(
                    exp >= expires_at,
                    "lease {id}: acknowledged expiry {expires_at} shortened to {exp}"
                );
                match pb::LeaseState::try_from(l.state)? {
                    pb::LeaseState::Released => ensure!(
                        rec.release_in_flight,
                        "lease {id} released without a release being sent"
                    ),
                    pb::LeaseState::Expired => {
                        ensure!(exp <= now, "lease {id} expired before its time: {l:?}")
                    }
                    s => bail!("lease {id}: {s:?} after every TTL ran out"),
                }
            }
        }
    }
    ensure!(report.lost == 0, "{} acknowledged leases lost", report.lost);

    // Each principal holds exactly the leases its client was told of: a
    // lease more would be a second grant of one request, or a grant
    // nobody heard of.
    let mut told: HashMap<usize, HashSet<&str>> = HashMap::new();
    for (id, rec) in &book.leases {
        told.entry(rec.client).or_default().insert(id.as_str());
    }
    for i in 0..o.clients {
        let held = all_leases(&mut leases, &format!("c{i}")).await?;
        let held: HashSet<&str> = held.iter().map(|l| l.id.as_str()).collect();
        let mine = told.remove(&i).unwrap_or_default();
        ensure!(
            held == mine,
            "client c{i}: the server granted {:?} it was not told of; told of {:?} the server does not have",
            held.difference(&mine).collect::<Vec<_>>(),
            mine.difference(&held).collect::<Vec<_>>()
        );
    }
    let granted_by_log = log
        .iter()
        .filter(|e| e.kind == pb::EventKind::LeaseGranted as i32)
        .count();
    ensure!(
        granted_by_log == book.leases.len(),
        "{granted_by_log} grants in the log, {} told to clients",
        book.leases.len()
    );

    report.requests = counters.requests.load(Ordering::Relaxed);
    report.grants = book.leases.len();
    report.resumed_grants = counters.resumed.load(Ordering::Relaxed);
    report.broken_while_queued = counters.broken_queued.load(Ordering::Relaxed);
    report.refused_no_wait = counters.refused.load(Ordering::Relaxed);
    report.releases = counters.releases.load(Ordering::Relaxed);
    report.abandoned = counters.abandoned.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    drop(server);
    Ok(report)
}

impl Report {
    /// The figures, one per line.
    pub fn summary(&self) -> String {
        let mut restarts = self.restarts.clone();
        restarts.sort();
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        format!(
            "kills: {}\n\
             requests: {} ({} granted, {} no_wait refused)\n\
             grants received after a broken stream (resumed by request id): {}\n\
             requests whose stream broke while they waited: {}\n\
             releases: {}, leases abandoned to their TTL: {}\n\
             acknowledged leases checked: {}, lost: {}\n\
             event log: {} events, {} requests, {} grants, {} withdrawals, {} order checks; double grants: 0\n\
             restart (spawn to listening): median {}, max {}\n\
             {}elapsed: {:.1} s",
            self.kills,
            self.requests,
            self.grants,
            self.refused_no_wait,
            self.resumed_grants,
            self.broken_while_queued,
            self.releases,
            self.abandoned,
            self.checked_leases,
            self.lost,
            self.history.events,
            self.history.requests,
            self.history.grants,
            self.history.withdrawals,
            self.history.order_checks,
            restarts
                .get(restarts.len() / 2)
                .copied()
                .map_or("-".into(), ms),
            restarts.last().copied().map_or("-".into(), ms),
            if self.resumed.is_empty() {
                String::new()
            } else {
                let mut r = self.resumed.clone();
                r.sort();
                format!(
                    "writes resumed after each kill (kill to the next acknowledged grant or release): {}\n",
                    r.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
                )
            },
            self.elapsed.as_secs_f64(),
        )
    }
}
