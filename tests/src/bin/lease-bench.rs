//! `lease-bench`: measured lease figures of a real lab-server with its
//! durable store: redb (fsync on every commit, concurrent changes grouped
//! into one commit) and, with `--stores redb,etcd`, etcd beside it (a
//! 3-member cluster of Debian's `etcd-server` on loopback that this program
//! starts, fsync on; every batch one transaction).
//!
//! ```text
//! cargo build --release --workspace
//! cargo run --release -p lab-tests --bin lease-bench -- [--duration 10s] [--hosts 8] [--stores redb,etcd]
//! ```
//!
//! Scenarios, each against a fresh server and store (on etcd: a fresh key
//! prefix), for each store in turn (scenario 1: each client count on each
//! store, side by side):
//! 1. acquire+release loop with 1, 8 and 64 concurrent clients (each on its
//!    own connection): `Acquire{count:1, ttl:60s}` stream → granted →
//!    `Release`, repeated for `--duration`.
//! 2. 1,000 queued waiters: 1,000 concurrent Acquire streams at once, each
//!    releasing as soon as granted; every waiter must be granted exactly once.
//! 3. the `lab` CLI: `lab lease acquire --ttl 60s` and `lab lease release ID`
//!    as separate processes, timed from spawn to exit.
//!
//! With `--scrape-metrics`, every row of scenario 1 is run twice, side by
//! side: without, then with `/metrics` of the server's web port scraped
//! every second (as Prometheus would), and the difference is printed.
//!
//! By default the server is the release binary `lab-server` run as a child
//! process (so the client's CPU is not the server's); `--in-process` runs it
//! inside this process instead. `--with-labgrid` also runs
//! `tests/bench/labgrid_bench.py` (see `tests/bench/README.md`) and prints
//! its table. Every number printed is measured in this run.

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use lab_proto::v1::acquire_update::Update;
use lab_proto::v1::{LeaseState, ReleaseRequest};
use lab_tests::bench::{BenchStore, acquire_request, round_trip, spawn_server};
use lab_tests::etcd::EtcdCluster;
use lab_tests::{Clients, InProcessServer, ServerOptions, ServerProcess, bin_path, percentile};
use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(60);

const USAGE: &str = "\
usage: lease-bench [options]
  --duration D        time per acquire+release row (e.g. 10s, 500ms, 1m) [10s]
  --hosts N           hosts in the generated inventory [8]
  --clients LIST      concurrent clients of the loop rows [1,8,64]
  --stores LIST       stores to measure, side by side: redb, etcd (a 3-member etcd on loopback) [redb]
  --waiters N         queued waiters of the drain scenario [1000]
  --cli-n N           runs of each timed CLI command [50]
  --scrape-metrics    run each loop row again with /metrics scraped every 1 s; print the difference
  --in-process        run lab-server inside this process instead of as a child
  --with-labgrid      also run tests/bench/labgrid_bench.py and print its table
  --labgrid-python P  python interpreter with labgrid installed [$LABGRID_PYTHON or python3]
  --labgrid-clients L concurrent clients of the labgrid rows [1,64]
  -h, --help          this text";

#[derive(Debug, Clone)]
struct Opts {
    duration: Duration,
    hosts: usize,
    clients: Vec<usize>,
    stores: Vec<String>,
    waiters: usize,
    cli_n: usize,
    in_process: bool,
    scrape_metrics: bool,
    with_labgrid: bool,
    labgrid_python: String,
    labgrid_clients: Vec<usize>,
}

fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        _ => bail!("not a duration: {s:?} (use ms, s or m)"),
    };
    ensure!(secs > 0.0, "the duration must be positive");
    Ok(Duration::from_secs_f64(secs))
}

fn parse_list(s: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("not a list of counts: {s:?}"))?;
    ensure!(
        !v.is_empty() && v.iter().all(|&n| n > 0),
        "counts must be positive"
    );
    Ok(v)
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        duration: Duration::from_secs(10),
        hosts: 8,
        clients: vec![1, 8, 64],
        stores: vec!["redb".to_owned()],
        waiters: 1000,
        cli_n: 50,
        in_process: false,
        scrape_metrics: false,
        with_labgrid: false,
        labgrid_python: std::env::var("LABGRID_PYTHON").unwrap_or_else(|_| "python3".to_owned()),
        labgrid_clients: vec![1, 64],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_owned(), Some(v.to_owned())),
            _ => (a.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args.next().with_context(|| format!("{key} needs a value")),
            }
        };
        match key.as_str() {
            "--duration" => o.duration = parse_duration(&value()?)?,
            "--hosts" => o.hosts = value()?.parse().context("--hosts")?,
            "--clients" => o.clients = parse_list(&value()?)?,
            "--stores" => {
                o.stores = value()?.split(',').map(|s| s.trim().to_owned()).collect();
            }
            "--waiters" => o.waiters = value()?.parse().context("--waiters")?,
            "--cli-n" => o.cli_n = value()?.parse().context("--cli-n")?,
            "--in-process" => o.in_process = true,
            "--scrape-metrics" => o.scrape_metrics = true,
            "--with-labgrid" => o.with_labgrid = true,
            "--labgrid-python" => o.labgrid_python = value()?,
            "--labgrid-clients" => o.labgrid_clients = parse_list(&value()?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(o.hosts > 0, "--hosts must be positive");
    ensure!(
        !o.stores.is_empty() && o.stores.iter().all(|s| s == "redb" || s == "etcd"),
        "--stores: a list of redb and etcd"
    );
    ensure!(
        !(o.in_process && o.stores.iter().any(|s| s == "etcd")),
        "--in-process runs redb only"
    );
    ensure!(
        !(o.scrape_metrics && o.in_process),
        "--scrape-metrics needs the server as a child process (its web port)"
    );
    ensure!(
        o.waiters > 0 && o.cli_n > 0,
        "--waiters and --cli-n must be positive"
    );
    Ok(o)
}

// ------------------------------------------------------------------ server

/// A lab-server for one scenario: a child process or in this process, with
/// a fresh inventory and store.
struct Server {
    addr: SocketAddr,
    /// The web port (`/metrics`), for a child process.
    web: Option<SocketAddr>,
    run: Running,
    _dir: tempfile::TempDir,
}

enum Running {
    Child(ServerProcess),
    InProcess(InProcessServer),
}

/// The stores rows run on: the etcd cluster when a row asks for etcd,
/// and a counter for fresh key prefixes.
struct Stores {
    etcd: Option<EtcdCluster>,
    rows: std::sync::atomic::AtomicUsize,
}

impl Server {
    async fn start(o: &Opts, stores: &Stores, store: &str) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        if o.in_process {
            let s = InProcessServer::start(ServerOptions {
                hosts: o.hosts,
                ..ServerOptions::default()
            })
            .await?;
            return Ok(Server {
                addr: s.addr,
                web: None,
                run: Running::InProcess(s),
                _dir: dir,
            });
        }
        let row = stores
            .rows
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("/bench-{}-{row}/", std::process::id());
        let on = match (store, &stores.etcd) {
            ("etcd", Some(cluster)) => BenchStore::Etcd {
                cluster,
                prefix: &prefix,
            },
            ("etcd", None) => bail!("no etcd cluster was started"),
            _ => BenchStore::Redb,
        };
        let p = spawn_server(dir.path(), o.hosts, on).await?;
        Ok(Server {
            addr: p.addr,
            web: p.web,
            run: Running::Child(p),
            _dir: dir,
        })
    }

    /// CPU time used so far by the server's process (None in-process: it
    /// shares this process).
    fn cpu(&self) -> Option<Duration> {
        match &self.run {
            Running::Child(p) => proc_cpu(&format!("/proc/{}/stat", p.child.id())),
            Running::InProcess(_) => None,
        }
    }

    async fn stop(self) {
        match self.run {
            Running::Child(mut p) => p.kill(),
            Running::InProcess(s) => s.stop().await,
        }
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process from its `/proc/.../stat`.
fn proc_cpu(path: &str) -> Option<Duration> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(Duration::from_secs_f64(ticks / clock_ticks()))
}

fn own_cpu() -> Option<Duration> {
    proc_cpu("/proc/self/stat")
}

/// CPU used between two readings as a share of one core over `wall`.
fn cpu_pct(a: Option<Duration>, b: Option<Duration>, wall: Duration) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !wall.is_zero() => {
            format!("{:.0}%", 100.0 * (b - a).as_secs_f64() / wall.as_secs_f64())
        }
        _ => "-".to_owned(),
    }
}

// ------------------------------------------------------------------ calls

/// One connection (tonic Channel) per client, opened 32 at a time.
async fn connect_many(addr: SocketAddr, names: Vec<String>) -> Result<Vec<Clients>> {
    let conns: Vec<Result<Clients>> = futures::stream::iter(names)
        .map(|name| async move { Clients::connect(addr, Some(&name)).await })
        .buffered(32)
        .collect()
        .await;
    conns.into_iter().collect()
}

// ------------------------------------------------------------------ scenario 1

struct LoopRow {
    store: String,
    clients: usize,
    count: usize,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
    grant: Vec<Duration>,
    release: Vec<Duration>,
    rt: Vec<Duration>,
    queued: usize,
    server_cpu: String,
    client_cpu: String,
    /// `/metrics` scrapes made during the row (with `--scrape-metrics`).
    scrapes: usize,
}

/// Scrapes `GET /metrics` (OpenMetrics, as Prometheus asks) every second
/// until `stop`; how many scrapes succeeded.
async fn scraper(web: SocketAddr, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut ok = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(ok),
        }
        let mut s = tokio::net::TcpStream::connect(web).await?;
        s.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        ensure!(
            body.starts_with(b"HTTP/1.1 200") && body.ends_with(b"# EOF\n"),
            "a /metrics scrape failed: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
        ok += 1;
    }
}

async fn loop_row(
    o: &Opts,
    stores: &Stores,
    store: &str,
    n: usize,
    scrape: bool,
) -> Result<LoopRow> {
    let server = Server::start(o, stores, store).await?;
    let conns = connect_many(
        server.addr,
        (0..n).map(|i| format!("bench-c{i:03}")).collect(),
    )
    .await?;
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let duration = o.duration;
    let mut tasks = Vec::with_capacity(n);
    for mut c in conns {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            // Warm-up: one round trip on this connection, not counted.
            let warm = round_trip(&mut c, TTL).await;
            barrier.wait().await;
            warm?;
            let deadline = Instant::now() + duration;
            let mut samples = Vec::new();
            let mut errors = Vec::new();
            while Instant::now() < deadline {
                match round_trip(&mut c, TTL).await {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        errors.push(format!("{e:#}"));
                        if errors.len() > 100 {
                            break;
                        }
                    }
                }
            }
            anyhow::Ok((samples, errors))
        }));
    }
    barrier.wait().await;
    let (stop_scrape, stop_rx) = tokio::sync::watch::channel(false);
    let scraping = match (scrape, server.web) {
        (false, _) => None,
        (true, Some(web)) => Some(tokio::spawn(scraper(web, stop_rx))),
        (true, None) => bail!("the server printed no web port to scrape"),
    };
    let start = Instant::now();
    let (s0, c0) = (server.cpu(), own_cpu());
    let mut row = LoopRow {
        store: store.to_owned(),
        clients: n,
        count: 0,
        errors: 0,
        first_error: None,
        wall: Duration::ZERO,
        grant: Vec::new(),
        release: Vec::new(),
        rt: Vec::new(),
        queued: 0,
        server_cpu: String::new(),
        client_cpu: String::new(),
        scrapes: 0,
    };
    for t in tasks {
        let (samples, errors) = t.await??;
        row.count += samples.len();
        row.errors += errors.len();
        if row.first_error.is_none() {
            row.first_error = errors.into_iter().next();
        }
        for t in samples {
            row.grant.push(t.grant);
            row.release.push(t.release);
            row.rt.push(t.whole);
            row.queued += t.queued;
        }
    }
    row.wall = start.elapsed();
    let (s1, c1) = (server.cpu(), own_cpu());
    let _ = stop_scrape.send(true);
    if let Some(t) = scraping {
        row.scrapes = t.await??;
    }
    row.server_cpu = cpu_pct(s0, s1, row.wall);
    row.client_cpu = cpu_pct(c0, c1, row.wall);
    row.grant.sort();
    row.release.sort();
    row.rt.sort();
    server.stop().await;
    Ok(row)
}

// ------------------------------------------------------------------ scenario 2

struct DrainResult {
    waiters: usize,
    connect: Duration,
    drain: Duration,
    grant: Vec<Duration>,
    queued_updates: usize,
    distinct_leases: usize,
    server_leases: usize,
    holders_once: usize,
    problems: Vec<String>,
    server_cpu: String,
    client_cpu: String,
}

async fn drain(o: &Opts, stores: &Stores, store: &str) -> Result<DrainResult> {
    let server = Server::start(o, stores, store).await?;
    let n = o.waiters;
    let t = Instant::now();
    let conns = connect_many(
        server.addr,
        (0..n).map(|i| format!("bench-w{i:04}")).collect(),
    )
    .await?;
    let connect = t.elapsed();
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for mut c in conns {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let t0 = Instant::now();
            let mut stream = c
                .leases
                .acquire(acquire_request(TTL))
                .await
                .context("Acquire")?
                .into_inner();
            let mut queued = 0usize;
            let mut grants = Vec::new();
            let mut grant_at = None;
            while let Some(u) = stream.message().await.context("Acquire stream")? {
                match u.update {
                    Some(Update::Queued(_)) => queued += 1,
                    Some(Update::Granted(lease)) => {
                        grant_at.get_or_insert_with(|| t0.elapsed());
                        if grants.is_empty() {
                            c.leases
                                .release(ReleaseRequest {
                                    lease_id: lease.id.clone(),
                                })
                                .await
                                .context("Release")?;
                        }
                        grants.push(lease.id);
                    }
                    None => bail!("an empty AcquireUpdate"),
                }
            }
            anyhow::Ok((grant_at, grants, queued, t0.elapsed()))
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let (s0, c0) = (server.cpu(), own_cpu());
    let mut grant = Vec::with_capacity(n);
    let mut ids = HashSet::new();
    let mut problems = Vec::new();
    let mut queued_updates = 0;
    let mut drain = Duration::ZERO;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await? {
            Ok((at, grants, queued, done)) => {
                queued_updates += queued;
                drain = drain.max(done);
                if grants.len() != 1 {
                    problems.push(format!("waiter {i} was granted {} times", grants.len()));
                }
                if let Some(at) = at {
                    grant.push(at);
                }
                for id in grants {
                    if !ids.insert(id.clone()) {
                        problems.push(format!("lease {id} was granted to two waiters"));
                    }
                }
            }
            Err(e) => problems.push(format!("waiter {i}: {e:#}")),
        }
    }
    let wall = start.elapsed();
    let (s1, c1) = (server.cpu(), own_cpu());
    grant.sort();
    // The server's own record: exactly one lease per waiter principal.
    let mut check = Clients::connect(server.addr, Some("bench-check")).await?;
    check.leases = check.leases.max_decoding_message_size(64 << 20);
    // Every page (the server pages its answer).
    let leases = lab_tests::crash_loop::all_leases(&mut check.leases, "").await?;
    let mut per_holder: HashMap<&str, usize> = HashMap::new();
    for l in &leases {
        *per_holder.entry(l.holder.as_str()).or_default() += 1;
        if l.state == LeaseState::Active as i32 {
            problems.push(format!("lease {} of {} is still active", l.id, l.holder));
        }
    }
    let holders_once = (0..n)
        .filter(|i| per_holder.get(format!("bench-w{i:04}").as_str()) == Some(&1))
        .count();
    if holders_once != n {
        problems.push(format!(
            "the server holds exactly one lease for {holders_once} of {n} waiters"
        ));
    }
    server.stop().await;
    Ok(DrainResult {
        waiters: n,
        connect,
        drain,
        grant,
        queued_updates,
        distinct_leases: ids.len(),
        server_leases: leases.len(),
        holders_once,
        problems,
        server_cpu: cpu_pct(s0, s1, wall),
        client_cpu: cpu_pct(c0, c1, wall),
    })
}

// ------------------------------------------------------------------ scenario 3

struct CliRow {
    what: &'static str,
    times: Vec<Duration>,
    failures: usize,
    first_failure: Option<String>,
}

fn run_timed(cmd: &mut Command) -> Result<(Duration, String)> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    let d = t.elapsed();
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((d, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn lease_id_of(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .find(|l| l.starts_with("lease"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_owned)
}

async fn cli(o: &Opts, stores: &Stores, store: &str) -> Result<Vec<CliRow>> {
    let lab = bin_path("lab");
    ensure!(
        lab.exists(),
        "{} is not built: run `cargo build --release --workspace` first",
        lab.display()
    );
    let server = Server::start(o, stores, store).await?;
    let url = format!("http://{}", server.addr);
    let n = o.cli_n;
    let lab2 = lab.clone();
    let rows = tokio::task::spawn_blocking(move || -> Result<Vec<CliRow>> {
        let base = |args: &[&str]| {
            let mut c = Command::new(&lab2);
            c.args(["--server", &url, "--token", "bench-cli"])
                .args(args)
                .env_remove("LAB_SERVER")
                .env_remove("LAB_TOKEN");
            c
        };
        let mut start = CliRow {
            what: "lab --version (process start only)",
            times: vec![],
            failures: 0,
            first_failure: None,
        };
        let mut acq = CliRow {
            what: "lab lease acquire --ttl 60s",
            times: vec![],
            failures: 0,
            first_failure: None,
        };
        let mut rel = CliRow {
            what: "lab lease release ID",
            times: vec![],
            failures: 0,
            first_failure: None,
        };
        let fail = |row: &mut CliRow, e: anyhow::Error| {
            row.failures += 1;
            row.first_failure.get_or_insert_with(|| format!("{e:#}"));
        };
        // Warm the page cache and the connection path once, not counted.
        let _ = run_timed(&mut base(&["--version"]));
        for _ in 0..n {
            match run_timed(&mut base(&["--version"])) {
                Ok((d, _)) => start.times.push(d),
                Err(e) => fail(&mut start, e),
            }
        }
        for _ in 0..n {
            let id = match run_timed(&mut base(&["lease", "acquire", "--ttl", "60s"])) {
                Ok((d, out)) => {
                    acq.times.push(d);
                    match lease_id_of(&out) {
                        Some(id) => id,
                        None => {
                            fail(
                                &mut acq,
                                anyhow::anyhow!("no lease id in the output: {out:?}"),
                            );
                            continue;
                        }
                    }
                }
                Err(e) => {
                    fail(&mut acq, e);
                    continue;
                }
            };
            match run_timed(&mut base(&["lease", "release", &id])) {
                Ok((d, _)) => rel.times.push(d),
                Err(e) => fail(&mut rel, e),
            }
        }
        for r in [&mut start, &mut acq, &mut rel] {
            r.times.sort();
        }
        Ok(vec![start, acq, rel])
    })
    .await??;
    server.stop().await;
    Ok(rows)
}

// ------------------------------------------------------------------ output

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        Duration::ZERO
    } else {
        v.iter().sum::<Duration>() / v.len() as u32
    }
}

/// fsync cost of this disk, for context: 4 KiB write + fdatasync, 100 times,
/// in the same file system as the store.
fn fsync_baseline() -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let mut f = std::fs::File::create(dir.path().join("probe"))?;
    let buf = vec![0x5au8; 4096];
    let mut v = Vec::with_capacity(100);
    for _ in 0..100 {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok((percentile(&v, 0.5), percentile(&v, 0.99)))
}

fn labgrid_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join("labgrid_bench.py")
}

fn run_labgrid(o: &Opts) -> Result<()> {
    let script = labgrid_script();
    ensure!(script.exists(), "{} is missing", script.display());
    let clients: Vec<String> = o.labgrid_clients.iter().map(ToString::to_string).collect();
    let status = Command::new(&o.labgrid_python)
        .arg(&script)
        .args(["--duration", &format!("{}", o.duration.as_secs_f64())])
        .args(["--places", &o.hosts.to_string()])
        .args(["--clients", &clients.join(",")])
        .status()
        .with_context(|| format!("run {} {}", o.labgrid_python, script.display()))?;
    ensure!(
        status.success(),
        "labgrid_bench.py failed ({status}); see tests/bench/README.md to install labgrid"
    );
    Ok(())
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mode = if o.in_process {
        "lab-server in this process (shares CPU with the clients)".to_owned()
    } else {
        format!(
            "lab-server child process ({})",
            bin_path("lab-server").display()
        )
    };
    let (f50, f99) = fsync_baseline()?;
    let stores = Stores {
        etcd: if o.stores.iter().any(|s| s == "etcd") {
            Some(EtcdCluster::start(3)?)
        } else {
            None
        },
        rows: std::sync::atomic::AtomicUsize::new(0),
    };
    println!("lease-bench: {mode}");
    let mut store_text = Vec::new();
    for s in &o.stores {
        store_text.push(if s == "redb" {
            "redb (fsync on each commit, concurrent changes grouped into one commit)".to_owned()
        } else {
            format!(
                "etcd: 3 members on loopback ({}), fsync on, a batch one transaction, a fresh key prefix per server",
                Command::new(lab_tests::etcd::require_etcd())
                    .arg("--version")
                    .output()
                    .ok()
                    .and_then(|o| String::from_utf8(o.stdout).ok())
                    .and_then(|s| s.lines().next().map(str::to_owned))
                    .unwrap_or_default()
            )
        });
    }
    println!(
        "machine: {cores} cores (available_parallelism) | stores: {} | {} s per loop row | {} hosts | fresh server and store per scenario",
        store_text.join("; "),
        o.duration.as_secs_f64(),
        o.hosts
    );
    println!(
        "disk: 4 KiB write+fdatasync p50 {} ms, p99 {} ms (tempdir, 100 samples)",
        ms(f50),
        ms(f99)
    );
    println!(
        "client: tokio multi-thread runtime, {cores} workers, one tonic Channel (TCP connection) per client"
    );
    println!();

    // 1. acquire+release loop.
    println!(
        "1. acquire+release loop: Acquire{{count:1, ttl:60s}} stream -> granted -> Release, repeated; latencies in ms"
    );
    println!(
        "   grant = Acquire sent -> Lease received (includes the wait in the queue); release = Release RPC; rt = whole round trip"
    );
    println!(
        "{:>5} {:>7} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6} {:>7} {:>7}  goal",
        "store",
        "clients",
        "trips",
        "trips/s",
        "grant50",
        "grant99",
        "rel50",
        "rel99",
        "rt50",
        "rt99",
        "upd/trip",
        "errors",
        "srvCPU",
        "cliCPU"
    );
    let mut errors = Vec::new();
    for &n in &o.clients {
        for store in &o.stores {
            let runs: &[bool] = if o.scrape_metrics {
                &[false, true]
            } else {
                &[false]
            };
            let mut pair: Vec<(f64, Duration)> = Vec::new();
            for &scrape in runs {
                let r = rt.block_on(loop_row(&o, &stores, store, n, scrape))?;
                let goal = if scrape {
                    format!("/metrics scraped {}×", r.scrapes)
                } else if n == 64 && store == "redb" {
                    "≥ 2600/s, p99 ≤ 10 ms".to_owned()
                } else {
                    String::new()
                };
                pair.push((
                    r.count as f64 / r.wall.as_secs_f64(),
                    percentile(&r.rt, 0.99),
                ));
                println!(
                    "{:>5} {:>7} {:>8} {:>9.1} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8.1} {:>6} {:>7} {:>7}  {goal}",
                    r.store,
                    r.clients,
                    r.count,
                    r.count as f64 / r.wall.as_secs_f64(),
                    ms(percentile(&r.grant, 0.5)),
                    ms(percentile(&r.grant, 0.99)),
                    ms(percentile(&r.release, 0.5)),
                    ms(percentile(&r.release, 0.99)),
                    ms(percentile(&r.rt, 0.5)),
                    ms(percentile(&r.rt, 0.99)),
                    r.queued as f64 / r.count.max(1) as f64,
                    r.errors,
                    r.server_cpu,
                    r.client_cpu,
                );
                if let Some(e) = r.first_error {
                    errors.push(format!("{store}, {n} clients: {e}"));
                }
                std::io::stdout().flush()?;
            }
            if let [(without, p99_without), (with, p99_with)] = pair[..] {
                println!(
                    "        /metrics every 1 s vs none, {store}, {n} clients: trips/s {:+.1} %, rt p99 {} -> {} ms",
                    100.0 * (with - without) / without,
                    ms(p99_without),
                    ms(p99_with)
                );
            }
        }
    }
    for e in &errors {
        println!("   error: {e}");
    }
    println!(
        "   upd/trip: queue-status updates received per round trip | srvCPU/cliCPU: CPU time of the server / the client process"
    );
    println!(
        "   as a share of one core over the row's wall time | closed loop: mean rt = clients / (trips/s) (Little's law)"
    );
    println!();

    let mut all_ok = true;
    for store in &o.stores {
        // 2. queued waiters.
        let d = rt.block_on(drain(&o, &stores, store))?;
        println!(
            "2. [{store}] {} queued waiters: {} concurrent Acquire{{count:1}} streams over {} hosts, each releasing as soon as granted",
            d.waiters, d.waiters, o.hosts
        );
        println!(
            "   connections opened in {} ms (not counted) | drained in {} ms | {:.1} grants/s | grant (wait in queue) p50 {} ms, p99 {} ms, max {} ms",
            ms(d.connect),
            ms(d.drain),
            d.grant.len() as f64 / d.drain.as_secs_f64(),
            ms(percentile(&d.grant, 0.5)),
            ms(percentile(&d.grant, 0.99)),
            ms(d.grant.last().copied().unwrap_or_default()),
        );
        println!(
            "   queue-status updates received: {} ({:.1} per waiter) | server CPU {} | client CPU {}",
            d.queued_updates,
            d.queued_updates as f64 / d.waiters as f64,
            d.server_cpu,
            d.client_cpu
        );
        let ok =
            d.problems.is_empty() && d.grant.len() == d.waiters && d.distinct_leases == d.waiters;
        println!(
            "   check: {} of {} waiters granted exactly once, {} distinct lease ids; server lists {} leases, exactly one for {} of {} waiter principals -> {}",
            d.grant.len(),
            d.waiters,
            d.distinct_leases,
            d.server_leases,
            d.holders_once,
            d.waiters,
            if ok { "OK" } else { "FAILED" }
        );
        for p in d.problems.iter().take(10) {
            println!("   problem: {p}");
        }
        println!();

        // 3. the CLI.
        let rows = rt.block_on(cli(&o, &stores, store))?;
        println!(
            "3. [{store}] lab CLI ({}) as separate processes, N={} each, spawn to exit, against a server with {} hosts",
            bin_path("lab").display(),
            o.cli_n,
            o.hosts
        );
        println!(
            "{:<36} {:>4} {:>8} {:>8} {:>8} {:>8}  goal",
            "command", "n", "p50 ms", "p99 ms", "mean ms", "failed"
        );
        for r in &rows {
            let goal = if r.what.starts_with("lab lease") {
                "≤ 20 ms"
            } else {
                ""
            };
            println!(
                "{:<36} {:>4} {:>8} {:>8} {:>8} {:>8}  {goal}",
                r.what,
                r.times.len(),
                ms(percentile(&r.times, 0.5)),
                ms(percentile(&r.times, 0.99)),
                ms(mean(&r.times)),
                r.failures
            );
            if let Some(f) = &r.first_failure {
                println!("   failure: {f}");
            }
        }
        std::io::stdout().flush()?;
        all_ok &= ok && rows.iter().all(|r| r.failures == 0);
        println!();
    }

    if o.with_labgrid {
        println!();
        run_labgrid(&o)?;
    }
    if !all_ok || !errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
