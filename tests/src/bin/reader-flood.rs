//! `reader-flood`: many concurrent filtered `ListEvents` calls against a
//! long event log (issue 12, item 12: a filtered query scanned the whole log
//! on the blocking pool, 1.4 s over 46,000 events, and 32 at once pushed a
//! `Renew` from 7 to 242 ms). Prints `Renew` latency without and with the
//! readers, and the readers' own latency.
//!
//! ```text
//! cargo build --workspace
//! cargo run -p lab-tests --bin reader-flood -- [--events 46000] [--readers 32]
//! ```
//!
//! The server is the `lab-server` binary next to this one, as a child
//! process; the log is built with acquire/release cycles on 15 hosts, and
//! the readers ask for the events of a 16th host, which has few.

use anyhow::{Context, Result, bail};
use lab_proto::v1 as pb;
use lab_tests::{Clients, ServerProcess, inventory_toml, percentile};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

async fn renew_latency(c: &mut Clients, lease: &str, n: usize) -> Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.leases
            .renew(pb::RenewRequest {
                lease_id: lease.to_owned(),
                ttl: None,
            })
            .await?;
        v.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    v.sort();
    Ok(v)
}

async fn run(events: u64, readers: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::spawn_dev(dir.path(), &inventory_toml(16))?;
    let mut c = Clients::connect(server.addr, Some("probe")).await?;
    // A few events about h15, then many about the other hosts.
    for _ in 0..3 {
        let l = c
            .grant_now(pb::LeaseRequest {
                hosts: vec!["h15".into()],
                ..Default::default()
            })
            .await?;
        c.leases
            .release(pb::ReleaseRequest { lease_id: l.id })
            .await?;
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..14 {
        let mut w = Clients::connect(server.addr, Some(&format!("w{i}"))).await?;
        let per = events / 5 / 14 + 1;
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let l = w
                    .grant_now(pb::LeaseRequest {
                        hosts: vec![format!("h{i:02}")],
                        ..Default::default()
                    })
                    .await?;
                w.leases
                    .release(pb::ReleaseRequest { lease_id: l.id })
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let last = c
        .events
        .list_events(pb::ListEventsRequest {
            limit: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .last_seq;
    println!(
        "log: {last} events (built in {:.0} s)",
        t.elapsed().as_secs_f64()
    );
    let held = c
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h14".into()],
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await?;
    let idle = renew_latency(&mut c, &held.id, 100).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..readers {
        let mut r = Clients::connect(server.addr, Some(&format!("r{i}"))).await?;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                r.events
                    .list_events(pb::ListEventsRequest {
                        host: "h15".into(),
                        ..Default::default()
                    })
                    .await?;
                v.push(t.elapsed());
            }
            anyhow::Ok(v)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = renew_latency(&mut c, &held.id, 100).await?;
    stop.store(true, Ordering::Relaxed);
    let mut reads = Vec::new();
    for t in tasks {
        reads.extend(t.await??);
    }
    reads.sort();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!(
        "Renew: p50 {} p99 {} alone; p50 {} p99 {} with {readers} readers",
        ms(percentile(&idle, 0.5)),
        ms(percentile(&idle, 0.99)),
        ms(percentile(&busy, 0.5)),
        ms(percentile(&busy, 0.99)),
    );
    println!(
        "ListEvents(host) by the readers: {} calls, p50 {} p99 {}",
        reads.len(),
        ms(percentile(&reads, 0.5)),
        ms(percentile(&reads, 0.99)),
    );
    Ok(())
}

fn main() -> Result<()> {
    let mut events = 46_000;
    let mut readers = 32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--events" => events = value()?.parse()?,
            "--readers" => readers = value()?.parse()?,
            "-h" | "--help" => {
                println!("usage: reader-flood [--events 46000] [--readers 32]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(events, readers))
}
