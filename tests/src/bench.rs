//! What the lease benchmarks share (`lease-bench`, `etcd-bench`): a real
//! lab-server on the store a row measures — redb in a temporary directory,
//! or a 3-member etcd under a fresh key prefix — waited for until it
//! answers (on etcd: until it leads), and the acquire+release round trip.

use crate::etcd::EtcdCluster;
use crate::{Clients, ServerProcess, inventory_toml};
use anyhow::{Context, Result, bail, ensure};
use lab_proto::convert::duration_to_proto;
use lab_proto::v1::acquire_update::Update;
use lab_proto::v1::{
    AcquireRequest, Lease, LeaseRequest, LeaseState, ListHostsRequest, ReleaseRequest,
};
use std::path::Path;
use std::time::{Duration, Instant};

/// The store of a benchmark's lab-server.
#[derive(Clone, Copy)]
pub enum BenchStore<'a> {
    /// `--data-dir` in the row's directory.
    Redb,
    /// `--store etcd` on `cluster`, under `prefix` (one per row: `/bench-N/`).
    Etcd {
        cluster: &'a EtcdCluster,
        prefix: &'a str,
    },
}

impl BenchStore<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            BenchStore::Redb => "redb",
            BenchStore::Etcd { .. } => "etcd",
        }
    }
}

/// A `lab-server` child (the binary beside this one) in development mode
/// with `inventory_toml(hosts)` in `dir`, on `store`, once it answers.
pub async fn spawn_server(
    dir: &Path,
    hosts: usize,
    store: BenchStore<'_>,
) -> Result<ServerProcess> {
    let extra: Vec<String> = match store {
        BenchStore::Redb => Vec::new(),
        BenchStore::Etcd { cluster, prefix } => vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            cluster.endpoints(),
            "--etcd-prefix".into(),
            prefix.into(),
        ],
    };
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let p = tokio::task::block_in_place(|| {
        ServerProcess::spawn_dev_with(dir, &inventory_toml(hosts), &extra, "lab-server.log")
    })?;
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
            "lab-server did not answer within 30 s: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Acquire{count:1, ttl}`.
pub fn acquire_request(ttl: Duration) -> AcquireRequest {
    AcquireRequest {
        request: Some(LeaseRequest {
            count: 1,
            ttl: Some(duration_to_proto(ttl)),
            ..LeaseRequest::default()
        }),
        ..Default::default()
    }
}

/// An Acquire stream read until the grant: the lease and how many queue
/// status updates came before it.
pub async fn acquire(c: &mut Clients, ttl: Duration) -> Result<(Lease, usize)> {
    let mut stream = c
        .leases
        .acquire(acquire_request(ttl))
        .await
        .context("Acquire")?
        .into_inner();
    let mut queued = 0;
    while let Some(u) = stream.message().await.context("Acquire stream")? {
        match u.update {
            Some(Update::Granted(lease)) => {
                ensure!(
                    lease.hosts.len() == 1,
                    "granted {} hosts, asked for 1",
                    lease.hosts.len()
                );
                ensure!(
                    lease.state == LeaseState::Active as i32,
                    "granted lease is not active"
                );
                return Ok((lease, queued));
            }
            Some(Update::Queued(_)) => queued += 1,
            None => bail!("an empty AcquireUpdate"),
        }
    }
    bail!("the Acquire stream ended without a grant")
}

/// One round trip: its latencies and the queue status updates received.
pub struct Trip {
    /// Acquire sent → lease received (the wait in the queue included).
    pub grant: Duration,
    /// The Release call.
    pub release: Duration,
    pub whole: Duration,
    pub queued: usize,
}

/// Acquire one host (`ttl`), then release it.
pub async fn round_trip(c: &mut Clients, ttl: Duration) -> Result<Trip> {
    let t0 = Instant::now();
    let (lease, queued) = acquire(c, ttl).await?;
    let grant = t0.elapsed();
    let t1 = Instant::now();
    c.leases
        .release(ReleaseRequest { lease_id: lease.id })
        .await
        .context("Release")?;
    Ok(Trip {
        grant,
        release: t1.elapsed(),
        whole: t0.elapsed(),
        queued,
    })
}
