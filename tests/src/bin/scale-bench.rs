//! `scale-bench`: lab-server at the scale of a large lab, measured.
//!
//! ```text
//! cargo build --release -p lab-server -p lab-tests --bin scale-bench
//! target/release/scale-bench [--hosts 10000] [--racks 100] [--projects 50] \
//!     [--waiters 10000] [--duration 10s] [--events 1000000] [--ended 100000]
//! ```
//!
//! Against the release `lab-server` as a child process (development mode,
//! durable redb store), with an inventory of `--hosts` hosts in `--racks`
//! racks, each rack's agent attached (a simulated agent: it attaches over
//! the real agent protocol and answers every command at once), and a policy
//! of `--projects` projects of equal share:
//!
//! 1. acquire+release round trips at 1 and 64 clients for `--duration`;
//! 2. every host leased, then `--waiters` requests waiting across the
//!    projects (4 principals each); the leases are released, and each
//!    waiter releases as soon as it is granted: the drain's time and rate;
//! 3. the scheduling pass's time measured inside the actor
//!    (`lab_core_schedule_seconds` from `/metrics`: p50/p99, interpolated
//!    within buckets 1.5× apart) during row 1 and during the drain;
//! 4. the server's resident memory (VmRSS, and its peak VmHWM);
//! 5. start-up time of a server whose store holds `--events` events and
//!    `--ended` ended leases (written directly into its redb file first).
//!
//! Every figure printed is measured in this run.

use anyhow::{Context, Result, bail};
use lab_proto::v1::acquire_update::Update;
use lab_proto::v1::{
    AcquireRequest, AgentHello, AgentMessage, CommandReply, LeaseRequest, ReleaseRequest,
    agent_message, server_message,
};
use lab_server::events::{EventKind, EventRecord};
use lab_server::lease::{Lease, LeaseState};
use lab_server::store::redb::RedbStore;
use lab_server::store::{Batch, Store, Write};
use lab_server::types::{Generation, HostName, LeaseId, Principal, Timestamp};
use lab_tests::{Clients, ServerProcess, percentile};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USAGE: &str = "\
usage: scale-bench [options]
  --hosts N       hosts in the inventory [10000]
  --racks N       racks (one simulated agent each) [100]
  --projects N    projects of equal share in the policy [50]
  --waiters N     waiting requests of the drain [10000]
  --duration D    seconds per round-trip row [10]
  --events N      events in the store of the start-up row [1000000]
  --ended N       ended leases in that store [100000]
  -h, --help      this text";

struct Opts {
    hosts: usize,
    racks: usize,
    projects: usize,
    waiters: usize,
    duration: Duration,
    events: u64,
    ended: usize,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        hosts: 10_000,
        racks: 100,
        projects: 50,
        waiters: 10_000,
        duration: Duration::from_secs(10),
        events: 1_000_000,
        ended: 100_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--hosts" => o.hosts = value()?.parse()?,
            "--racks" => o.racks = value()?.parse()?,
            "--projects" => o.projects = value()?.parse()?,
            "--waiters" => o.waiters = value()?.parse()?,
            "--duration" => {
                o.duration = Duration::from_secs(value()?.trim_end_matches('s').parse()?)
            }
            "--events" => o.events = value()?.parse()?,
            "--ended" => o.ended = value()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    anyhow::ensure!(
        o.hosts > 0 && o.racks > 0 && o.projects > 0,
        "sizes must be positive"
    );
    Ok(o)
}

fn inventory(o: &Opts) -> String {
    let mut s = String::new();
    for r in 0..o.racks {
        s.push_str(&format!(
            "[[rack]]\nname = \"r{r}\"\nagent = \"agent-r{r}\"\n\n"
        ));
    }
    for i in 0..o.hosts {
        s.push_str(&format!(
            "[[host]]\nname = \"h{i:05}\"\narch = \"{}\"\nfirmware = \"uefi\"\nrack = \"r{}\"\nmac = \"52:54:00:{:02x}:{:02x}:{:02x}\"\n\n",
            if i % 5 == 4 { "aarch64" } else { "x86_64" },
            i % o.racks,
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff,
        ));
    }
    s
}

/// Principal `k` of project `p`.
fn member(p: usize, k: usize) -> String {
    format!("u{p:02}-{k}")
}

fn policy(o: &Opts) -> String {
    (0..o.projects)
        .map(|p| {
            let members: Vec<String> = (0..4).map(|k| format!("\"{}\"", member(p, k))).collect();
            format!(
                "[[project]]\nname = \"p{p:02}\"\nmembers = [{}]\n\n",
                members.join(", ")
            )
        })
        .collect()
}

fn spawn(dir: &Path, o: &Opts) -> Result<ServerProcess> {
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(o))?;
    ServerProcess::spawn_dev_with(
        dir,
        &inventory(o),
        &[
            "--policy",
            &pol.to_string_lossy(),
            "--max-waiting-per-principal",
            "100000",
        ],
        "server.log",
    )
}

/// A simulated agent of `rack`: attaches, then answers every command with
/// success at once.
async fn agent(addr: SocketAddr, rack: String, attached: Arc<AtomicUsize>) -> Result<()> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let token = lab_client::auth::BearerToken::new(&format!("agent-{rack}"))?;
    let mut client = lab_proto::v1::agent_service_client::AgentServiceClient::with_interceptor(
        channel,
        lab_client::auth::BearerAuth::new(Some(token)),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1024);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(AgentHello {
            rack,
            version: "scale-bench".into(),
        })),
    })
    .await?;
    let mut inbound = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    attached.fetch_add(1, Ordering::SeqCst);
    while let Some(m) = inbound.message().await? {
        if let Some(server_message::Msg::Command(c)) = m.msg {
            let reply = AgentMessage {
                msg: Some(agent_message::Msg::Reply(CommandReply {
                    id: c.id,
                    ..Default::default()
                })),
            };
            if tx.send(reply).await.is_err() {
                break;
            }
        }
    }
    Ok(())
}

async fn acquire(c: &mut Clients, ttl: Duration, no_wait: bool) -> Result<String> {
    let mut s = c
        .leases
        .acquire(AcquireRequest {
            request: Some(LeaseRequest {
                count: 1,
                ttl: Some(lab_proto::convert::duration_to_proto(ttl)),
                ..Default::default()
            }),
            no_wait,
            ..Default::default()
        })
        .await?
        .into_inner();
    loop {
        match s.message().await?.and_then(|u| u.update) {
            Some(Update::Granted(l)) => return Ok(l.id),
            Some(Update::Queued(_)) => continue,
            None => bail!("the stream ended without a grant"),
        }
    }
}

async fn release(c: &mut Clients, id: String) -> Result<()> {
    c.leases.release(ReleaseRequest { lease_id: id }).await?;
    Ok(())
}

/// `/metrics` of the web port, as text.
async fn metrics(web: SocketAddr) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(web).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

/// Cumulative bucket counts of `lab_core_schedule_seconds`.
fn schedule_buckets(text: &str) -> BTreeMap<u64, (f64, f64)> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("lab_core_schedule_seconds_bucket{le=\"") else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count: f64 = count.trim().parse().unwrap_or(0.0);
        out.insert(le.to_bits(), (le, count));
    }
    out
}

/// Quantile `q` of the passes between two scrapes, interpolated within a
/// bucket (as Prometheus' `histogram_quantile`); with the pass count.
fn quantile(before: &str, after: &str, q: f64) -> (f64, f64) {
    let b = schedule_buckets(before);
    let mut rows: Vec<(f64, f64)> = schedule_buckets(after)
        .into_iter()
        .map(|(k, (le, n))| (le, n - b.get(&k).map_or(0.0, |x| x.1)))
        .collect();
    rows.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = rows.last().map_or(0.0, |r| r.1);
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in &rows {
        if n >= rank {
            if le.is_infinite() {
                return (prev.0, total);
            }
            let width = n - prev.1;
            let frac = if width > 0.0 {
                (rank - prev.1) / width
            } else {
                1.0
            };
            return (prev.0 + (le - prev.0) * frac, total);
        }
        prev = (le, n);
    }
    (f64::NAN, total)
}

fn ms(s: f64) -> String {
    format!("{:.3} ms", s * 1000.0)
}

/// (VmRSS, VmHWM) of a process, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

async fn connect_many(addr: SocketAddr, names: Vec<String>) -> Result<Vec<Clients>> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        out.push(Clients::connect(addr, Some(&n)).await?);
    }
    Ok(out)
}

/// Round trips for `duration` with `n` clients: (count, per-trip times).
async fn round_trips(
    addr: SocketAddr,
    n: usize,
    duration: Duration,
    o: &Opts,
) -> Result<(usize, Vec<Duration>)> {
    let names = (0..n)
        .map(|i| member(i % o.projects, i / o.projects % 4))
        .collect();
    let conns = connect_many(addr, names).await?;
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for mut c in conns {
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let id = acquire(&mut c, Duration::from_secs(600), false).await?;
                release(&mut c, id).await?;
                times.push(t.elapsed());
            }
            anyhow::Ok(times)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    Ok((all.len(), all))
}

async fn live(o: &Opts) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let server = spawn(dir.path(), o)?;
    let started = t.elapsed();
    let web = server.web.context("no web port")?;
    let pid = server.child.id();
    println!(
        "lab-server (release), {} hosts in {} racks, {} projects, redb store; up in {:.2} s",
        o.hosts,
        o.racks,
        o.projects,
        started.as_secs_f64()
    );
    let attached = Arc::new(AtomicUsize::new(0));
    let mut agents = Vec::new();
    for r in 0..o.racks {
        let attached = attached.clone();
        let addr = server.addr;
        agents.push(tokio::spawn(async move {
            if let Err(e) = agent(addr, format!("r{r}"), attached).await {
                eprintln!("agent r{r}: {e:#}");
            }
        }));
    }
    let t = Instant::now();
    while attached.load(Ordering::SeqCst) < o.racks {
        if t.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {} of {} agents attached",
                attached.load(Ordering::SeqCst),
                o.racks
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reachable once attached: wait until a request can be granted.
    let mut probe = Clients::connect(server.addr, Some("probe")).await?;
    let t = Instant::now();
    loop {
        match acquire(&mut probe, Duration::from_secs(60), true).await {
            Ok(id) => {
                release(&mut probe, id).await?;
                break;
            }
            Err(_) if t.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e).context("no host became grantable"),
        }
    }
    println!(
        "  {} simulated agents attached in {:.2} s",
        o.racks,
        t.elapsed().as_secs_f64()
    );

    println!("\n1. acquire+release round trips (any host, each client its own connection)");
    for n in [1, 64] {
        let before = metrics(web).await?;
        let (count, times) = round_trips(server.addr, n, o.duration, o).await?;
        let after = metrics(web).await?;
        let (p50, passes) = quantile(&before, &after, 0.5);
        let (p99, _) = quantile(&before, &after, 0.99);
        println!(
            "  {n:>2} clients: {:>6.0} round trips/s, round trip p50 {:?} p99 {:?}; scheduling pass in the actor p50 {} p99 {} ({passes:.0} passes)",
            count as f64 / o.duration.as_secs_f64(),
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            ms(p50),
            ms(p99),
        );
    }
    let (rss, _) = memory(pid);
    println!("  server memory after row 1: {rss:.0} MiB resident");

    println!(
        "\n2. every host leased, {} requests waiting across {} projects, then drained",
        o.waiters, o.projects
    );
    let fillers = connect_many(
        server.addr,
        (0..64).map(|i| format!("filler-{i}")).collect(),
    )
    .await?;
    let t = Instant::now();
    let per = o.hosts.div_ceil(64);
    let mut tasks = Vec::new();
    for mut c in fillers {
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..per {
                match acquire(&mut c, Duration::from_secs(3600), true).await {
                    Ok(id) => ids.push(id),
                    Err(_) => break,
                }
            }
            (c, ids)
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await?);
    }
    let leased: usize = held.iter().map(|(_, ids)| ids.len()).sum();
    println!(
        "  {leased} hosts leased in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The waiters: 100 connections, their requests spread over the
    // projects' principals.
    let mut conns = Vec::new();
    for i in 0..100 {
        conns.push(
            Clients::connect(
                server.addr,
                Some(&member(i % o.projects, i / o.projects % 4)),
            )
            .await?,
        );
    }
    let granted = Arc::new(AtomicUsize::new(0));
    let queued = Arc::new(AtomicUsize::new(0));
    let mut waiters = Vec::new();
    for i in 0..o.waiters {
        let mut c = conns[i % conns.len()].clone();
        let (granted, queued) = (granted.clone(), queued.clone());
        waiters.push(tokio::spawn(async move {
            let mut s = c
                .leases
                .acquire(AcquireRequest {
                    request: Some(LeaseRequest {
                        count: 1,
                        ttl: Some(lab_proto::convert::duration_to_proto(Duration::from_secs(
                            600,
                        ))),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut counted = false;
            loop {
                match s.message().await?.and_then(|u| u.update) {
                    Some(Update::Queued(_)) if !counted => {
                        counted = true;
                        queued.fetch_add(1, Ordering::SeqCst);
                    }
                    Some(Update::Queued(_)) => {}
                    Some(Update::Granted(l)) => {
                        release(&mut c, l.id).await?;
                        granted.fetch_add(1, Ordering::SeqCst);
                        return anyhow::Ok(());
                    }
                    None => bail!("the stream ended without a grant"),
                }
            }
        }));
    }
    let t = Instant::now();
    while queued.load(Ordering::SeqCst) < o.waiters {
        if t.elapsed() > Duration::from_secs(300) {
            bail!(
                "only {} of {} requests queued",
                queued.load(Ordering::SeqCst),
                o.waiters
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  {} requests queued in {:.1} s",
        o.waiters,
        t.elapsed().as_secs_f64()
    );
    let (rss, _) = memory(pid);
    println!(
        "  server memory with every host leased and {} waiting: {rss:.0} MiB resident",
        o.waiters
    );
    let before = metrics(web).await?;
    let t = Instant::now();
    let mut releasers = Vec::new();
    for (mut c, ids) in held {
        releasers.push(tokio::spawn(async move {
            for id in ids {
                release(&mut c, id).await?;
            }
            anyhow::Ok(())
        }));
    }
    for r in releasers {
        r.await??;
    }
    for w in waiters {
        w.await??;
    }
    let drain = t.elapsed();
    let after = metrics(web).await?;
    let (p50, passes) = quantile(&before, &after, 0.5);
    let (p99, _) = quantile(&before, &after, 0.99);
    println!(
        "  drained: {} waiters granted in {:.1} s ({:.0} grants/s); scheduling pass in the actor p50 {} p99 {} ({passes:.0} passes)",
        granted.load(Ordering::SeqCst),
        drain.as_secs_f64(),
        granted.load(Ordering::SeqCst) as f64 / drain.as_secs_f64(),
        ms(p50),
        ms(p99)
    );
    let (rss, hwm) = memory(pid);
    println!("  server memory at the end: {rss:.0} MiB resident, peak {hwm:.0} MiB");
    for a in agents {
        a.abort();
    }
    Ok(())
}

/// Writes `events` events and `ended` ended leases into a fresh redb store.
fn fill_store(path: &Path, o: &Opts) -> Result<()> {
    std::fs::create_dir_all(path.parent().context("store dir")?)?;
    let store = RedbStore::open(path)?;
    let now = Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64,
    );
    let start = now.0 - 30 * 86_400_000;
    let actor = Principal::new("filler")?;
    let host = |i: usize| HostName::new(format!("h{:05}", i % o.hosts));
    let mut seq = 0u64;
    let step = (30 * 86_400_000 / o.events.max(1) as i64).max(1);
    let mut leases = 0usize;
    while seq < o.events || leases < o.ended {
        let mut batch = Batch::default();
        for _ in 0..10_000 {
            if seq >= o.events {
                break;
            }
            seq += 1;
            batch.events.push(EventRecord {
                seq,
                time: Timestamp(start + seq as i64 * step),
                actor: actor.clone(),
                kind: EventKind::LeaseGranted,
                hosts: vec![host(seq as usize)?],
                lease: Some(LeaseId::random()),
                waiter: Some(seq),
                request: None,
                detail: String::new(),
                booking: None,
            });
        }
        for _ in 0..2_000 {
            if leases >= o.ended {
                break;
            }
            let granted = Timestamp(start + leases as i64 * 20_000);
            batch.writes.push(Write::Lease(Lease {
                id: LeaseId::random(),
                holder: Principal::new(member(leases % o.projects, leases % 4))?,
                hosts: vec![host(leases)?],
                state: LeaseState::Released,
                profile: None,
                priority: 0,
                comment: String::new(),
                ttl_ms: 3_600_000,
                granted_at: granted,
                expires_at: Timestamp(granted.0 + 3_600_000),
                max_expires_at: Timestamp(granted.0 + 7 * 86_400_000),
                ended_at: Some(Timestamp(granted.0 + 600_000)),
                waiter_id: leases as u64 + 1,
                request_id: None,
                generation: Generation(1),
                ssh_public_key: None,
                preemptible: false,
                preempted_at: None,
                booking: None,
            }));
            leases += 1;
        }
        store.commit(&batch)?;
    }
    Ok(())
}

async fn startup(o: &Opts) -> Result<()> {
    println!(
        "\n3. start-up with {} events and {} ended leases in the store",
        o.events, o.ended
    );
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    fill_store(&dir.path().join("data").join("lab.redb"), o)?;
    let size = std::fs::metadata(dir.path().join("data").join("lab.redb"))?.len();
    println!(
        "  store written in {:.1} s ({:.0} MiB)",
        t.elapsed().as_secs_f64(),
        size as f64 / 1048576.0
    );
    let t = Instant::now();
    let server = spawn(dir.path(), o)?;
    let up = t.elapsed();
    let (rss, _) = memory(server.child.id());
    println!(
        "  lab-server up (listening, core started) in {:.2} s; {rss:.0} MiB resident",
        up.as_secs_f64()
    );
    let mut c = Clients::connect(server.addr, Some("probe")).await?;
    let n = c
        .leases
        .list_leases(lab_proto::v1::ListLeasesRequest {
            include_ended: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .leases
        .len();
    println!("  it lists ended leases ({n} on the first page)");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = opts()?;
    live(&o).await?;
    startup(&o).await?;
    Ok(())
}
