//! `soak`: lab-server under a steady acquire/renew/release load for a long
//! time with a short retention, printing the store's size and the server's
//! memory every interval, to show that both stay flat (retention removes
//! ended leases and old events in bounded steps; refused requests write
//! nothing).
//!
//! ```text
//! cargo build --workspace
//! cargo run -p lab-tests --bin soak -- --duration 30m --retention 1m
//! ```
//!
//! Each client (own principal and connection) loops: acquire one host (a
//! 200-byte comment, TTL 30 s) → hold → sometimes renew → release, pausing
//! `--pause` between cycles; every tenth cycle also a `no_wait` request for
//! a host it cannot get (refused), a filtered `ListEvents` and a page of
//! `ListLeases`. The server is the `lab-server` binary next to this one,
//! as a child process with `--retention`. At the end it compares the last
//! third of the samples with the middle third (the first fills the
//! retention window): flat means the mean grew by less than 5 % and the
//! peak by less than 10 %.

use anyhow::{Context, Result, bail, ensure};
use lab_proto::v1 as pb;
use lab_tests::agent::rss_kib;
use lab_tests::{Clients, ServerProcess, inventory_toml};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: soak [--duration 30m] [--retention 1m] [--interval 1m] [--clients 4] [--hosts 8] [--pause 200ms]
  --duration D    how long the load runs [30m]
  --retention D   the server's --retention [1m]
  --interval D    how often a line of figures is printed [1m]
  --clients N     concurrent clients [4]
  --hosts N       hosts in the inventory (each client uses its own) [8]
  --pause D       pause between a client's cycles [200ms]";

struct Opts {
    duration: Duration,
    retention: Duration,
    interval: Duration,
    clients: usize,
    hosts: usize,
    pause: Duration,
}

fn duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .with_context(|| format!("not a duration: {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("not a duration: {s:?} (ms, s, m or h)"),
    })
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        duration: Duration::from_secs(30 * 60),
        retention: Duration::from_secs(60),
        interval: Duration::from_secs(60),
        clients: 4,
        hosts: 8,
        pause: Duration::from_millis(200),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => o.duration = duration(&value()?)?,
            "--retention" => o.retention = duration(&value()?)?,
            "--interval" => o.interval = duration(&value()?)?,
            "--clients" => o.clients = value()?.parse()?,
            "--hosts" => o.hosts = value()?.parse()?,
            "--pause" => o.pause = duration(&value()?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(
        o.clients >= 1 && o.hosts > o.clients,
        "--hosts must exceed --clients (each client uses its own host, one stays held)"
    );
    Ok(o)
}

#[derive(Default)]
struct Counts {
    cycles: AtomicU64,
    refused: AtomicU64,
    queries: AtomicU64,
    errors: AtomicU64,
}

async fn client(i: usize, mut c: Clients, o: Arc<Opts>, counts: Arc<Counts>, until: Instant) {
    let host = format!("h{:02}", i + 1);
    let mut n: u64 = 0;
    while Instant::now() < until {
        n += 1;
        let req = pb::LeaseRequest {
            hosts: vec![host.clone()],
            ttl: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            comment: format!("soak client {i} cycle {n} {}", "x".repeat(160)),
            ..Default::default()
        };
        let lease = match c.grant_now(req).await {
            Ok(l) => l,
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(o.pause).await;
                continue;
            }
        };
        if n.is_multiple_of(3) {
            let _ = c
                .leases
                .renew(pb::RenewRequest {
                    lease_id: lease.id.clone(),
                    ttl: None,
                })
                .await;
        }
        if c.leases
            .release(pb::ReleaseRequest {
                lease_id: lease.id.clone(),
            })
            .await
            .is_err()
        {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
        counts.cycles.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(10) {
            // h00 is held for the whole run: refused, and must cost nothing.
            let refused = c
                .grant_now(pb::LeaseRequest {
                    hosts: vec!["h00".into()],
                    comment: "y".repeat(1000),
                    ..Default::default()
                })
                .await;
            if refused.is_err_and(|s| s.code() == tonic::Code::ResourceExhausted) {
                counts.refused.fetch_add(1, Ordering::Relaxed);
            }
            let _ = c
                .events
                .list_events(pb::ListEventsRequest {
                    host: host.clone(),
                    limit: 100,
                    ..Default::default()
                })
                .await;
            let _ = c
                .leases
                .list_leases(pb::ListLeasesRequest {
                    include_ended: true,
                    page_size: 100,
                    ..Default::default()
                })
                .await;
            counts.queries.fetch_add(3, Ordering::Relaxed);
        }
        tokio::time::sleep(o.pause).await;
    }
}

/// Events in the log: from the first kept to the last.
async fn log_size(c: &mut Clients) -> Result<(u64, u64)> {
    let first = c
        .events
        .list_events(pb::ListEventsRequest {
            limit: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    let first_seq = first.events.first().map_or(0, |e| e.seq);
    Ok((first.last_seq + 1 - first_seq.max(1), first.last_seq))
}

/// Leases in the store (active and ended), counted page by page.
async fn lease_count(c: &mut Clients) -> Result<usize> {
    let mut n = 0;
    let mut page_token = String::new();
    loop {
        let page = c
            .leases
            .list_leases(pb::ListLeasesRequest {
                include_ended: true,
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        n += page.leases.len();
        if page.next_page_token.is_empty() {
            return Ok(n);
        }
        page_token = page.next_page_token;
    }
}

async fn soak(o: Arc<Opts>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, inventory_toml(o.hosts))?;
    let data = dir.path().join("data");
    let retention = format!("{}s", o.retention.as_secs().max(1));
    let server = ServerProcess::spawn(
        &[
            "--dev-insecure-no-auth",
            "--listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--inventory",
            &inv.to_string_lossy(),
            "--data-dir",
            &data.to_string_lossy(),
            "--retention",
            &retention,
        ],
        &dir.path().join("server.log"),
    )?;
    let pid = server.child.id();
    let store = data.join("lab.redb");
    let mut holder = Clients::connect(server.addr, Some("holder")).await?;
    holder
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h00".into()],
            ttl: Some(prost_types::Duration {
                seconds: 24 * 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("hold h00: {s}"))?;
    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let until = start + o.duration;
    let mut tasks = Vec::new();
    for i in 0..o.clients {
        let c = Clients::connect(server.addr, Some(&format!("soak{i}"))).await?;
        tasks.push(tokio::spawn(client(i, c, o.clone(), counts.clone(), until)));
    }
    println!(
        "soak: {} clients, pause {:?}, retention {retention}, {} min; server pid {pid}",
        o.clients,
        o.pause,
        o.duration.as_secs() / 60
    );
    println!(
        "{:>6} {:>9} {:>8} {:>8} {:>9} {:>8} {:>10} {:>9}",
        "min", "cycles", "refused", "errors", "events", "leases", "store_KiB", "rss_KiB"
    );
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut next = start;
    loop {
        next += o.interval;
        let last = next >= until;
        tokio::time::sleep_until(next.min(until).into()).await;
        let (events, _) = log_size(&mut holder).await?;
        let leases = lease_count(&mut holder).await?;
        let size = std::fs::metadata(&store).map_or(0, |m| m.len()) / 1024;
        let rss = rss_kib(pid).unwrap_or(0);
        samples.push((size, rss));
        println!(
            "{:>6.1} {:>9} {:>8} {:>8} {:>9} {:>8} {:>10} {:>9}",
            start.elapsed().as_secs_f64() / 60.0,
            counts.cycles.load(Ordering::Relaxed),
            counts.refused.load(Ordering::Relaxed),
            counts.errors.load(Ordering::Relaxed),
            events,
            leases,
            size,
            rss
        );
        if last {
            break;
        }
    }
    for t in tasks {
        t.await?;
    }
    // Flat: the last third of the run against the middle third (the first
    // fills the retention window): the mean grows by less than 5 %, and
    // the largest value of the last third is within 10 % of the middle
    // third's.
    let third = samples.len() / 3;
    if third == 0 {
        println!("too short to judge (fewer than 3 samples)");
    } else {
        let (middle, last) = (&samples[third..2 * third], &samples[2 * third..]);
        let mean = |v: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| {
            v.iter().map(f).sum::<u64>() as f64 / v.len() as f64
        };
        let max = |v: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| v.iter().map(f).max().unwrap_or(0);
        let judge = |f: fn(&(u64, u64)) -> u64| {
            let growth = mean(last, f) / mean(middle, f) - 1.0;
            let peak = max(last, f) as f64 / max(middle, f) as f64 - 1.0;
            let flat = growth < 0.05 && peak < 0.10;
            format!(
                "mean {:+.1} %, max {:+.1} % ({})",
                growth * 100.0,
                peak * 100.0,
                if flat { "flat" } else { "GROWING" }
            )
        };
        println!(
            "last third against the middle third: store {}; server RSS {}",
            judge(|s| s.0),
            judge(|s| s.1)
        );
    }
    drop(server);
    Ok(())
}

fn main() -> Result<()> {
    let o = Arc::new(parse()?);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(soak(o))
}
