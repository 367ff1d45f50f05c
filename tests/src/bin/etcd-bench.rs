//! `etcd-bench`: the write stall of lab-server on etcd when the etcd leader
//! member dies, measured.
//!
//! ```text
//! cargo build --release --workspace
//! cargo run --release -p lab-tests --bin etcd-bench -- [--kills 5] [--clients 8]
//! ```
//!
//! `--clients` clients loop (`Acquire{count:1}` → granted → `Release`, as
//! `lease-bench`'s first scenario) against lab-server with `--store etcd`
//! on a 3-member etcd (Debian's `etcd-server`, on loopback, fsync on) while
//! the etcd leader member is SIGKILLed `--kills` times (restarted and
//! healthy again between kills). For each kill: how long after it the
//! first round trip sent after it completed ("resumed"), the time from the
//! last round trip completed before it to that one ("gap"), and the errors
//! clients saw.
//!
//! Throughput and latency of etcd beside redb (round trips/s, p50, p99 at
//! 1, 8 and 64 clients) are `lease-bench --stores redb,etcd`; both use
//! `lab_tests::bench` (the server on a store, the round trip).
//!
//! The server is the `lab-server` binary beside this one (release with
//! `--release`). Every number printed is measured in this run.

use anyhow::{Context, Result, bail, ensure};
use lab_tests::bench::{BenchStore, round_trip, spawn_server};
use lab_tests::etcd::EtcdCluster;
use lab_tests::{Clients, percentile};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: etcd-bench [options]
  --clients N    concurrent looping clients [8]
  --hosts N      hosts in the inventory [64]
  --kills N      etcd leader kills [5]
  -h, --help     this text";

struct Opts {
    clients: usize,
    hosts: usize,
    kills: usize,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        clients: 8,
        hosts: 64,
        kills: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--clients" => o.clients = value()?.parse()?,
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
        o.hosts > 0 && o.clients > 0 && o.kills > 0,
        "counts must be positive"
    );
    Ok(o)
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
                let r = round_trip(&mut c, Duration::from_secs(60))
                    .await
                    .map(|_| ());
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

async fn stall(o: &Opts, cluster: &mut EtcdCluster) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut p = spawn_server(
        dir.path(),
        o.hosts.max(o.clients),
        BenchStore::Etcd {
            cluster,
            prefix: "/bench-stall/",
        },
    )
    .await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks = clients(p.addr, o.clients, seen.clone(), stop_rx).await?;
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
            "etcd-bench: lab-server ({}) on a 3-member etcd ({}) on loopback; {} hosts",
            lab_tests::bin_path("lab-server").display(),
            std::process::Command::new(lab_tests::etcd::require_etcd())
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(str::to_owned))
                .unwrap_or_default(),
            o.hosts
        );
        println!(
            "write stall: {} clients loop on etcd; the etcd leader member SIGKILLed {} times",
            o.clients, o.kills
        );
        stall(&o, &mut cluster).await
    })
}
