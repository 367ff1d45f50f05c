//! `waiter-flood`: one principal opens thousands of waiting Acquire
//! streams (issue 12, item 10); prints lab-server's resident memory before,
//! during and after, and `GetHost` latency while they are open.
//!
//! ```text
//! cargo build --workspace
//! cargo run -p lab-tests --bin waiter-flood -- [--waiters 10000] [--connections 100]
//! # the same flood without the per-principal cap, for comparison:
//! cargo run -p lab-tests --bin waiter-flood -- --server-arg=--max-waiting-per-principal=100000
//! ```
//!
//! The server is the `lab-server` binary next to this one, as a child
//! process with two hosts, both held, so every request waits (or is
//! refused).

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lab_proto::v1 as pb;
use lab_tests::agent::rss_kib;
use lab_tests::{Clients, ServerProcess, inventory_toml, percentile};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: waiter-flood [--waiters N] [--connections N] [--server-arg=ARG]...
  --waiters N        Acquire streams to open, all as principal mallory [10000]
  --connections N    spread over this many connections (at most 128 streams each) [100]
  --server-arg=ARG   one more argument for lab-server (repeatable)";

async fn get_host_latency(c: &mut Clients) -> Result<(Duration, Duration)> {
    let mut v = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        c.hosts
            .get_host(pb::GetHostRequest { name: "h00".into() })
            .await?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok((percentile(&v, 0.5), percentile(&v, 0.99)))
}

async fn flood(waiters: usize, connections: usize, extra: Vec<String>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, inventory_toml(2))?;
    let data = dir.path().join("data");
    let mut args: Vec<String> = [
        "--dev-insecure-no-auth",
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        "127.0.0.1:0",
        "--inventory",
        &inv.to_string_lossy(),
        "--data-dir",
        &data.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::spawn(&argv, &dir.path().join("server.log"))?;
    let pid = server.child.id();
    let mut probe = Clients::connect(server.addr, Some("probe")).await?;
    probe
        .grant_now(pb::LeaseRequest {
            count: 2,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("hold the hosts: {s}"))?;
    let (idle_p50, idle_p99) = get_host_latency(&mut probe).await?;
    let before = rss_kib(pid).unwrap_or(0);

    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(Clients::connect(server.addr, Some("mallory")).await?);
    }
    let t = Instant::now();
    let results: Vec<Result<tonic::Streaming<pb::AcquireUpdate>, tonic::Status>> =
        futures::stream::iter(0..waiters)
            .map(|i| {
                let mut leases = conns[i % connections].leases.clone();
                async move {
                    let mut s = leases
                        .acquire(pb::AcquireRequest {
                            request: Some(pb::LeaseRequest {
                                comment: "x".repeat(1024),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    s.message().await?;
                    Ok(s)
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
    let opened = t.elapsed();
    let mut streams = Vec::new();
    let mut refused = 0;
    let mut other = 0;
    for r in results {
        match r {
            Ok(s) => streams.push(s),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
            Err(s) => {
                if other == 0 {
                    eprintln!("unexpected: {s}");
                }
                other += 1;
            }
        }
    }
    // Let the server settle, then measure with the streams open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = rss_kib(pid).unwrap_or(0);
    let (busy_p50, busy_p99) = get_host_latency(&mut probe).await?;
    let waiting = streams.len();
    drop(streams);
    drop(conns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!(
        "server args: {}",
        if extra.is_empty() {
            "(defaults)".to_owned()
        } else {
            extra.join(" ")
        }
    );
    println!(
        "{waiters} Acquire requests by one principal over {connections} connections in {:.1} s: {waiting} waiting, {refused} RESOURCE_EXHAUSTED, {other} other errors",
        opened.as_secs_f64()
    );
    println!(
        "server RSS: {before} KiB before, {during} KiB with them open (+{} KiB), {after} KiB after they closed",
        during.saturating_sub(before)
    );
    println!(
        "GetHost: p50 {} p99 {} before, p50 {} p99 {} with them open",
        ms(idle_p50),
        ms(idle_p99),
        ms(busy_p50),
        ms(busy_p99)
    );
    Ok(())
}

fn main() -> Result<()> {
    let mut waiters = 10_000;
    let mut connections = 100;
    let mut extra = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if let Some(v) = a.strip_prefix("--server-arg=") {
            extra.push(v.to_owned());
            continue;
        }
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--waiters" => waiters = value()?.parse()?,
            "--connections" => connections = value()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if connections == 0 || waiters == 0 {
        bail!("--waiters and --connections must be positive");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(flood(waiters, connections, extra))
}
