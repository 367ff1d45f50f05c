//! `etcd-bench`: lab-server on etcd beside lab-server on redb, measured.
//!
//! ```text
//! cargo build --release --workspace
//! cargo run --release -p lab-tests --bin etcd-bench -- [--duration 5s] [--clients 1,64] [--kills 5]
//! ```
//!
//! 1. The acquire+release loop (as `lease-bench`'s first scenario:
//!    `Acquire{count:1}` → granted → `Release`, repeated for `--duration`)
//!    at each client count, against lab-server with `--store redb` and
//!    with `--store etcd` on a 3-member etcd (Debian's `etcd-server`, on
//!    loopback, fsync on); a fresh server (and key prefix) per row. Prints
//!    round trips/s and the round trip's p50 and p99.
//! 2. The write stall: 8 clients loop against lab-server on etcd while the
//!    etcd leader member is SIGKILLed `--kills` times (restarted and
//!    healthy again between kills). For each kill: how long after it the
//!    first round trip sent after it completed ("resumed"), the time from
//!    the last round trip completed before it to that one ("gap"), and the
//!    errors clients saw.
//!
//! The servers are `lab-server` binaries beside this one (release with
//! `--release`). Every number printed is measured in this run.

use anyhow::{Context, Result, bail, ensure};
use lab_proto::convert::duration_to_proto;
use lab_proto::v1::acquire_update::Update;
use lab_proto::v1::{AcquireRequest, LeaseRequest, ListHostsRequest, ReleaseRequest};
use lab_tests::etcd::EtcdCluster;
use lab_tests::{Clients, ServerProcess, inventory_toml, percentile};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: etcd-bench [options]
  --duration D   time per loop row, seconds (e.g. 5, 0.5) [5]
  --clients LIST concurrent clients of the loop rows [1,64]
  --hosts N      hosts in the inventory [64]
  --kills N      etcd leader kills in the stall scenario [5]
  -h, --help     this text";

struct Opts {
    duration: Duration,
    clients: Vec<usize>,
    hosts: usize,
    kills: usize,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        duration: Duration::from_secs(5),
        clients: vec![1, 64],
        hosts: 64,
        kills: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => o.duration = Duration::from_secs_f64(value()?.parse()?),
            "--clients" => {
                o.clients = value()?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()?;
            }
            "--hosts" => o.hosts = value()?.parse()?,
            "--kills" => o.kills = value()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(
        o.hosts > 0 && o.clients.iter().all(|&c| c > 0),
        "counts must be positive"
    );
    Ok(o)
}

/// A lab-server child on redb (`etcd` None) or on etcd under `prefix`,
/// once it answers (on etcd: once it leads).
async fn server(
    dir: &std::path::Path,
    hosts: usize,
    etcd: Option<(&EtcdCluster, &str)>,
) -> Result<ServerProcess> {
    let inv = dir.join("inventory.toml");
    std::fs::write(&inv, inventory_toml(hosts))?;
    let mut args: Vec<String> = [
        "--dev-insecure-no-auth",
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        "127.0.0.1:0",
        "--inventory",
    ]
    .map(String::from)
    .to_vec();
    args.push(inv.to_string_lossy().into_owned());
    match etcd {
        None => {
            args.push("--data-dir".into());
            args.push(dir.join("data").to_string_lossy().into_owned());
        }
        Some((cluster, prefix)) => {
            args.extend(["--store".into(), "etcd".into(), "--etcd-endpoints".into()]);
            args.push(cluster.endpoints());
            args.push("--etcd-prefix".into());
            args.push(prefix.into());
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = dir.join("lab-server.log");
    let p = tokio::task::block_in_place(|| ServerProcess::spawn(&args, &log))?;
    let started = Instant::now();
    loop {
        if let Ok(mut c) = Clients::connect(p.addr, Some("bench")).await
            && c.hosts
                .list_hosts(ListHostsRequest::default())
                .await
                .is_ok()
        {
            return Ok(p);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "lab-server did not lead within 30 s: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Acquire one host, then release it.
async fn round_trip(c: &mut Clients) -> Result<()> {
    let mut stream = c
        .leases
        .acquire(AcquireRequest {
            request: Some(LeaseRequest {
                count: 1,
                ttl: Some(duration_to_proto(Duration::from_secs(60))),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let lease = loop {
        match stream.message().await?.and_then(|u| u.update) {
            Some(Update::Granted(l)) => break l,
            Some(Update::Queued(_)) => {}
            None => bail!("the Acquire stream ended without a grant"),
        }
    };
    c.leases
        .release(ReleaseRequest { lease_id: lease.id })
        .await?;
    Ok(())
}

/// What the clients saw: each completed round trip (its end and length)
/// and the errors.
#[derive(Default)]
struct Seen {
    done: Vec<(Instant, Duration)>,
    errors: Vec<String>,
}

/// `n` clients looping until `stop`.
async fn clients(
    addr: std::net::SocketAddr,
    n: usize,
    seen: Arc<Mutex<Seen>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = Clients::connect(addr, Some(&format!("bench-{i:03}"))).await?;
        let seen = seen.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !*stop.borrow() {
                let t0 = Instant::now();
                let r = round_trip(&mut c).await;
                let mut s = seen.lock().unwrap();
                match r {
                    Ok(()) => s.done.push((Instant::now(), t0.elapsed())),
                    Err(e) => s.errors.push(format!("{e:#}")),
                }
            }
        }));
    }
    Ok(tasks)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn loop_row(
    o: &Opts,
    n: usize,
    etcd: Option<(&EtcdCluster, &str)>,
) -> Result<(usize, f64, Duration, Duration, usize)> {
    let dir = tempfile::tempdir()?;
    let mut p = server(dir.path(), o.hosts.max(n), etcd).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks = clients(p.addr, n, seen.clone(), stop_rx).await?;
    // Warm-up, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let before = seen.lock().unwrap().done.len();
    tokio::time::sleep(o.duration).await;
    let wall = t0.elapsed();
    let mut rts: Vec<Duration> = seen.lock().unwrap().done[before..]
        .iter()
        .map(|(_, d)| *d)
        .collect();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    p.kill();
    rts.sort();
    let errors = seen.lock().unwrap().errors.len();
    Ok((
        rts.len(),
        rts.len() as f64 / wall.as_secs_f64(),
        percentile(&rts, 0.5),
        percentile(&rts, 0.99),
        errors,
    ))
}

async fn stall(o: &Opts, cluster: &mut EtcdCluster) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut p = server(dir.path(), o.hosts, Some((cluster, "/bench-stall/"))).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks = clients(p.addr, 8, seen.clone(), stop_rx).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "{:>5} {:>12} {:>10} {:>7}",
        "kill", "resumed(ms)", "gap(ms)", "errors"
    );
    let mut resumed_all = Vec::new();
    for k in 1..=o.kills {
        let leader = tokio::task::block_in_place(|| cluster.leader()).context("no etcd leader")?;
        let errors_before = seen.lock().unwrap().errors.len();
        let last_before = seen.lock().unwrap().done.last().map(|(t, _)| *t);
        let killed = Instant::now();
        cluster.kill(leader);
        // Until a round trip completes after the kill.
        let first_after = loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            // A round trip sent after the kill (one that had committed
            // before it may still complete after it).
            let s = seen.lock().unwrap();
            let first = s
                .done
                .iter()
                .rev()
                .take_while(|(t, _)| *t > killed)
                .filter(|(t, d)| *t - *d > killed)
                .map(|(t, _)| *t)
                .min();
            drop(s);
            if let Some(t) = first {
                break t;
            }
            ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "no round trip completed within 60 s of the kill"
            );
        };
        let resumed = first_after - killed;
        let gap = last_before.map_or(resumed, |b| first_after - b);
        let errors = seen.lock().unwrap().errors.len() - errors_before;
        println!("{k:>5} {:>12} {:>10} {errors:>7}", ms(resumed), ms(gap));
        resumed_all.push(resumed);
        cluster.restart(leader)?;
        tokio::task::block_in_place(|| cluster.wait_ready(Duration::from_secs(30)))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    p.kill();
    resumed_all.sort();
    let s = seen.lock().unwrap();
    println!(
        "resumed after a kill: min {} ms, median {} ms, max {} ms; {} round trips in all, {} errors{}",
        ms(resumed_all[0]),
        ms(percentile(&resumed_all, 0.5)),
        ms(*resumed_all.last().unwrap()),
        s.done.len(),
        s.errors.len(),
        s.errors
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    Ok(())
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut cluster = tokio::task::block_in_place(|| EtcdCluster::start(3))?;
        println!(
            "etcd-bench: lab-server ({}) on redb vs on a 3-member etcd ({}) on loopback; {} hosts; {:.1} s per row",
            lab_tests::bin_path("lab-server").display(),
            std::process::Command::new(lab_tests::etcd::require_etcd())
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(str::to_owned))
                .unwrap_or_default(),
            o.hosts,
            o.duration.as_secs_f64()
        );
        println!();
        println!("1. acquire+release loop (round trip = Acquire -> granted -> Release; ms)");
        println!(
            "{:>6} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7}",
            "store", "clients", "trips", "trips/s", "rt50", "rt99", "errors"
        );
        let mut row = 0;
        for &n in &o.clients {
            for store in ["redb", "etcd"] {
                row += 1;
                let prefix = format!("/bench-{row}/");
                let etcd = (store == "etcd").then_some((&cluster, prefix.as_str()));
                let (trips, per_s, p50, p99, errors) = loop_row(&o, n, etcd).await?;
                println!(
                    "{store:>6} {n:>8} {trips:>8} {per_s:>9.0} {:>8} {:>8} {errors:>7}",
                    ms(p50),
                    ms(p99)
                );
            }
        }
        println!();
        println!(
            "2. write stall: 8 clients loop on etcd; the etcd leader member SIGKILLed {} times",
            o.kills
        );
        if o.kills > 0 {
            stall(&o, &mut cluster).await?;
        }
        Ok(())
    })
}
